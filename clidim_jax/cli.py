"""The `clidim-jax` command line: train, evaluate (more subcommands grow here)."""

from __future__ import annotations

import importlib.resources
import os
import sys

from absl import flags
from ml_collections import config_flags

USAGE = """usage: clidim-jax <command> [flags]

commands:
  train     --workdir DIR [--config PATH[:ARGS]] [--config.KEY=VALUE ...]
            train a model (default config: the bundled demo), then evaluate it
  evaluate  --workdir DIR
            re-evaluate the trained model of a workdir on its test split

examples:
  clidim-jax train --workdir runs/demo
  clidim-jax train --config reference:variant=cl --config.train.batch_size=8 --workdir runs/x
"""


class UsageError(ValueError):
    pass


def packaged_config(name: str) -> str:
    """A preset shipped in the package (`configs/` is installed as `clidim_jax.configs`)."""
    try:
        return str(importlib.resources.files("clidim_jax.configs") / name)
    except ModuleNotFoundError:  # running from a source tree that is not installed
        return os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", name)


def resolve_config_path(value: str) -> str:
    """`PATH[:ARGS]`: PATH as given if it exists, else the preset of that name shipped in the
    package (so `configs/reference.py` works from any directory after `pip install`)."""
    path, sep, arg = value.partition(":")
    if not os.path.exists(path):
        candidate = packaged_config(
            os.path.basename(path if path.endswith(".py") else path + ".py")
        )
        if os.path.exists(candidate):
            path = candidate
        else:
            raise UsageError(f"config file {path!r} not found (presets: demo, reference, paper)")
    return path + sep + arg


def _rewrite_config_arg(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + resolve_config_path(a.split("=", 1)[1])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
    return out


def _unknown_override(argv: list[str], message: str) -> str:
    """Names the `--config.FIELD` override whose FIELD does not exist."""
    from clidim_jax.config_lib import base_config

    for a in argv:
        if a.startswith("--config."):
            path = a[len("--config.") :].split("=", 1)[0]
            node = base_config()
            try:
                for part in path.split("."):
                    node = node[part]
            except (KeyError, TypeError):
                hint = message[message.find("Did you mean") :].rstrip("'\"")
                hint = f" ({hint})" if "Did you mean" in message else ""
                return f"unknown config field {path!r} in {a}{hint}"
    return f"unknown config field: {message}"


def parse_flags(command: str, argv: list[str]) -> flags.FlagValues:
    argv = [f"clidim-jax {command}", *_rewrite_config_arg(argv)]
    fv = flags.FlagValues()
    try:
        flags.DEFINE_string("workdir", None, "Run directory.", flag_values=fv)
        if command == "train":
            config_flags.DEFINE_config_file(
                "config",
                default=packaged_config("demo.py"),
                flag_values=fv,
                lock_config=True,
                sys_argv=argv,
            )
        rest = fv(argv)
    except flags.Error as e:
        msg = str(e)
        if "Traceback" in msg:  # an error raised by the config file itself: keep its message
            lines = [ln for ln in msg.splitlines() if ln.strip()]
            msg = f"{lines[0].split(':')[0]}: {lines[-1]}"
        raise UsageError(msg) from None
    except AttributeError as e:  # ml_collections: a typo in a --config.FIELD override
        raise UsageError(_unknown_override(argv, str(e.args[0]) if e.args else str(e))) from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
    if not fv.workdir:
        raise UsageError("--workdir is required")
    return fv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    from clidim_jax.config_lib import ConfigError
    from clidim_jax.data.tiff import DataError

    try:
        if command == "train":
            fv = parse_flags(command, rest)
            from clidim_jax.train import train_and_evaluate

            train_and_evaluate(fv.config, fv.workdir)
        elif command == "evaluate":
            fv = parse_flags(command, rest)
            from clidim_jax.train import evaluate_workdir

            evaluate_workdir(fv.workdir)
        else:
            raise UsageError(f"unknown command {command!r}\n\n{USAGE}")
    except (UsageError, ConfigError, DataError, FileNotFoundError) as e:
        print(f"clidim-jax {command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"clidim-jax {command}: training diverged: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
