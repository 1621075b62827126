"""Denoising TIFF files: a 2-D image or a stack, plane by plane, with memory bounded by the tile.

Planes are read one at a time (one TIFF page each, also for ImageJ files whose frames have no
IFD of their own) and written one at a time through `tifffile.TiffWriter`. The pixel size
(resolution tags) and the ImageJ axes, unit and spacing are carried over. The output is written to
a temporary file next to OUTPUT and renamed at the end, so a failure never leaves a partial file
and never touches an existing one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tifffile

from clidim_jax.data.tiff import SUPPORTED_DTYPES, DataError
from clidim_jax.inference import Denoiser

OUTPUT_DTYPES = ("float32", "input")
# ImageJ hyperstack metadata worth keeping (display ranges are dropped: the values change).
_IMAGEJ_KEYS = ("unit", "spacing", "finterval", "fps", "loop", "xorigin", "yorigin", "zorigin")


class TiffPlanes:
    """A TIFF's first series as lazily read (H, W) planes, validated up front."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise DataError(f"{path}: file not found")
        if os.path.isdir(path):
            raise DataError(f"{path}: is a folder, expected a TIFF file")
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            self.shape = tuple(series.shape)
            self.axes = series.axes
            self.dtype = np.dtype(series.dtype)
            page_shape = tuple(series.keyframe.shape)
            self.n_planes = len(series)
            self.imagej = self._tif.is_imagej
            self.imagej_metadata = dict(self._tif.imagej_metadata or {})
            self.resolution, self.resolutionunit = _resolution(series.keyframe)
        except DataError:
            raise
        except Exception as e:  # tifffile raises several types for corrupt files
            self.close()
            raise DataError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
        self._series = series
        if self.dtype not in SUPPORTED_DTYPES:
            self.close()
            raise DataError(
                f"{path}: unsupported pixel type {self.dtype} (use uint8, uint16 or float32)"
            )
        if len(page_shape) != 2 or len(self.shape) < 2 or self.shape[-2:] != page_shape:
            self.close()
            raise DataError(
                f"{path}: expected a 2-D image or a stack of 2-D planes, got shape "
                f"{self.shape} (axes {self.axes}; RGB or multi-sample pages are not supported)"
            )
        if int(np.prod(self.shape[:-2], dtype=np.int64)) != self.n_planes:
            self.close()
            raise DataError(f"{path}: {self.n_planes} pages do not make up the shape {self.shape}")

    @property
    def plane_shape(self) -> tuple[int, int]:
        return tuple(self.shape[-2:])

    def plane(self, i: int) -> np.ndarray:
        try:
            a = self._tif.asarray(key=i, series=0)
        except Exception as e:
            raise DataError(
                f"{self.path}: cannot read plane {i} ({type(e).__name__}: {e})"
            ) from None
        a = np.asarray(a).reshape(self.plane_shape)
        if a.dtype == np.float32 and not np.all(np.isfinite(a)):
            raise DataError(f"{self.path}: plane {i} contains NaN or Inf values")
        return a

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None

    def __enter__(self) -> TiffPlanes:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _resolution(page: Any) -> tuple[tuple | None, int | None]:
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None, None
    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
    return (tags["XResolution"].value, tags["YResolution"].value), unit


