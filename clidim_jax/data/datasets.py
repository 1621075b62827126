"""Paired (noisy, clean) image sets: loading, spatial train/test splits, the few-shot rule.

Every set is a list of *views*: rectangles of stored planes. A view is (noisy plane, clean plane,
y0, x0, h, w): repeated acquisitions of one field share one clean plane (the mean is never
copied), and a spatial split is a set of rectangles of the same stored planes (nothing is copied
either: the PN2V Convallaria split trains on three quadrants of each frame and tests on the fourth).
On the device, only the bounding box of the views that training uses is kept (`device_data`).

Sources (`config.data.source`):
  demo          the bundled ACsN TIRF stack (20 x 256 x 256 uint16)
  stack         a TIFF (or OME-Zarr image) of repeated noisy acquisitions of a static field;
                ground truth = their mean
  paired        noisy and clean TIFFs or OME-Zarr images: two files, or two folders matched by
                file name
Images with a channel axis need `data.channel` (the channel to train on).
  convallaria, actin, skull
                the paper's benchmark stacks (`clidim-jax download NAME`), with the PN2V splits
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np

from clidim_jax.config_lib import CHOICES
from clidim_jax.data.tiff import DataError, read_tiff

SOURCES = CHOICES["data.source"]
GROUND_TRUTHS = ("mean", "mean_uint16")

# A rectangle (y0, y1, x0, x1); None = the image edge.
Rect = tuple[int | None, int | None, int | None, int | None]

# The PN2V spatial splits of the three benchmarks (docs/method.md section 6): (train regions in
# order, test region). Convallaria trains on the bottom-right, top-right and bottom-left 512x512
# quadrants, in that order, and tests on the top-left one.
BENCHMARK_SPLITS: dict[str, tuple[tuple[Rect, ...], Rect]] = {
    "convallaria": (
        ((512, 1024, 512, 1024), (0, 512, 512, 1024), (512, 1024, 0, 512)),
        (0, 512, 0, 512),
    ),
    "actin": (((None, None, 512, None),), (None, None, None, 512)),
    "skull": (((None, None, 256, None),), (None, None, None, 256)),
}

# The reference's few-shot rule takes the fixed slice [50:50+N] of the training images.
FEW_SHOT_START = 50


@dataclasses.dataclass
class PairedImages:
    """Views of stored planes: `noisy` (P, H, W) in the stored dtype, `clean` (M, H, W) float32,
    `views` (N, 6) int32 rows (noisy plane, clean plane, y0, x0, h, w). `order` (few-shot sets
    only) lists the view of each position of an epoch: N views repeated to the epoch's length."""

    noisy: np.ndarray
    clean: np.ndarray
    views: np.ndarray
    name: str
    order: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.noisy.ndim != 3 or self.clean.ndim != 3:
            raise DataError(f"{self.name}: expected (N, H, W) stacks")
        if self.noisy.shape[1:] != self.clean.shape[1:]:
            raise DataError(
                f"{self.name}: noisy images are {self.noisy.shape[1]}x{self.noisy.shape[2]}, "
                f"clean images {self.clean.shape[1]}x{self.clean.shape[2]}"
            )
        self.views = np.asarray(self.views, np.int32).reshape(-1, 6)
        if len(self.views) == 0:
            raise DataError(f"{self.name}: no images")
        p, c, y0, x0, h, w = self.views.T
        _, hh, ww = self.noisy.shape
        if (
            p.min() < 0
            or p.max() >= len(self.noisy)
            or c.min() < 0
            or c.max() >= len(self.clean)
            or y0.min() < 0
            or x0.min() < 0
            or h.min() < 1
            or w.min() < 1
            or (y0 + h).max() > hh
            or (x0 + w).max() > ww
        ):
            raise ValueError(f"{self.name}: views outside the stored planes")

    @classmethod
    def whole(
        cls, noisy: np.ndarray, clean: np.ndarray, clean_index: Sequence[int], name: str
    ) -> PairedImages:
        """Each noisy plane whole, paired with clean plane `clean_index[i]`."""
        n, h, w = noisy.shape
        views = [(i, int(clean_index[i]), 0, 0, h, w) for i in range(n)]
        return cls(noisy, clean, np.asarray(views, np.int32), name)

    def __len__(self) -> int:
        return len(self.views)

    @property
    def epoch_length(self) -> int:
        """Images per epoch: the reference repeats a few-shot subset to the full set's length."""
        return len(self.order) if self.order is not None else len(self.views)

    @property
    def sizes(self) -> np.ndarray:
        return self.views[:, 4:6]

    @property
    def min_size(self) -> tuple[int, int]:
        return int(self.sizes[:, 0].min()), int(self.sizes[:, 1].min())

    def describe(self) -> str:
        """'20 images of 256x128' or '12 images of 64x64 to 512x300'."""
        hs, ws = self.sizes.T
        lo, hi = f"{hs.min()}x{ws.min()}", f"{hs.max()}x{ws.max()}"
        return f"{len(self)} images of {lo}" + (f" to {hi}" if lo != hi else "")

    @property
    def shape(self) -> tuple[int, int]:
        """(h, w) of the views; they must all have it."""
        hs, ws = self.sizes.T
        if hs.min() != hs.max() or ws.min() != ws.max():
            raise ValueError(f"{self.name}: images of different sizes ({self.describe()})")
        return int(hs[0]), int(ws[0])

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        p, c, y, x, h, w = (int(v) for v in self.views[i])
        return self.noisy[p, y : y + h, x : x + w], self.clean[c, y : y + h, x : x + w]

    def noisy_image(self, i: int) -> np.ndarray:
        p, _, y, x, h, w = (int(v) for v in self.views[i])
        return self.noisy[p, y : y + h, x : x + w]

    def images(self) -> list[np.ndarray]:
        """The noisy images (views into the stored planes, no copies)."""
        return [self.noisy_image(i) for i in range(len(self))]

    def iter_noisy(self) -> Iterator[np.ndarray]:
        return (self.noisy_image(i) for i in range(len(self)))

    def _by_clean_view(self) -> dict[tuple[int, ...], list[int]]:
        """The view indices grouped by the clean view (plane and region) they share, in view
        order."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_p, c, y, x, h, w) in enumerate(self.views):
            groups.setdefault((int(c), int(y), int(x), int(h), int(w)), []).append(i)
        return groups

    def iter_clean(self) -> Iterator[np.ndarray]:
        for c, y, x, h, w in self._by_clean_view():
            yield self.clean[c, y : y + h, x : x + w]

    def noisy_groups(self) -> list[list[np.ndarray]]:
        """The noisy views grouped by the clean view they share (repeated acquisitions of one
        scene), in view order."""
        return [[self.noisy_image(i) for i in g] for g in self._by_clean_view().values()]

    def iter_pairs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(noisy, clean) of every view (views, no copies)."""
        return (self.pair(i) for i in range(len(self)))

    def subset(self, indices: Sequence[int], name: str, order: np.ndarray | None = None):
        return PairedImages(self.noisy, self.clean, self.views[np.asarray(indices)], name, order)

    def device_data(self) -> dict[str, np.ndarray]:
        """What the train step keeps on the device: only the planes the views use, cropped to the
        bounding box of the views, in the stored dtype; views rebased to it."""
        p, c, y0, x0, h, w = self.views.T
        ya, yb, xa, xb = int(y0.min()), int((y0 + h).max()), int(x0.min()), int((x0 + w).max())
        planes, p_new = np.unique(p, return_inverse=True)
        cplanes, c_new = np.unique(c, return_inverse=True)

        def take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
            if len(idx) == len(a) and (idx == np.arange(len(a))).all():
                return a[:, ya:yb, xa:xb]  # a view; the device transfer makes the only copy
            return a[idx, ya:yb, xa:xb]

        views = np.stack([p_new, c_new, y0 - ya, x0 - xa, h, w], axis=1).astype(np.int32)
        out = {
            "noisy": take(self.noisy, planes),
            "clean": take(self.clean, cplanes),
            "views": views,
        }
        if self.order is not None:
            out["order"] = np.asarray(self.order, np.int32)
        return out


