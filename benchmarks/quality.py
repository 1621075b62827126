"""Quality benchmark: clidim-jax and its peers on the same real few-shot data, side by side.

Protocol (FMD confocal BPAE_B, Zhang et al., CVPR 2019; the data has no licence, so it is read
from the folder given and never copied into the repository):

    train        field of view 1, noisy frames 0-15, ground truth = its 50-frame average
    validation   field of view 2, noisy frames 0-3 (every method tunes on it: the Gaussian's
                 sigma, BM3D's noise model and strength, CARE's and clidim-jax's checkpoint)
    test         all 50 noisy frames of fields of view 3 and 4 (100 images)

Metrics: the comparable convention (`clidim_jax.metrics`): float64, original intensities, data
range = max - min of each ground-truth image, per image, then the mean (and per field).

Rows, each with its training / tuning wall time on this machine: the noisy input; a Gaussian
filter; BM3D after a generalized Anscombe transform; CARE (CAREamics at its defaults, in its own
virtual environment: `--care-python`); clidim-jax's own-data recipe (`configs/own_data.py`, the
README's command); the paper's ablations on top of the recipe at one common step budget; and
the demo (bundled TIRF data) against its best Gaussian filter.

    python benchmarks/quality.py --data ../shared/data/fmd_confocal_bpae_b --out runs/quality \\
        --care-python /path/to/venv-care/bin/python

writes OUT/results.json (every row, every image's figures), OUT/table.md, OUT/figure.png
(crops of every method side by side) and OUT/curve.png (validation PSNR against training
time). Run it on an otherwise idle machine: the wall times are part of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import tifffile
from scipy import ndimage

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from clidim_jax import metrics  # noqa: E402
from clidim_jax.data.normalization import NoiseModel, fit_noise_model  # noqa: E402

ABLATIONS = ("l1", "baseline", "tv", "ssim", "cl", "cl_tv_ssim")
SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


# ------------------------------------------------------------------------------------ the data


def prepare(
    data: str, out: str, fields: tuple[int, int, int, int] = (1, 2, 3, 4), average: int = 1
) -> dict:
    """Writes the protocol's splits as paired TIFF folders under OUT/data (what a user would
    give `clidim-jax train --config.data.source=paired`) and returns them in memory. `fields`:
    the training, validation and two test fields of view (the protocol's 1, 2, 3, 4; another
    order measures the same recipe trained on another field). A test field may be the training
    field: it is then tested on its frames after those training takes (never trained on), which
    measures what training on the test field's own ground truth would give. `average` > 1 makes
    every noisy image the float32 mean of that many consecutive frames: the same scenes with
    real noise `average` times weaker in variance (and no longer integer), for as many images as
    the 50 frames give (training at most 16, validation 4)."""
    raw = {k: tifffile.imread(os.path.join(data, f"fov0{k}_raw.tif")) for k in (1, 2, 3, 4)}
    gt = {k: tifffile.imread(os.path.join(data, f"fov0{k}_gt.tif")) for k in (1, 2, 3, 4)}
    if average > 1:
        for k, r in raw.items():
            n = len(r) // average
            raw[k] = r[: n * average].reshape(n, average, *r.shape[1:]).mean(1, dtype=np.float32)
    tr, va, t1, t2 = fields
    n_train = min(16, len(raw[tr]))

    def tested(k: int) -> np.ndarray:  # the training field: only the frames it does not train on
        if k == tr and n_train == len(raw[k]):
            raise SystemExit(f"field {k} trains on all its {n_train} images: none left to test on")
        return raw[k][n_train:] if k == tr else raw[k]

    splits = {
        "train": {f"fov0{tr}": (raw[tr][:n_train], gt[tr])},
        "val": {f"fov0{va}": (raw[va][:4], gt[va])},
        "test": {f"fov0{t1}": (tested(t1), gt[t1]), f"fov0{t2}": (tested(t2), gt[t2])},
    }
    for split, by_field in splits.items():
        for kind in ("noisy", "clean"):
            os.makedirs(os.path.join(out, "data", f"{split}_{kind}"), exist_ok=True)
        for name, (noisy, clean) in by_field.items():
            for kind, img in (("noisy", noisy), ("clean", clean)):
                path = os.path.join(out, "data", f"{split}_{kind}", f"{name}.tif")
                tifffile.imwrite(path, img, photometric="minisblack")  # (4 frames are not RGBA)
    return splits


def parse_fields(text: str) -> tuple[int, int, int, int]:
    """`--fields T,V,A,B`: four of the fields 1-4, the two test fields different, validation on
    a field used for nothing else; a test field may be the training field (`prepare`)."""
    try:
        order = tuple(int(k) for k in text.split(","))
    except ValueError:
        order = ()
    if len(order) != 4 or not set(order) <= {1, 2, 3, 4}:
        raise SystemExit(f"--fields must name four of the fields 1, 2, 3, 4, not {text!r}")
    tr, va, t1, t2 = order
    if t1 == t2 or va in (tr, t1, t2):
        raise SystemExit(
            f"--fields {text}: the two test fields must differ, and the validation field must be "
            "used for nothing else (a test field may be the training field)"
        )
    return order


def pairs(fields: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(field, noisy frame, ground truth) for every frame, fields in sorted order (the order
    clidim-jax's paired folders use)."""
    return [(name, frame, gt) for name, (noisy, gt) in sorted(fields.items()) for frame in noisy]


