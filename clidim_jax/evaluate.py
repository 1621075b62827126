"""Evaluation on a held-out split: metrics (comparable and, on request, the reference code's), a
classical baseline, and the artifacts: eval.json, eval.csv (per image), eval.md (a Table-I style
table) and eval.png (noisy | denoised | ground truth, full field and a zoomed inset)."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np
from scipy import ndimage

from clidim_jax import metrics
from clidim_jax.data.datasets import PairedImages
from clidim_jax.data.normalization import Normalization, min_max_normalization
from clidim_jax.inference import Denoiser
from clidim_jax.run import dataset_name, require_checkpoints, restore_run
from clidim_jax.workdir_lock import WorkdirLock

METRIC_CHOICES = (*metrics.MODES, "both")
SPLITS = ("test", "train")
_NAMES = ("psnr", "ssim", "nrmse")


def gaussian_baseline(
    test: PairedImages, sigmas: tuple[float, ...]
) -> tuple[dict[str, float], float, list[np.ndarray]]:
    """The best Gaussian filter over a grid of sigmas (chosen on the evaluated images themselves,
    which flatters the baseline, never the model)."""
    gts = [test.pair(i)[1] for i in range(len(test))]
    best = None
    for s in sigmas:
        preds = [ndimage.gaussian_filter(a.astype(np.float64), s) for a in test.iter_noisy()]
        mean_psnr = float(np.mean([metrics.psnr(g, p) for g, p in zip(gts, preds)]))
        if best is None or mean_psnr > best[0]:
            best = (mean_psnr, s, preds)
    _, sigma, preds = best
    return metrics.summarize(gts, preds), float(sigma), preds


def reference_test_normalizations(test: PairedImages) -> list[Normalization]:
    """The reference code's test-time normalisation: min-max of each noisy image *and its clean
    image* together (it leaks the ground truth; reproduction only)."""
    return [min_max_normalization(test.pair(i)) for i in range(len(test))]


def zoom_box(gt: np.ndarray, frac: float = 0.25) -> tuple[int, int, int]:
    """(y, x, size) of a square inset around the brightest structure of the ground truth."""
    h, w = gt.shape
    size = max(8, int(round(min(h, w) * frac)))
    size = min(size, h, w)
    smooth = ndimage.gaussian_filter(np.asarray(gt, np.float64), max(1.0, size / 8))
    cy, cx = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    y = int(np.clip(cy - size // 2, 0, h - size))
    x = int(np.clip(cx - size // 2, 0, w - size))
    return y, x, size


def save_figure(
    path: str, noisy: np.ndarray, denoised: np.ndarray, gt: np.ndarray, title: str
) -> None:
    """noisy | denoised | ground truth on one intensity scale (percentiles of the ground truth):
    the full field with the inset marked, and below it the zoomed inset; one colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    vmin, vmax = np.percentile(gt, (0.5, 99.5))
    y, x, s = zoom_box(gt)
    h, w = gt.shape
    fig, axes = plt.subplots(
        2,
        3,
        figsize=(12, 3.7 * (h / w) + 4.3),
        constrained_layout=True,
        gridspec_kw={"height_ratios": [h / w, 1.0]},
    )
    panels = zip(axes.T, (noisy, denoised, gt), ("noisy", "denoised", "ground truth"))
    for (full, inset), img, name in panels:
        im = full.imshow(img, cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        full.add_patch(Rectangle((x - 0.5, y - 0.5), s, s, fill=False, ec="cyan", lw=1.2))
        full.set_title(name)
        inset.imshow(
            img[y : y + s, x : x + s], cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest"
        )
        inset.set_title(f"{name}, zoom [{y}:{y + s}, {x}:{x + s}]", fontsize=9)
        for ax in (full, inset):
            ax.set_xticks([])
            ax.set_yticks([])
        for side in inset.spines.values():
            side.set_edgecolor("cyan")
    fig.colorbar(im, ax=axes, shrink=0.8, label="intensity (original units)")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rows(result: dict) -> list[tuple[str, str]]:
    """(label, key) of the compared methods, in table order."""
    return [
        ("noisy input", "input"),
        (result["baseline"]["name"], "baseline"),
        (result.get("model", "denoised"), "output"),
    ]


def write_csv(path: str, names: list[str], values: dict[str, dict[str, list[float]]]) -> None:
    """One row per image; a column per (method, metric), e.g. `output_psnr`, `ref_output_ssim`."""
    cols = [f"{part}_{m}" for part in values for m in _NAMES if m in values[part]]
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["image", "name", *cols])
        for i, name in enumerate(names):
            row = [values[c.rsplit("_", 1)[0]][c.rsplit("_", 1)[1]][i] for c in cols]
            wr.writerow([i, name, *(f"{v:.10g}" for v in row)])