def demo_stack_path() -> str:
    """The bundled ACsN TIRF stack (20 x 256 x 256 uint16, BSD-3-Clause, Mandracchia et al.)."""
    return str(importlib.resources.files("clidim_jax.data") / "demo" / "TIRF_200Hz.tif")


def mean_ground_truth(stack: np.ndarray, path: str, truncate: bool = False) -> np.ndarray:
    """The mean of all frames (float32), summed one plane at a time in float64 (exact for
    integer data, and never a float copy of the stack). `truncate` reproduces the reference's
    cast of the mean to uint16 (values kept as float32)."""
    if stack.shape[0] < 2:
        raise DataError(
            f"{path}: a stack of {stack.shape[0]} frame cannot give a ground truth "
            "(the mean of repeated acquisitions needs at least 2 frames)"
        )
    acc = np.zeros(stack.shape[1:], np.float64)
    for plane in stack:
        acc += plane
    mean = acc / stack.shape[0]
    if truncate:
        mean = mean.astype(np.uint16)
    return mean.astype(np.float32)[None]


def parse_rect(spec: str, what: str) -> Rect:
    """'y0:y1,x0:x1' (numpy slice bounds, empty = edge) -> (y0, y1, x0, x1)."""
    m = re.fullmatch(r"\s*(-?\d*)\s*:\s*(-?\d*)\s*,\s*(-?\d*)\s*:\s*(-?\d*)\s*", spec)
    if not m:
        raise DataError(f"{what}={spec!r}: expected rows,columns as 'y0:y1,x0:x1' (e.g. 0:512,:)")
    return tuple(int(g) if g else None for g in m.groups())  # type: ignore[return-value]


