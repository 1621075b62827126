"""JAX vs PyTorch in one run, and how the JAX step scales with batch size and image size.

Every measurement runs in its own fresh process (so peak memory is per measurement, and one
run's allocator state cannot slow the next): the JAX step through `clidim-jax benchmark`, the
PyTorch step through `benchmarks/torch_step.py` with a Python that has torch (a separate venv:
benchmarks/README.md). JAX and PyTorch alternate, `--repeats` times, and the report takes the
median over repeats of each side's median step time, so a slow spell of a shared machine hits both.

    python benchmarks/compare.py --torch-python venv-torch/bin/python --json cmp.json
    python benchmarks/compare.py --scaling --plot scaling.png --markdown scaling.md

Standard library + matplotlib only; run it with the project's Python.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def jax_run(
    mode: str, variant: str, batch: int, size: int, steps: int, extra: list[str]
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [
            sys.executable, "-m", "clidim_jax", "benchmark",
            f"--config=configs/reference.py:variant={variant}",
            f"--config.train.batch_size={batch}", f"--config.data.patch_size={size}",
            f"--steps={steps}", f"--mode={mode}", f"--json={out}", *extra,
        ]  # fmt: skip
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def torch_run(
    python: str, mode: str, variant: str, batch: int, size: int, steps: int
) -> dict[str, Any]:
    cmd = [
        python, os.path.join(HERE, "torch_step.py"), f"--mode={mode}", f"--variant={variant}",
        f"--batch-size={batch}", f"--steps={steps}",
    ]  # fmt: skip
    if mode == "train":
        cmd.append(f"--size={size}")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout[p.stdout.index("{") :])


def compare(a: argparse.Namespace) -> dict[str, Any]:
    rows = []
    cases = [("train", v) for v in a.variants.split(",")]
    if a.denoise:
        cases.append(("denoise", "baseline"))
    for mode, variant in cases:
        jx, pt = [], []
        for r in range(a.repeats):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for side in order:
                if side == 0:
                    jx.append(jax_run(mode, variant, a.batch_size, a.size, a.steps, []))
                else:
                    pt.append(
                        torch_run(a.torch_python, mode, variant, a.batch_size, a.size, a.steps)
                    )
                print(f"  {mode}/{variant}: {'jax' if side == 0 else 'torch'} done", flush=True)
        j_s = statistics.median(r["step_s"] for r in jx)
        t_s = statistics.median(r["step_s"] for r in pt)
        rows.append(
            {
                "mode": mode,
                "variant": variant,
                "jax_step_s": j_s,
                "torch_step_s": t_s,
                "speedup_jax_over_torch": t_s / j_s,
                "jax_utilization": statistics.median(r["utilization"] for r in jx),
                "jax_compile_s": statistics.median(r["compile_s"] for r in jx),
                "jax_step_s_all": [r["step_s"] for r in jx],
                "torch_step_s_all": [r["step_s"] for r in pt],
                "jax": jx[-1],
                "torch": pt[-1],
            }
        )
    return {"batch_size": a.batch_size, "size": a.size, "steps": a.steps, "rows": rows}


def format_compare(result: dict[str, Any]) -> str:
    lines = [
        f"batch {result['batch_size']}, {result['size']}x{result['size']} (denoise: 1024x1024), "
        f"{result['steps']} timed steps per run",
        "| step | JAX | PyTorch eager | PyTorch time / JAX time | JAX utilisation | JAX compile |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        name = "denoise 1024x1024" if r["mode"] == "denoise" else f"train {r['variant']}"
        lines.append(
            f"| {name} | {r['jax_step_s']:.3f} s | {r['torch_step_s']:.3f} s | "
            f"{r['speedup_jax_over_torch']:.2f}x | {100 * r['jax_utilization']:.1f} % | "
            f"{r['jax_compile_s']:.1f} s |"
        )
    return "\n".join(lines)


def scaling(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"variant": a.scaling_variant, "batch": [], "size": []}
    for b in (int(x) for x in a.batch_sizes.split(",")):
        r = jax_run("train", a.scaling_variant, b, 256, a.steps, [])
        out["batch"].append({"batch_size": b, "size": 256, **_keep(r)})
        print(f"  batch {b}: {r['step_s']:.3f} s", flush=True)
    for s in (int(x) for x in a.sizes.split(",")):
        r = jax_run("train", a.scaling_variant, a.scaling_batch, s, a.steps, [])
        out["size"].append({"batch_size": a.scaling_batch, "size": s, **_keep(r)})
        print(f"  size {s}: {r['step_s']:.3f} s", flush=True)
    return out


def _keep(r: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "step_s", "images_per_s", "compile_s", "utilization", "flops_per_step",
        "achieved_flops_per_s", "peak_flops_per_s", "peak_rss_bytes",
    )  # fmt: skip
    out = {k: r[k] for k in keys}
    out["xla_temp_bytes"] = r.get("memory_analysis", {}).get("temp_size_in_bytes")
    return out


def format_scaling(result: dict[str, Any]) -> str:
    gib = 2**30
    lines = [
        f"JAX train step, reference preset, variant {result['variant']}",
        "| batch | image | step | images/s | Mpixel/s | utilisation | XLA temp | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["batch"] + result["size"]:
        mp = r["images_per_s"] * r["size"] ** 2 / 1e6
        temp = r["xla_temp_bytes"]
        lines.append(
            f"| {r['batch_size']} | {r['size']}x{r['size']} | {r['step_s']:.3f} s | "
            f"{r['images_per_s']:.2f} | {mp:.3f} | {100 * r['utilization']:.1f} % | "
            f"{'-' if temp is None else f'{temp / gib:.2f} GiB'} | "
            f"{r['peak_rss_bytes'] / gib:.2f} GiB |"
        )
    return "\n".join(lines)


def plot_scaling(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (key, xlabel) in enumerate(
        (("batch", "batch size (256x256)"), ("size", "image size"))
    ):
        rows = result[key]
        x = [r["batch_size"] if key == "batch" else r["size"] for r in rows]
        mpix = [r["images_per_s"] * r["size"] ** 2 / 1e6 for r in rows]
        ax = axes[0, col]
        ax.plot(x, mpix, "o-", label="throughput")
        ax.set_ylabel("Mpixel/s")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot(x, [100 * r["utilization"] for r in rows], "s--", color="tab:orange")
        ax2.set_ylabel("utilisation of matmul peak (%)", color="tab:orange")
        ax2.set_ylim(0, 100)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_title(f"throughput vs {xlabel}")
        ax = axes[1, col]
        ax.plot(x, [r["peak_rss_bytes"] / 2**30 for r in rows], "o-", label="peak RSS")
        temps = [r["xla_temp_bytes"] for r in rows]
        if all(t is not None for t in temps):
            ax.plot(x, [t / 2**30 for t in temps], "s--", label="XLA temp buffers")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("GiB")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle(f"clidim-jax train step (reference preset, {result['variant']}), XLA CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", ""))
    p.add_argument("--variants", default="baseline,cl_tv_ssim")
    p.add_argument("--denoise", action="store_true", help="also whole-image inference 1024x1024")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="alternating JAX/PyTorch runs")
    p.add_argument("--scaling", action="store_true", help="JAX scaling instead of the comparison")
    p.add_argument("--scaling-variant", default="cl_tv_ssim")
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--sizes", default="256,512,768", help="multiples of 2**depth (256)")
    p.add_argument("--scaling-batch", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    if a.scaling:
        result = scaling(a)
        text = format_scaling(result)
        if a.plot:
            plot_scaling(result, a.plot)
    else:
        if not a.torch_python:
            p.error("--torch-python (or $TORCH_PYTHON): a Python with torch (benchmarks/README.md)")
        result = compare(a)
        text = format_compare(result)
    print(text)
    if a.markdown:
        with open(a.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
