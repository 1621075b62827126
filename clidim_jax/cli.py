"""The `clidim-jax` command line: train, evaluate, denoise, export, download, benchmark."""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from absl import flags
from ml_collections import config_flags

USAGE = """usage: clidim-jax <command> [flags]

commands:
  train     --workdir DIR [--config PATH[:ARGS]] [--config.KEY=VALUE ...]
            train a model (default config: the bundled demo), then evaluate it
  evaluate  --workdir DIR [--split test|train] [--metrics standard|reference|both] [--tile N]
            re-evaluate the trained model of a workdir on its dataset: eval.json, eval.csv,
            eval.md, eval.png (reference: the authors' code's metrics, side by side with both)
  denoise   INPUT OUTPUT (--workdir DIR | --model FILE | --model c0=FILE,c1=FILE...)
            [--channel N] [--tile N] [--overlap N] [--dtype float32|input] [--overwrite]
            [--recursive]
            denoise a 2-D image or every plane of a stack (uint8, uint16 or float32): a TIFF
            or an OME-Zarr image (NGFF 0.4 / 0.5) in; a TIFF out, or an OME-Zarr image when
            OUTPUT ends in .zarr. Images of any size stream a row of tiles at a time.
            Channels (a C axis): every channel with the one model, one model per channel
            (--model c0=A,c1=B), or --channel N to denoise channel N only (the output then
            has no C axis); the other axes, the pixel size and ImageJ metadata are kept.
            INPUT a folder: every TIFF / OME-Zarr in it into the folder OUTPUT, same names
            (--recursive: sub-folders too, mirrored); existing outputs are skipped unless
            --overwrite; a file that fails is reported at the end and the others go on.
            --model takes a file from `export` or a zoo package (.zip, run with onnxruntime)
  export    --workdir DIR OUT [--format clidim|bmz] [--platforms cpu,cuda] [--overwrite]
            write the trained generator as a portable model file (jax.export), for
            `denoise --model OUT` without the config or checkpoint; --format bmz: a
            BioImage Model Zoo package (OUT.zip: ONNX weights, for Fiji / deepImageJ, napari,
            bioimageio.core)
  download  NAME [--root DIR] [--base_url URL]
            fetch a benchmark dataset of the paper (convallaria, actin, skull) from Zenodo:
            progress, resume, sha256 check, extraction; prints the stack's path
  benchmark --config PATH[:ARGS] [--config.KEY=VALUE ...] --steps N [--json OUT]
            [--mode train|denoise]
            compile the train step (or whole-image inference) ahead of time and report compile
            time, step time, images/s, XLA FLOPs, achieved FLOP/s vs a measured matmul peak,
            memory and parameters

exit status: 0 done; 1 training diverged, a checkpoint could not be written or read, a
  download failed, or files of a denoised folder failed; 2 a usage, config or data error, or a
  workdir in use by another process; 130 interrupted (a stopped `train` saves a checkpoint
  first and exits 0)

examples:
  clidim-jax train --workdir runs/demo
  clidim-jax train --config reference:variant=cl --config.train.batch_size=8 --workdir runs/x
  clidim-jax denoise cells.tif cells_denoised.tif --workdir runs/demo
  clidim-jax denoise cells.ome.zarr cells_denoised.ome.zarr --model demo.clidim --channel 1
  clidim-jax denoise raw/ denoised/ --recursive --model c0=dapi.clidim,c1=gfp.clidim
  clidim-jax download convallaria --root data
  clidim-jax train --config reference:dataset=convallaria,n_samples=16 --config.data.root=data \
      --workdir runs/conv16
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


def _refuse_if_busy(workdir: str | None, command: str) -> None:
    """A run another process is writing: refused here, before JAX is loaded (these commands run
    as one process). The command checks again where it reads or locks the run."""
    if workdir:
        from clidim_jax.workdir_lock import check_not_busy

        check_not_busy(workdir, command, primary=True)


def start_runtime(fv: flags.FlagValues) -> None:
    """Device count and distributed runtime: must happen before JAX touches a backend."""
    import jax

    if fv.local_cpu_devices:
        jax.config.update("jax_num_cpu_devices", fv.local_cpu_devices)
    from clidim_jax.sharding import initialize_distributed

    initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)


# Positional arguments of each command.
POSITIONAL = {"denoise": ("INPUT", "OUTPUT"), "export": ("OUT",), "download": ("NAME",)}


def _define_command_flags(command: str, fv: flags.FlagValues) -> None:
    if command in ("train", "benchmark"):
        flags.DEFINE_string(
            "coordinator_address",
            None,
            "host:port of process 0 (multi-process runs).",
            flag_values=fv,
        )
        flags.DEFINE_integer("num_processes", None, "Number of processes.", 1, flag_values=fv)
        flags.DEFINE_integer("process_id", None, "This process's index.", 0, flag_values=fv)
        flags.DEFINE_integer(
            "local_cpu_devices",
            None,
            "Split the CPU into this many JAX devices.",
            1,
            flag_values=fv,
        )
    if command == "benchmark":
        flags.DEFINE_integer("steps", 5, "Timed steps after warm-up.", 1, flag_values=fv)
        flags.DEFINE_string("json", None, "Write the figures to this JSON file.", flag_values=fv)
        flags.DEFINE_enum("mode", "train", ["train", "denoise"], "What to time.", flag_values=fv)
    if command == "evaluate":
        from clidim_jax.evaluate import METRIC_CHOICES, SPLITS

        flags.DEFINE_enum("split", "test", list(SPLITS), "Split to evaluate.", flag_values=fv)
        flags.DEFINE_enum(
            "metrics",
            "standard",
            list(METRIC_CHOICES),
            "standard: comparable metrics; reference: the authors' code's; both: side by side.",
            flag_values=fv,
        )
    if command in ("evaluate", "denoise"):
        flags.DEFINE_integer(
            "tile", None, "Tile size for large images (default: the run's).", 1, flag_values=fv
        )
        flags.DEFINE_boolean(
            "tta",
            None,
            "Test-time augmentation: average the predictions of the 8 flips and quarter turns "
            "(8x the compute; default: the run's eval.tta). --notta turns it off.",
            flag_values=fv,
        )
    if command == "denoise":
        flags.DEFINE_string(
            "model",
            None,
            "Model file written by `export` (either format), or one per channel: "
            "c0=FILE,c1=FILE,...",
            flag_values=fv,
        )
        flags.DEFINE_integer(
            "channel",
            None,
            "Denoise this channel only (0-based index along the C axis); default: every channel.",
            0,
            flag_values=fv,
        )
        flags.DEFINE_boolean(
            "recursive", False, "INPUT a folder: its sub-folders too.", flag_values=fv
        )
        flags.DEFINE_integer("overlap", None, "Least tile overlap in pixels.", 1, flag_values=fv)
        flags.DEFINE_integer("batch_size", None, "Tiles per call.", 1, flag_values=fv)
        flags.DEFINE_enum(
            "dtype",
            "float32",
            ["float32", "input"],
            "Output pixel type: float32, or the input's (rounded and clipped).",
            flag_values=fv,
        )
        flags.DEFINE_boolean("progress", True, "Report progress on stderr.", flag_values=fv)
    if command in ("denoise", "export"):
        flags.DEFINE_boolean("overwrite", False, "Replace an existing output.", flag_values=fv)
    if command == "download":
        flags.DEFINE_string(
            "root",
            None,
            "Dataset folder (default: $CLIDIM_JAX_DATA or ~/.cache/clidim_jax/datasets).",
            flag_values=fv,
        )
        flags.DEFINE_string(
            "base_url",
            None,
            "Fetch the archive from this URL prefix instead of Zenodo.",
            flag_values=fv,
        )
        flags.DEFINE_boolean("progress", True, "Show a progress bar on stderr.", flag_values=fv)
    if command == "export":
        flags.DEFINE_list(
            "platforms", [], "Platforms to export for (default: this machine's).", flag_values=fv
        )
        flags.DEFINE_enum(
            "format",
            "clidim",
            ["clidim", "bmz"],
            "clidim: clidim-jax's model file (jax.export); bmz: a BioImage Model Zoo package "
            "(format 0.5, ONNX weights).",
            flag_values=fv,
        )


def parse_flags(command: str, argv: list[str]) -> flags.FlagValues:
    return parse_args(command, argv)[0]


def parse_args(command: str, argv: list[str]) -> tuple[flags.FlagValues, list[str]]:
    """The command's flags and its positional arguments (POSITIONAL)."""
    argv = [f"clidim-jax {command}", *_rewrite_config_arg(argv)]
    fv = flags.FlagValues()
    try:
        flags.DEFINE_string("workdir", None, "Run directory.", flag_values=fv)
        if command in ("train", "benchmark"):
            config_flags.DEFINE_config_file(
                "config",
                default=packaged_config("demo.py"),
                flag_values=fv,
                lock_config=True,
                sys_argv=argv,
            )
        _define_command_flags(command, fv)
        rest = fv(argv)
    except flags.Error as e:
        msg = str(e)
        if "Traceback" in msg:  # an error raised by the config file itself: keep its message
            lines = [ln for ln in msg.splitlines() if ln.strip()]
            msg = f"{lines[0].split(':')[0]}: {lines[-1]}"
        raise UsageError(msg) from None
    except AttributeError as e:  # ml_collections: a typo in a --config.FIELD override
        raise UsageError(_unknown_override(argv, str(e.args[0]) if e.args else str(e))) from None
    names = POSITIONAL.get(command, ())
    if len(rest) - 1 > len(names):
        raise UsageError(f"unexpected arguments: {' '.join(rest[1 + len(names) :])}")
    if len(rest) - 1 < len(names):
        raise UsageError(f"missing {' '.join(names[len(rest) - 1 :])} (usage: see clidim-jax -h)")
    if command == "denoise":
        if bool(fv.workdir) == bool(fv.model):
            raise UsageError("give the model as exactly one of --workdir DIR or --model FILE")
    elif command not in ("benchmark", "download") and not fv.workdir:
        raise UsageError("--workdir is required")
    return fv, rest[1:]


