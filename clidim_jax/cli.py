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
  clidim-jax train --config configs/reference.py:variant=cl --config.train.batch_size=8 --workdir runs/x
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
        candidate = packaged_config(os.path.basename(path if path.endswith(".py") else path + ".py"))
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


def parse_flags(command: str, argv: list[str]) -> flags.FlagValues:
    argv = [f"clidim-jax {command}"] + _rewrite_config_arg(argv)
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Run directory.", flag_values=fv)
    if command == "train":
        config_flags.DEFINE_config_file(
            "config", default=packaged_config("demo.py"), flag_values=fv, lock_config=True, sys_argv=argv
        )
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise UsageError(str(e)) from None
    except AttributeError as e:  # ml_collections: a typo in a --config.FIELD override
        msg = str(e.args[0]) if e.args else str(e)
        raise UsageError(f"unknown config field in an override: {msg}") from None
    except (ValueError, KeyError) as e:
        raise UsageError(f"bad config: {e}") from None
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
