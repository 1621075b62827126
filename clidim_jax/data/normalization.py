"""Intensity normalisation to [-1, 1], stored with the model and inverted exactly."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

import numpy as np


def percentiles(images: Iterable[np.ndarray], q: tuple[float, ...]) -> tuple[float, ...]:
    """`np.percentile(all pixels, q)` (linear interpolation), bit for bit, of a set of images
    without concatenating them: integer images go through an exact histogram built one image at
    a time (a few MB however large the stack); float images are concatenated (one copy)."""
    images = list(images)
    if all(np.issubdtype(a.dtype, np.unsignedinteger) and a.itemsize <= 2 for a in images):
        counts = np.zeros(1 << (8 * max(a.itemsize for a in images)), np.int64)
        for a in images:
            counts += np.bincount(a.ravel(), minlength=len(counts))
        return _percentiles_from_counts(counts, q)
    flat = np.concatenate([np.asarray(a, np.float32).ravel() for a in images])
    return tuple(float(v) for v in np.percentile(flat, q))


def _percentiles_from_counts(counts: np.ndarray, q: tuple[float, ...]) -> tuple[float, ...]:
    """NumPy's 'linear' method on the sorted values a histogram describes (same arithmetic as
    numpy's _lerp, so the result is identical; tested against np.percentile)."""
    n = int(counts.sum())
    cum = np.cumsum(counts)
    out = []
    for qq in np.true_divide(np.asarray(q, np.float64), 100):
        v = (n - 1) * qq
        i = np.floor(v)
        t = v - i
        j = min(int(i) + 1, n - 1)
        a = float(np.searchsorted(cum, int(i), side="right"))
        b = float(np.searchsorted(cum, j, side="right"))
        d = b - a
        r = a + d * t
        if t >= 0.5:
            r = b - d * (1 - t)
        out.append(float(r))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Normalization:
    """x -> 2 (x - low) / (high - low) - 1, from statistics of the noisy training images only.

    `mode == "reference"` marks runs that reproduce the reference code, which instead uses a
    batch min-max of noisy and clean together during training (and per image at test time, a
    leak of the ground truth): the fixed low/high here are then used only for deployment.
    """

    low: float
    high: float
    mode: str = "percentile"

    @classmethod
    def from_images(
        cls, noisy: Iterable[np.ndarray], q: tuple[float, float], mode: str = "percentile"
    ) -> Normalization:
        """From the percentiles `q` of every pixel of the noisy images (an array or a sequence
        of arrays of any shapes)."""
        lo, hi = percentiles(noisy, q)
        if not hi > lo:
            hi = lo + 1.0  # a constant image: any positive scale is exact
        return cls(lo, hi, mode)

    def apply(self, x):
        """Works on NumPy and JAX arrays alike."""
        return (x - self.low) * (2.0 / (self.high - self.low)) - 1.0

    def invert(self, y):
        return (y + 1.0) * ((self.high - self.low) / 2.0) + self.low

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        return cls(float(d["low"]), float(d["high"]), str(d.get("mode", "percentile")))