def markdown_table(result: dict) -> str:
    """A Table-I style Markdown table: mean ± std over images per method."""
    both = "reference" in result
    std = result.get("metrics", "standard") != "reference" or not both
    head, sep = ["method"], ["---"]
    if std:
        head += ["PSNR (dB)", "SSIM", "NRMSE"]
        sep += ["---:"] * 3
    if both:
        head += ["PSNR ref.", "SSIM ref.", "NRMSE ref."]
        sep += ["---:"] * 3
    lines = [
        f"**{result['dataset']}**, {result['split']} split ({result.get('region', '')}), "
        f"{result['n_images']} images; mean ± standard deviation over images.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(sep) + " |",
    ]

    def cells(m: dict, d: int = 4) -> list[str]:
        return [
            f"{m['psnr']:.2f} ± {m['psnr_std']:.2f}",
            f"{m['ssim']:.{d}f} ± {m['ssim_std']:.{d}f}",
            f"{m['nrmse']:.{d}f} ± {m['nrmse_std']:.{d}f}",
        ]

    for label, key in _rows(result):
        row = [label]
        if std:
            row += cells(result[key])
        if both:
            row += cells(result["reference"][key], 5)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    ck = result.get("checkpoint")
    if ck:
        tta = (
            ", test-time augmentation over the 8 flips and quarter turns"
            if result.get("tta")
            else ""
        )
        lines.append(f"Model: checkpoint {ck['step']} ({ck['selected_by']}){tta}.")
        lines.append("")
    if std:
        lines.append(
            "PSNR, SSIM (2-D) and NRMSE in the comparable convention: float64, original units, "
            "data range = max - min of each ground-truth image (docs/method.md section 7)."
        )
    if both:
        lines.append(
            "*ref.*: the reference code's metrics (uint16 casts with wrapping squared errors, "
            "column-wise 1-D SSIM with the uint16 data range, self-fit NRMSE / 4095); not "
            f"comparable with published numbers. Model predictions: "
            f"{result['reference']['prediction_normalization']}."
        )
    return "\n".join(lines) + "\n"