def score(test: list, preds: list[np.ndarray]) -> dict:
    gts = [g for _, _, g in test]
    v = metrics.per_image(gts, preds)
    out = {"psnr": float(np.mean(v["psnr"])), "ssim": float(np.mean(v["ssim"]))}
    for name in sorted({f for f, _, _ in test}):
        idx = [i for i, (f, _, _) in enumerate(test) if f == name]
        out[f"psnr_{name}"] = float(np.mean([v["psnr"][i] for i in idx]))
        out[f"ssim_{name}"] = float(np.mean([v["ssim"][i] for i in idx]))
    out["per_image_psnr"] = [float(x) for x in v["psnr"]]
    out["per_image_ssim"] = [float(x) for x in v["ssim"]]
    return out


def intensity_drift(splits: dict, data: str) -> dict:
    """How far single frames are from the 50-frame average where it is bright (>= 60 counts):
    the mean of (frame - average) there, per frame, for every field of view. A per-frame
    brightness change (bleaching, laser or focus drift) is an error no denoiser can remove."""
    out = {}
    for k in (1, 2, 3, 4):
        raw = tifffile.imread(os.path.join(data, f"fov0{k}_raw.tif")).astype(np.float64)
        gt = tifffile.imread(os.path.join(data, f"fov0{k}_gt.tif")).astype(np.float64)
        m = gt >= 60
        d = [float((f[m] - gt[m]).mean()) for f in raw]
        # The oracle: the ground truth under each frame's least-squares gain and offset.
        design = np.stack([gt.ravel(), np.ones(gt.size)], axis=1)
        oracle = []
        for f in raw:
            (a, b), *_ = np.linalg.lstsq(design, f.ravel(), rcond=None)
            oracle.append(metrics.psnr(gt, a * gt + b))
        out[f"fov0{k}"] = {"frames_0_3": float(np.mean(d[:4])), "min": min(d), "max": max(d),
                           "oracle_psnr_mean": float(np.mean(oracle)),
                           "oracle_psnr_min": float(np.min(oracle)), "per_frame": d}  # fmt: skip
    return out


# ---------------------------------------------------------------------------- classical peers


def gaussian_row(val: list, test: list) -> tuple[dict, list]:
    t0 = time.perf_counter()
    best = max(
        SIGMAS,
        key=lambda s: np.mean(
            [metrics.psnr(g, ndimage.gaussian_filter(n.astype(np.float64), s)) for _, n, g in val]
        ),
    )
    tune = time.perf_counter() - t0
    val_psnr = np.mean(
        [metrics.psnr(g, ndimage.gaussian_filter(n.astype(np.float64), best)) for _, n, g in val]
    )
    preds = [ndimage.gaussian_filter(n.astype(np.float64), best) for _, n, _ in test]
    info = {"setting": f"sigma {best:g} (best on validation of {SIGMAS})", "tune_s": tune,
            "val_psnr": float(val_psnr)}  # fmt: skip
    return info, preds