def resolve_rect(rect: Rect, h: int, w: int, what: str) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = rect
    ya, yb, _ = slice(y0, y1).indices(h)
    xa, xb, _ = slice(x0, x1).indices(w)
    if yb <= ya or xb <= xa:
        raise DataError(f"{what}: the region {_fmt_rect(rect)} is empty in a {h}x{w} image")
    return ya, yb, xa, xb


def _fmt_rect(r: Sequence[int | None]) -> str:
    s = ["" if v is None else str(v) for v in r]
    return f"[{s[0]}:{s[1]}, {s[2]}:{s[3]}]"


def complement(test: tuple[int, int, int, int], h: int, w: int) -> list[Rect]:
    """The image minus a test rectangle, as up to four rectangles: full-width bands above and
    below, then the parts left and right of it."""
    ya, yb, xa, xb = test
    out: list[Rect] = []
    if ya > 0:
        out.append((0, ya, 0, w))
    if yb < h:
        out.append((yb, h, 0, w))
    if xa > 0:
        out.append((ya, yb, 0, xa))
    if xb < w:
        out.append((ya, yb, xb, w))
    return out


@dataclasses.dataclass
class _Field:
    """Whole stored planes of one acquisition (a stack, or one noisy/clean file pair)."""

    noisy: np.ndarray
    clean: np.ndarray
    clean_index: np.ndarray
    name: str


def _views(field: _Field, plane_offset: int, clean_offset: int, rect) -> list[tuple[int, ...]]:
    ya, yb, xa, xb = rect
    return [
        (plane_offset + i, clean_offset + int(field.clean_index[i]), ya, xa, yb - ya, xb - xa)
        for i in range(len(field.noisy))
    ]


def _merge(fields: list[_Field]) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """One store for several fields: the same arrays for one field (no copy), else the planes
    concatenated, zero-padded to the largest size (views keep each image's own size)."""
    if len(fields) == 1:
        return fields[0].noisy, fields[0].clean, [0], [0]
    h = max(f.noisy.shape[1] for f in fields)
    w = max(f.noisy.shape[2] for f in fields)
    dtypes = {f.noisy.dtype for f in fields}
    if len(dtypes) > 1:
        raise DataError(
            "noisy images of different pixel types: "
            + ", ".join(f"{f.name} {f.noisy.dtype}" for f in fields[:4])
        )
    n = sum(len(f.noisy) for f in fields)
    m = sum(len(f.clean) for f in fields)
    noisy = np.zeros((n, h, w), fields[0].noisy.dtype)
    clean = np.zeros((m, h, w), np.float32)
    p_off, c_off, i, j = [], [], 0, 0
    for f in fields:
        _, fh, fw = f.noisy.shape
        noisy[i : i + len(f.noisy), :fh, :fw] = f.noisy
        clean[j : j + len(f.clean), :fh, :fw] = f.clean
        p_off.append(i)
        c_off.append(j)
        i, j = i + len(f.noisy), j + len(f.clean)
    return noisy, clean, p_off, c_off


