"""TIFF reading with validation: every user-data problem becomes one `DataError` naming the file."""

from __future__ import annotations

import os

import numpy as np
import tifffile

SUPPORTED_DTYPES = (np.uint8, np.uint16, np.float32)


class DataError(ValueError):
    """A problem with the user's data, reported as one clear message (no traceback)."""


def read_tiff(path: str | os.PathLike, *, min_ndim: int = 2) -> np.ndarray:
    """Reads a 2-D image or a stack of 2-D planes as (N, H, W) in its stored dtype."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected a TIFF file")
    try:
        arr = tifffile.imread(path)
    except Exception as e:  # tifffile raises several types for corrupt files
        raise DataError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
    arr = np.asarray(arr)
    if arr.dtype not in SUPPORTED_DTYPES:
        if np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() <= 65535:
            arr = arr.astype(np.uint16)
        elif np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        else:
            raise DataError(
                f"{path}: unsupported pixel type {arr.dtype} (use uint8, uint16 or float32)"
            )
    arr = np.squeeze(arr)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise DataError(
            f"{path}: expected a 2-D image or a stack of 2-D planes, got shape {arr.shape}"
        )
    if arr.dtype == np.float32 and not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: contains NaN or Inf values")
    return arr
