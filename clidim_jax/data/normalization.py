"""Intensity normalisation to [-1, 1], stored with the model and inverted exactly."""

from __future__ import annotations

import dataclasses
import json

import numpy as np


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
        cls, noisy: np.ndarray, percentiles: tuple[float, float], mode: str = "percentile"
    ) -> Normalization:
        lo, hi = np.percentile(noisy, percentiles)
        lo, hi = float(lo), float(hi)
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
