"""What the napari widgets run, without napari or Qt: a model loaded from a path, an image
denoised plane by plane with progress and cancellation, layers written as training data with the
config that trains on them, training with a stop request, and a run's curves from metrics.jsonl.

Every problem with what the user chose is a `UserError` of one line (a notification, not a
traceback); a cancelled job raises `Cancelled`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import threading
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# fraction done in [0, 1], and what is being done
Progress = Callable[[float, str], None]

DEFAULT_PRESET = "own_data"  # the preset for your own data (configs/own_data.py)
LOSS_KEY = "g_total"  # the generator's total loss, logged by every variant
PSNR_KEY = "val/psnr"  # validation PSNR, logged at each checkpoint when there is validation data


class UserError(ValueError):
    """A problem with what the user chose, as one line for a notification."""


class Cancelled(Exception):
    """The user cancelled the job."""


@dataclasses.dataclass
class Outcome:
    """How a job ended: its value, or the one-line error, or cancelled."""

    value: Any = None
    error: str | None = None
    cancelled: bool = False


def guarded(job: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
    """Runs `job`, turning a `UserError` or `Cancelled` into an `Outcome` (for a background
    thread whose errors would otherwise reach the user as a traceback). Any other exception is
    a bug and propagates."""
    try:
        return Outcome(value=job(*args, **kwargs))
    except UserError as e:
        return Outcome(error=str(e))
    except Cancelled:
        return Outcome(cancelled=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions clidim-jax raises for bad input (each a clear one-line message)."""
    from clidim_jax.config_lib import ConfigError
    from clidim_jax.data.tiff import DataError
    from clidim_jax.inference import TilingError

    return (ConfigError, DataError, TilingError, FileNotFoundError)


# ----------------------------------------------------------------------------------- models


def model_kind(path: str) -> str:
    """What `path` holds: "run" (a training folder, `--workdir`), "bmz" (a BioImage Model Zoo
    package from `export --format bmz`) or "clidim" (a model file from `export`)."""
    if not path:
        raise UserError(
            "choose a model: a training folder (--workdir), a .clidim file from `clidim-jax "
            "export`, or a zoo package (.zip)"
        )
    if not os.path.exists(path):
        raise UserError(f"{path}: not found")
    if os.path.isdir(path):
        if not os.path.isdir(os.path.join(path, "checkpoints")):
            raise UserError(f"{path}: no checkpoint found (not a training folder, or not trained)")
        return "run"
    from clidim_jax import bmz  # (no JAX)

    if bmz.is_package(path):
        return "bmz"
    if path.endswith(".zip") and not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a zip file (a zoo package is a .zip holding rdf.yaml)")
    return "clidim"


def load_denoiser(
    path: str, *, tile: int | None = None, overlap: int | None = None, tta: bool | None = None
) -> Any:
    """A `clidim_jax.inference.Denoiser` for a training folder, a model file or a zoo package;
    tile, overlap and tta default (None) to the model's own settings."""
    path = os.path.expanduser(path.strip())
    kind = model_kind(path)
    opts = dict(tile=tile or None, overlap=overlap or None, tta=tta)
    try:
        if kind == "run":
            from clidim_jax.run import denoiser_from_run

            return denoiser_from_run(path, **opts)
        if kind == "bmz":
            from clidim_jax.bmz import denoiser_from_package

            return denoiser_from_package(path, **opts)
        from clidim_jax.export import denoiser_from_model

        return denoiser_from_model(path, **opts)
    except _user_errors() as e:
        raise UserError(str(e)) from None


# -------------------------------------------------------------------------------- denoising


def check_image(data: Any, name: str, *, rgb: bool = False) -> tuple[int, ...]:
    """The shape of an image layer's data if it can be denoised (2-D planes, each axis before
    the last two indexing planes), else UserError."""
    if rgb:
        raise UserError(
            f"{name}: an RGB image; split its channels (layer list, right click: Split RGB) "
            "and denoise one"
        )
    shape = tuple(int(s) for s in np.shape(data))
    if len(shape) < 2 or min(shape[-2:]) < 1:
        raise UserError(f"{name}: not an image (shape {shape})")
    dtype = np.dtype(getattr(data, "dtype", np.float32))
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise UserError(f"{name}: pixel type {dtype} cannot be denoised (integers or floats)")
    return shape


