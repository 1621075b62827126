"""In-process A/B of the reference train step under different XLA options or formulation
thresholds: every setting compiled in the same process, then timed in alternating rounds, so a
slow spell of a shared machine hits all settings alike (separate processes on this VM differ by
up to 10 % run to run).

    PYTHONPATH=. python benchmarks/ab_step.py --variant baseline --rounds 8 \\
        project xla-default const:_DX_DOT_MAX_PIXELS=256

Settings: `project` (the project's compiler options, `clidim_jax.compiler`), `xla-default` (no
compiler options: jaxlib's defaults, YNNPACK convolutions on CPU), `ynn-conv` (the project's
options with YNNPACK convolutions back on), `const:NAME=INT[,NAME=INT]` (the project's options
with thresholds of `clidim_jax.models.layers` changed while tracing). Prints the median and
minimum wall time and the median process CPU time per step, and the compile time. Needs memory
for one train state per setting (about 1 GiB each for the reference preset).
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time

import jax
import numpy as np

from clidim_jax import compiler
from clidim_jax.data.normalization import Normalization
from clidim_jax.models import layers
from clidim_jax.sharding import init_replicated, make_mesh, put_replicated
from clidim_jax.state import build_networks, init_state
from clidim_jax.step import make_sampled_train_step
from configs import reference


def options_and_constants(setting: str) -> tuple[dict, dict[str, int]]:
    project = compiler.compiler_options()
    if setting == "project":
        return project, {}
    if setting == "xla-default":
        return {}, {}
    if setting == "ynn-conv":
        fusions = compiler.CPU_LIBRARY_FUSIONS + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
        return {**project, "xla_cpu_experimental_ynn_fusion_type": fusions}, {}
    if setting.startswith("const:"):
        pairs = (kv.split("=") for kv in setting[len("const:") :].split(","))
        constants = {k: int(v) for k, v in pairs}
        unknown = [k for k in constants if not hasattr(layers, k)]
        if unknown:
            raise SystemExit(f"unknown constant(s) of clidim_jax.models.layers: {unknown}")
        return project, constants
    raise SystemExit(f"unknown setting {setting!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--variant", default="baseline")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    args = parser.parse_args()

    config = reference.get_config(f"variant={args.variant}")
    config.train.batch_size = args.batch_size
    nets, mesh, p = build_networks(config), make_mesh(), config.data.patch_size
    rng = np.random.default_rng(0)
    host = {
        "noisy": rng.integers(0, 4096, (8, p, p), dtype=np.uint16),
        "clean": rng.uniform(0, 4096, (8, p, p)).astype(np.float32),
        "views": np.array([(i, i, 0, 0, p, p) for i in range(8)], np.int32),
    }
    data, key = put_replicated(host, mesh), jax.random.key(1)
    runs = {}
    for setting in args.settings:
        options, constants = options_and_constants(setting)
        saved = {k: getattr(layers, k) for k in constants}
        for k, v in constants.items():
            setattr(layers, k, v)
        try:
            state = init_replicated(functools.partial(init_state, nets), mesh, jax.random.key(0))
            step = jax.jit(
                make_sampled_train_step(config, nets, 10, Normalization(0.0, 4096.0), mesh=mesh),
                donate_argnums=(0,),
                compiler_options=options,
            )
            t = time.perf_counter()
            compiled = step.lower(state, data, key).compile()
            compile_s = time.perf_counter() - t
        finally:
            for k, v in saved.items():
                setattr(layers, k, v)
        state = jax.block_until_ready(compiled(state, data, key)[0])  # warm-up
        runs[setting] = {"c": compiled, "state": state, "wall": [], "cpu": [], "compile": compile_s}
    for _ in range(args.rounds):
        for run in runs.values():
            for _ in range(args.steps_per_round):
                r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                run["state"] = jax.block_until_ready(run["c"](run["state"], data, key)[0])
                wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
                run["wall"].append(wall)
                run["cpu"].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    print(f"{args.variant}, batch {args.batch_size}, {args.rounds} rounds x {args.steps_per_round}")
    for setting, run in runs.items():
        print(
            f"{setting:40s} wall median {statistics.median(run['wall']):.3f} s"
            f"  min {min(run['wall']):.3f} s  cpu median {statistics.median(run['cpu']):.3f} s"
            f"  compile {run['compile']:.1f} s"
        )


if __name__ == "__main__":
    main()
