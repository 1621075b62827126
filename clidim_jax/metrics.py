"""Image-quality metrics: the comparable convention, and the reference code's own metrics.

Comparable convention (PN2V, DivNoising, CARE; docs/method.md section 7): float64, original
intensity units, data range = gt.max - gt.min of each ground-truth image; PSNR, standard 2-D
SSIM and NRMSE = RMSE / range, averaged over images. These are the numbers to compare with
published ones.

Reference-code metrics (`reference_*`): what the authors' evaluation computes, reproduced so the
two can be shown side by side. Their numbers (Table I of the paper) are not comparable:

- both images are cast to uint16 first, and `(gt - pred) ** 2` is evaluated in uint16, so the
  difference *and* its square wrap modulo 2**16: an error e contributes (e * e) mod 65536, which
  equals e**2 only for |e| < 256 (a negative error wraps to 65536 - |e|, whose square is again
  e**2 mod 65536). Large errors are under-counted and PSNR goes up;
- SSIM is scikit-image's `structural_similarity(gt, pred, multichannel=True)` on 2-D images:
  the last axis is taken as channels, so it is the mean over columns of 1-D SSIMs computed down
  each column (7-sample uniform window, sample covariance, reflect borders, the 3 samples at each
  end cropped), called with `data_range = gt.max() - gt.min()` of the uint16 ground truth (the
  range its PSNR uses; the reference's util/metrics.py passes `max_p=range_PSNR`), not
  scikit-image's uint16 default of 65535;
- "NRMSE" is the RMS difference between the prediction and its own least-squares affine fit to
  the ground truth, divided by 4095 (a 12-bit range, whatever the data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------------------------
# Comparable convention


def _f64(*arrays: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def data_range(gt: np.ndarray) -> float:
    return float(np.max(gt)) - float(np.min(gt))


def psnr(gt: np.ndarray, pred: np.ndarray) -> float:
    """20 log10((gt.max - gt.min) / RMSE), in float64 (integer inputs never wrap)."""
    gt, pred = _f64(gt, pred)
    mse = np.mean((gt - pred) ** 2)
    return float(10.0 * np.log10(data_range(gt) ** 2 / mse)) if mse > 0 else float("inf")


def nrmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """RMSE / (gt.max - gt.min)."""
    gt, pred = _f64(gt, pred)
    return float(np.sqrt(np.mean((gt - pred) ** 2)) / data_range(gt))


def ssim(gt: np.ndarray, pred: np.ndarray, *, win_size: int = 7) -> float:
    """Standard 2-D SSIM as scikit-image's `structural_similarity` defaults (7x7 uniform window,
    sample covariance, K1 0.01, K2 0.03, reflect borders, mean over the valid interior), with
    data range gt.max - gt.min."""
    gt, pred = _f64(gt, pred)
    if gt.ndim != 2:
        raise ValueError(f"ssim expects 2-D images, got {gt.shape}")
    if min(gt.shape) < win_size:
        raise ValueError(f"ssim needs images of at least {win_size}x{win_size}, got {gt.shape}")
    L = data_range(gt)
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    filt = lambda a: ndimage.uniform_filter(a, size=win_size, mode="reflect")
    n = win_size**2
    cov_norm = n / (n - 1.0)
    ux, uy = filt(gt), filt(pred)
    vx = cov_norm * (filt(gt * gt) - ux * ux)
    vy = cov_norm * (filt(pred * pred) - uy * uy)
    vxy = cov_norm * (filt(gt * pred) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())


# --------------------------------------------------------------------------------------------
# The reference code's metrics

REFERENCE_NRMSE_RANGE = 4095.0


def to_uint16(x: np.ndarray) -> np.ndarray:
    """`x.astype(np.uint16)` as the reference does it: floats truncate toward zero.

    NumPy leaves the cast of out-of-range floats undefined; here they wrap modulo 2**16 like an
    integer cast (what x86-64 builds give for moderate values), and NaN becomes 0. The
    reference's images are min-max denormalised into their original uint16 range, so this only
    matters for predictions that leave it.
    """
    a = np.asarray(x)
    if a.dtype == np.uint16:
        return a
    if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        return (a.astype(np.int64) & 0xFFFF).astype(np.uint16)
    f = np.nan_to_num(np.asarray(a, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    f = np.clip(np.trunc(f), -(2.0**62), 2.0**62)
    return (f.astype(np.int64) & 0xFFFF).astype(np.uint16)


def reference_squared_errors(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """`(gt - pred) ** 2` on uint16 images: both operations wrap modulo 2**16 (uint16 result)."""
    g, p = to_uint16(gt), to_uint16(pred)
    d = g - p  # uint16 - uint16 stays uint16 in NumPy: wraps
    return d * d  # and so does the square


def reference_psnr(gt: np.ndarray, pred: np.ndarray) -> float:
    """PSNR with the reference's uint16 arithmetic: MSE = mean of wrapped squared errors,
    data range = max - min of the uint16 ground truth."""
    se = reference_squared_errors(gt, pred)
    mse = float(np.mean(se, dtype=np.float64))
    g = to_uint16(gt)
    rng = float(g.max()) - float(g.min())
    return float(10.0 * np.log10(rng**2 / mse)) if mse > 0 else float("inf")


def reference_ssim(
    gt: np.ndarray, pred: np.ndarray, *, data_range: float | None = None, win_size: int = 7
) -> float:
    """`skimage.metrics.structural_similarity(gt_u16, pred_u16, multichannel=True,
    data_range=gt_u16.max() - gt_u16.min())` on a 2-D image, as the reference code calls it.

    With `multichannel=True` scikit-image loops over the last axis, so every column is a 1-D
    "image": per column, uniform filter of size 7 along the column (scipy `reflect` borders),
    sample covariance (7/6), K1 0.01, K2 0.03, SSIM map cropped by 3 samples at each end and
    averaged; the result is the mean over columns. `data_range=None` (the default) is the
    reference's range, max - min of the uint16 ground truth (the same range as `reference_psnr`),
    not scikit-image's uint16 default of 65535; pass `data_range` to override it. A constant
    ground truth has range 0, for which SSIM is undefined (NaN), as in the reference.
    """
    g, p = to_uint16(gt), to_uint16(pred)
    if g.ndim != 2:
        raise ValueError(f"reference_ssim expects 2-D images, got {g.shape}")
    if g.shape[0] < win_size:
        raise ValueError(
            f"reference_ssim needs columns of at least {win_size} pixels, got {g.shape}"
        )
    rng = float(g.max()) - float(g.min()) if data_range is None else float(data_range)
    x, y = g.astype(np.float64), p.astype(np.float64)
    filt = lambda a: ndimage.uniform_filter1d(a, size=win_size, axis=0, mode="reflect")
    cov_norm = win_size / (win_size - 1.0)
    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    per_column = s[pad : s.shape[0] - pad].mean(axis=0)
    return float(per_column.mean())


def affine_fit(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """a * pred + b with (a, b) the least-squares fit of pred to gt."""
    g, p = _f64(gt, pred)
    a_mat = np.stack([p.ravel(), np.ones(p.size)], axis=1)
    (a, b), *_ = np.linalg.lstsq(a_mat, g.ravel(), rcond=None)
    return a * p + b


def reference_nrmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """RMS(pred - affine_fit(gt, pred)) / 4095, on the uint16 images."""
    g, p = to_uint16(gt), to_uint16(pred)
    fit = affine_fit(g, p)
    rms = np.sqrt(np.mean((p.astype(np.float64) - fit) ** 2))
    return float(rms / REFERENCE_NRMSE_RANGE)


# --------------------------------------------------------------------------------------------
# Per-image values and summaries

Metric = Callable[[np.ndarray, np.ndarray], float]
MODES: dict[str, dict[str, Metric]] = {
    "standard": {"psnr": psnr, "ssim": ssim, "nrmse": nrmse},
    "reference": {"psnr": reference_psnr, "ssim": reference_ssim, "nrmse": reference_nrmse},
}


def per_image(
    gts: Sequence[np.ndarray], preds: Sequence[np.ndarray], mode: str = "standard"
) -> dict[str, list[float]]:
    """{"psnr": [...], "ssim": [...], "nrmse": [...]}, one value per image pair."""
    if mode not in MODES:
        raise ValueError(f"unknown metrics mode {mode!r}; choose one of {sorted(MODES)}")
    if len(gts) != len(preds):
        raise ValueError(f"{len(gts)} ground-truth images for {len(preds)} predictions")
    return {k: [f(g, p) for g, p in zip(gts, preds)] for k, f in MODES[mode].items()}


def summarize_values(values: dict[str, list[float]]) -> dict[str, float]:
    """Mean and (population) standard deviation over images of each metric."""
    out: dict[str, float] = {}
    for k, v in values.items():
        out[k] = float(np.mean(v))
        out[k + "_std"] = float(np.std(v))
    return out


def summarize(
    gts: Sequence[np.ndarray], preds: Sequence[np.ndarray], mode: str = "standard"
) -> dict[str, float]:
    """Mean and standard deviation over images of PSNR, SSIM and NRMSE."""
    return summarize_values(per_image(gts, preds, mode))