def _split(
    fields: list[_Field],
    train_rects: list[Rect] | None,
    test_rect: Rect | None,
    test_fraction: float,
    patch_size: int,
) -> tuple[PairedImages, PairedImages]:
    """Spatial split of every field: the test region, and training regions (given, or the rest
    of the image: the parts of it at least `patch_size` wide and high). Without a test region the
    left `test_fraction` of the columns is tested."""
    noisy, clean, p_off, c_off = _merge(fields)
    train_views: list[tuple[int, ...]] = []
    test_views: list[tuple[int, ...]] = []
    names = []
    for f, po, co in zip(fields, p_off, c_off):
        _, h, w = f.noisy.shape
        if test_rect is None:
            if not 0.0 < test_fraction < 1.0:
                raise DataError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
            w_test = int(round(w * test_fraction))
            if w_test < 1 or w_test >= w:
                raise DataError(
                    f"{f.name}: {w} columns cannot be split with test_fraction={test_fraction}"
                )
            test = (0, h, 0, w_test)
        else:
            test = resolve_rect(test_rect, h, w, f"{f.name}: data.test_region")
        if train_rects is not None:
            trains = [resolve_rect(r, h, w, f"{f.name}: data.train_regions") for r in train_rects]
        else:
            rest = complement(test, h, w)
            trains = [r for r in rest if min(r[1] - r[0], r[3] - r[2]) >= patch_size]
            if not trains:
                big = max(rest, key=lambda r: min(r[1] - r[0], r[3] - r[2]), default=None)
                where = (
                    f"the training region {_fmt_rect(big)} ({big[1] - big[0]}x{big[3] - big[2]} "
                    "pixels) is"
                    if big
                    else "nothing is left outside the test region, which is"
                )
                raise DataError(
                    f"{f.name}: {where} smaller than data.patch_size={patch_size} (test region "
                    f"{_fmt_rect(test)} of a {h}x{w} image)"
                )
        for r in trains:
            if max(r[0], test[0]) < min(r[1], test[1]) and max(r[2], test[2]) < min(r[3], test[3]):
                raise DataError(
                    f"{f.name}: training region {_fmt_rect(r)} overlaps the test region "
                    f"{_fmt_rect(test)}"
                )
            train_views += _views(f, po, co, r)
        test_views += _views(f, po, co, test)
        names.append((f.name, trains, test))
    if len(names) == 1:
        name, trains, test = names[0]
        train_name = name + "+".join(_fmt_rect(r) for r in trains)
        test_name = name + _fmt_rect(test)
    else:
        train_name = f"{len(names)} image pairs (training regions)"
        test_name = f"{len(names)} image pairs (test regions)"
    return (
        PairedImages(noisy, clean, np.asarray(train_views), train_name),
        PairedImages(noisy, clean, np.asarray(test_views), test_name),
    )


def _whole(fields: list[_Field], name: str) -> PairedImages:
    noisy, clean, p_off, c_off = _merge(fields)
    views: list[tuple[int, ...]] = []
    for f, po, co in zip(fields, p_off, c_off):
        _, h, w = f.noisy.shape
        views += _views(f, po, co, (0, h, 0, w))
    return PairedImages(noisy, clean, np.asarray(views), name)


# ---------------------------------------------------------------------------------------------
# Sources


def _read(path: str, data: ml_collections.ConfigDict) -> np.ndarray:
    """(N, H, W) planes of a TIFF or OME-Zarr image, with data.axes and data.channel."""
    return read_tiff(path, axes=data.get("axes", ""), channel=int(data.get("channel", -1)))


def _stack_field(path: str, data: ml_collections.ConfigDict, name: str) -> _Field:
    stack = _read(path, data)
    gt = mean_ground_truth(stack, path, truncate=data.get("ground_truth") == "mean_uint16")
    return _Field(stack, gt, np.zeros(len(stack), np.int32), name)


TIFF_SUFFIXES = (".tif", ".tiff")


def _tiffs_in(folder: str) -> dict[str, str]:
    """stem -> path of the TIFF files and OME-Zarr images directly in a folder."""
    out: dict[str, str] = {}
    for entry in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(entry.rstrip("/"))
        if ext.lower() in (*TIFF_SUFFIXES, ".zarr") and not entry.startswith("."):
            if stem in out:
                raise DataError(f"{folder}: both {os.path.basename(out[stem])} and {entry}")
            out[stem] = os.path.join(folder, entry)
    if not out:
        raise DataError(f"{folder}: an empty folder (no .tif, .tiff or .zarr images)")
    return out