def parse_model_spec(value: str) -> str | dict[int, str]:
    """`--model FILE`, or one model per channel: `c0=FILE,c1=FILE` -> {0: FILE, 1: FILE}."""
    items = [v.strip() for v in value.split(",")]
    if not any(re.match(r"^c\d+=", v) for v in items):
        return value
    out: dict[int, str] = {}
    for v in items:
        m = re.fullmatch(r"c(\d+)=(.+)", v)
        if not m:
            raise UsageError(
                f"--model={value}: {v!r} is not cN=FILE (one model per channel: c0=A,c1=B)"
            )
        c = int(m.group(1))
        if c in out:
            raise UsageError(f"--model={value}: two models for channel {c}")
        out[c] = m.group(2)
    return out


def _load_denoiser(fv: flags.FlagValues, model: str | None):
    """The Denoiser of a model file (either format) or, with `model` None, of --workdir."""
    from clidim_jax.inference import TilingError

    opts = dict(tile=fv.tile, overlap=fv.overlap, batch_size=fv.batch_size, tta=fv.tta)
    try:
        if model:
            from clidim_jax import bmz

            if bmz.is_package(model):  # a zoo package: ONNX Runtime, no JAX
                return bmz.denoiser_from_package(model, **opts)
            from clidim_jax.export import denoiser_from_model

            return denoiser_from_model(model, **opts)
        from clidim_jax.run import denoiser_from_run

        return denoiser_from_run(fv.workdir, **opts)
    except TilingError as e:
        raise UsageError(str(e)) from None


