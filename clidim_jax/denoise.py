"""Denoising image files: a 2-D image or a stack, plane by plane, with memory bounded by the tile;
one file, or every image of a folder.

Inputs are TIFFs or OME-Zarr images (`clidim_jax.data.images`), read a band of rows at a time;
each plane streams through `Denoiser.stream` to the writer, so neither the image nor a
whole-plane accumulator is ever held (a 16384 x 16384 plane needs a few tiles' rows of memory).
The output is a TIFF (strips written as they are finished) or, for an OUTPUT ending in `.zarr`,
an OME-Zarr image (NGFF 0.5, chunks written as rows of them are finished). The pixel size
(resolution tags, NGFF scale) and the axes (ImageJ hyperstack axes, unit and spacing) are
carried over. Channels (a C axis) are denoised with one model, or a model per channel, or one
channel is picked (the output then has no C axis). The output is written under a temporary name
next to OUTPUT and renamed at the end, so a failure or an interrupt never leaves a partial output
and never touches an existing one.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tifffile

from clidim_jax.data.images import (
    Image,
    OmeZarrWriter,
    TiffImage,
    is_image_file,
    is_zarr,
    open_image,
)
from clidim_jax.data.tiff import DataError
from clidim_jax.inference import Denoiser

OUTPUT_DTYPES = ("float32", "input")
# ImageJ hyperstack metadata worth keeping (display ranges are dropped: the values change).
_IMAGEJ_KEYS = ("unit", "spacing", "finterval", "fps", "loop", "xorigin", "yorigin", "zorigin")


# The lazily read TIFF of earlier versions (kept for callers that import it from here).
TiffPlanes = TiffImage


def cast_output(y: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 -> `dtype`: integers are rounded and clipped to the type's range."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(y), info.min, info.max).astype(dtype)
    return y.astype(dtype)


def is_zarr_output(path: str) -> bool:
    return os.fspath(path).rstrip("/\\").lower().endswith(".zarr")


def check_output(path: str, overwrite: bool, input_path: str | None = None) -> None:
    zarr_out = is_zarr_output(path)
    if os.path.isdir(path) and not zarr_out:
        raise DataError(f"{path}: is a folder, expected an output file name")
    if input_path is not None and os.path.abspath(path) == os.path.abspath(input_path):
        raise DataError(f"{path}: the output would replace the input; choose another name")
    if os.path.exists(path) and not overwrite:
        raise DataError(f"{path}: already exists (pass --overwrite to replace it)")
    if zarr_out and os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{path}: exists and is not a Zarr folder (remove it or choose another)")
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


Models = Denoiser | Mapping[int, Denoiser]


def check_channel(src: Image, channel: int | None) -> None:
    """DataError unless `channel` (None: all) is a channel of the image."""
    if channel is None:
        return
    n = src.n_channels
    if "C" not in src.axes and channel != 0:
        raise DataError(
            f"{src.path}: --channel {channel}, but the image has no channel axis "
            f"(axes {src.axes}: one channel, 0)"
        )
    if not 0 <= channel < n:
        raise DataError(
            f"{src.path}: --channel {channel} is out of range: the image has {n} channels "
            f"(0 to {n - 1}, axes {src.axes})"
        )


def _plan(src: Image, model: Models, channel: int | None) -> tuple[list[int], dict[int, Denoiser]]:
    """The planes to denoise (input plane numbers, in output order) and each channel's model;
    DataError for a channel the image lacks or a channel without a model."""
    check_channel(src, channel)
    n = src.n_channels
    wanted = [channel] if channel is not None else list(range(n))
    if isinstance(model, Denoiser):
        models = {c: model for c in wanted}
    else:
        extra = sorted(c for c in model if c >= n)
        if extra:
            raise DataError(
                f"{src.path}: a model for channel {extra[0]} (--model c{extra[0]}=...), but the "
                f"image has {n} channel(s) (axes {src.axes})"
            )
        missing = [c for c in wanted if c not in model]
        if missing:
            raise DataError(
                f"{src.path}: no model for channel {missing[0]} of its {n} (give "
                + ",".join(f"c{c}=MODEL" for c in wanted)
                + " to --model, or --channel to pick one)"
            )
        models = {c: model[c] for c in wanted}
    planes = [i for i in range(src.n_planes) if src.channel_of(i) in models]
    return planes, models


def _out_layout(src: Image, channel: int | None) -> tuple[tuple[int, ...], str]:
    if channel is None or "C" not in src.axes:
        return src.shape, src.axes
    k = src.axes.index("C")
    return src.shape[:k] + src.shape[k + 1 :], src.axes.replace("C", "")


def _sample(src: Image, i: int) -> np.ndarray:
    """Up to about 4 Mpixels of the top of plane i: enough to judge its intensity range."""
    rows = src.rows(i, 0, min(src.plane_shape[0], 1024))
    step = max(1, int(np.sqrt(rows.size / 4e6)))
    return rows[::step, ::step]


def _rechunk(bands: Iterator[tuple[int, np.ndarray]], size: int) -> Iterator[np.ndarray]:
    """Bands of rows -> blocks of exactly `size` rows (the last one shorter)."""
    pending, n = [], 0
    for _, rows in bands:
        pending.append(rows)
        n += len(rows)
        while n >= size:
            block = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield block[:size]
            pending, n = [block[size:]], n - size
    if n:
        yield np.concatenate(pending)


class _Partial:
    """OUTPUT's temporary name (a file or a Zarr folder): renamed onto OUTPUT when complete
    (an existing OUTPUT, with --overwrite, is replaced only then), removed on any failure."""

    def __init__(self, output_path: str):
        self.output = output_path
        folder = os.path.dirname(os.path.abspath(output_path))
        base = os.path.basename(output_path.rstrip("/\\"))
        self.tmp = os.path.join(folder, f".{base}.{os.getpid()}.partial")
        self._old = os.path.join(folder, f".{base}.{os.getpid()}.old")
        self.remove()  # left by a killed process that had this process id

    def commit(self) -> None:
        if os.path.isdir(self.output):  # a Zarr folder cannot be replaced in one rename
            os.replace(self.output, self._old)
            try:
                os.replace(self.tmp, self.output)
            except BaseException:
                os.replace(self._old, self.output)
                raise
            shutil.rmtree(self._old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.output)

    def remove(self) -> None:
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def denoise_file(
    input_path: str,
    output_path: str,
    model: Models,
    *,
    channel: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Denoises every plane of INPUT (a TIFF or an OME-Zarr image) into OUTPUT (a TIFF, or an
    OME-Zarr image when it ends in .zarr): same shape and axes, or without the C axis when
    `channel` picks one. `model` is one Denoiser for every channel, or {channel: Denoiser}.
    Returns a summary."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    if dtype not in OUTPUT_DTYPES:
        raise DataError(f"--dtype={dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    check_output(output_path, overwrite, input_path)
    with open_image(input_path) as src:
        planes, models = _plan(src, model, channel)
        out_shape, out_axes = _out_layout(src, channel)
        out_dtype = src.dtype if dtype == "input" else np.dtype(np.float32)
        first = models[src.channel_of(planes[0])]
        _warn_out_of_range(input_path, _sample(src, planes[0]), first)
        bar = ProgressLine(os.path.basename(input_path), len(planes)) if progress else None
        partial = _Partial(output_path)
        try:
            with StopOnSignal() as stop:
                stream = _denoised_planes(src, planes, models, out_dtype, bar, stop)
                if is_zarr_output(output_path):
                    _write_zarr(partial.tmp, src, stream, out_shape, out_axes, out_dtype, channel)
                else:
                    _write_tiff(partial.tmp, src, stream, out_shape, out_axes, out_dtype)
            partial.commit()
        finally:
            partial.remove()
        return {
            "input": input_path,
            "output": output_path,
            "shape": list(out_shape),
            "axes": out_axes,
            "dtype": str(out_dtype),
            "planes": len(planes),
            "channel": channel,
        }


# The earlier name (TIFF in, TIFF out), kept for callers.
denoise_tiff = denoise_file


def _denoised_planes(
    src: Image,
    planes: list[int],
    models: dict[int, Denoiser],
    out_dtype: np.dtype,
    bar: ProgressLine | None,
    stop: StopOnSignal,
) -> Iterator[tuple[int, Iterator[tuple[int, np.ndarray]]]]:
    """(input plane, its denoised (y0, rows) bands in the output dtype) in order. Planes that
    fit in a tile go `batch_size` at a time (one call for several planes of a channel); larger
    ones stream row of tiles by row of tiles."""
    shape = src.plane_shape
    k = 0
    while k < len(planes):
        d = models[src.channel_of(planes[k])]
        if d.fits_whole(shape):
            batch = [planes[k]]
            while (
                len(batch) < d.batch_size
                and k + len(batch) < len(planes)
                and models[src.channel_of(planes[k + len(batch)])] is d
            ):
                batch.append(planes[k + len(batch)])
            stop.check()
            ys = d(np.stack([src.plane(i) for i in batch]))
            for j, (i, y) in enumerate(zip(batch, ys)):
                if bar is not None:
                    bar.plane_done(k + j, 1)
                yield i, iter([(0, cast_output(y, out_dtype))])
            k += len(batch)
            continue
        i = planes[k]
        cb = stop.wrap(bar.tiles(k) if bar is not None else None)
        bands = d.stream(lambda a, b, i=i: src.rows(i, a, b), shape, progress=cb)
        yield i, ((y0, cast_output(rows, out_dtype)) for y0, rows in bands)
        k += 1


def _tiff_options(src: Image, out_axes: str) -> tuple[bool, dict, dict]:
    """(ImageJ format?, ImageJ/shaped metadata, resolution keywords) for a TIFF output."""
    kwargs: dict[str, Any] = {}
    if isinstance(src, TiffImage):
        if src.resolution is not None:
            kwargs["resolution"] = src.resolution
            if src.resolutionunit is not None:
                kwargs["resolutionunit"] = src.resolutionunit
        if src.imagej:
            md = {k: v for k, v in src.imagej_metadata.items() if k in _IMAGEJ_KEYS}
            return True, {**md, "axes": out_axes}, kwargs
        return False, {"axes": out_axes}, kwargs
    # OME-Zarr in: micrometres per pixel -> pixels per centimetre; ImageJ where its axis order
    # allows (TZCYX), which keeps the Z spacing and the frame interval too.
    sc = src.scale
    if "X" in sc and "Y" in sc and sc["X"] > 0 and sc["Y"] > 0:
        kwargs["resolution"] = (1e4 / sc["X"], 1e4 / sc["Y"])
        kwargs["resolutionunit"] = "CENTIMETER"
    order = "TZCYX"
    imagej = set(out_axes) <= set(order) and list(out_axes) == sorted(out_axes, key=order.index)
    md: dict[str, Any] = {"axes": out_axes}
    if imagej:
        if "X" in sc:
            md["unit"] = "um"
        if "Z" in sc:
            md["spacing"] = sc["Z"]
        if "T" in sc:
            md["finterval"] = sc["T"]
    return imagej, md, kwargs


def _write_tiff(path, src, stream, out_shape, out_axes, out_dtype) -> None:
    h, w = src.plane_shape
    # about 1 MiB strips: written as soon as their rows are final
    rows_per_strip = max(1, min(h, 2**20 // (w * out_dtype.itemsize)))
    imagej, md, kwargs = _tiff_options(src, out_axes)
    nbytes = int(np.prod(out_shape, dtype=np.int64)) * out_dtype.itemsize

    def strips() -> Iterator[bytes]:
        for _, bands in stream:
            for block in _rechunk(bands, rows_per_strip):
                yield np.ascontiguousarray(block, out_dtype).tobytes()

    with tifffile.TiffWriter(path, bigtiff=nbytes > 2**32 - 2**25, imagej=imagej) as tw:
        tw.write(
            strips(),
            shape=out_shape,
            dtype=out_dtype,
            rowsperstrip=rows_per_strip,
            photometric="minisblack",  # a C axis of 3 or 4 is channels, never RGB
            metadata=md,
            software="clidim-jax",
            **kwargs,
        )


def _write_zarr(path, src, stream, out_shape, out_axes, out_dtype, channel) -> None:
    writer = OmeZarrWriter(
        path,
        out_shape,
        out_axes,
        out_dtype,
        src.scale,
        name=os.path.basename(src.path.rstrip("/\\")),
    )
    drop = src.axes.index("C") if channel is not None and "C" in src.axes else None
    for i, bands in stream:
        index = list(src.plane_index(i))
        if drop is not None:
            del index[drop]
        writer.write_plane(index, bands)


# ------------------------------------------------------------------------------------- folders


def find_images(folder: str, recursive: bool, exclude: str | None = None) -> list[str]:
    """The TIFFs and OME-Zarr images in a folder (and its sub-folders with `recursive`), as
    paths relative to it, sorted. Hidden names (temporary outputs among them) are left out, and
    so is `exclude` (an output folder inside the input folder)."""
    out = []
    skip = os.path.abspath(exclude) if exclude else None
    for root, dirs, files in os.walk(folder):
        keep = []
        for d in sorted(dirs):
            full = os.path.join(root, d)
            if d.startswith(".") or os.path.abspath(full) == skip:
                continue
            if is_zarr(full):
                out.append(os.path.relpath(full, folder))
            elif recursive:
                keep.append(d)
        dirs[:] = keep
        for f in files:
            if not f.startswith(".") and is_image_file(f) and not f.lower().endswith(".zarr"):
                out.append(os.path.relpath(os.path.join(root, f), folder))
        if not recursive:
            dirs[:] = []
    return sorted(out)


class FolderProgress:
    """One line for a whole folder: files done / total, skipped and failed, time left
    (extrapolated from the files denoised so far). Rewritten in place on a terminal."""

    def __init__(self, name: str, total: int, stream: Any = None):
        self.name, self.total = name, total
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.done = self.denoised = self.skipped = self.failed = 0

    def update(self, outcome: str) -> None:
        self.done += 1
        self.denoised += outcome == "denoised"
        self.skipped += outcome == "skipped"
        self.failed += outcome == "failed"
        dt = time.perf_counter() - self.t0
        left = self.total - self.done
        eta = ""
        if left and self.denoised:
            eta = f", about {_duration(dt / (self.done - self.skipped) * left)} left"
        msg = (
            f"{self.name}: {self.done}/{self.total} files ({self.skipped} skipped, "
            f"{self.failed} failed), {_duration(dt)}{eta}"
        )
        last = self.done == self.total
        self.stream.write(("\r" + msg + ("\n" if last else "   ")) if self.tty else msg + "\n")
        self.stream.flush()


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def denoise_folder(
    input_dir: str,
    output_dir: str,
    model: Models,
    *,
    recursive: bool = False,
    channel: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Denoises every TIFF and OME-Zarr image of INPUT_DIR into OUTPUT_DIR under the same
    relative name (sub-folders mirrored with `recursive`). Outputs that exist are skipped unless
    `overwrite`; a file that fails is reported and the others go on. Returns the lists
    "denoised", "skipped" and "failed" ((relative path, message) pairs)."""
    input_dir, output_dir = os.fspath(input_dir), os.fspath(output_dir)
    if not os.path.isdir(input_dir):
        raise DataError(f"{input_dir}: folder not found")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DataError(f"{output_dir}: exists and is not a folder")
    if os.path.abspath(output_dir) == os.path.abspath(input_dir):
        raise DataError(f"{output_dir}: the output folder is the input folder; choose another")
    if dtype not in OUTPUT_DTYPES:
        raise DataError(f"--dtype={dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    names = find_images(input_dir, recursive, exclude=output_dir)
    if not names:
        more = "" if recursive else " (--recursive looks in its sub-folders too)"
        raise DataError(f"{input_dir}: no TIFF or OME-Zarr images in it{more}")
    name = os.path.basename(os.path.normpath(input_dir))
    bar = FolderProgress(name, len(names), stream=None if progress else io.StringIO())
    result: dict[str, list] = {"denoised": [], "skipped": [], "failed": []}
    for rel in names:
        src, dst = os.path.join(input_dir, rel), os.path.join(output_dir, rel)
        if os.path.exists(dst) and not overwrite:
            result["skipped"].append(rel)
            bar.update("skipped")
            continue
        try:
            os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
            denoise_file(
                src, dst, model, channel=channel, dtype=dtype, overwrite=overwrite,
                progress=False,
            )  # fmt: skip
        except (DataError, OSError, ValueError) as e:
            msg = str(e)
            result["failed"].append((rel, msg if msg.startswith(src) else f"{src}: {msg}"))
            bar.update("failed")
            continue
        result["denoised"].append(rel)
        bar.update("denoised")
    return result


def example_image_path() -> str:
    """The bundled example input: frame 0 of the Convallaria benchmark stack (1024 x 1024 uint16,
    CC-BY-4.0, Prakash et al., ISBI 2020; `clidim_jax/data/examples/CREDIT.md`)."""
    import importlib.resources

    return str(importlib.resources.files("clidim_jax.data") / "examples" / "convallaria_frame0.tif")
