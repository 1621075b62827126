"""Images too large to hold: TIFF and OME-Zarr (NGFF 0.4 / 0.5) read lazily, a band of rows of
one plane at a time, and OME-Zarr (NGFF 0.5) written chunk by chunk.

An image is a stack of 2-D planes: `axes` names every dimension with tifffile's letters (T time,
C channel, Z depth, Y, X; others index planes too), YX last. `rows(i, a, b)` reads rows a .. b of
plane i (planes in C order over the leading axes). Contiguous uncompressed TIFF data is read
straight from the file; tiled or compressed TIFFs through tifffile's Zarr view (`aszarr`), which
decodes only the strips or tiles a band touches; OME-Zarr through zarr. The physical pixel size
(`scale`, in micrometres, and seconds for T) travels with the image so writers can carry it over.

OME-Zarr output uses zarr 3 directly with the NGFF 0.5 metadata written here (one scale level):
the metadata is a few keys of JSON, and zarr is the one well-kept dependency it needs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from clidim_jax.data.tiff import SUPPORTED_DTYPES, DataError, check_not_colour

ZARR_SUFFIX = ".zarr"
TIFF_SUFFIXES = (".tif", ".tiff")
NGFF_VERSION = "0.5"
# NGFF axis names and types of tifffile's letters, and back.
_NGFF_AXES = {"T": ("t", "time"), "C": ("c", "channel"), "Z": ("z", "space")}
_UNIT_TO_UM = {
    "micrometer": 1.0,
    "micron": 1.0,
    "um": 1.0,
    "\u00b5m": 1.0,
    "\\u00B5m": 1.0,
    "nanometer": 1e-3,
    "nm": 1e-3,
    "millimeter": 1e3,
    "mm": 1e3,
    "centimeter": 1e4,
    "cm": 1e4,
    "meter": 1e6,
    "m": 1e6,
    "inch": 25400.0,
}
_UNIT_TO_S = {"second": 1.0, "s": 1.0, "sec": 1.0, "millisecond": 1e-3, "ms": 1e-3, "minute": 60.0,
              "min": 60.0, "hour": 3600.0, "h": 3600.0}  # fmt: skip


def is_zarr(path: str) -> bool:
    """A Zarr store: a folder named *.zarr, or a folder holding zarr.json / .zattrs / .zgroup."""
    path = os.fspath(path).rstrip("/\\")
    if path.lower().endswith(ZARR_SUFFIX):
        return True
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("zarr.json", ".zattrs", ".zgroup")
    )


def is_image_file(path: str) -> bool:
    return path.lower().endswith(TIFF_SUFFIXES) or is_zarr(path)


class Image:
    """A lazily read image: shape, axes, dtype, pixel size, and rows of its planes."""

    path: str
    shape: tuple[int, ...]
    axes: str
    dtype: np.dtype
    # physical size of a step along an axis: {"X": 0.065, "Z": 0.5, "T": 2.0} (um, um, s)
    scale: dict[str, float]

    @property
    def plane_shape(self) -> tuple[int, int]:
        return (int(self.shape[-2]), int(self.shape[-1]))

    @property
    def n_planes(self) -> int:
        return int(np.prod(self.shape[:-2], dtype=np.int64))

    @property
    def n_channels(self) -> int:
        return int(self.shape[self.axes.index("C")]) if "C" in self.axes else 1

    def plane_index(self, i: int) -> tuple[int, ...]:
        """Plane i's index along the leading axes."""
        if not self.shape[:-2]:
            return ()
        return tuple(int(v) for v in np.unravel_index(i, self.shape[:-2]))

    def channel_of(self, i: int) -> int:
        return self.plane_index(i)[self.axes.index("C")] if "C" in self.axes else 0

    def rows(self, i: int, a: int, b: int) -> np.ndarray:
        """Rows a .. b of plane i, (b - a, W), in the stored dtype; NaN/Inf are refused."""
        try:
            out = np.asarray(self._rows(i, a, b))
        except DataError:
            raise
        except Exception as e:  # a damaged chunk or strip
            raise DataError(
                f"{self.path}: cannot read plane {i} ({type(e).__name__}: {e})"
            ) from None
        if out.dtype == np.float32 and not np.all(np.isfinite(out)):
            raise DataError(f"{self.path}: plane {i} contains NaN or Inf values")
        return out.reshape(b - a, self.shape[-1])

    def plane(self, i: int) -> np.ndarray:
        return self.rows(i, 0, self.plane_shape[0])

    def _rows(self, i: int, a: int, b: int) -> np.ndarray:
        raise NotImplementedError

    def _check(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise DataError(
                f"{self.path}: unsupported pixel type {self.dtype} (use uint8, uint16 or float32)"
            )
        if len(self.axes) != len(self.shape) or not self.axes.endswith("YX"):
            raise DataError(
                f"{self.path}: expected a 2-D image or a stack of 2-D planes with YX last, got "
                f"shape {self.shape} (axes {self.axes})"
            )
        if len(set(self.axes)) != len(self.axes):
            raise DataError(f"{self.path}: axes {self.axes} repeat a letter")
        if min(self.shape) < 1:
            raise DataError(f"{self.path}: an empty image (shape {self.shape})")

    def close(self) -> None:
        pass

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_image(path: str) -> Image:
    """A TIFF or an OME-Zarr image, opened lazily (headers and metadata read, no pixels)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if is_zarr(path):
        return ZarrImage(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected a TIFF file or an OME-Zarr image")
    return TiffImage(path)


# ----------------------------------------------------------------------------------------- TIFF


class TiffImage(Image):
    """A TIFF's first series. Contiguous uncompressed data is read with a seek and a read;
    anything else (tiles, compression) through tifffile's Zarr store, chunk by chunk."""

    def __init__(self, path: str):
        import tifffile

        self.path = path
        self._tif = None
        log = logging.getLogger("tifffile")
        level = log.level
        log.setLevel(logging.CRITICAL)  # damaged files: one DataError, no log lines first
        try:
            self._tif = tifffile.TiffFile(path)
            if not self._tif.series:
                raise DataError(f"{path}: not a readable TIFF (no image data in it)")
            series = self._tif.series[0]
            self.shape = tuple(int(s) for s in series.shape)
            self.axes = series.axes.upper()
            self.dtype = np.dtype(series.dtype)
            page_shape = tuple(series.keyframe.shape)
            n_pages = len(series)
            self.imagej = bool(self._tif.is_imagej)
            self.imagej_metadata = dict(self._tif.imagej_metadata or {})
            self.resolution, self.resolutionunit = _resolution(series.keyframe)
            self._offset = series.dataoffset
            self._byteorder = self._tif.byteorder
            self._series = series
        except DataError:
            self.close()
            raise
        except Exception as e:  # tifffile raises several types for corrupt files
            self.close()
            raise DataError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
        finally:
            log.setLevel(level)
        self._zarr = None
        # Pages of several planes (planar samples, SYX) are planes, as `read_tiff` (training)
        # reads them: tifffile's default for a stack of 3 or 4 planes is such a page marked RGB.
        # Interleaved samples (YXS: a colour image) are not planes.
        try:
            check_not_colour(path, self.axes, self.shape)
        except DataError:
            self.close()
            raise
        if (
            len(page_shape) < 2
            or len(self.shape) < 2
            or self.shape[-2:] != page_shape[-2:]
            or self.axes.endswith("S")
        ):
            self.close()
            raise DataError(
                f"{path}: expected a 2-D image or a stack of 2-D planes, got shape "
                f"{self.shape} (axes {self.axes}; pages of interleaved samples are not supported)"
            )
        n_pages *= int(np.prod(page_shape[:-2], dtype=np.int64))
        if self.n_planes != n_pages and self._offset is None:
            self.close()
            raise DataError(f"{path}: {n_pages} pages do not make up the shape {self.shape}")
        try:
            self._check()
        except DataError:
            self.close()
            raise
        self.scale = self._scale()

    def _scale(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.resolution is not None:
            unit = _tiff_unit_um(self.resolutionunit, self.imagej_metadata.get("unit"))
            (xn, xd), (yn, yd) = self.resolution
            if unit is not None and xn and yn:
                out["X"], out["Y"] = unit * xd / xn, unit * yd / yn
        md = self.imagej_metadata
        um = _UNIT_TO_UM.get(str(md.get("unit", "")).lower())
        if "Z" in self.axes and md.get("spacing") and um is not None:
            out["Z"] = float(md["spacing"]) * um
        if "T" in self.axes and md.get("finterval"):
            out["T"] = float(md["finterval"])
        return out

    def _rows(self, i: int, a: int, b: int) -> np.ndarray:
        h, w = self.plane_shape
        if self._offset is not None:  # contiguous: no decoding, read only these rows
            dt = self.dtype.newbyteorder(self._byteorder)
            start = self._offset + ((i * h + a) * w) * dt.itemsize
            fh = self._tif.filehandle
            fh.seek(start)
            out = np.frombuffer(fh.read((b - a) * w * dt.itemsize), dt)
            if out.size != (b - a) * w:
                raise DataError(f"{self.path}: the file is truncated (plane {i})")
            return out.astype(self.dtype.newbyteorder("="), copy=False)
        if self._zarr is None:
            import zarr

            self._zarr = zarr.open_array(self._series.aszarr(level=0), mode="r")
        return self._zarr[(*self.plane_index(i), slice(a, b), slice(None))]

    def close(self) -> None:
        if getattr(self, "_tif", None) is not None:
            self._tif.close()
            self._tif = None


def _resolution(page: Any) -> tuple[tuple | None, int | None]:
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None, None
    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
    return (tags["XResolution"].value, tags["YResolution"].value), unit


def _tiff_unit_um(resolutionunit: int | None, imagej_unit: Any) -> float | None:
    """Micrometres per resolution unit: inch (2), centimetre (3), or, without one (1), the
    ImageJ unit."""
    if resolutionunit is not None and int(resolutionunit) == 2:
        return 25400.0
    if resolutionunit is not None and int(resolutionunit) == 3:
        return 1e4
    if imagej_unit is not None:
        return _UNIT_TO_UM.get(str(imagej_unit).lower())
    return None


# ------------------------------------------------------------------------------------- OME-Zarr


def _ome_attrs(attrs: dict) -> tuple[dict | None, str]:
    """(the first multiscales entry, NGFF version) of a group's attributes (0.4 or 0.5)."""
    if "ome" in attrs and isinstance(attrs["ome"], dict):  # 0.5
        ms = attrs["ome"].get("multiscales")
        return (ms[0] if ms else None), str(attrs["ome"].get("version", "0.5"))
    ms = attrs.get("multiscales")  # 0.4 and older
    return (ms[0] if ms else None), str(ms[0].get("version", "0.4")) if ms else ""


class ZarrImage(Image):
    """The full-resolution level of an OME-Zarr image (NGFF 0.4 or 0.5, or the first image of
    a bioformats2raw folder)."""

    def __init__(self, path: str):
        import zarr

        self.path = path
        try:
            node = zarr.open(path, mode="r")
            ms, version = _ome_attrs(dict(node.attrs)) if isinstance(node, zarr.Group) else ({}, "")
            if isinstance(node, zarr.Group) and ms is None and "0" in node:  # bioformats2raw
                node = node["0"]
                ms, version = _ome_attrs(dict(node.attrs))
        except DataError:
            raise
        except Exception as e:
            msg = f"{path}: not a readable Zarr store ({type(e).__name__}: {e})"
            raise DataError(msg) from None
        if isinstance(node, zarr.Array):
            raise DataError(f"{path}: a bare Zarr array, not an OME-Zarr image (no multiscales)")
        if not ms:
            raise DataError(
                f"{path}: not an OME-Zarr image (no 'multiscales' metadata; plates and label "
                "groups are not supported)"
            )
        try:
            ds = ms["datasets"][0]
            self._array = node[ds["path"]]
            axes = ms.get("axes") or [{"name": n} for n in "tczyx"[-self._array.ndim :]]
            self.axes = _letters(axes)
            self.units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
            scale = [1.0] * self._array.ndim
            for t in ds.get("coordinateTransformations", []):
                if t.get("type") == "scale":
                    scale = [float(v) for v in t["scale"]]
        except DataError:
            raise
        except Exception as e:
            raise DataError(
                f"{path}: malformed OME-Zarr metadata ({type(e).__name__}: {e})"
            ) from None
        self.version = version
        self.shape = tuple(int(s) for s in self._array.shape)
        self.dtype = np.dtype(self._array.dtype)
        self._check()
        self.scale = {}
        for ax, s, unit in zip(self.axes, scale, self.units):
            to = (_UNIT_TO_S if ax == "T" else _UNIT_TO_UM).get(str(unit).lower(), 1.0)
            if unit is not None or s != 1.0:
                self.scale[ax] = s * to

    def _rows(self, i: int, a: int, b: int) -> np.ndarray:
        return self._array[(*self.plane_index(i), slice(a, b), slice(None))]


def _letters(axes: Sequence[Any]) -> str:
    """NGFF axes -> tifffile letters; the last two space axes are Y and X."""
    out = []
    for a in axes:
        name = str(a.get("name", "") if isinstance(a, dict) else a).lower()
        kind = a.get("type") if isinstance(a, dict) else None
        if kind == "time" or name == "t":
            out.append("T")
        elif kind == "channel" or name == "c":
            out.append("C")
        elif name in ("z", "y", "x"):
            out.append(name.upper())
        else:
            out.append("Q")
    return "".join(out)


def ngff_axes(axes: str) -> list[int]:
    """The order NGFF wants the axes in (time, channel, one other, space), as a permutation
    of `axes`; DataError if they cannot be written as OME-Zarr."""
    rank = {"T": 0, "C": 1, "Z": 3, "Y": 4, "X": 5}
    order = sorted(range(len(axes)), key=lambda i: (rank.get(axes[i], 2), i))
    others = [a for a in axes if a not in rank]
    if len(others) > 1 or len(axes) > 5:
        raise DataError(
            f"axes {axes} cannot be written as OME-Zarr (at most 5 axes: time, channel, one "
            "more, and Z, Y, X); write a TIFF instead"
        )
    return order


class OmeZarrWriter:
    """An NGFF 0.5 image (zarr 3) written plane by plane, a band of rows at a time: rows are
    gathered until a row of chunks is complete, so every chunk is written once."""

    def __init__(
        self,
        path: str,
        shape: Sequence[int],
        axes: str,
        dtype: np.dtype,
        scale: dict[str, float],
        chunk: int = 512,
        name: str = "",
    ):
        import zarr

        self.path = path
        self.order = ngff_axes(axes)
        self.axes = "".join(axes[i] for i in self.order)
        self.shape = tuple(int(shape[i]) for i in self.order)
        h, w = self.shape[-2:]
        self.chunk_rows = min(chunk, h)
        chunks = (1,) * (len(self.shape) - 2) + (self.chunk_rows, min(chunk, w))
        ngff = []
        for a in self.axes:
            n, kind = _NGFF_AXES.get(a, (a.lower(), None))
            if a in "YX":
                n, kind = a.lower(), "space"
            entry: dict[str, Any] = {"name": n}
            if kind is not None:
                entry["type"] = kind
            if kind == "space" and a in scale:
                entry["unit"] = "micrometer"
            elif kind == "time" and a in scale:
                entry["unit"] = "second"
            ngff.append(entry)
        multiscale = {
            "name": name,
            "axes": ngff,
            "datasets": [
                {
                    "path": "0",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [float(scale.get(a, 1.0)) for a in self.axes]}
                    ],
                }
            ],
        }
        root = zarr.open_group(path, mode="w-", zarr_format=3)
        root.attrs.update({"ome": {"version": NGFF_VERSION, "multiscales": [multiscale]}})
        self.array = root.create_array(
            "0",
            shape=self.shape,
            dtype=dtype,
            chunks=chunks,
            dimension_names=[e["name"] for e in ngff],
            fill_value=0,
        )
        self._pending: list[np.ndarray] = []
        self._y = 0

    def write_plane(self, index: Sequence[int], bands: Iterator[tuple[int, np.ndarray]]) -> None:
        """Writes one plane (`index` along the input's leading axes) from (y0, rows) bands
        in order."""
        full = [*index, 0, 0]
        at = tuple(full[i] for i in self.order[:-2])
        h = self.shape[-2]
        pending, start = [], 0
        n = 0
        for y0, rows in bands:
            if y0 != start + n:
                raise ValueError("bands out of order")
            pending.append(rows)
            n += len(rows)
            while n >= self.chunk_rows or (start + n == h and n):
                block = np.concatenate(pending) if len(pending) > 1 else pending[0]
                k = n if start + n == h else self.chunk_rows
                self.array[(*at, slice(start, start + k), slice(None))] = block[:k]
                pending, start, n = [block[k:]], start + k, n - k
        if start != h:
            raise ValueError(f"plane {index}: rows {start} of {h} written")


def read_ngff_metadata(path: str) -> dict:
    """The NGFF attributes of a written image (for reports and tests): zarr.json's 'ome'."""
    with open(os.path.join(path, "zarr.json"), encoding="utf-8") as f:
        return json.load(f)["attributes"]["ome"]
