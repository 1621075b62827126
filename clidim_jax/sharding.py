"""Data parallelism over a `data` mesh axis, on one or many hosts (jax.distributed).

The global batch is sharded `P('data')`, the train state and the (small, few-shot) training images
are replicated `P()`, and the step runs under plain `jax.jit`. Because the crops are drawn inside
the step from `fold_in(key, step)` with partitionable threefry, every device draws exactly its own
part of the *same* global batch whatever the device count, and BatchNorm statistics (plain means
over the batch axis) are global-batch statistics: the same config computes the same function on
1, 4 or 8 devices, up to the order of floating-point reductions.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts JAX's distributed runtime when there is more than one process.

    Explicit flags win; otherwise `jax.distributed.initialize()` auto-detects TPU pods, SLURM and
    Open MPI from the environment. A plain single-process run initialises nothing. On CPU the
    collectives go through gloo.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    auto = any(
        k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE")
    )
    if auto and not explicit:
        if int(os.environ.get("SLURM_NTASKS", "2")) < 2:
            return
    elif not explicit:
        return
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        jax.distributed.initialize()


def make_mesh(num_devices: int | None = None, devices: list | None = None) -> Mesh:
    """A 1-D `data` mesh over all (or the first `num_devices`) devices of all processes."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices is None else num_devices
    if n > len(devices):
        raise ValueError(f"asked for {n} devices, {len(devices)} available")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        from clidim_jax.config_lib import ConfigError

        raise ConfigError(
            f"config.train.batch_size={batch_size} does not divide by the {n} devices of the "
            f"mesh; use a multiple of {n}"
        )


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Lifts host data that every process holds in full to replicated global arrays."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def init_replicated(init_fn, mesh: Mesh, *args) -> Any:
    """Initialises straight into replicated shardings: the abstract state comes from
    `jax.eval_shape`, so no full state is ever built on a single device first."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
    return jax.jit(init_fn, out_shardings=shardings)(*args)


def shard_batch_fn(mesh: Mesh):
    """A constraint that puts a (B, ...) array on the `data` axis inside jit."""
    sharding = batch_sharding(mesh)
    return functools.partial(jax.lax.with_sharding_constraint, shardings=sharding)


def place(tree: Any, sharding: NamedSharding) -> Any:
    """Puts every leaf on `sharding` (replicated), from host or device values, on one or many
    processes: `jax.device_put` cannot target devices of other processes, so values not already
    placed there are lifted with `make_array_from_process_local_data` (each process holds the
    same full value)."""

    def one(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                one(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        value = np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, value)

    return jax.tree.map(one, tree)