def cast_output(y: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 -> `dtype`: integers are rounded and clipped to the type's range."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(y), info.min, info.max).astype(dtype)
    return y.astype(dtype)


def check_output(path: str, overwrite: bool) -> None:
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected an output file name")
    if os.path.exists(path) and not overwrite:
        raise DataError(f"{path}: already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DataError(f"{path}: the folder {parent} does not exist")


class ProgressLine:
    """`plane i/N, tile j/M` on stderr: rewritten in place on a terminal, else a line per plane."""

    def __init__(self, name: str, n_planes: int, stream: Any = None):
        self.name, self.n = name, n_planes
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last = 0.0

    def tiles(self, plane: int) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            now = time.perf_counter()
            if self.tty and (done == total or now - self._last > 0.2):
                self._last = now
                self.stream.write(
                    f"\r{self.name}: plane {plane + 1}/{self.n}, tile {done}/{total}   "
                )
                self.stream.flush()
            if done == total:
                self.plane_done(plane, total)

        return report

    def plane_done(self, plane: int, tiles: int) -> None:
        dt = time.perf_counter() - self.t0
        msg = f"{self.name}: plane {plane + 1}/{self.n} done ({tiles} tiles, {dt:.1f} s)"
        self.stream.write(("\r" + msg + "\n") if self.tty else (msg + "\n"))
        self.stream.flush()


def _warn_out_of_range(path: str, plane: np.ndarray, denoiser: Denoiser) -> None:
    """Intensities far outside the training data's range: a tanh G saturates there, and no G
    has seen them. Say so (measured in the model's space, so it holds with a VST too)."""
    norm = getattr(denoiser, "norm", None)
    if norm is None:
        return
    y = np.asarray(norm.apply(plane.astype(np.float64)))
    lo_y = getattr(norm, "shift", -1.0)  # the training range is [lo_y, lo_y + 2]
    outside = float(np.mean((y < lo_y - 1.0) | (y > lo_y + 3.0)))  # half of it beyond an end
    if outside > 0.05:
        bounded = getattr(getattr(denoiser, "generator", None), "output", "tanh") == "tanh"
        lo, hi = norm.invert(lo_y), norm.invert(lo_y + 2.0)
        print(
            f"warning: {100 * outside:.0f}% of the pixels of {path} (plane 1) lie far outside the "
            f"intensity range the model was trained on ({lo:g} to {hi:g}); "
            + ("the output saturates there. " if bounded else "")
            + "Use a model trained on data like this one.",
            file=sys.stderr,
        )


class StopOnSignal:
    """SIGTERM or SIGINT while denoising -> KeyboardInterrupt at the next plane or tile, so the
    partial output is removed on the way out. (Raised from the handler itself, it could land in
    a callback that swallows it, e.g. a garbage-collection hook.) A second signal raises at once.
    Signal handlers are only installed from the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(signal.Signals(self.signum).name)

    def wrap(self, callback: Callable | None) -> Callable:
        def checked(*args):
            self.check()
            if callback is not None:
                callback(*args)

        return checked


def denoise_tiff(
    input_path: str,
    output_path: str,
    denoiser: Denoiser,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Denoises every plane of INPUT into OUTPUT (same shape and axes). Returns a summary."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    if dtype not in OUTPUT_DTYPES:
        raise DataError(f"--dtype={dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    check_output(output_path, overwrite)
    with TiffPlanes(input_path) as src:
        out_dtype = src.dtype if dtype == "input" else np.dtype(np.float32)
        _warn_out_of_range(input_path, src.plane(0), denoiser)
        bar = ProgressLine(os.path.basename(input_path), src.n_planes) if progress else None

        def planes() -> Iterator[np.ndarray]:
            if denoiser.fits_whole(src.plane_shape):  # small planes: a batch of planes per call
                b = denoiser.batch_size
                for i in range(0, src.n_planes, b):
                    stop.check()
                    idx = range(i, min(i + b, src.n_planes))
                    ys = denoiser(np.stack([src.plane(j) for j in idx]))
                    for j, y in zip(idx, ys):
                        if bar is not None:
                            bar.plane_done(j, 1)
                        yield cast_output(y, out_dtype)
                return
            for i in range(src.n_planes):  # large planes: tiles, one plane at a time
                stop.check()
                cb = bar.tiles(i) if bar is not None else None
                yield cast_output(denoiser.denoise(src.plane(i), progress=stop.wrap(cb)), out_dtype)

        kwargs: dict[str, Any] = {}
        if src.resolution is not None:
            kwargs["resolution"] = src.resolution
            if src.resolutionunit is not None:
                kwargs["resolutionunit"] = src.resolutionunit
        if src.imagej:
            md = {k: v for k, v in src.imagej_metadata.items() if k in _IMAGEJ_KEYS}
            md["axes"] = src.axes
        else:
            md = {"axes": src.axes}
        nbytes = int(np.prod(src.shape, dtype=np.int64)) * out_dtype.itemsize
        tmp = os.path.join(
            os.path.dirname(os.path.abspath(output_path)),
            f".{os.path.basename(output_path)}.{os.getpid()}.partial",
        )
        try:
            with (
                StopOnSignal() as stop,
                tifffile.TiffWriter(tmp, bigtiff=nbytes > 2**32 - 2**25, imagej=src.imagej) as tw,
            ):
                tw.write(
                    planes(),
                    shape=src.shape,
                    dtype=out_dtype,
                    metadata=md,
                    software="clidim-jax",
                    **kwargs,
                )
            os.replace(tmp, output_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return {
            "input": input_path,
            "output": output_path,
            "shape": list(src.shape),
            "axes": src.axes,
            "dtype": str(out_dtype),
            "planes": src.n_planes,
        }


def example_image_path() -> str:
    """The bundled example input: frame 0 of the Convallaria benchmark stack (1024 x 1024 uint16,
    CC-BY-4.0, Prakash et al., ISBI 2020; `clidim_jax/data/examples/CREDIT.md`)."""
    import importlib.resources

    return str(importlib.resources.files("clidim_jax.data") / "examples" / "convallaria_frame0.tif")
