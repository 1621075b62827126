"""Image-quality metrics in the comparable convention (PN2V, DivNoising, CARE): float64, original
intensity units, data range = gt.max - gt.min per image (METHOD.md section 7)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _f64(*arrays: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def data_range(gt: np.ndarray) -> float:
    return float(np.max(gt) - np.min(gt))


def psnr(gt: np.ndarray, pred: np.ndarray) -> float:
    """20 log10((gt.max - gt.min) / RMSE)."""
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


def summarize(gts: list[np.ndarray], preds: list[np.ndarray]) -> dict[str, float]:
    """Mean and standard deviation over images of PSNR, SSIM and NRMSE."""
    vals = {
        "psnr": [psnr(g, p) for g, p in zip(gts, preds)],
        "ssim": [ssim(g, p) for g, p in zip(gts, preds)],
        "nrmse": [nrmse(g, p) for g, p in zip(gts, preds)],
    }
    out: dict[str, float] = {}
    for k, v in vals.items():
        out[k] = float(np.mean(v))
        out[k + "_std"] = float(np.std(v))
    return out