def run_denoise(fv: flags.FlagValues, input_path: str, output_path: str) -> int:
    """Checks the files first (fast errors), then loads the model(s) and denoises a file or a
    folder. Returns the exit status (1 when files of a folder failed)."""
    from clidim_jax.data.images import is_zarr, open_image
    from clidim_jax.data.tiff import DataError
    from clidim_jax.denoise import (
        check_channel,
        check_output,
        denoise_file,
        denoise_folder,
        find_images,
    )

    spec = parse_model_spec(fv.model) if fv.model else None
    folder = os.path.isdir(input_path) and not is_zarr(input_path)
    if folder:
        if os.path.exists(output_path) and not os.path.isdir(output_path):
            raise DataError(f"{output_path}: exists and is not a folder (INPUT is a folder)")
        n = len(find_images(input_path, fv.recursive, exclude=output_path))
        print(f"{input_path}: {n} image(s) to denoise", file=sys.stderr)
    else:
        if fv.recursive:
            raise UsageError("--recursive applies when INPUT is a folder")
        check_output(output_path, fv.overwrite, input_path)
        with open_image(input_path) as src:
            check_channel(src, fv.channel)
            print(
                f"{input_path}: {src.n_planes} plane(s) of {src.plane_shape[0]}x"
                f"{src.plane_shape[1]} {src.dtype} (axes {src.axes})",
                file=sys.stderr,
            )
    if isinstance(spec, dict):
        if fv.channel is not None and fv.channel not in spec:
            raise UsageError(f"--channel {fv.channel} has no model in --model={fv.model}")
        cache: dict[str, Any] = {}
        model: Any = {}
        for c, path in spec.items():
            if fv.channel is None or c == fv.channel:
                if path not in cache:
                    cache[path] = _load_denoiser(fv, path)
                model[c] = cache[path]
    else:
        model = _load_denoiser(fv, spec)
    opts = dict(channel=fv.channel, dtype=fv.dtype, overwrite=fv.overwrite, progress=fv.progress)
    if folder:
        r = denoise_folder(input_path, output_path, model, recursive=fv.recursive, **opts)
        print(
            f"{output_path}: {len(r['denoised'])} denoised, {len(r['skipped'])} skipped "
            f"(output exists; --overwrite replaces it), {len(r['failed'])} failed"
        )
        for _rel, msg in r["failed"]:
            print(f"clidim-jax denoise: failed: {msg}", file=sys.stderr)
        return 1 if r["failed"] else 0
    summary = denoise_file(input_path, output_path, model, **opts)
    print(f"wrote {output_path}: shape {tuple(summary['shape'])}, {summary['dtype']}")
    return 0


