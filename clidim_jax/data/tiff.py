"""Reading training images (TIFF, or OME-Zarr through `clidim_jax.data.images`) with validation:
every user-data problem becomes one `DataError` naming the file."""

from __future__ import annotations

import logging
import os

import numpy as np
import tifffile

SUPPORTED_DTYPES = (np.uint8, np.uint16, np.float32)

# Axes that index 2-D planes (tifffile's letters: T time, Z depth, Q/I unknown or generic,
# S a sample index when it leads, e.g. SYX; R/E/H/V/L/A/P/M/B/O other sequences). Each plane is one
# image; the planes of all such axes are flattened into one stack. Of a C (channel) axis the user
# picks one channel (`data.channel`): channels differ in structure and brightness, and a mean over
# them is not a denoising target.
PLANE_AXES = frozenset("TZQISREHVLAPMBO")


class DataError(ValueError):
    """A problem with the user's data, reported as one clear message (no traceback)."""


def check_not_colour(path: str, axes: str, shape: tuple[int, ...]) -> None:
    """Refuses a colour image, 3 or 4 samples or channels last (YXS / YXC), for both readers:
    `read_tiff` and the lazy `images.TiffImage`."""
    if len(shape) >= 3 and axes.endswith(("S", "C")) and shape[-1] in (3, 4):
        raise DataError(
            f"{path}: a colour (RGB) image, axes {axes}, shape {tuple(shape)}: save one channel "
            "as a greyscale TIFF"
        )


def _planes(arr: np.ndarray, axes: str, path: str, source: str, channel: int = -1) -> np.ndarray:
    axes = axes.upper()
    if len(axes) != arr.ndim:
        raise DataError(
            f"{path}: axes {axes!r} ({source}) name {len(axes)} dimensions, the image has "
            f"{arr.ndim} (shape {arr.shape})"
        )
    if len(set(axes)) != len(axes):
        raise DataError(f"{path}: axes {axes!r} ({source}) repeat a letter")
    arr, axes = _pick_channel(arr, axes, path, channel)
    while len(axes) > 2 and axes[-1] in "SC" and arr.shape[-1] == 1:
        arr, axes = arr[..., 0], axes[:-1]  # a trailing single sample/channel (YXS with S=1)
    check_not_colour(path, axes, arr.shape)
    if not axes.endswith("YX"):
        raise DataError(
            f"{path}: not a 2-D image or a stack of 2-D planes: axes {axes} ({source}), shape "
            f"{arr.shape}; the last two axes must be YX (set data.axes, e.g. TYX or ZYX, if the "
            "file's metadata is wrong)"
        )
    for ax in axes[:-2]:
        if ax not in PLANE_AXES and ax != "C":
            raise DataError(
                f"{path}: unsupported axis {ax!r} in axes {axes} ({source}); planes may be "
                f"indexed by {''.join(sorted(PLANE_AXES))}"
            )
    return arr.reshape((-1, *arr.shape[-2:]))


def _pick_channel(arr: np.ndarray, axes: str, path: str, channel: int) -> tuple[np.ndarray, str]:
    """The one channel `channel` of a C axis (-1: only a single channel is accepted)."""
    n = arr.shape[axes.index("C")] if "C" in axes else 1
    if channel < 0:
        if n > 1:
            raise DataError(
                f"{path}: has {n} channels (axes {axes}, shape {arr.shape}); pick the one to "
                f"train on with --config.data.channel=N (0 to {n - 1})"
            )
        return arr, axes
    if "C" not in axes and channel > 0:
        raise DataError(
            f"{path}: config.data.channel={channel}, but the image has no channel axis (axes "
            f"{axes}: one channel, 0)"
        )
    if channel >= n:
        raise DataError(
            f"{path}: config.data.channel={channel} is out of range: the image has {n} channels "
            f"(0 to {n - 1}, axes {axes})"
        )
    if "C" not in axes:
        return arr, axes
    k = axes.index("C")
    return np.take(arr, channel, axis=k), axes[:k] + axes[k + 1 :]


def read_tiff(path: str | os.PathLike, *, axes: str = "", channel: int = -1) -> np.ndarray:
    """Reads a 2-D image or a stack of 2-D planes as (N, H, W) in its stored dtype: a TIFF, or
    an OME-Zarr image (a .zarr folder, NGFF 0.4 or 0.5; its full-resolution level).

    `axes` (e.g. "TYX", "ZYX", "YX") overrides the file's own axes metadata; every axis before YX
    indexes planes (a ZYX stack is treated plane by plane). `channel` picks one channel of a C
    axis (-1: the image must have one channel only).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    from clidim_jax.data.images import is_zarr

    if is_zarr(path):
        return _read_zarr(path, axes, channel)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected a TIFF file")
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)  # damaged files: one DataError instead of log lines first
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise DataError(f"{path}: not a readable TIFF (no image data in it)")
            series = tf.series[0]
            meta_axes = series.axes
            arr = series.asarray()
    except DataError:
        raise
    except Exception as e:  # tifffile raises several types for corrupt or truncated files
        raise DataError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
    finally:
        log.setLevel(level)
    arr = np.asarray(arr)
    if arr.ndim < 2 or min(arr.shape[-2:], default=0) < 1:
        raise DataError(f"{path}: not an image (shape {arr.shape})")
    arr = _planes(arr, axes or meta_axes, path, "data.axes" if axes else "from the file", channel)
    return _checked(arr, path)


def _read_zarr(path: str, axes: str, channel: int) -> np.ndarray:
    from clidim_jax.data.images import ZarrImage

    img = ZarrImage(path)
    try:
        arr = np.asarray(img._array[...])
    except Exception as e:  # a missing or damaged chunk
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    arr = _planes(arr, axes or img.axes, path, "data.axes" if axes else "from the file", channel)
    return _checked(arr, path)


def _checked(arr: np.ndarray, path: str) -> np.ndarray:
    if arr.dtype not in SUPPORTED_DTYPES:
        if np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() <= 65535:
            arr = arr.astype(np.uint16)
        elif np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        else:
            raise DataError(
                f"{path}: unsupported pixel type {arr.dtype} (use uint8, uint16 or float32)"
            )
    if arr.dtype == np.float32:
        bad = ~np.isfinite(arr)
        if bad.any():
            i = int(np.argmax(bad.reshape(len(arr), -1).any(axis=1)))
            raise DataError(
                f"{path}: contains {int(bad.sum())} NaN or Inf values (first in plane {i})"
            )
    return arr