def _pair_field(noisy_path: str, clean_path: str, data: ml_collections.ConfigDict) -> _Field:
    noisy = _read(noisy_path, data)
    clean = _read(clean_path, data)
    if noisy.shape[1:] != clean.shape[1:]:
        raise DataError(
            f"{noisy_path}: noisy images are {noisy.shape[1]}x{noisy.shape[2]}, but "
            f"{clean_path} is {clean.shape[1]}x{clean.shape[2]}"
        )
    if len(clean) == 1:
        index = np.zeros(len(noisy), np.int32)  # one clean image for every noisy frame
    elif len(clean) == len(noisy):
        index = np.arange(len(noisy), dtype=np.int32)
    else:
        raise DataError(
            f"{clean_path}: {len(clean)} clean planes for the {len(noisy)} noisy planes of "
            f"{noisy_path} (give 1 clean image, or one per noisy plane)"
        )
    clean = clean.astype(np.float32, copy=False)
    return _Field(noisy, clean, index, os.path.basename(noisy_path))


def _paired_fields(
    noisy_path: str, clean_path: str, data: ml_collections.ConfigDict, what: str
) -> list[_Field]:
    if not noisy_path or not clean_path:
        raise DataError(
            f"data.source=paired needs data.{what}noisy_path and data.{what}clean_path "
            "(two TIFF files, or two folders of TIFFs matched by file name)"
        )
    noisy_path, clean_path = os.path.expanduser(noisy_path), os.path.expanduser(clean_path)
    for p in (noisy_path, clean_path):
        if not os.path.exists(p):
            raise DataError(f"{p}: file or folder not found")
    n_dir, c_dir = os.path.isdir(noisy_path), os.path.isdir(clean_path)
    if n_dir != c_dir:
        raise DataError(
            f"{noisy_path} and {clean_path}: give two files or two folders, not one of each"
        )
    if not n_dir:
        return [_pair_field(noisy_path, clean_path, data)]
    noisy, clean = _tiffs_in(noisy_path), _tiffs_in(clean_path)
    only_n, only_c = sorted(set(noisy) - set(clean)), sorted(set(clean) - set(noisy))
    if only_n or only_c:
        parts = []
        if only_n:
            parts.append(f"{len(only_n)} without a clean image in {clean_path}: {only_n[:5]}")
        if only_c:
            parts.append(f"{len(only_c)} without a noisy image in {noisy_path}: {only_c[:5]}")
        raise DataError(
            f"{noisy_path}: noisy and clean files are matched by name; " + "; ".join(parts)
        )
    return [_pair_field(noisy[k], clean[k], data) for k in sorted(noisy)]


def benchmark_path(name: str, data: ml_collections.ConfigDict) -> str:
    from clidim_jax.data import download

    root = os.path.expanduser(data.get("root", "") or str(download.default_root()))
    found = download.locate(name, root)
    if found is None:
        ds = download.DATASETS[name]
        raise DataError(
            f"dataset {name} not found under {root} (looked for {ds.tif_name}); fetch it with "
            f"`clidim-jax download {name} --root {root}` or place the file there by hand"
        )
    return str(found)


def _rects(spec: str, what: str) -> list[Rect] | None:
    if not spec:
        return None
    return [parse_rect(s, what) for s in spec.split(";") if s.strip()]


def _load_train_test(
    data: ml_collections.ConfigDict,
) -> tuple[PairedImages, PairedImages, int]:
    """(train, test, full width of the images) for the configured source."""
    src = data.source
    test_rect = parse_rect(data.test_region, "data.test_region") if data.test_region else None
    train_rects = _rects(data.train_regions, "data.train_regions")
    p = data.patch_size
    if src in ("demo", "stack"):
        if src == "demo":
            path, name = demo_stack_path(), "acsn_tirf"
        else:
            if not data.path:
                raise DataError(
                    "data.source=stack needs data.path (a TIFF stack of repeated acquisitions)"
                )
            path = os.path.expanduser(data.path)
            name = os.path.basename(path)
        fields = [_stack_field(path, data, name)]
        train, test = _split(fields, train_rects, test_rect, data.test_fraction, p)
    elif src in BENCHMARK_SPLITS:
        path = benchmark_path(src, data)
        fields = [_stack_field(path, data, src)]
        bench_train, bench_test = BENCHMARK_SPLITS[src]
        train, test = _split(fields, list(bench_train), bench_test, 0.0, p)
    elif src == "paired":
        fields = _paired_fields(data.noisy_path, data.clean_path, data, "")
        if data.test_noisy_path or data.test_clean_path:
            test_fields = _paired_fields(data.test_noisy_path, data.test_clean_path, data, "test_")
            train = _whole(fields, _pair_name(data.noisy_path, fields))
            test = _whole(test_fields, _pair_name(data.test_noisy_path, test_fields))
        else:
            train, test = _split(fields, train_rects, test_rect, data.test_fraction, p)
    else:
        raise DataError(f"unknown data.source {src!r} (choose one of {', '.join(SOURCES)})")
    full_width = max(f.noisy.shape[2] for f in fields)
    return train, test, full_width


