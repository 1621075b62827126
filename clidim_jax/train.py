"""`train_and_evaluate(config, workdir)`: data on device, the jitted step loop, logging, checkpoint,
evaluation. Also `evaluate_workdir` for re-evaluating a finished run."""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from clu import parameter_overview

from clidim_jax import config_lib
from clidim_jax.checkpointing import Checkpoints
from clidim_jax.data import Normalization, PairedImages, load_datasets
from clidim_jax.evaluate import evaluate, format_result
from clidim_jax.inference import Denoiser
from clidim_jax.state import (
    Networks,
    TrainState,
    build_networks,
    init_state,
    steps_per_epoch,
    total_steps,
)
from clidim_jax.step import make_sampled_train_step
from clidim_jax.writers import MetricWriter


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def compute_normalization(config: ml_collections.ConfigDict, train: PairedImages) -> Normalization:
    """Leak-free by construction: only the training images are looked at."""
    d = config.data
    if d.normalization == "reference":
        # Training uses a per-batch min-max (in the step); for deployment store the training
        # data's overall min-max, which a large reference batch approaches.
        lo = float(min(train.noisy.min(), train.clean.min()))
        hi = float(max(train.noisy.max(), train.clean.max()))
        return Normalization(lo, hi if hi > lo else lo + 1.0, "reference")
    return Normalization.from_images(train.noisy, tuple(d.percentiles))


def make_metrics_collection(names: list[str]) -> type[clu_metrics.Collection]:
    """A clu Collection averaging every scalar the step reports over a logging interval."""
    return clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in names})


def run_metadata(
    config: ml_collections.ConfigDict, norm: Normalization, train: PairedImages
) -> dict:
    return {
        "config": json.loads(config.to_json_best_effort()),
        "normalization": json.loads(norm.to_json()),
        "train_region": train.name,
        "n_train_images": len(train),
    }


