"""One exploration run of the quality protocol: train a preset with config overrides on field 1,
then report validation PSNR (field 2, frames 0-3, which chose the checkpoint) and a quick look at
fields 3 and 4 (frames 0, 10, .., 40 of each). How QUALITY.md's "what was tried" list was
measured; the table itself comes from `quality.py`, which runs every row as a user would.

    python benchmarks/quality_explore.py --data ../shared/data/fmd_confocal_bpae_b \\
        --out runs/explore --name l2_smooth -- model.residual=smooth loss.l2=100 ...

Overrides are `FIELD=VALUE` on `--preset` (default demo: the recipe of the quality issue's
report); `tta=1` evaluates with test-time augmentation. `--full-test` also scores all 100 test
images (fields 3 and 4, every frame: quality.py's test set), `--select latest` the last
checkpoint instead of the best-validated one, and `--eval-only` evaluates OUT/runs/NAME without
training it again. Appends one JSON line per run to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import time

import numpy as np
import tifffile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from clidim_jax import metrics  # noqa: E402
from clidim_jax import run as run_lib  # noqa: E402
from clidim_jax import train as train_lib  # noqa: E402
from clidim_jax.inference import Denoiser  # noqa: E402


def write_splits(data: str, out: str) -> str:
    d = os.path.join(out, "data")
    parts = {
        "train": [("fov01", slice(0, 16))],
        "val": [("fov02", slice(0, 4))],
        "testq": [("fov03", slice(0, 50, 10)), ("fov04", slice(0, 50, 10))],
        "test": [("fov03", slice(0, 50)), ("fov04", slice(0, 50))],
    }
    for split, fields in parts.items():
        for kind in ("noisy", "clean"):
            os.makedirs(os.path.join(d, f"{split}_{kind}"), exist_ok=True)
        for name, sl in fields:
            for kind, src in (("noisy", "raw"), ("clean", "gt")):
                dst = os.path.join(d, f"{split}_{kind}", f"{name}.tif")
                if not os.path.exists(dst):  # (written once; concurrent runs share it)
                    img = tifffile.imread(os.path.join(data, f"{name}_{src}.tif"))
                    tmp = f"{dst}.{os.getpid()}.tmp"
                    tifffile.imwrite(tmp, img[sl] if kind == "noisy" else img)
                    os.replace(tmp, dst)
    return d


def load(d: str, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for f in sorted(os.listdir(os.path.join(d, f"{split}_noisy"))):
        raw = tifffile.imread(os.path.join(d, f"{split}_noisy", f))
        gt = tifffile.imread(os.path.join(d, f"{split}_clean", f)).astype(np.float64)
        out += [(f, r, gt) for r in raw]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--preset", default="demo")
    ap.add_argument(
        "--full-test", action="store_true",
        help="also every frame of fields 3 and 4 (the 100 test images of quality.py)",
    )  # fmt: skip
    ap.add_argument(
        "--eval-only", action="store_true",
        help="no training: evaluate the run OUT/runs/NAME already trained",
    )  # fmt: skip
    ap.add_argument(
        "--select", choices=("best", "latest"), default="best",
        help="the checkpoint evaluated: best validation PSNR (what clidim-jax uses) or the last",
    )  # fmt: skip
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import importlib

    d = write_splits(args.data, args.out)
    c = importlib.import_module(f"clidim_jax.configs.{args.preset}").get_config()
    c.data.source = "paired"
    c.data.noisy_path, c.data.clean_path = f"{d}/train_noisy", f"{d}/train_clean"
    c.data.val_noisy_path, c.data.val_clean_path = f"{d}/val_noisy", f"{d}/val_clean"
    c.data.test_noisy_path, c.data.test_clean_path = f"{d}/testq_noisy", f"{d}/testq_clean"
    c.data.val_fraction = 0.0
    c.checkpoint.every_steps = 250
    tta = False
    for o in args.overrides:
        k, v = o.split("=", 1)
        if k == "tta":
            tta = v == "1"
            continue
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v if isinstance(node[leaf], str) else type(node[leaf])(ast.literal_eval(v))
    wd = os.path.join(args.out, "runs", args.name)
    res = {"name": args.name, "overrides": args.overrides, "select": args.select, "tta": tta}
    if not args.eval_only:
        shutil.rmtree(wd, ignore_errors=True)
        t0 = time.perf_counter()
        run = train_lib.train(c, wd)
        res.update(train_s=round(time.perf_counter() - t0, 1), steps=run.step)
    best = run_lib.restore_run(wd, select=args.select)
    den = Denoiser(best.nets.generator, best.variables, best.norm, 4, tta=tta)
    res["checkpoint"] = best.step
    for split in ("val", "testq", "test") if args.full_test else ("val", "testq"):
        data = load(d, split)
        preds = den(np.stack([r for _, r, _ in data]))
        ps = [metrics.psnr(g, p) for (_, _, g), p in zip(data, preds)]
        res[split] = round(float(np.mean(ps)), 3)
        if split == "test":
            ss = [metrics.ssim(g, p) for (_, _, g), p in zip(data, preds)]
            res["test_ssim"] = round(float(np.mean(ss)), 4)
        for f in sorted({f for f, _, _ in data}):
            res[f"{split}_{f[:-4]}"] = round(
                float(np.mean([p for (ff, _, _), p in zip(data, ps) if ff == f])), 2
            )
    print("RESULT", json.dumps(res), flush=True)
    with open(os.path.join(args.out, "results.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