def _pair_name(path: str, fields: list[_Field]) -> str:
    base = os.path.basename(os.path.normpath(path))
    return base if len(fields) == 1 else f"{base} ({len(fields)} files)"


def carve_validation(
    train: PairedImages, val_fraction: float, full_width: int
) -> tuple[PairedImages, PairedImages | None]:
    """Splits the validation region off the right edge of every training region: its last
    round(full_width * val_fraction) columns. The test split is never touched (the reference
    code picked its best checkpoint on the test set, docs/method.md section 7)."""
    if val_fraction <= 0:
        return train, None
    w_val = int(round(full_width * val_fraction))
    w = train.views[:, 5]
    if w_val < 1 or (w - w_val).min() < 1:
        raise DataError(
            f"{train.name}: data.val_fraction={val_fraction} ({w_val} columns) leaves "
            f"{int((w - w_val).min())} training columns"
        )
    keep, val = train.views.copy(), train.views.copy()
    keep[:, 5] = w - w_val
    val[:, 3] += w - w_val
    val[:, 5] = w_val
    base = train.name.split("[")[0]
    return (
        PairedImages(train.noisy, train.clean, keep, _region_name(base, keep, "training")),
        PairedImages(train.noisy, train.clean, val, _region_name(base, val, "validation")),
    )


def _region_name(base: str, views: np.ndarray, what: str) -> str:
    """'name[y0:y1, x0:x1]' when every view is the same region, else 'name (what regions)'."""
    regions = {tuple(int(v) for v in r) for r in views[:, 2:]}
    if len(regions) == 1:
        y, x, h, w = regions.pop()
        return f"{base}{_fmt_rect((y, y + h, x, x + w))}"
    return f"{base} ({len(regions)} {what} regions)"


def few_shot(train: PairedImages, n: int, batch_size: int, seed: int) -> PairedImages:
    """The reference's few-shot selection (docs/method.md section 6): N < batch size takes the fixed
    slice [50:50+N] of the (sorted) training images, otherwise a seeded random subset; either way
    repeated up to the full training-set length, so an epoch keeps its number of steps.

    When fewer than 50 + N images exist, the slice ends at the last image instead (the reference
    would silently train on fewer than N)."""
    total = len(train)
    if n <= 0:
        return train
    if n > total:
        raise DataError(
            f"data.n_samples={n} is larger than the {total} training images of {train.name}"
        )
    if n < batch_size:
        start = min(FEW_SHOT_START, total - n)
        idx = np.arange(start, start + n)
        how = f"images {start}:{start + n}"
    else:
        idx = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
        how = f"a random subset (seed {seed})"
    order = (np.arange(total) % n).astype(np.int32)
    return train.subset(idx, f"{train.name}, {n} of {total}: {how}", order)


def load_splits(
    data: ml_collections.ConfigDict, batch_size: int = 1, seed: int = 0
) -> tuple[PairedImages, PairedImages | None, PairedImages]:
    """Returns (train, validation or None, test), validated before any training starts."""
    train, test, full_width = _load_train_test(data)
    val_fraction = float(data.get("val_fraction", 0.0))
    if data.get("val_noisy_path") or data.get("val_clean_path"):
        # Validation files take precedence over a validation region (data.val_fraction).
        val_fields = _paired_fields(data.val_noisy_path, data.val_clean_path, data, "val_")
        val = _whole(val_fields, _pair_name(data.val_noisy_path, val_fields))
    else:
        train, val = carve_validation(train, val_fraction, full_width)
    p = data.patch_size
    hs, ws = train.sizes.T
    small = np.flatnonzero((hs < p) | (ws < p))
    if len(small):
        i = int(small[0])
        hint = (
            f" (without the validation region, data.val_fraction={data.val_fraction})"
            if val is not None
            else ""
        )
        raise DataError(
            f"{train.name}: a training image{hint} is {int(hs[i])}x{int(ws[i])} pixels, smaller "
            f"than data.patch_size={p}"
        )
    train = few_shot(train, int(data.get("n_samples", 0)), batch_size, seed)
    return train, val, test


def load_datasets(
    data: ml_collections.ConfigDict, batch_size: int = 1, seed: int = 0
) -> tuple[PairedImages, PairedImages]:
    """Returns (train, test) for the configured source (train without any validation region)."""
    train, _, test = load_splits(data, batch_size, seed)
    return train, test