@contextlib.contextmanager
def _background_errors_to_file(path: str) -> Iterator[None]:
    """Orbax's background save threads report a failed save (a full disk) with pages of
    tracebacks from several threads before the main thread gets the error; `train` reports it
    in one line (CheckpointError) and keeps those details in `path`, opened on first use. The
    hooks and handlers are put back when training returns."""
    import logging
    import threading

    class DetailsHandler(logging.FileHandler):
        def handleError(self, record) -> None:  # best effort: the disk may be what failed
            pass

    handler = DetailsHandler(path, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.ERROR)
    log = logging.getLogger("asyncio")
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio")]
    saved = [(lg, lg.propagate) for lg in loggers]
    warnings = _below_error_to_stderr()
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    loggers[0].addHandler(warnings)  # absl's warnings still reach the terminal
    hooks = (threading.excepthook, sys.excepthook, sys.unraisablehook)

    def thread_hook(args) -> None:
        if args.exc_type is not SystemExit:
            name = args.thread.name if args.thread else "?"
            log.error("in thread %s", name, exc_info=(args.exc_type, args.exc_value,
                                                       args.exc_traceback))  # fmt: skip

    def excepthook(exc_type, exc, tb) -> None:  # (also called by C code of other threads)
        if threading.current_thread() is threading.main_thread():
            hooks[1](exc_type, exc, tb)
        else:
            log.error("in a callback", exc_info=(exc_type, exc, tb))

    def unraisable(u) -> None:  # e.g. a save callback run after its event loop closed
        log.error("%s", u.err_msg or "unraisable", exc_info=(u.exc_type, u.exc_value,
                                                             u.exc_traceback))  # fmt: skip

    threading.excepthook, sys.excepthook, sys.unraisablehook = thread_hook, excepthook, unraisable
    yield  # (after an error they stay: Orbax's threads still report it as the process exits)
    threading.excepthook, sys.excepthook, sys.unraisablehook = hooks
    for lg, propagate in saved:
        lg.removeHandler(handler)
        lg.propagate = propagate
    loggers[0].removeHandler(warnings)
    handler.close()