def unbiased_inverse_table(model, top: float) -> tuple[np.ndarray, np.ndarray]:
    """The exact unbiased inverse of the generalized Anscombe transform (Makitalo and Foi 2013),
    numerically: E[GAT(x)] for a grid of clean intensities x under the fitted Poisson-Gaussian
    model, to be inverted by interpolation. The model Var = gain * x + offset is read as
    x = gain * (P + d) + N(0, s^2) with P ~ Poisson, d >= 0 a dark level and s^2 >= 0."""
    a, b = model.gain, model.offset
    # b >= 0: s^2 = b, d = 0; b < 0: s^2 = 0 and Var = gain^2 * (x / gain - d) gives d = -b / gain^2
    s2, d = (b, 0.0) if b >= 0 else (0.0, -b / a**2)
    hx, hw = np.polynomial.hermite_e.hermegauss(24)  # E over a standard normal
    hw = hw / hw.sum()
    xs = np.linspace(max(d * a, 0.0) + 1e-3, top, 600)
    ey = []
    for x in xs:
        lam = max(x / a - d, 1e-9)
        k = np.arange(0, int(lam + 12 * np.sqrt(lam) + 20))
        logp = k * np.log(lam) - lam - np.array([np.sum(np.log(np.arange(1, j + 1))) for j in k])
        p = np.exp(logp)
        vals = a * (k[:, None] + d) + np.sqrt(s2) * hx[None, :]
        ey.append(np.sum(p[:, None] * hw[None, :] * model.gat(vals)))
    return np.asarray(ey), xs


def bm3d_row(val: list, test: list, workers: int) -> tuple[dict, list]:
    """BM3D on the generalized Anscombe transform of the image (noise of unit variance there),
    the noise model fitted on the validation pairs, the strength (a factor on the unit sigma)
    chosen on validation, and the inverse (the exact unbiased one, or the algebraic one) chosen
    on validation too."""
    import bm3d  # noqa: F401  (fail before any work when the package is missing)

    t0 = time.perf_counter()
    model = fit_noise_model([(n, g) for _, n, g in val])
    top = float(max(n.max() for _, n, _ in test + val)) * 1.5
    ey, xs = unbiased_inverse_table(model, top)

    inverses = {"exact unbiased": lambda d: np.interp(d, ey, xs), "algebraic": model.gat_inverse}

    def transformed(images: list[np.ndarray], factor: float) -> list[np.ndarray]:
        jobs = [(model.gain, model.offset, n, factor) for n in images]
        return _parallel_map(_bm3d_gat, jobs, workers)

    factors = (0.9, 1.0, 1.1)
    scores = {}
    for f in factors:
        ds = transformed([n for _, n, _ in val], f)
        for name, inv in inverses.items():
            scores[(f, name)] = np.mean([metrics.psnr(g, inv(d)) for (_, _, g), d in zip(val, ds)])
    factor, inverse = max(scores, key=scores.get)
    tune = time.perf_counter() - t0
    inv = inverses[inverse]
    preds = [inv(d) for d in transformed([n for _, n, _ in test], factor)]
    setting = (
        f"GAT with Var = {model.gain:.4g} x + {model.offset:.4g} (fitted on validation), "
        f"sigma {factor:g} of {factors} and the {inverse} inverse (best on validation)"
    )
    return {"setting": setting, "tune_s": tune, "val_psnr": float(scores[factor, inverse])}, preds


def _bm3d_gat(job: tuple) -> np.ndarray:
    """BM3D (unit noise) of the GAT of an image; a top-level function for worker processes."""
    import bm3d

    gain, offset, noisy, factor = job
    return bm3d.bm3d(NoiseModel(gain, offset).gat(noisy.astype(np.float64)), sigma_psd=factor)


def _parallel_map(f, items, workers: int) -> list:
    if workers <= 1:
        return [f(x) for x in items]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Processes: bm3d's native thread pool is not safe to enter from several threads.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        return list(ex.map(f, items, chunksize=max(1, len(items) // (4 * workers))))


# ------------------------------------------------------------------------------ learned peers


