"""How well does synthetic noise match the real noise? For the training pairs of the quality
protocol (FMD confocal field of view 1, noisy frames 0-15, its 50-frame average), the residual
noisy - average by intensity bin: variance and skewness of the real frames, of the fitted
Poisson-Gaussian model (`data.synthetic_noise=poisson`) and of the measured distribution
(`data.synthetic_noise=empirical`), each drawn for the same clean image as training draws it;
and a figure of the noisy values' histograms at two background-to-dim intensities.

    python benchmarks/noise_shape.py --data ../shared/data/fmd_confocal_bpae_b \\
        --out docs/noise_shape.png
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
import tifffile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from clidim_jax.data.normalization import fit_empirical_noise, fit_noise_model
from clidim_jax.step import synthesize_noisy


def stats(x: np.ndarray, c: np.ndarray) -> tuple[float, float, float]:
    d = x - c
    m, v = float(d.mean()), float(d.var())
    return m, v, float(((d - m) ** 3).mean() / max(v, 1e-12) ** 1.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default=None, help="PNG of the histograms")
    args = ap.parse_args()
    raw = tifffile.imread(os.path.join(args.data, "fov01_raw.tif"))[:16]
    gt = tifffile.imread(os.path.join(args.data, "fov01_gt.tif")).astype(np.float64)
    pairs = [(f, gt) for f in raw]
    model = fit_noise_model(pairs)
    emp = dataclasses.replace(model, empirical=fit_empirical_noise(pairs))
    print(
        f"Poisson-Gaussian model: Var = {model.gain:.4g} x + {model.offset:.4g}; {emp.empirical!r}"
    )
    clean = jnp.asarray(np.repeat(gt[None, ..., None], len(raw), 0), jnp.float32)
    draw = jax.jit(
        lambda k, m: synthesize_noisy(k, clean, m, (1.0, 1.0), True)[0], static_argnums=1
    )
    real = raw.astype(np.float64)
    syn = {
        "poisson": np.asarray(draw(jax.random.key(0), model))[..., 0],
        "empirical": np.asarray(draw(jax.random.key(0), emp))[..., 0],
    }
    print("| clean intensity | pixels | real: variance, skewness | poisson | empirical |")
    print("|---|---:|---|---|---|")
    for lo, hi in [(4, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, 256)]:
        m = (gt >= lo) & (gt < hi)
        c = np.broadcast_to(gt[m], real[:, m].shape)
        cells = [stats(x[:, m], c) for x in (real, syn["poisson"], syn["empirical"])]
        print(
            f"| [{lo}, {hi}) | {int(m.sum())} | "
            + " | ".join(f"{v:.2f}, {s:+.2f}" for _, v, s in cells)
            + " |"
        )
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        for ax, (lo, hi) in zip(axes, [(5, 6), (10, 11)]):
            m = (gt >= lo) & (gt < hi)
            bins = np.arange(-0.5, 40.5)
            for name, x, style in (
                ("real frames", real, dict(color="k", lw=2)),
                ("Poisson-Gaussian model", syn["poisson"], dict(color="tab:red")),
                ("measured distribution", syn["empirical"], dict(color="tab:blue", ls="--")),
            ):
                ax.hist(
                    x[:, m].ravel(), bins=bins, density=True, histtype="step", label=name, **style
                )
            ax.set_title(
                f"clean intensity in [{lo}, {hi}) counts\n({int(m.sum())} pixels x 16 frames)"
            )
            ax.set_xlabel("noisy value (counts)")
        axes[0].set_ylabel("fraction of pixels")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
