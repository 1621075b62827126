"""Runs a few sharded train steps of a tiny CLIDiM model and saves losses and parameters.

Used by test_sharding.py in fresh processes, because the number of CPU devices (and the
distributed runtime) must be fixed before JAX starts. One process can run several mesh sizes.
"""

import argparse
import functools
import os
import sys

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True, help="local CPU devices")
    ap.add_argument("--mesh-sizes", default="", help="comma list; default: all global devices")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compute-dtype", default="float32")
    ap.add_argument("--also-bfloat16", action="store_true", help="and mesh 1 in bfloat16")
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import tiny_config

    from clidim_jax.data.datasets import PairedImages
    from clidim_jax.data.normalization import Normalization
    from clidim_jax.sharding import (
        init_replicated,
        initialize_distributed,
        make_mesh,
        put_replicated,
    )
    from clidim_jax.state import build_networks, init_state
    from clidim_jax.step import make_sampled_train_step

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    c = tiny_config("cl_tv_ssim")
    c.train.batch_size = args.batch_size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    clean = (1000 + 400 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.float32)[None]
    noisy = (clean + rng.normal(0, 150, (6, 48, 48))).clip(0, 65535).astype(np.uint16)
    host_data = PairedImages.whole(noisy, clean, np.zeros(6, np.int32), "synthetic").device_data()
    norm = Normalization.from_images(noisy, (0.1, 99.9))

    sizes = (
        [int(s) for s in args.mesh_sizes.split(",")] if args.mesh_sizes else [len(jax.devices())]
    )
    runs = [(n, args.compute_dtype, str(n)) for n in sizes]
    if args.also_bfloat16:  # bfloat16 compute on one device, beside the float32 runs
        runs.append((1, "bfloat16", "1_bfloat16"))

    def leaves(state):
        return jax.tree.leaves(
            (state.g_params, state.d_params, state.g_batch_stats, state.d_batch_stats)
        )

    def flat(state):
        return np.concatenate([np.asarray(x.addressable_data(0)).ravel() for x in leaves(state)])

    results = {}
    for n, dtype, key in runs:
        c.model.compute_dtype = dtype
        nets = build_networks(c)
        mesh = make_mesh(n)
        state = init_replicated(functools.partial(init_state, nets), mesh, jax.random.key(0))
        data = put_replicated(host_data, mesh)
        step = jax.jit(make_sampled_train_step(c, nets, 2, norm, mesh=mesh), donate_argnums=(0,))

        losses = []
        for i in range(args.steps):
            state, m = step(state, data, jax.random.key(1))
            losses.append([float(m[k].addressable_data(0)) for k in sorted(m)])
            if i == 0:
                results[f"params_step1_{key}"] = flat(state)
        results[f"losses_{key}"] = np.array(losses)
        results[f"params_{key}"] = flat(state)
        results[f"param_dtypes_{key}"] = np.array(sorted({str(x.dtype) for x in leaves(state)}))
        results["names"] = np.array(sorted(m))
    if jax.process_index() == 0:
        np.savez(args.out, **results)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