def evaluate(
    denoiser: Denoiser,
    test: PairedImages,
    workdir: str,
    *,
    dataset: str,
    split: str = "test",
    baseline_sigmas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
    write: bool = True,
    metrics_mode: str = "standard",
    model_name: str | None = None,
    checkpoint: dict | None = None,
) -> dict:
    """Denoises every noisy image of the split and compares input, model and the Gaussian
    baseline with the ground truth. Writes eval.json, eval.csv, eval.md and eval.png; returns
    the summary. The comparable metrics are always computed (the top-level keys); with
    `metrics_mode` "reference" or "both" the reference code's metrics are added under
    "reference"."""
    if metrics_mode not in METRIC_CHOICES:
        raise ValueError(f"metrics must be one of {', '.join(METRIC_CHOICES)}")
    noisy = test.images()
    preds = list(denoiser(noisy))
    gts = [test.pair(i)[1] for i in range(len(test))]
    base, sigma, base_preds = gaussian_baseline(test, tuple(baseline_sigmas))
    values = {
        "input": metrics.per_image(gts, noisy),
        "output": metrics.per_image(gts, preds),
        "baseline": metrics.per_image(gts, base_preds),
    }
    result: dict[str, Any] = {
        "dataset": dataset,
        "split": split,
        "region": test.name,
        "n_images": len(test),
        "metrics": metrics_mode,
        "model": model_name or "denoised",
        "tta": bool(getattr(denoiser, "tta", False)),
        "input": metrics.summarize_values(values["input"]),
        "output": metrics.summarize_values(values["output"]),
        "baseline": {"name": f"gaussian_filter(sigma={sigma:g})", "sigma": sigma, **base},
    }
    if checkpoint is not None:
        result["checkpoint"] = checkpoint
    if metrics_mode != "standard":
        if denoiser.norm.mode == "reference":
            # A run reproducing the reference: predict as its test code does, with each image's
            # min-max over noisy and clean together.
            ref_preds = list(denoiser(noisy, norms=reference_test_normalizations(test)))
            how = "per-image min-max of noisy and clean (the reference's test-time leak)"
        else:
            ref_preds = preds
            how = "the run's stored normalisation (same predictions as the comparable metrics)"
        ref_values = {
            "input": metrics.per_image(gts, noisy, "reference"),
            "output": metrics.per_image(gts, ref_preds, "reference"),
            "baseline": metrics.per_image(gts, base_preds, "reference"),
        }
        result["reference"] = {
            "prediction_normalization": how,
            **{k: metrics.summarize_values(v) for k, v in ref_values.items()},
        }
        values.update({f"ref_{k}": v for k, v in ref_values.items()})
    if write:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        names = [f"{test.name}#{i}" for i in range(len(test))]
        write_csv(os.path.join(workdir, "eval.csv"), names, values)
        with open(os.path.join(workdir, "eval.md"), "w", encoding="utf-8") as f:
            f.write(markdown_table(result))
        inp, out = result["input"], result["output"]
        title = (
            f"{dataset} {split}: PSNR noisy {inp['psnr']:.2f} dB | denoised {out['psnr']:.2f} dB | "
            f"Gaussian {base['psnr']:.2f} dB"
        )
        save_figure(os.path.join(workdir, "eval.png"), noisy[0], preds[0], gts[0], title)
    return result


def format_result(r: dict) -> str:
    """The console summary: mean ± std of each method, both metric families when present."""
    ref = r.get("reference")
    show_std = r.get("metrics", "standard") != "reference" or ref is None
    head = f"{r['dataset']} / {r['split']} ({r['n_images']} images): "
    parts = []
    if show_std:
        parts.append("PSNR (dB), SSIM, NRMSE")
    if ref is not None:
        parts.append("reference-code PSNR, SSIM, NRMSE")
    lines = [head + " | ".join(parts)]
    for name, key in _rows(r):
        cells = []
        if show_std:
            m = r[key]
            cells.append(
                f"{m['psnr']:7.2f} ± {m['psnr_std']:.2f}  {m['ssim']:.4f}  {m['nrmse']:.4f}"
            )
        if ref is not None:
            m = ref[key]
            cells.append(f"{m['psnr']:7.2f}  {m['ssim']:.5f}  {m['nrmse']:.5f}")
        lines.append(f"  {name:<28} " + "   |   ".join(cells))
    return "\n".join(lines)


def evaluate_run(
    workdir: str,
    *,
    split: str = "test",
    metrics_mode: str = "standard",
    tile: int | None = None,
    tta: bool | None = None,
    quiet: bool = False,
) -> dict:
    """Re-evaluates a training run on its own dataset's split, with the checkpoint `restore_run`
    selects (the best by validation PSNR when the run has validation data, else the latest)."""
    import jax

    from clidim_jax.data import load_datasets

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    require_checkpoints(workdir)  # (before the lock, which would create the directory)
    with WorkdirLock(workdir, "evaluate"):  # eval.* are written into the run
        restored = restore_run(workdir)
        config = restored.config
        train_ds, test_ds = load_datasets(config.data, config.train.batch_size, config.seed)
        ds = test_ds if split == "test" else train_ds
        ev = config.eval
        denoiser = restored.denoiser(tile=tile, tta=tta)
        result = evaluate(
            denoiser,
            ds,
            workdir,
            dataset=dataset_name(config),
            split=split,
            baseline_sigmas=tuple(ev.baseline_sigmas),
            write=jax.process_index() == 0,
            metrics_mode=metrics_mode,
            model_name=f"{config.name}:{config.variant}",
            checkpoint=restored.checkpoint,
        )
    if not quiet and jax.process_index() == 0:
        print(format_result(result), flush=True)
    return result
