"""Intensity normalisation to [-1, 1], stored with the model and inverted exactly."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Sequence

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


def _xp(x):
    """jax.numpy for JAX arrays (also under jit), NumPy otherwise."""
    import jax

    if isinstance(x, jax.Array):
        import jax.numpy as jnp

        return jnp
    return np


@dataclasses.dataclass(frozen=True)
class NoiseModel:
    """Poisson-Gaussian noise: Var[noisy | clean] = gain * clean + offset (offset = read-noise
    variance minus gain times the camera's dark level, so it may be negative)."""

    gain: float
    offset: float
    # Lag-1 correlation of the noise between vertical and horizontal neighbours (a scanning
    # detector's analog bandwidth correlates neighbours along its lines); only synthesised
    # noise uses it (`fit_noise_correlation`, `clidim_jax.step.synthesize_noisy`).
    corr: tuple[float, float] = (0.0, 0.0)
    # The measured distribution of the noise at each intensity (`fit_empirical_noise`): when
    # set, synthesised noise is drawn from it instead of from the Poisson-Gaussian model, which
    # then only extends it above the brightest intensity measured.
    empirical: EmpiricalNoise | None = None  # (compared, and hashed, by identity)

    def gat(self, x):
        """The generalized Anscombe transform (Murtagh, Starck and Bijaoui 1995; Makitalo and
        Foi 2013): 2 / gain * sqrt(max(gain * x + 3/8 gain^2 + offset, 0)). It maps noise of
        variance gain * x + offset to (approximately) unit variance."""
        xp = _xp(x)
        a = self.gain
        return (2.0 / a) * xp.sqrt(xp.maximum(a * x + 0.375 * a * a + self.offset, 0.0))

    def gat_inverse(self, y):
        """The algebraic inverse of `gat` (for y >= 0; negative y count as 0). A supervised
        model learns the transform of the clean image itself, so the algebraic inverse, not
        an unbiased one, is the right inverse here."""
        xp = _xp(y)
        a = self.gain
        y = xp.maximum(y, 0.0)
        return ((a * y / 2.0) ** 2 - 0.375 * a * a - self.offset) / a


@dataclasses.dataclass(frozen=True, eq=False)
class EmpiricalNoise:
    """The distribution of noisy - clean measured on training pairs, by clean intensity: for
    J intensity bins, the mean clean intensity `levels` (increasing), the residuals' standard
    deviation `std`, and K quantiles of the residual divided by that deviation at
    probabilities (k + 1/2) / K (`quantiles`, J x K), centred (a mean offset of the
    training frames from their clean image is drift, not noise). Drawing from it reproduces the real
    noise's shape (its floor, skew and discreteness), which a Poisson-Gaussian model with a
    detector gain of several counts per photon gets wrong (a lattice of multiples of the gain
    where the real data takes every value)."""

    levels: np.ndarray
    std: np.ndarray
    quantiles: np.ndarray

    def __repr__(self) -> str:  # a short, exact fingerprint (part of the compiled step's key)
        import hashlib

        h = hashlib.sha256()
        for a in (self.levels, self.std, self.quantiles):
            h.update(np.ascontiguousarray(a, np.float64).tobytes())
        return f"EmpiricalNoise(bins={len(self.levels)}, sha256={h.hexdigest()[:16]})"


# At most this many (clean, residual) samples are used for the empirical noise fit (a fixed,
# evenly strided subset of larger training sets): 4M pixels, 64 MB of float64.
_EMPIRICAL_SAMPLES = 1 << 22


def fit_empirical_noise(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    bins: int = 48,
    quantiles: int = 512,
    min_samples: int = 20000,
) -> EmpiricalNoise:
    """The measured noise distribution by clean intensity (`EmpiricalNoise`), from paired
    images: bin edges at equally populated quantiles of the clean intensity merged with edges
    equally spaced in its square root (so bright, rare intensities get bins of their own),
    then bins with fewer than `min_samples` residuals merged upward. Raises ValueError when
    there are not enough pixels for one bin or the clean images are constant."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no image pairs to measure the noise on")
    total = sum(np.size(c) for _, c in pairs)
    stride = max(1, -(-total // _EMPIRICAL_SAMPLES))
    cs, rs = [], []
    for noisy, clean in pairs:  # (the subset first, then float64: no full-size copies)
        c = np.ravel(clean)[::stride].astype(np.float64)
        cs.append(c)
        rs.append(np.ravel(noisy)[::stride].astype(np.float64) - c)
    c, r = np.concatenate(cs), np.concatenate(rs)
    if c.size < min_samples:
        raise ValueError(
            f"{c.size} pixels are too few to measure the noise's distribution "
            f"(at least {min_samples})"
        )
    lo, hi = float(c.min()), float(c.max())
    if not hi > lo:
        raise ValueError("the clean images have a single intensity: the noise cannot be measured")
    root = np.linspace(np.sqrt(max(lo, 0.0)), np.sqrt(max(hi, 0.0)), bins // 2 + 1) ** 2
    edges = np.unique(np.concatenate([np.quantile(c, np.linspace(0, 1, bins // 2 + 1)), root]))
    idx = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    groups, cur, n = [], [], 0  # consecutive bins merged until each holds min_samples
    for b, k in enumerate(counts):
        cur.append(b)
        n += k
        if n >= min_samples:
            groups.append(cur)
            cur, n = [], 0
    if cur:  # the brightest remainder joins the last full group
        if groups:
            groups[-1] += cur
        else:
            groups.append(cur)
    label = np.empty(len(counts), np.int64)
    for g, members in enumerate(groups):
        label[members] = g
    lab = label[idx]
    order = np.argsort(lab, kind="stable")
    splits = np.cumsum(np.bincount(lab, minlength=len(groups)))[:-1]
    probs = (np.arange(quantiles) + 0.5) / quantiles
    levels, std, table = [], [], []
    for members in np.split(order, splits):
        rr = r[members]
        rr = rr - rr.mean()  # zero-mean: an offset of these frames from their average is drift
        s = float(rr.std())
        s = s if s > 0 else 1.0  # noise-free intensities: every quantile is 0 anyway
        levels.append(float(c[members].mean()))
        std.append(s)
        table.append(np.quantile(rr, probs) / s)
    return EmpiricalNoise(np.asarray(levels), np.asarray(std), np.asarray(table))


# Up to this many pixels a noise model is fitted from all of them at once (2**24: 256 MB of
# float64 temporaries); larger stacks stream through one image at a time.
_FIT_IN_ONE_GO = 1 << 24


def fit_noise_model(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], bins: int = 64, allow_constant: bool = False
) -> NoiseModel:
    """Fits Var[noisy - clean] = gain * clean + offset on paired images: the residual variance
    in `bins` equally populated bins of the clean intensity, then a least-squares line through
    the bins (each weighted by its pixel count). Raises ValueError when the data show no
    signal-dependent noise (a gain <= 0 cannot be stabilised by the GAT), unless
    `allow_constant`: then the noise is taken as signal-independent, gain 0 and offset the mean
    residual variance (enough to synthesise noise, not for a GAT)."""
    pairs = list(pairs)  # (views of stored planes: references, no copies)
    if not pairs:
        raise ValueError("no image pairs to fit a noise model on")
    if sum(np.size(c) for _, c in pairs) <= _FIT_IN_ONE_GO:
        c = np.concatenate([np.asarray(c, np.float64).ravel() for _, c in pairs])
        r = np.concatenate([np.asarray(n, np.float64).ravel() for n, _ in pairs]) - c
        edges = np.unique(np.quantile(c, np.linspace(0, 1, bins + 1)))
        nb = max(len(edges) - 1, 1)
        idx = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, nb - 1)
        n = np.bincount(idx, minlength=nb).astype(np.float64)
        sc, sr, srr = (np.bincount(idx, v, nb) for v in (c, r, r * r))
    else:
        # Bin edges from a subsample of the clean pixels, then per-bin sums one pair at a time:
        # memory stays that of one image however large the stack.
        sample = np.concatenate([np.asarray(c, np.float64)[::4, ::4].ravel() for _, c in pairs])
        edges = np.unique(np.quantile(sample, np.linspace(0, 1, bins + 1)))
        nb = max(len(edges) - 1, 1)
        n, sc, sr, srr = (np.zeros(nb) for _ in range(4))
        for noisy, clean in pairs:
            c = np.asarray(clean, np.float64).ravel()
            r = np.asarray(noisy, np.float64).ravel() - c
            idx = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, nb - 1)
            n += np.bincount(idx, minlength=nb)
            sc += np.bincount(idx, c, nb)
            sr += np.bincount(idx, r, nb)
            srr += np.bincount(idx, r * r, nb)
    ok = n > 1
    mean_c = sc[ok] / n[ok]
    mean_r = sr[ok] / n[ok]
    var = srr[ok] / n[ok] - mean_r**2
    w = n[ok]
    if len(mean_c) < 2 or np.ptp(mean_c) == 0:
        raise ValueError("the clean images have a single intensity: no noise model can be fitted")
    gain, offset = np.polyfit(mean_c, var, 1, w=np.sqrt(w))
    if not gain > 0 and allow_constant:
        return NoiseModel(0.0, float(np.average(var, weights=w)))
    if not gain > 0:
        raise ValueError(
            f"the noise does not grow with the signal (fitted gain {gain:.3g}): a variance-"
            "stabilising transform does not apply; use data.vst=none"
        )
    return NoiseModel(float(gain), float(offset))


MAX_NOISE_CORRELATION = 0.45


def fit_noise_correlation(groups: Iterable[Sequence[np.ndarray]]) -> tuple[float, float]:
    """The noise's lag-1 correlation between vertical and horizontal neighbours, (rho_y, rho_x),
    from repeated noisy acquisitions of one scene: each group holds noisy images of one clean
    image. The difference of two consecutive frames of a group is noise only (the scene, and
    the ground truth's own noise, cancel; slow drift nearly does), and its normalised lag-1
    autocovariance is the noise's. Clipped to +-MAX_NOISE_CORRELATION (what a 3-tap filter can
    synthesise with margin). Raises ValueError when no group has two frames."""
    n = sxx = syy = sq = 0.0
    for frames in groups:
        for a, b in itertools.pairwise(frames):
            d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
            d -= d.mean()
            sq += float(np.sum(d * d))
            syy += float(np.sum(d[1:] * d[:-1])) * d.size / max(d[1:].size, 1)
            sxx += float(np.sum(d[:, 1:] * d[:, :-1])) * d.size / max(d[:, 1:].size, 1)
            n += 1
    if n == 0:
        raise ValueError(
            "fitting the noise's spatial correlation needs at least two noisy images of one "
            "clean image (a stack, or a noisy stack paired with one clean image)"
        )
    if sq == 0:
        return 0.0, 0.0
    clip = lambda r: float(np.clip(r, -MAX_NOISE_CORRELATION, MAX_NOISE_CORRELATION))
    return clip(syy / sq), clip(sxx / sq)


@dataclasses.dataclass(frozen=True)
class Normalization:
    """x -> 2 (v(x) - low) / (high - low) - 1 (+ 0 in mode "scale"), where v is the identity
    or, with a noise model, its generalized Anscombe transform; low/high come from statistics
    of the training images.

    `mode` says how low/high were chosen: "percentile" (percentiles of the noisy training
    images, the pix2pix-style default; "scale" is the same mapping shifted so that `low`, the
    dark level, lands on 0), "range" (the noisy training images' low percentile and
    the clean training images' maximum, plus headroom: every training target is representable
    and brighter test images stay in a range the model has seen), or "reference" (runs that
    reproduce the reference code, which instead uses a batch min-max of noisy and clean during
    training and per image at test time, a leak of the ground truth: the fixed low/high here
    are then used only for deployment).
    """

    low: float
    high: float
    mode: str = "percentile"
    noise: NoiseModel | None = None

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

    @property
    def shift(self) -> float:
        """Where `low` lands: -1, or 0 for mode "scale" (zero = the dark level, so brightness
        is a multiplication and a homogeneous G treats it as one)."""
        return 0.0 if self.mode == "scale" else -1.0

    def apply(self, x):
        """Works on NumPy and JAX arrays alike (also inside jit)."""
        if self.noise is not None:
            x = self.noise.gat(x)
        return (x - self.low) * (2.0 / (self.high - self.low)) + self.shift

    def invert(self, y):
        x = (y - self.shift) * ((self.high - self.low) / 2.0) + self.low
        if self.noise is not None:
            x = self.noise.gat_inverse(x)
        return x

    def to_dict(self) -> dict:
        d = {"low": self.low, "high": self.high, "mode": self.mode}
        if self.noise is not None:
            d["noise"] = {"gain": self.noise.gain, "offset": self.noise.offset}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        noise = d.get("noise")
        return cls(
            float(d["low"]),
            float(d["high"]),
            str(d.get("mode", "percentile")),
            NoiseModel(float(noise["gain"]), float(noise["offset"])) if noise else None,
        )


def min_max_normalization(images: Iterable[np.ndarray]) -> Normalization:
    """The reference code's normalisation ("reference" mode): the one min and max over all
    `images` (noisy and clean together) mapped to [-1, 1]. (The train step computes the same
    per batch, traced, in `clidim_jax.step.normalize_batch`.)"""
    lo, hi = np.inf, -np.inf
    for a in images:
        lo, hi = min(lo, float(np.min(a))), max(hi, float(np.max(a)))
    return Normalization(lo, hi if hi > lo else lo + 1.0, "reference")