def care_row(python: str, out: str, minutes: float) -> tuple[dict, list]:
    """CAREamics at its defaults, trained for `minutes` of wall time (the epoch count that fits
    is measured first), in its own interpreter; predictions come back as one .npy."""
    pred_path = os.path.join(out, "care_pred.npy")
    cmd = [python, os.path.join(HERE, "care_peer.py"), "--data", os.path.join(out, "data"),
           "--workdir", os.path.join(out, "care"), "--minutes", str(minutes),
           "--out", pred_path]  # fmt: skip
    info = _run_logged(cmd, os.path.join(out, "care.log"))
    with open(os.path.join(out, "care", "care_info.json"), encoding="utf-8") as f:
        info.update(json.load(f))
    preds = list(np.load(pred_path))
    return info, preds


def _run_logged(cmd: list[str], log: str, env: dict | None = None) -> dict:
    """Runs a command, its output to `log` with the time of each line; returns wall time."""
    t0 = time.perf_counter()
    stamps = []
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env
        )
        assert p.stdout is not None
        for line in p.stdout:
            t = time.perf_counter() - t0
            stamps.append((t, line.rstrip("\n")))
            f.write(f"[{t:8.1f}] {line}")
            f.flush()
        rc = p.wait()
    if rc != 0:
        tail = "\n".join(s for _, s in stamps[-30:])
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}:\n{tail}")
    return {"wall_s": time.perf_counter() - t0, "command": " ".join(cmd), "lines": stamps}


def clidim_row(
    out: str, name: str, preset: str, overrides: list[str], test_data: bool = True
) -> tuple[dict, list | None]:
    """One `clidim-jax train` run, exactly as a user runs it; the test figures are read back
    from its eval.csv (one row per test image, fields in sorted order)."""
    wd = os.path.join(out, "runs", name)
    shutil.rmtree(wd, ignore_errors=True)
    d = os.path.join(out, "data")
    data_flags = []
    if test_data:
        data_flags = [
            "--config.data.source=paired",
            f"--config.data.noisy_path={d}/train_noisy",
            f"--config.data.clean_path={d}/train_clean",
            f"--config.data.val_noisy_path={d}/val_noisy",
            f"--config.data.val_clean_path={d}/val_clean",
            f"--config.data.test_noisy_path={d}/test_noisy",
            f"--config.data.test_clean_path={d}/test_clean",
        ]
    cmd = ["clidim-jax", "train", f"--workdir={wd}", f"--config={preset}", *data_flags, *overrides]
    exe = shutil.which("clidim-jax") or os.path.join(os.path.dirname(sys.executable), "clidim-jax")
    info = _run_logged([exe, *cmd[1:]], os.path.join(out, f"{name}.log"))
    info["command"] = " ".join(cmd)
    lines = info.pop("lines")
    # Training time: from the start to the last training line (before the final evaluation).
    train_end = max(
        (t for t, s in lines if re.match(r"step \d+/\d+ ", s) or "validation PSNR" in s),
        default=info["wall_s"],
    )
    info["train_s"] = train_end
    info["val_curve"] = [
        (t, float(m.group(2)), int(m.group(1)))
        for t, s in lines
        if (m := re.match(r"step (\d+): validation PSNR ([\d.]+) dB", s))
    ]
    with open(os.path.join(wd, "eval.json"), encoding="utf-8") as f:
        ev = json.load(f)
    info["eval"] = {
        k: ev[k] for k in ("input", "output", "baseline", "checkpoint", "tta") if k in ev
    }
    if not test_data:
        return info, None
    with open(os.path.join(wd, "eval.csv"), encoding="utf-8") as f:
        rows = f.read().splitlines()
    head = rows[0].split(",")
    ip, iss = head.index("output_psnr"), head.index("output_ssim")
    info["csv"] = [(float(r.split(",")[ip]), float(r.split(",")[iss])) for r in rows[1:]]
    return info, None


# ------------------------------------------------------------------------------------ reports