def _below_error_to_stderr():
    import logging

    h = logging.StreamHandler(sys.stderr)
    h.addFilter(lambda r: r.levelno < logging.ERROR)
    h.setLevel(logging.WARNING)
    return h


def entry() -> int:
    """The `clidim-jax` program: `main` after re-executing with huge pages for malloc where
    that helps (see `clidim_jax.malloc_env`; `CLIDIM_JAX_DEFAULT_MALLOC=1` turns it off)."""
    from clidim_jax.malloc_env import reexec_with_hugepages

    reexec_with_hugepages()
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    details = None  # a file that holds the details of a failure, if any
    from clidim_jax.config_lib import ConfigError
    from clidim_jax.data.tiff import DataError

    try:
        if command == "train":
            fv = parse_flags(command, rest)
            start_runtime(fv)
            details = os.path.join(fv.workdir, "errors.log")
            from clidim_jax.train import train_and_evaluate

            with _background_errors_to_file(details):
                train_and_evaluate(fv.config, fv.workdir)
        elif command == "benchmark":
            fv = parse_flags(command, rest)
            start_runtime(fv)
            from clidim_jax.benchmark import format_benchmark, run_benchmark

            result = run_benchmark(fv.config, steps=fv.steps, mode=fv.mode, json_path=fv.json)
            print(format_benchmark(result))
        elif command == "evaluate":
            fv = parse_flags(command, rest)
            _refuse_if_busy(fv.workdir, command)
            from clidim_jax.evaluate import evaluate_run
            from clidim_jax.inference import TilingError

            try:
                evaluate_run(
                    fv.workdir, split=fv.split, metrics_mode=fv.metrics, tile=fv.tile, tta=fv.tta
                )
            except TilingError as e:
                raise UsageError(str(e)) from None
        elif command == "denoise":
            fv, (input_path, output_path) = parse_args(command, rest)
            if run_denoise(fv, input_path, output_path):
                return 1
        elif command == "download":
            fv, (name,) = parse_args(command, rest)
            from clidim_jax.data import download

            path = download.fetch(name, fv.root, base_url=fv.base_url, progress=fv.progress)
            print(path)
        elif command == "export":
            fv, (out,) = parse_args(command, rest)
            _refuse_if_busy(fv.workdir, command)
            if fv.format == "bmz":
                if fv.platforms:
                    raise UsageError("--platforms applies to --format clidim only")
                from clidim_jax.bmz import export_bmz

                s = export_bmz(fv.workdir, out, overwrite=fv.overwrite)
                print(
                    f"wrote {out}: BioImage Model Zoo package, generator of depth {s['depth']}, "
                    f"step {s['step']}, {s['bytes'] / 1e6:.1f} MB; ONNX vs clidim-jax on the "
                    f"test image: {s['onnx_max_error_of_range']:.2g} of the intensity range"
                )
            else:
                from clidim_jax.export import export_run

                meta = export_run(
                    fv.workdir, out, overwrite=fv.overwrite, platforms=fv.platforms or None
                )
                print(
                    f"wrote {out}: generator of depth {meta['depth']}, step {meta['run']['step']}"
                )
        else:
            raise UsageError(f"unknown command {command!r}\n\n{USAGE}")
    except (UsageError, ConfigError, DataError, FileNotFoundError) as e:
        print(f"clidim-jax {command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a diverged run (train.py names the step and the terms)
        print(f"clidim-jax {command}: training diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training
        print(f"clidim-jax {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Errors of modules that may not be imported yet (the CLI imports lazily).
        ckpt = sys.modules.get("clidim_jax.checkpointing")
        if ckpt is not None and isinstance(e, ckpt.CheckpointError):
            more = f" (details: {details})" if details and os.path.exists(details) else ""
            print(f"clidim-jax {command}: checkpoint error: {e}{more}", file=sys.stderr)
            return 1
        dl = sys.modules.get("clidim_jax.data.download")
        if dl is not None and isinstance(e, dl.DownloadError):
            print(f"clidim-jax {command}: error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