def config_from_metadata(meta: dict) -> ml_collections.ConfigDict:
    c = config_lib.base_config()
    c.update_from_flattened_dict(
        {k: (tuple(v) if isinstance(v, list) else v) for k, v in _flatten(meta["config"]).items()}
    )
    return c


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def generator_variables(state: TrainState) -> dict:
    return {"params": state.g_params, "batch_stats": state.g_batch_stats}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains the configured model in `workdir`, then evaluates it on the test split."""
    config_lib.validate(config)
    train_ds, test_ds = load_datasets(config.data)  # every data error surfaces before training
    os.makedirs(workdir, exist_ok=True)

    nets = build_networks(config)
    spe = steps_per_epoch(config, len(train_ds))
    num_steps = total_steps(config, len(train_ds))
    norm = compute_normalization(config, train_ds)
    meta = run_metadata(config, norm, train_ds)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)

    root_key = jax.random.key(config.seed)
    init_key, train_key = jax.random.split(root_key)
    state = jax.jit(functools.partial(init_state, nets))(init_key)
    ckpts = Checkpoints(workdir, max_to_keep=2)
    start = ckpts.latest_step()
    if start is not None:
        state, _ = ckpts.restore(jax.eval_shape(lambda: state))
        _say(f"resumed from checkpoint at step {start}")

    _say(
        f"{config.name}:{config.variant} on {train_ds.name} ({len(train_ds)} images of "
        f"{train_ds.shape[0]}x{train_ds.shape[1]}), patch {config.data.patch_size}, "
        f"batch {config.train.batch_size}, {spe} steps/epoch, {num_steps} steps, "
        f"devices {jax.devices()}"
    )
    writer = MetricWriter(workdir)
    for name, params in (("generator", state.g_params), ("discriminator", state.d_params)):
        overview = parameter_overview.get_parameter_overview(params, include_stats=False)
        with open(os.path.join(workdir, f"parameters_{name}.txt"), "w", encoding="utf-8") as f:
            f.write(overview + "\n")
        n = parameter_overview.count_parameters(params)
        _say(f"{name}: {n:,} parameters\n{overview}")
        writer.write_texts(int(state.step), {f"parameters/{name}": f"```\n{overview}\n```"})

    data = jax.device_put(
        {"noisy": train_ds.noisy, "clean": train_ds.clean, "clean_index": train_ds.clean_index}
    )
    step_fn = jax.jit(make_sampled_train_step(config, nets, spe, norm), donate_argnums=(0,))

    log_every = config.train.log_every
    collection = None
    acc = None
    step = int(state.step)
    t_compile = time.perf_counter()
    t_mark, step_mark = None, step
    while step < num_steps:
        state, m = step_fn(state, data, train_key)
        step += 1
        if collection is None:  # first step: compile; time it separately from throughput
            collection = make_metrics_collection(sorted(m))
            jax.block_until_ready(m)
            _say(f"compiled and ran the first step in {time.perf_counter() - t_compile:.1f} s")
            t_mark, step_mark = time.perf_counter(), step
        upd = collection.single_from_model_output(**m)
        acc = upd if acc is None else acc.merge(upd)
        if step % log_every == 0 or step == num_steps:
            values = {k: float(v) for k, v in acc.compute().items()}
            acc = None
            _check_finite(values, step)
            writer.write_scalars(step, values)
            now = time.perf_counter()
            rate = (
                (step - step_mark) / max(now - t_mark, 1e-9) if step > step_mark else float("nan")
            )
            left = (num_steps - step) / rate if rate > 0 else float("nan")
            shown = " ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "lr")
            _say(
                f"step {step}/{num_steps} (epoch {(step - 1) // spe + 1}) | {shown} | "
                f"{rate:.2f} steps/s | {_fmt_time(left) if left == left else '?'} left"
            )
    writer.flush()
    jax.block_until_ready(state)
    ckpts.save(step, state, meta, force=True)
    ckpts.close()

    denoiser = Denoiser(nets.generator, generator_variables(state), norm, config.eval.batch_size)
    result = evaluate(
        denoiser,
        test_ds,
        workdir,
        dataset=_dataset_name(config),
        baseline_sigmas=tuple(config.eval.baseline_sigmas),
        write=jax.process_index() == 0,
    )
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result["output"].items()})
    writer.close()
    _say(format_result(result))
    return result


def _dataset_name(config: ml_collections.ConfigDict) -> str:
    return "acsn_tirf" if config.data.source == "demo" else os.path.basename(config.data.path)


def _check_finite(values: dict[str, float], step: int) -> None:
    bad = [k for k, v in values.items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite loss at step {step}: {', '.join(bad)}")


def restore_run(
    workdir: str,
) -> tuple[ml_collections.ConfigDict, Networks, TrainState, Normalization]:
    """Rebuilds config, networks, state and normalisation from a workdir's latest checkpoint."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir}: no checkpoint found (train a model there first)")
    ckpts = Checkpoints(workdir)
    if ckpts.latest_step() is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint found (train a model there first)")
    meta = ckpts.restore_meta()
    config = config_from_metadata(meta)
    nets = build_networks(config)
    abstract = jax.eval_shape(functools.partial(init_state, nets), jax.random.key(0))
    state, _ = ckpts.restore(abstract)
    ckpts.close()
    return config, nets, state, Normalization.from_dict(meta["normalization"])


def evaluate_workdir(workdir: str) -> dict[str, Any]:
    config, nets, state, norm = restore_run(workdir)
    _, test_ds = load_datasets(config.data)
    denoiser = Denoiser(nets.generator, generator_variables(state), norm, config.eval.batch_size)
    result = evaluate(
        denoiser,
        test_ds,
        workdir,
        dataset=_dataset_name(config),
        baseline_sigmas=tuple(config.eval.baseline_sigmas),
        write=jax.process_index() == 0,
    )
    _say(format_result(result))
    return result
