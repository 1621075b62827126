"""Where a denoiser's remaining error on the quality protocol lies, and what ensembling buys.

For denoised test stacks (one TIFF per field, written by `clidim-jax denoise ... --dtype float32`)
prints, per field of view: the comparable PSNR (data range of the ground truth); the PSNR after
an oracle per-frame gain (and gain + offset) fitted to the ground truth (how much of the error is
the frames' brightness drift, which no single-frame denoiser can know); the PSNR of the mean of
the 50 denoised frames (the systematic part of the error); the mean error on the brightest 1 %
of the ground truth; and, with several runs, the PSNR of every average of their predictions.
First, per field, the floor: the PSNR a perfect single-frame denoiser would score, one that
returns each frame's own noise-free signal g_j S (g_j: the frame's brightness relative to the
average, fitted by least squares on the noisy frames). Its squared error is the ground truth's
own noise (a mean of 50 frames: the drift-corrected temporal variance of the frames / 50) plus
the drift, (g_j - 1)^2 mean(S^2), neither of which any denoiser of one frame can remove.

    python benchmarks/quality_errors.py --data OUT/data --pred recipe=DIR1 --pred syn10=DIR2
(each DIR holds fov03.tif and fov04.tif denoised from OUT/data/test_noisy)
"""

import argparse
import itertools
from pathlib import Path

import numpy as np
import tifffile
from scipy.ndimage import gaussian_filter


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    r = gt.max() - gt.min()
    return float(10 * np.log10(r * r / np.mean((pred - gt) ** 2)))


def describe(name: str, stack: np.ndarray, gt: np.ndarray) -> None:
    raw, gain, affine = [], [], []
    for x in stack:
        raw.append(psnr(x, gt))
        gain.append(psnr((x * gt).sum() / (x * x).sum() * x, gt))
        a = np.stack([x.ravel(), np.ones(x.size)], 1)
        affine.append(
            psnr((a @ np.linalg.lstsq(a, gt.ravel(), rcond=None)[0]).reshape(x.shape), gt)
        )
    bright = gt >= np.percentile(gt, 99)
    print(
        f"  {name:12s} PSNR {np.mean(raw):6.2f}  oracle gain {np.mean(gain):6.2f}  "
        f"oracle gain+offset {np.mean(affine):6.2f}  "
        f"mean of frames {psnr(stack.mean(0), gt):6.2f}  "
        f"error on brightest 1% {(stack[:, bright] - gt[bright]).mean():+5.2f}"
    )


def floor(stack: np.ndarray, gt: np.ndarray) -> None:
    """The PSNR of a perfect single-frame denoiser against this ground truth (module doc)."""
    g = np.array([(x * gt).sum() / (gt * gt).sum() for x in stack])
    gt_noise = (stack - g[:, None, None] * gt).var(axis=0, ddof=1).mean() / len(stack)
    drift = (g - 1) ** 2 * (gt * gt).mean()
    r = gt.max() - gt.min()
    print(
        f"  {'floor':12s} PSNR {np.mean(10 * np.log10(r * r / (gt_noise + drift))):6.2f}  "
        f"(squared error: ground-truth noise {gt_noise:.2f}, drift {drift.mean():.2f} counts^2;"
        f" frame gains {g.min():.3f} .. {g.max():.3f})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the quality benchmark's OUT/data")
    p.add_argument("--pred", action="append", default=[], help="NAME=DIR of denoised stacks")
    p.add_argument("--sigma", type=float, default=1.25, help="the Gaussian row's sigma")
    a = p.parse_args()
    runs = dict(s.split("=", 1) for s in a.pred)
    ensembles: dict[tuple[str, ...], list[float]] = {}
    for f in ("fov03", "fov04"):
        noisy = tifffile.imread(a.data / "test_noisy" / f"{f}.tif").astype(np.float64)
        gt = tifffile.imread(a.data / "test_clean" / f"{f}.tif").astype(np.float64)
        gt = gt[0] if gt.ndim == 3 else gt
        print(f"{f}:")
        floor(noisy, gt)
        describe("noisy", noisy, gt)
        describe(
            "gaussian", np.stack([gaussian_filter(n, a.sigma, mode="mirror") for n in noisy]), gt
        )
        preds = {
            n: tifffile.imread(Path(d) / f"{f}.tif").astype(np.float64) for n, d in runs.items()
        }
        for n, x in preds.items():
            describe(n, x, gt)
        for k in range(2, len(preds) + 1):
            for combo in itertools.combinations(preds, k):
                mean = sum(preds[n] for n in combo) / k
                ensembles.setdefault(combo, []).append(np.mean([psnr(x, gt) for x in mean]))
    if ensembles:
        print("averages of the runs' predictions (fields 3, 4, mean):")
        for combo, v in ensembles.items():
            print(f"  {' + '.join(combo):40s} {v[0]:6.2f} {v[1]:6.2f} {np.mean(v):6.3f}")


if __name__ == "__main__":
    main()