def table(results: dict, fields: list[str]) -> str:
    head = ["method", "PSNR (dB)", "SSIM"] + [f"PSNR {f}" for f in fields] + ["time", "setting"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if "psnr" not in r:
            continue
        t = r.get("train_s", r.get("tune_s", r.get("wall_s")))
        cells = [
            name,
            f"{r['psnr']:.2f}",
            f"{r['ssim']:.4f}",
            *[f"{r[f'psnr_{f}']:.2f}" for f in fields],
            "" if t is None else f"{t / 60:.1f} min",
            r.get("setting", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(path: str, test: list, preds: dict, index: int, box: tuple[int, int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    field, noisy, gt = test[index]
    y, x, s = box
    panels = [("noisy", noisy)] + [(k, v[index]) for k, v in preds.items()] + [("ground truth", gt)]
    vmin, vmax = np.percentile(gt, (0.5, 99.8))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.3))
    for ax, (name, img) in zip(axes, panels):
        ax.imshow(img[y : y + s, x : x + s], cmap="magma", vmin=vmin, vmax=vmax)
        p = metrics.psnr(gt, img) if name != "ground truth" else None
        ax.set_title(f"{name}\n{p:.2f} dB" if p else name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    k = sum(f == field for f, _, _ in test[:index])  # its place among its field's test images
    title = f"{field}, test image {k}, crop [{y}:{y + s}, {x}:{x + s}]"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))  # room for the title above the panels' own
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve(path: str, rows: dict[str, dict], peers: dict[str, float], val_field: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in rows.items():
        c = r.get("val_curve") or []
        if c:
            ax.plot([t / 60 for t, _, _ in c], [p for _, p, _ in c], marker="o", label=name)
    for name, p in peers.items():
        ax.axhline(p, ls="--", lw=1, color="gray")
        ax.text(0.02, p, name, fontsize=8, va="bottom", transform=ax.get_yaxis_transform())
    ax.set_xlabel("training wall time (min, 2-core CPU)")
    ax.set_ylabel(f"validation PSNR (dB, {val_field})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder with fov0N_raw.tif / fov0N_gt.tif")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--rows",
        default="drift,noisy,gaussian,bm3d,care,recipe,ablations,demo",
        help="comma-separated rows to measure (others are kept from OUT/results.json); "
        "'figure' redraws the figures only",
    )
    ap.add_argument("--care-python", default="", help="Python of a venv with careamics")
    ap.add_argument("--care-minutes", type=float, default=10.0)
    ap.add_argument("--ablation-steps", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--fields", default="1,2,3,4",
        help="training, validation and the two test fields of view (default: the protocol's); "
        "another order checks that the recipe's margin is not a property of field 1; a test "
        "field equal to the training field is tested on its frames after the training ones",
    )  # fmt: skip
    ap.add_argument(
        "--average", type=int, default=1,
        help="noisy images = means of this many consecutive frames (real noise at a lower level)",
    )  # fmt: skip
    args = ap.parse_args()
    order = parse_fields(args.fields)
    rows = args.rows.split(",")
    os.makedirs(args.out, exist_ok=True)
    res_path = os.path.join(args.out, "results.json")
    results: dict = {}
    if os.path.exists(res_path):  # resume: keep rows already measured
        with open(res_path, encoding="utf-8") as f:
            results = json.load(f)
    protocol = {"fields": list(order), "average": args.average}
    done = {"fields": [1, 2, 3, 4], "average": 1, **results.get("protocol", {})}
    if results and done != protocol:
        raise SystemExit(
            f"{res_path} holds rows measured with --fields {','.join(map(str, done['fields']))} "
            f"--average {done['average']}; give another --out for another protocol"
        )
    results["protocol"] = protocol
    splits = prepare(args.data, args.out, order, args.average)
    val, test = pairs(splits["val"]), pairs(splits["test"])
    fields = sorted(splits["test"])
    shown_index = len(test) - len(test) // 4  # the figure's image: the second test field's middle
    os.makedirs(os.path.join(args.out, "shown"), exist_ok=True)

    def save() -> None:
        with open(res_path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)

    def record(name: str, info: dict, p: list | None) -> None:
        if p is not None:
            info.update(score(test, p))
            if name != "noisy input":  # the figure's image, for a later figure-only run
                np.save(os.path.join(args.out, "shown", f"{len(results):02d} {name}.npy"),
                        np.asarray(p[shown_index], np.float32))  # fmt: skip
        elif "csv" in info:
            v = info.pop("csv")
            info["psnr"] = float(np.mean([a for a, _ in v]))
            info["ssim"] = float(np.mean([b for _, b in v]))
            for fld in fields:
                idx = [i for i, (f, _, _) in enumerate(test) if f == fld]
                info[f"psnr_{fld}"] = float(np.mean([v[i][0] for i in idx]))
                info[f"ssim_{fld}"] = float(np.mean([v[i][1] for i in idx]))
            info["per_image_psnr"] = [a for a, _ in v]
        results[name] = info
        save()
        print(f"{name}: " + ", ".join(f"{k} {info[k]:.4g}" for k in ("psnr", "ssim") if k in info)
              + f" ({info.get('setting', '')})", flush=True)  # fmt: skip

    if "drift" in rows:
        results["intensity drift"] = intensity_drift(splits, args.data)
        save()
    if "noisy" in rows:
        record("noisy input", {"setting": ""}, [n.astype(np.float64) for _, n, _ in test])
    if "gaussian" in rows:
        record("Gaussian filter", *gaussian_row(val, test))
    if "bm3d" in rows:
        t0 = time.perf_counter()
        info, p = bm3d_row(val, test, args.workers)
        info["wall_s"] = time.perf_counter() - t0
        record("BM3D + GAT", info, p)
    if "care" in rows:
        if not args.care_python:
            raise SystemExit("the care row needs --care-python (a venv with careamics)")
        info, p = care_row(args.care_python, args.out, args.care_minutes)
        info.pop("lines", None)
        record("CARE (CAREamics defaults)", info, p)
    if "recipe" in rows:
        info, _ = clidim_row(args.out, "recipe", "own_data", [])
        info["setting"] = "configs/own_data.py, the README's own-data recipe"
        record("clidim-jax own_data", info, None)
    if "ablations" in rows:
        # The paper's loss terms on the recipe's model and optimizer, one common budget: pix2pix's
        # L1 (weight 100) in place of the recipe's L2, plus each variant's terms, on the measured
        # noisy images (no synthetic inputs, as the paper).
        epochs = max(1, args.ablation_steps // 20)
        for v in ABLATIONS:
            over = [f"--config.train.n_epochs={epochs}", f"--config.train.n_epochs_decay={epochs}",
                    "--config.loss.l1=100", "--config.loss.l2=0",
                    "--config.data.synthetic=0"]  # fmt: skip
            preset = f"own_data:variant={'pixel' if v == 'l1' else v}"
            what = "L1 alone" if v == "l1" else f"GAN + L1 + the {v} terms"
            try:
                info, _ = clidim_row(args.out, f"ablation_{v}", preset, over)
            except RuntimeError as e:  # e.g. a diverged GAN: report it, measure the rest
                results[f"ablation {v}"] = {
                    "setting": f"{preset} ({what}): failed",
                    "error": str(e),
                }
                save()
                print(f"ablation {v} failed:\n{e}", flush=True)
                continue
            info["setting"] = f"{preset} ({what}), {2 * epochs * 10} steps"
            record(f"ablation {v}", info, None)
    if "demo" in rows:
        info, _ = clidim_row(args.out, "demo", "demo", [], test_data=False)
        ev = info["eval"]
        info["setting"] = (
            f"bundled TIRF demo, held-out left half: model {ev['output']['psnr']:.2f} dB / "
            f"{ev['output']['ssim']:.4f}, best Gaussian {ev['baseline']['psnr']:.2f} dB / "
            f"{ev['baseline']['ssim']:.4f}"
        )
        results["demo"] = info
        save()
    if "recipe" in rows or "figure" in rows:
        from clidim_jax.evaluate import zoom_box
        from clidim_jax.run import denoiser_from_run

        shown = {}
        for fname in sorted(os.listdir(os.path.join(args.out, "shown"))):
            shown[fname[3:-4]] = {shown_index: np.load(os.path.join(args.out, "shown", fname))}
        den = denoiser_from_run(os.path.join(args.out, "runs", "recipe"))
        shown["clidim-jax own_data"] = {shown_index: den(test[shown_index][1])}
        box = zoom_box(test[shown_index][2])
        figure(os.path.join(args.out, "figure.png"), test, shown, shown_index, box)
        curves = {k: v for k, v in results.items() if v.get("val_curve")}
        peers = {k: v["val_psnr"] for k, v in results.items() if "val_psnr" in v}
        curve(os.path.join(args.out, "curve.png"), curves, peers, next(iter(splits["val"])))
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table(results, fields))
    print(table(results, fields))


if __name__ == "__main__":
    main()
