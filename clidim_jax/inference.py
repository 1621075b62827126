"""Whole-image prediction with the generator in eval mode (BN running statistics, no dropout):
reflect padding to the U-Net's size multiple, and overlapping tiles blended smoothly for images
larger than a tile, so memory is bounded by the tile and each tile shape compiles once.

Why tiles can reproduce the whole-image output exactly: in eval mode every layer is a convolution
followed by a per-pixel affine map (BatchNorm with running statistics) and a pointwise activation,
so an output pixel depends only on the input inside its receptive field. The U-Net is equivariant
to shifts by multiples of 2**depth, so tiles start at such multiples. A tile's output then equals
the whole image's output at every pixel whose receptive field lies inside the tile; near a tile
edge that lies inside the image, the convolutions' zero padding differs. The blending window is
therefore exactly zero within `margin` pixels of such an edge and ramps up (raised cosine) over
the rest of the overlap: with `margin >= receptive_field_margin(depth)` tiled and whole-image
outputs agree to float rounding. Deep U-Nets (depth 8: a receptive field over 1000 pixels) have a
much smaller *effective* receptive field; there a smaller margin trades exactness for speed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from clidim_jax.data.normalization import Normalization

# JAX is imported only by the generators that need it: a model that runs elsewhere (ONNX
# Runtime, `predict_fn` below) denoises without JAX installed.

Progress = Callable[[int, int], None]


def pad_to_multiple(img: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pads (H, W) up to multiples of `multiple` (U-Net input sizes)."""
    h, w = img.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if (ph < h and pw < w) else "symmetric"
        img = np.pad(img, ((0, ph), (0, pw)), mode=mode)
    return img, (h, w)