def denoise_image(
    denoiser: Any,
    data: Any,
    *,
    name: str = "image",
    rgb: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """`data` (Y, X) or (..., Y, X), numpy or any array that indexes like it (dask, zarr)
    -> float32 of the same shape, each 2-D plane denoised on its own (tiled when larger than the
    model's tile), in the image's own units. `progress` hears the fraction done after each tile;
    `cancel` set stops at the next tile with `Cancelled`."""
    shape = check_image(data, name, rgb=rgb)
    planes = list(np.ndindex(*shape[:-2]))
    out = np.empty(shape, np.float32)
    for i, index in enumerate(planes):
        where = f"plane {i + 1}/{len(planes)}" if len(planes) > 1 else name

        def tiles(done: int, total: int, i: int = i, where: str = where) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled
            if progress is not None:
                progress((i + done / total) / len(planes), f"{where}: tile {done}/{total}")

        if cancel is not None and cancel.is_set():
            raise Cancelled
        out[index] = denoiser.denoise(np.asarray(data[index]), progress=tiles)
    if cancel is not None and cancel.is_set():
        raise Cancelled
    return out


# --------------------------------------------------------------------------------- training


def presets() -> list[str]:
    """The configs shipped in the package (`configs/*.py`), by name."""
    from clidim_jax.cli import packaged_config

    folder = os.path.dirname(packaged_config("demo.py"))
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f[0] != "_")


