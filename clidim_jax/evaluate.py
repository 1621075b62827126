"""Evaluation on the held-out split: metrics, a classical baseline, a figure."""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import ndimage

from clidim_jax import metrics
from clidim_jax.data.datasets import PairedImages
from clidim_jax.inference import Denoiser


def gaussian_baseline(
    test: PairedImages, sigmas: tuple[float, ...]
) -> tuple[dict[str, float], float, list[np.ndarray]]:
    """The best Gaussian filter over a grid of sigmas (chosen on the evaluated images themselves,
    which flatters the baseline, never the model)."""
    gts = [test.pair(i)[1] for i in range(len(test))]
    best = None
    for s in sigmas:
        preds = [
            ndimage.gaussian_filter(test.noisy[i].astype(np.float64), s) for i in range(len(test))
        ]
        mean_psnr = float(np.mean([metrics.psnr(g, p) for g, p in zip(gts, preds)]))
        if best is None or mean_psnr > best[0]:
            best = (mean_psnr, s, preds)
    _, sigma, preds = best
    return metrics.summarize(gts, preds), float(sigma), preds


def save_figure(
    path: str, noisy: np.ndarray, denoised: np.ndarray, gt: np.ndarray, title: str
) -> None:
    """noisy | denoised | ground truth on one intensity scale (percentiles of the ground truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmin, vmax = np.percentile(gt, (0.5, 99.5))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), constrained_layout=True)
    for ax, img, name in zip(axes, (noisy, denoised, gt), ("noisy", "denoised", "ground truth")):
        im = ax.imshow(img, cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="intensity (original units)")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(
    denoiser: Denoiser,
    test: PairedImages,
    workdir: str,
    *,
    dataset: str,
    split: str = "test",
    baseline_sigmas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
    write: bool = True,
) -> dict:
    """Denoises every noisy test image; writes eval.json and eval.png; returns the summary."""
    preds = denoiser(test.noisy)
    gts = [test.pair(i)[1] for i in range(len(test))]
    noisy = [test.noisy[i] for i in range(len(test))]
    inp = metrics.summarize(gts, noisy)
    out = metrics.summarize(gts, list(preds))
    base, sigma, _ = gaussian_baseline(test, tuple(baseline_sigmas))
    result = {
        "dataset": dataset,
        "split": split,
        "region": test.name,
        "n_images": len(test),
        "input": inp,
        "output": out,
        "baseline": {"name": f"gaussian_filter(sigma={sigma:g})", "sigma": sigma, **base},
    }
    if write:
        with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        title = (
            f"{dataset} {split}: PSNR noisy {inp['psnr']:.2f} dB | denoised {out['psnr']:.2f} dB | "
            f"Gaussian {base['psnr']:.2f} dB"
        )
        save_figure(os.path.join(workdir, "eval.png"), noisy[0], preds[0], gts[0], title)
    return result


def format_result(r: dict) -> str:
    rows = [
        ("noisy input", r["input"]),
        ("denoised", r["output"]),
        (r["baseline"]["name"], r["baseline"]),
    ]
    lines = [f"{r['dataset']} / {r['split']} ({r['n_images']} images): PSNR (dB), SSIM"]
    for name, m in rows:
        lines.append(f"  {name:<28} {m['psnr']:7.2f} ± {m['psnr_std']:.2f}   {m['ssim']:.4f}")
    return "\n".join(lines)