def receptive_field(depth: int) -> tuple[int, int]:
    """(left, right): how far, in input pixels, the U-Net's output at a pixel can look to either
    side (the worst case over the 2**depth alignments), through the 4x4 stride-2 convolutions
    (output j of a level reads inputs 2j-1 .. 2j+2), the 4x4 stride-2 transposed convolutions
    (output o reads coarse inputs ceil(o/2)-1 .. floor((o+1)/2)) and the skip connections."""

    def down(level: int, lo: int, hi: int) -> tuple[int, int]:
        # pixels lo..hi of the down path's output at `level` read input pixels:
        return (2**level) * lo - (2**level - 1), (2**level) * hi + 2 * (2**level - 1)

    def up(level: int, lo: int, hi: int) -> tuple[int, int]:
        # pixels lo..hi of the up path's input at `level` (skip concat transposed-conv output)
        a, b = down(level, lo, hi)
        if level == depth:
            return a, b
        c, d = up(level + 1, math.ceil(lo / 2) - 1, (hi + 1) // 2)
        return min(a, c), max(b, d)

    left = right = 0
    for o in range(2**depth):
        a, b = up(1, math.ceil(o / 2) - 1, (o + 1) // 2)  # the outermost transposed conv
        left, right = max(left, o - a), max(right, b - o)
    return left, right


def receptive_field_margin(depth: int) -> int:
    """The blending margin at which tiled prediction is exact (see the module docstring)."""
    return max(receptive_field(depth))


class TilingError(ValueError):
    """Tiling arguments the model cannot use (reported to the user as one line)."""


def _round_up(x: int, q: int) -> int:
    return -(-x // q) * q


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile geometry, in pixels of the padded image.

    tile: tile side (rounded down to a multiple of 2**depth); images whose padded side fits in
      it are predicted whole along that side.
    overlap: the least overlap of neighbouring tiles (rounded up to a multiple of 2**depth).
    margin: pixels next to a tile edge inside the image that get zero weight.
    """

    tile: int
    overlap: int
    margin: int

    @classmethod
    def make(
        cls, multiple: int, tile: int, overlap: int | None = None, margin: int | None = None
    ) -> Tiling:
        if tile < multiple:
            raise TilingError(f"tile size {tile} is smaller than the U-Net's size unit {multiple}")
        tile = tile // multiple * multiple
        overlap = tile // 4 if overlap is None or overlap <= 0 else overlap
        overlap = max(multiple, _round_up(overlap, multiple))
        if overlap >= tile:
            raise TilingError(f"tile overlap {overlap} must be smaller than the tile ({tile})")
        margin = overlap // 4 if margin is None or margin < 0 else margin
        if 2 * margin >= overlap:
            raise TilingError(f"tile margin {margin} must be less than half the overlap {overlap}")
        return cls(tile, overlap, margin)

    def positions(self, length: int) -> list[int]:
        """Tile origins along an axis of `length` (a multiple of the size unit): a regular stride
        of tile - overlap, the last tile flush with the end."""
        if length <= self.tile:
            return [0]
        stride = self.tile - self.overlap
        n = -(-(length - self.overlap) // stride)
        return [min(k * stride, length - self.tile) for k in range(n)]

    def ramp(self, d: np.ndarray) -> np.ndarray:
        """0 for d < margin, then sin^2 up to 1 over overlap - 2 margin pixels. For two tiles
        overlapping by exactly `overlap` the two ramps sum to 1 (a partition of unity)."""
        r = self.overlap - 2 * self.margin
        u = np.clip((d - self.margin + 1) / (r + 1), 0.0, 1.0)
        return np.where(d < self.margin, 0.0, np.sin(0.5 * np.pi * u) ** 2)

    def window(self, start: int, size: int, length: int) -> np.ndarray:
        """The 1-D blending weights of the tile [start, start + size) on an axis of `length`."""
        t = np.arange(size, dtype=np.float64)
        w = np.ones(size)
        if start > 0:
            w = w * self.ramp(t)
        if start + size < length:
            w = w * self.ramp(size - 1 - t)
        return w


# The 8 symmetries of the square (dihedral group D4) as (quarter turns, mirror first).
DIHEDRAL = tuple((k, m) for k in range(4) for m in (False, True))


def _xp(x) -> Any:
    """numpy for NumPy arrays, jax.numpy for anything else (JAX arrays and tracers)."""
    if isinstance(x, np.ndarray):
        return np
    import jax.numpy as jnp

    return jnp


def dihedral(x, k: int, mirror: bool):
    """Mirrors the W axis (if `mirror`), then turns the (H, W) axes of (N, H, W, ...) `k`
    quarter turns; NumPy or JAX arrays."""
    xp = _xp(x)
    if mirror:
        x = xp.flip(x, axis=2)
    return xp.rot90(x, k, axes=(1, 2))


def dihedral_inverse(y, k: int, mirror: bool):
    xp = _xp(y)
    y = xp.rot90(y, -k, axes=(1, 2))
    return xp.flip(y, axis=2) if mirror else y


def dihedral_mean(f: Callable, x: Any) -> Any:
    """Test-time augmentation: the mean over the 8 symmetries t of t^-1(f(t(x))) for an (N, H,
    W, C) batch (NumPy or JAX). The transforms of equal shape go through `f` as one batch (one
    call for square images, two otherwise); eval-mode G treats the images of a batch
    independently, so this equals eight separate calls."""
    xp, n = _xp(x), x.shape[0]
    groups = ([t for t in DIHEDRAL if t[0] % 2 == 0], [t for t in DIHEDRAL if t[0] % 2 == 1])
    if x.shape[1] == x.shape[2]:
        groups = (DIHEDRAL,)
    total = xp.zeros((*x.shape[:3], 1), xp.float32)
    for ts in groups:
        y = f(xp.concatenate([dihedral(x, k, m) for k, m in ts], axis=0))
        for i, (k, m) in enumerate(ts):
            total = total + dihedral_inverse(y[i * n : (i + 1) * n], k, m)
    return total / len(DIHEDRAL)


def inference_settings(stored: Any = None, **given: Any) -> dict[str, Any]:
    """`Denoiser` keyword arguments (batch_size, tile, overlap, tta): each one given (and not None
    or 0), else the one stored with the model (a run's `eval` config, or a model file's metadata:
    batch_size, tile, tile_overlap, tta), else the default (4, 512, a quarter tile, off)."""
    stored = stored if stored is not None else {}
    overlap = given.get("overlap")
    tta = given.get("tta")
    return {
        "batch_size": int(given.get("batch_size") or stored.get("batch_size") or 4),
        "tile": int(given.get("tile") or stored.get("tile") or 512),
        "overlap": overlap
        if overlap is not None
        else (int(stored.get("tile_overlap") or 0) or None),
        "tta": bool(stored.get("tta", False)) if tta is None else bool(tta),
    }


class Denoiser:
    """Runs G (eval mode) on images in original units.

    `generator` is a Flax module with `depth` and `apply(variables, x, train=False)` (or anything
    with that interface, e.g. a model loaded by `clidim_jax.export.load_model`), run under
    `jax.jit`. A generator with `runs_in_jax = False` (e.g. an ONNX Runtime session,
    `onnx_export.OnnxGenerator`) is called as it is, on NumPy arrays, and JAX is never imported.
    Images whose
    padded size fits in `tile` are predicted whole, `batch_size` at a time (one compilation per
    image size); larger ones as overlapping tiles, `batch_size` tiles at a time (one compilation
    per tile shape). `tta=True` predicts every image (or tile) under the 8 flips and quarter
    turns and averages the 8 predictions, mapped back (test-time augmentation: 8 times the
    compute, in one compiled program per shape).
    """

    def __init__(
        self,
        generator: Any,
        variables: Any,
        norm: Normalization,
        batch_size: int = 4,
        *,
        tile: int = 512,
        overlap: int | None = None,
        margin: int | None = None,
        tta: bool = False,
    ):
        self.generator = generator
        self.tta = bool(tta)
        self.variables = variables
        self.norm = norm
        self.batch_size = max(1, int(batch_size))
        self.multiple = 2**generator.depth
        self.tiling = Tiling.make(self.multiple, tile, overlap, margin)

        def predict(variables, x):
            f = lambda x: generator.apply(variables, x, train=False).astype(np.float32)
            return dihedral_mean(f, x) if self.tta else f(x)

        if getattr(generator, "runs_in_jax", True):
            import jax

            from clidim_jax.compiler import compiler_options

            self._predict = jax.jit(predict, compiler_options=compiler_options())
        else:
            self._predict = predict

    @property
    def exact_tiling(self) -> bool:
        """Whether tiled outputs equal whole-image outputs: the margin covers the receptive field
        and no layer normalises over the image (instance norm does)."""
        if getattr(self.generator, "norm", "batch") == "instance":
            return False
        return self.tiling.margin >= receptive_field_margin(self.generator.depth)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """x: (n <= batch_size, H, W) normalised float32 -> (n, H, W) in [-1, 1]. A full batch
        every call keeps one compiled shape per (H, W)."""
        n = x.shape[0]
        if n < self.batch_size:
            x = np.concatenate([x, np.repeat(x[-1:], self.batch_size - n, 0)], 0)
        y = self._predict(self.variables, x[..., None].astype(np.float32))
        return np.asarray(y)[:n, ..., 0]

    def _forward(self, images: Sequence[np.ndarray], norms: Sequence[Normalization]) -> list:
        padded = [
            nm.apply(pad_to_multiple(np.asarray(im, np.float32), self.multiple)[0]).astype(
                np.float32
            )
            for im, nm in zip(images, norms)
        ]
        y = self._run(np.stack(padded))
        outs = []
        for im, nm, yi in zip(images, norms, y):
            h, w = im.shape
            outs.append(np.asarray(nm.invert(yi[:h, :w].astype(np.float64)), np.float32))
        return outs

    def fits_whole(self, shape: tuple[int, int]) -> bool:
        t = self.tiling.tile
        return all(_round_up(s, self.multiple) <= t for s in shape)

    def __call__(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        norms: Sequence[Normalization] | None = None,
        progress: Progress | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """images: (N, H, W) or (H, W) in original units -> float32 denoised, same shape. A list
        of 2-D images of different sizes gives a list of denoised images.

        `norms` gives each image its own normalisation (the reference code's test-time per-image
        min-max); by default every image uses the model's stored one.
        """
        if not isinstance(images, np.ndarray) and len({np.shape(a) for a in images}) > 1:
            norms = [self.norm] * len(images) if norms is None else list(norms)
            outs = []
            for i, (im, nm) in enumerate(zip(images, norms)):
                outs.append(self.denoise(im, nm))
                if progress is not None:
                    progress(i + 1, len(images))
            return outs
        images = np.asarray(images)
        single = images.ndim == 2
        images = images[None] if single else images
        if images.ndim != 3:
            raise ValueError(f"expected (H, W) or (N, H, W) images, got {images.shape}")
        norms = [self.norm] * len(images) if norms is None else list(norms)
        if not self.fits_whole(images.shape[1:]):
            out = np.stack([self.denoise(im, nm, progress) for im, nm in zip(images, norms)])
            return out[0] if single else out
        outs = []
        for i in range(0, len(images), self.batch_size):
            sl = slice(i, i + self.batch_size)
            outs.extend(self._forward(list(images[sl]), norms[sl]))
            if progress is not None:
                progress(min(i + self.batch_size, len(images)), len(images))
        out = np.stack(outs)
        return out[0] if single else out

    def denoise(
        self,
        image: np.ndarray,
        norm: Normalization | None = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """One (H, W) image -> float32 (H, W), whole or tiled."""
        norm = self.norm if norm is None else norm
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"expected an (H, W) image, got {image.shape}")
        if self.fits_whole(image.shape):
            out = self._forward([image], [norm])[0]
            if progress is not None:
                progress(1, 1)
            return out
        return self._tiled(image, norm, progress)

    def _tiled(self, image: np.ndarray, norm: Normalization, progress: Progress | None):
        out = np.empty(image.shape, np.float32)
        for y0, rows in self.stream(lambda a, b: image[a:b], image.shape, norm, progress):
            out[y0 : y0 + len(rows)] = rows
        return out

    def stream(
        self,
        read_rows: Callable[[int, int], np.ndarray],
        shape: tuple[int, int],
        norm: Normalization | None = None,
        progress: Progress | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Denoises an (H, W) image read lazily, a band of rows at a time: yields (y0, rows),
        float32 rows y0 .. y0 + len(rows) of the output, top to bottom, covering the image.

        `read_rows(a, b)` returns rows a .. b of the image in original units (any dtype). Images
        that fit in a tile are read and predicted whole. Larger ones go one row of tiles at a
        time: memory holds that row of tiles' input band and the blending accumulator of the
        rows later tiles still add to (a tile's height each, full width), never the image. Each
        pixel sums the same tiles' weighted predictions in the same order as a whole-plane
        accumulator would, so the result is the same numbers.
        """
        norm = self.norm if norm is None else norm
        h, w = (int(s) for s in shape)
        if self.fits_whole((h, w)):
            out = self._forward([np.asarray(read_rows(0, h))], [norm])[0]
            if progress is not None:
                progress(1, 1)
            yield 0, out
            return
        ph, pw = _round_up(h, self.multiple), _round_up(w, self.multiple)
        # np.pad's reflection as an index map (both axes use one mode, as in pad_to_multiple)
        mode = "reflect" if (ph - h < h and pw - w < w) else "symmetric"
        row_of = np.pad(np.arange(h), (0, ph - h), mode=mode)
        tl = self.tiling
        th, tw = min(tl.tile, ph), min(tl.tile, pw)
        ys, xs = tl.positions(ph), tl.positions(pw)
        wy = {y: tl.window(y, th, ph) for y in ys}
        wx = {x0: tl.window(x0, tw, pw) for x0 in xs}
        norm_y, norm_x = np.zeros(ph), np.zeros(pw)
        for y in ys:
            norm_y[y : y + th] += wy[y]
        for x0 in xs:
            norm_x[x0 : x0 + tw] += wx[x0]
        total, done = len(ys) * len(xs), 0
        acc = np.zeros((th, pw), np.float32)  # padded rows ys[k] .. ys[k] + th

        def finished(a: int, b: int, rows: np.ndarray) -> tuple[int, np.ndarray]:
            y = norm.invert(rows[: min(b, h) - a, :w].astype(np.float64))
            return a, np.asarray(y, np.float32)

        for k, y in enumerate(ys):
            idx = row_of[y : y + th]
            lo = int(idx.min())
            band = np.asarray(read_rows(lo, int(idx.max()) + 1))[idx - lo].astype(np.float32)
            if pw > w:
                band = np.pad(band, ((0, 0), (0, pw - w)), mode=mode)
            band = np.asarray(norm.apply(band), np.float32)
            for i in range(0, len(xs), self.batch_size):
                batch = xs[i : i + self.batch_size]
                pred = self._run(np.stack([band[:, x0 : x0 + tw] for x0 in batch]))
                wrow = (wy[y] / norm_y[y : y + th])[:, None]
                for x0, p in zip(batch, pred):
                    weight = wrow * (wx[x0] / norm_x[x0 : x0 + tw])
                    acc[:, x0 : x0 + tw] += (p * weight).astype(np.float32)
                done += len(batch)
                if progress is not None:
                    progress(done, total)
            if k + 1 < len(ys):  # rows above the next row of tiles are final
                step = ys[k + 1] - y
                if y < h:
                    yield finished(y, min(y + step, h), acc[:step])
                acc = np.concatenate([acc[step:], np.zeros((step, pw), np.float32)])
            elif y < h:
                yield finished(y, h, acc)
