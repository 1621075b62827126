"""`clidim-jax benchmark`: what XLA compiled for the train step (or inference) and how fast it runs.

Reports compile time (ahead of time: lower + compile), the median and spread of the step time after
warm-up, images/s, FLOPs per step from XLA's cost analysis, achieved FLOP/s, this machine's float32
matmul peak measured in the same run, utilisation, XLA's memory analysis, the process's peak
resident memory, parameter counts and devices. Synthetic data of the configured patch size: the
step samples its crops on the device, so input I/O plays no part.
"""

from __future__ import annotations

import functools
import json
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clidim_jax import config_lib
from clidim_jax.compiler import compiler_options
from clidim_jax.data.normalization import Normalization
from clidim_jax.malloc_env import hugepages_enabled
from clidim_jax.models import count_params
from clidim_jax.sharding import (
    check_batch_divisible,
    init_replicated,
    make_mesh,
    put_replicated,
)
from clidim_jax.state import build_networks, init_state
from clidim_jax.step import make_sampled_train_step, step_compiler_options


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _timed(fn, carry: Any = None, *, steps: int, warmup: int) -> tuple[list[float], Any]:
    """Wall times of `carry = fn(carry)` after warm-up (the carry threads donated buffers)."""
    for _ in range(warmup):
        carry = fn(carry)
    jax.block_until_ready(carry)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        carry = jax.block_until_ready(fn(carry))
        times.append(time.perf_counter() - t)
    return times, carry


def matmul_peak_flops(n: int = 2048, steps: int = 5) -> float:
    """Best float32 matmul FLOP/s of the first device (the machine's practical peak)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    times, _ = _timed(lambda _: mm(a, a), steps=steps, warmup=2)
    return 2.0 * n**3 / min(times)


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    keys = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
        "alias_size_in_bytes",
    )
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def _summary(times: list[float]) -> dict[str, float]:
    return {
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_s_iqr": float(np.subtract(*np.percentile(times, [75, 25])))
        if len(times) > 1
        else 0.0,
    }


def benchmark_train(
    config: ml_collections.ConfigDict, steps: int, warmup: int = 1
) -> dict[str, Any]:
    config_lib.validate(config)
    nets = build_networks(config)
    mesh = make_mesh()
    b, p = config.train.batch_size, config.data.patch_size
    check_batch_divisible(b, mesh)
    rng = np.random.default_rng(0)
    host = {
        "noisy": rng.integers(0, 4096, (8, p, p), dtype=np.uint16),
        "clean": rng.uniform(0, 4096, (8, p, p)).astype(np.float32),
        "views": np.array([(i, i, 0, 0, p, p) for i in range(8)], np.int32),
    }
    norm = Normalization(0.0, 4096.0)
    state = init_replicated(functools.partial(init_state, nets), mesh, jax.random.key(0))
    data = put_replicated(host, mesh)
    key = jax.random.key(1)
    step = jax.jit(
        make_sampled_train_step(config, nets, 10, norm, mesh=mesh),
        donate_argnums=(0,),
        compiler_options=step_compiler_options(mesh),
    )
    t = time.perf_counter()
    lowered = step.lower(state, data, key)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    flops = _cost_flops(compiled)

    # The state is donated: thread it through the timed calls.
    times, state = _timed(lambda st: compiled(st, data, key)[0], state, steps=steps, warmup=warmup)
    s = _summary(times)
    return {
        "mode": "train",
        "config": f"{config.name}:{config.variant}",
        "batch_size": b,
        "patch_size": p,
        "compile_s": compile_s,
        **s,
        "images_per_s": b / s["step_s"],
        "flops_per_step": flops,
        "achieved_flops_per_s": flops / s["step_s"],
        "memory_analysis": _memory(compiled),
        "params_g": count_params(state.g_params),
        "params_d": count_params(state.d_params),
        "steps": steps,
    }


def benchmark_denoise(
    config: ml_collections.ConfigDict, steps: int, size: int = 1024, warmup: int = 1
) -> dict[str, Any]:
    """Whole-image inference of G in eval mode on one size x size image."""
    nets = build_networks(config)
    state = jax.jit(functools.partial(init_state, nets))(jax.random.key(0))
    variables = {"params": state.g_params, "batch_stats": state.g_batch_stats}
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, size, size, 1)), jnp.float32)
    fn = jax.jit(
        lambda v, x: nets.generator.apply(v, x, train=False), compiler_options=compiler_options()
    )
    t = time.perf_counter()
    compiled = fn.lower(variables, x).compile()
    compile_s = time.perf_counter() - t
    times, _ = _timed(lambda _: compiled(variables, x), steps=steps, warmup=warmup)
    s = _summary(times)
    flops = _cost_flops(compiled)
    return {
        "mode": "denoise",
        "config": f"{config.name}:{config.variant}",
        "image_size": size,
        "compile_s": compile_s,
        **s,
        "megapixels_per_s": size * size / 1e6 / s["step_s"],
        "images_per_s": 1.0 / s["step_s"],
        "flops_per_step": flops,
        "achieved_flops_per_s": flops / s["step_s"],
        "memory_analysis": _memory(compiled),
        "params_g": count_params(state.g_params),
        "params_d": count_params(state.d_params),
        "steps": steps,
    }


def run_benchmark(
    config: ml_collections.ConfigDict,
    *,
    steps: int,
    mode: str = "train",
    json_path: str | None = None,
) -> dict[str, Any]:
    if mode == "train":
        result = benchmark_train(config, steps)
    elif mode == "denoise":
        result = benchmark_denoise(config, steps)
    else:
        raise ValueError(f"--mode must be train or denoise, got {mode!r}")
    peak = matmul_peak_flops()
    result.update(
        peak_flops_per_s=peak,
        utilization=result["achieved_flops_per_s"] / peak,
        peak_rss_bytes=peak_rss_bytes(),
        devices=[str(d) for d in jax.devices()],
        backend=jax.default_backend(),
        jax_version=jax.__version__,
        malloc_hugepages=hugepages_enabled(),
    )
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def format_benchmark(r: dict[str, Any]) -> str:
    lines = [
        f"{r['mode']} benchmark, {r['config']}, devices {r['devices']}",
        f"  compile            {r['compile_s']:.1f} s",
        f"  step (median)      {r['step_s'] * 1e3:.1f} ms  (min {r['step_s_min'] * 1e3:.1f}, "
        f"max {r['step_s_max'] * 1e3:.1f}, over {r['steps']})",
        f"  images/s           {r['images_per_s']:.2f}",
    ]
    if "megapixels_per_s" in r:
        lines.append(f"  megapixels/s       {r['megapixels_per_s']:.2f}")
    lines += [
        f"  FLOPs/step (XLA)   {r['flops_per_step'] / 1e9:.1f} GFLOP",
        f"  achieved           {r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s",
        f"  matmul peak        {r['peak_flops_per_s'] / 1e9:.1f} GFLOP/s",
        f"  utilisation        {100 * r['utilization']:.1f} %",
        f"  peak RSS           {r['peak_rss_bytes'] / 2**30:.2f} GiB",
        f"  XLA temp memory    {r['memory_analysis'].get('temp_size_in_bytes', 0) / 2**20:.0f} MiB",
        f"  params             G {r['params_g']:,}  D {r['params_d']:,}",
    ]
    return "\n".join(lines)