def preset_config(name: str, arg: str | None = None) -> Any:
    """`get_config(arg)` of a packaged preset (as `--config NAME:ARG` would load it)."""
    from clidim_jax.cli import packaged_config

    if name not in presets():
        raise UserError(f"unknown preset {name!r} (presets: {', '.join(presets())})")
    spec = importlib.util.spec_from_file_location(
        f"clidim_jax_preset_{name}", packaged_config(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.get_config(arg)
    except ValueError as e:
        raise UserError(f"preset {name}:{arg}: {e}") from None


def as_planes(data: Any, name: str) -> np.ndarray:
    """An image layer's data as (N, H, W) planes in a type clidim-jax reads from TIFF (uint8,
    uint16, float32)."""
    shape = check_image(data, name)
    a = np.asarray(data).reshape((-1, *shape[-2:]))
    if a.dtype in (np.uint8, np.uint16, np.float32):
        return a
    if np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 65535:
        return a.astype(np.uint16)
    return a.astype(np.float32)


def _write_tiff(folder: str, role: str, planes: np.ndarray) -> str:
    """Writes `planes` as folder/ROLE-HASH.tif (once: the name is its content's hash, so a
    resumed run finds its own data and a run given other data is refused by the resume check,
    which compares data paths)."""
    import tifffile

    digest = hashlib.sha256()
    digest.update(f"{planes.dtype.str}{planes.shape}".encode())
    digest.update(np.ascontiguousarray(planes).data)
    path = os.path.join(folder, f"{role}-{digest.hexdigest()[:12]}.tif")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        # (minisblack: 3 or 4 planes are not a colour image)
        tifffile.imwrite(tmp, planes, photometric="minisblack", metadata={"axes": "TYX"})
        os.replace(tmp, path)
    return path


def write_training_data(
    workdir: str, noisy: Any, clean: Any = None, *, noisy_name: str = "noisy",
    clean_name: str = "clean",
) -> dict[str, Any]:  # fmt: skip
    """Writes the layers as TIFFs under WORKDIR/napari_data and returns the config fields that
    train on them: `data.source=paired` for noisy and clean images (one clean image for every
    noisy plane, or one per plane), `data.source=stack` for a stack of repeated acquisitions
    whose mean is the ground truth (`clean` None)."""
    folder = os.path.join(workdir, "napari_data")
    n = as_planes(noisy, noisy_name)
    if clean is None:
        if len(n) < 2:
            raise UserError(
                f"{noisy_name}: one plane; a stack of repeated acquisitions of the same field "
                "(its mean is the ground truth) needs at least 2, or choose a clean layer"
            )
        return {
            "data.source": "stack",
            "data.path": _write_tiff(folder, "stack", n),
            "data.axes": "TYX",
        }
    c = as_planes(clean, clean_name)
    if n.shape[1:] != c.shape[1:]:
        raise UserError(
            f"{noisy_name} is {n.shape[1]}x{n.shape[2]}, {clean_name} is "
            f"{c.shape[1]}x{c.shape[2]}: noisy and clean images must be the same size"
        )
    if len(c) not in (1, len(n)):
        raise UserError(
            f"{clean_name}: {len(c)} clean planes for the {len(n)} noisy planes of {noisy_name} "
            "(give 1 clean image, or one per noisy plane)"
        )
    return {
        "data.source": "paired",
        "data.noisy_path": _write_tiff(folder, "noisy", n),
        "data.clean_path": _write_tiff(folder, "clean", c),
        "data.axes": "TYX",
    }


def set_steps(config: Any, steps: int) -> int:
    """Makes the run `steps` long (rounded up to whole epochs of the preset's steps per epoch,
    10 if it has none) keeping the preset's share of constant and decaying learning rate; logs
    at least ~30 loss points and validates at least ~10 times. Returns the run's length."""
    t = config.train
    spe = int(t.steps_per_epoch) or 10
    epochs = max(1, math.ceil(steps / spe))
    total = t.n_epochs + t.n_epochs_decay
    constant = int(epochs * t.n_epochs / total + 0.5) if total else epochs
    t.steps_per_epoch, t.n_epochs, t.n_epochs_decay = spe, constant, epochs - constant
    t.log_every = max(1, min(int(t.log_every), epochs * spe // 30))
    ck = config.checkpoint
    if ck.every_steps > 0:
        ck.every_steps = max(1, min(int(ck.every_steps), epochs * spe // 10))
    return epochs * spe


def training_config(
    preset: str,
    data_fields: Mapping[str, Any],
    *,
    steps: int | None = None,
    arg: str | None = None,
) -> Any:
    """The preset with the data fields of `write_training_data` and, if given, the length."""
    c = preset_config(preset, arg)
    for key, value in data_fields.items():
        section, field = key.split(".")
        c[section][field] = value
    if steps:
        set_steps(c, int(steps))
    from clidim_jax.config_lib import ConfigError, validate

    try:
        validate(c)
    except ConfigError as e:
        raise UserError(str(e)) from None
    return c


def train(
    config: Any,
    workdir: str,
    *,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """`train.train_and_evaluate` in this process (resuming from the workdir's checkpoints),
    stopped (with a checkpoint saved) when `stop` is set; `progress(step, num_steps)` after each
    step. Returns its result: the evaluation, or {"stopped_by", "step"}."""
    if not workdir:
        raise UserError("choose a folder for the run (its checkpoints, metrics and data)")
    workdir = os.path.expanduser(workdir)
    from clidim_jax.train import train_and_evaluate

    try:
        return train_and_evaluate(config, workdir, stop=stop, progress=progress)
    except _user_errors() as e:
        raise UserError(str(e)) from None
    except FloatingPointError as e:
        raise UserError(f"training diverged: {e}") from None


def summary(result: Mapping[str, Any]) -> str:
    """One line for the result of `train`."""
    if result.get("stopped_by"):
        return (
            f"stopped at step {result['step']} (checkpoint saved); train again in the same "
            "folder to resume"
        )
    out = result.get("output", {})
    psnr, ssim = out.get("psnr"), out.get("ssim")
    if psnr is None:
        return "trained"
    return f"trained; test split: PSNR {psnr:.2f} dB, SSIM {ssim:.4f}"


def read_curves(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} from WORKDIR/metrics.jsonl as written so far (a line being
    written is skipped). A resumed run's file holds the first run's lines then its own: the
    later value of a step wins."""
    curves: dict[str, dict[int, float]] = {}
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return {}
    for line in lines:
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (ValueError, KeyError, TypeError):
            continue
        for k, v in row.items():
            if isinstance(v, (int, float)):
                curves.setdefault(k, {})[step] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in curves.items()}
