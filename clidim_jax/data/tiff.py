"""TIFF reading with validation: every user-data problem becomes one `DataError` naming the file."""

from __future__ import annotations

import logging
import os

import numpy as np
import tifffile

SUPPORTED_DTYPES = (np.uint8, np.uint16, np.float32)

# Axes that index 2-D planes (tifffile's letters: T time, Z depth, Q/I unknown or generic,
# S a sample index when it leads, e.g. SYX; R/E/H/V/L/A/P/M/B/O other sequences). Each plane is one
# image; the planes of all such axes are flattened into one stack. C (channels) must have size 1:
# a mean over channels is not a denoising target, so the user picks one.
PLANE_AXES = frozenset("TZQISREHVLAPMBO")


class DataError(ValueError):
    """A problem with the user's data, reported as one clear message (no traceback)."""


def _planes(arr: np.ndarray, axes: str, path: str, source: str) -> np.ndarray:
    axes = axes.upper()
    if len(axes) != arr.ndim:
        raise DataError(
            f"{path}: axes {axes!r} ({source}) name {len(axes)} dimensions, the image has "
            f"{arr.ndim} (shape {arr.shape})"
        )
    while len(axes) > 2 and axes[-1] in "SC" and arr.shape[-1] == 1:
        arr, axes = arr[..., 0], axes[:-1]  # a trailing single sample/channel (YXS with S=1)
    if len(set(axes)) != len(axes):
        raise DataError(f"{path}: axes {axes!r} ({source}) repeat a letter")
    if arr.ndim >= 3 and axes.endswith(("S", "C")) and arr.shape[-1] in (3, 4):
        raise DataError(
            f"{path}: a colour (RGB) image, axes {axes}, shape {arr.shape}: save one channel "
            "as a greyscale TIFF"
        )
    if not axes.endswith("YX"):
        raise DataError(
            f"{path}: not a 2-D image or a stack of 2-D planes: axes {axes} ({source}), shape "
            f"{arr.shape}; the last two axes must be YX (set data.axes, e.g. TYX or ZYX, if the "
            "file's metadata is wrong)"
        )
    for ax, n in zip(axes[:-2], arr.shape[:-2]):
        if ax == "C" and n > 1:
            raise DataError(
                f"{path}: has {n} channels (axes {axes}, shape {arr.shape}); save the channel to "
                "denoise as its own TIFF"
            )
        if ax not in PLANE_AXES and ax != "C":
            raise DataError(
                f"{path}: unsupported axis {ax!r} in axes {axes} ({source}); planes may be "
                f"indexed by {''.join(sorted(PLANE_AXES))}"
            )
    return arr.reshape((-1, *arr.shape[-2:]))


def read_tiff(path: str | os.PathLike, *, axes: str = "") -> np.ndarray:
    """Reads a 2-D image or a stack of 2-D planes as (N, H, W) in its stored dtype.

    `axes` (e.g. "TYX", "ZYX", "YX") overrides the file's own axes metadata; every axis before YX
    indexes planes (a ZYX stack is treated plane by plane).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
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
    arr = _planes(arr, axes or meta_axes, path, "data.axes" if axes else "from the file")
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
