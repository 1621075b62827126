"""`train_and_evaluate(config, workdir)`: data on device, the jitted step loop, logging,
checkpoints, validation, then evaluation of the selected checkpoint on the test split."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from clu import parameter_overview
from jax.sharding import Mesh

from clidim_jax import config_lib
from clidim_jax import metrics as metrics_lib
from clidim_jax.checkpointing import (
    BEST_METRIC,
    SCORE_METRIC,
    Checkpoints,
    StopRequest,
    nonfinite_leaves,
)
from clidim_jax.data import DataError, Normalization, PairedImages
from clidim_jax.data.datasets import load_splits
from clidim_jax.data.normalization import (
    fit_empirical_noise,
    fit_noise_correlation,
    fit_noise_model,
    min_max_normalization,
    percentiles,
)
from clidim_jax.evaluate import evaluate, format_result
from clidim_jax.inference import Denoiser
from clidim_jax.run import (
    check_resumable,
    config_changes,
    config_fields,
    dataset_name,
    keep_metric_lines,
    local_generator_variables,
    make_denoiser,
    restore_run,
    run_metadata,
    say,
)
from clidim_jax.sharding import check_batch_divisible, make_mesh, place, put_replicated, replicated
from clidim_jax.state import (
    Networks,
    TrainState,
    build_networks,
    init_state,
    lr_policy_inputs,
    steps_per_epoch,
    total_steps,
)
from clidim_jax.step import make_sampled_train_step, step_compiler_options
from clidim_jax.workdir_lock import WorkdirLock, check_not_busy
from clidim_jax.writers import MetricWriter


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def compute_normalization(config: ml_collections.ConfigDict, train: PairedImages) -> Normalization:
    """Leak-free by construction: only the training images are looked at."""
    d = config.data
    if d.normalization == "reference":
        # Training uses a per-batch min-max (in the step); for deployment store the training
        # data's overall min-max, which a large reference batch approaches.
        return min_max_normalization([*train.iter_noisy(), *train.iter_clean()])
    noise = None
    if d.vst == "gat":
        try:
            noise = fit_noise_model(train.iter_pairs())
        except ValueError as e:
            raise DataError(f"{train.name}: {e}") from None
    transform = noise.gat if noise is not None else (lambda x: x)
    # (without a transform the stored integer images go in as they are: an exact histogram,
    # never a float copy of the stack)
    images = train.iter_noisy()
    if noise is not None:
        images = (transform(np.asarray(a, np.float32)) for a in images)
    lo, hi = percentiles(images, tuple(d.percentiles))
    if d.normalization == "range":
        # Every clean training intensity inside [-1, 1], with headroom above the brightest.
        top = max(float(transform(np.float32(c.max()))) for c in train.iter_clean())
        hi = lo + (max(hi, top) - lo) * (1.0 + float(d.headroom))
    if not hi > lo:
        hi = lo + 1.0  # a constant image: any positive scale is exact
    return Normalization(float(lo), float(hi), d.normalization, noise)


def make_metrics_collection(names: list[str]) -> type[clu_metrics.Collection]:
    """A clu Collection averaging every scalar the step reports over a logging interval (one
    class per set of names: the class is part of the carry's pytree structure, and a new one
    would make the jitted loop step compile again)."""
    return _metrics_collection(tuple(names))


@functools.cache
def _metrics_collection(names: tuple[str, ...]) -> type[clu_metrics.Collection]:
    return clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in names})


# ------------------------------------------------------------------------------- the train loop


@flax.struct.dataclass
class LoopCarry:
    """What one jitted loop step reads and writes (donated): the train state, the metric sums of
    the logging interval in progress, and the first step whose metrics were not finite."""

    state: TrainState
    metrics: Any  # a clu Collection of Averages
    bad_step: jax.Array  # int32, -1 while every metric has been finite
    bad_terms: jax.Array  # int32 bit mask over the sorted metric names, at bad_step


def make_loop_step(step_fn: Callable, names: list[str]) -> Callable:
    """(carry, data, key) -> (carry, bad_step): the train step, the metric accumulation and the
    non-finite check, all in the one XLA program. `bad_step` is returned separately (not donated)
    so the host can poll it without waiting for the step."""
    collection = make_metrics_collection(names)

    def loop_step(carry: LoopCarry, data, key):
        state, m = step_fn(carry.state, data, key)
        m = {k: jnp.asarray(m[k], jnp.float32) for k in names}
        bits = jnp.stack([~jnp.isfinite(m[k]) for k in names]).astype(jnp.int32)
        mask = jnp.sum(bits << jnp.arange(len(names), dtype=jnp.int32))
        first = (carry.bad_step < 0) & (mask != 0)
        bad_step = jnp.where(first, state.step, carry.bad_step)
        carry = LoopCarry(
            state=state,
            metrics=carry.metrics.merge(collection.single_from_model_output(**m)),
            bad_step=bad_step,
            bad_terms=jnp.where(first, mask, carry.bad_terms),
        )
        return carry, bad_step + 0

    return loop_step


# Config fields the compiled loop step does not depend on (the learning-rate policy is an input:
# `data["lr_policy"]`).
_NOT_IN_STEP = (
    "name", "seed", "checkpoint", "eval", "train.log_every",
    "train.lr", "train.n_epochs", "train.n_epochs_decay",
)  # fmt: skip
_compiled_steps: collections.OrderedDict = collections.OrderedDict()


def _step_key(config, spe, norm, mesh, noise) -> tuple:
    fields = {
        k: v
        for k, v in config_fields(config).items()
        if not any(k == f or k.startswith(f + ".") for f in _NOT_IN_STEP)
    }
    return (
        json.dumps(fields, sort_keys=True), spe, norm.to_json(), repr(noise), _mesh_key(mesh)
    )  # fmt: skip


def _cached(key, build: Callable) -> Any:
    if key not in _compiled_steps:
        _compiled_steps[key] = build()
        while len(_compiled_steps) > 8:
            _compiled_steps.popitem(last=False)
    _compiled_steps.move_to_end(key)
    return _compiled_steps[key]


def jitted_sampled_step(
    config: ml_collections.ConfigDict,
    nets: Networks,
    spe: int,
    norm: Normalization,
    mesh: Mesh,
    noise: Any = None,
) -> Callable:
    """`make_sampled_train_step` under `jax.jit`, one per step program in a process. `prepare`
    reads the metric names from its abstract evaluation and the loop step calls it: JAX traces
    a jitted function once per argument signature, so the train step is traced once, not twice
    (XLA inlines the nested call: the compiled program is the same)."""
    key = ("sampled", *_step_key(config, spe, norm, mesh, noise))
    return _cached(
        key,
        lambda: jax.jit(make_sampled_train_step(config, nets, spe, norm, mesh=mesh, noise=noise)),
    )


def compiled_loop_step(
    config: ml_collections.ConfigDict,
    nets: Networks,
    spe: int,
    norm: Normalization,
    names,
    mesh: Mesh,
    noise: Any = None,
) -> Callable:
    """The jitted loop step, shared by runs of one process whose step program is the same (the
    same model, data, losses and schedule), so that e.g. a resumed or repeated run in a notebook
    does not compile again. Keyed on everything the step closes over."""
    key = ("loop", *_step_key(config, spe, norm, mesh, noise), tuple(names))
    return _cached(
        key,
        lambda: jax.jit(
            make_loop_step(jitted_sampled_step(config, nets, spe, norm, mesh, noise), names),
            donate_argnums=(0,),
            compiler_options=step_compiler_options(mesh),
        ),
    )


_compiled_inits: dict = {}


def _mesh_key(mesh: Mesh) -> tuple:
    return (tuple(d.id for d in mesh.devices.flat), mesh.axis_names)


def compiled_init(config: ml_collections.ConfigDict, nets: Networks, mesh: Mesh) -> Callable:
    """`init_state` jitted once per model in a process (keyed on what shapes the networks),
    writing its outputs straight into the replicated sharding of the mesh."""
    fields = config_fields(config)
    key = json.dumps(
        {
            k: v
            for k, v in fields.items()
            if k.startswith("model.")
            or k in ("data.patch_size", "loss.head_features", "train.b1", "train.b2")
        },
        sort_keys=True,
    )
    key = (key, _mesh_key(mesh))
    if key not in _compiled_inits:
        _compiled_inits.clear()
        _compiled_inits[key] = jax.jit(
            functools.partial(init_state, nets), out_shardings=replicated(mesh)
        )
    return _compiled_inits[key]


def _placed(carry: LoopCarry) -> LoopCarry:
    """Every array of the carry where the state lives: a carry assembled on the host (fresh
    metric sums, a restored checkpoint) then has the placement of the step's own outputs, and
    the loop step compiles once rather than again for each placement."""
    return place(carry, jax.tree.leaves(carry.state)[0].sharding)


def _loop_item(carry: LoopCarry, key: jax.Array, names: list[str]) -> dict:
    """The checkpoint's `loop` item: the PRNG key and the interval's metric sums."""
    sums = {
        n: {"total": getattr(carry.metrics, n).total, "count": getattr(carry.metrics, n).count}
        for n in names
    }
    return {"rng": jax.random.key_data(key), "metrics": sums}


def _abstract_loop_item(meta: dict) -> dict:
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    scalar = {
        "total": jax.ShapeDtypeStruct((), jnp.float32),
        "count": jax.ShapeDtypeStruct((), jnp.int32),
    }
    return {"rng": rng, "metrics": {n: dict(scalar) for n in meta["metric_names"]}}


def _accumulator(names: list[str], sums: dict | None) -> Any:
    collection = make_metrics_collection(names)
    empty = collection.empty()
    if not sums or sorted(sums) != names:
        return empty
    # Each field's own class (clu's `from_output` subclass of Average): the carry's pytree
    # structure must be the one the loop step produces.
    return empty.replace(
        **{
            n: type(getattr(empty, n))(total=jnp.asarray(s["total"]), count=jnp.asarray(s["count"]))
            for n, s in sums.items()
        }
    )


def _nonfinite_error(carry: LoopCarry, names: list[str], last_saved: int | None) -> str | None:
    step = int(carry.bad_step)
    if step < 0:
        return None
    mask = int(carry.bad_terms)
    terms = ", ".join(n for i, n in enumerate(names) if mask >> i & 1)
    kept = (
        f"the last checkpoint (step {last_saved}) is intact"
        if last_saved is not None
        else "no checkpoint was saved"
    )
    return (
        f"non-finite loss at step {step}: {terms}. Training stopped; {kept} (no state after "
        "the divergence was saved). Lower train.lr or check the data."
    )


def validation_psnr(denoiser: Denoiser, val: PairedImages, state: TrainState) -> float:
    """Mean PSNR (comparable convention, docs/method.md section 7) of G on the validation data."""
    denoiser.variables = local_generator_variables(state)
    try:
        preds = denoiser(val.images())
    finally:
        denoiser.variables = None  # the state's buffers are donated to the next step
    return float(np.mean([metrics_lib.psnr(val.pair(i)[1], p) for i, p in enumerate(preds)]))


# ---------------------------------------------------------------------------- what a run needs


@dataclasses.dataclass
class Job:
    """Everything a training run is built from, before any state exists: the data splits (on
    the host, and the training images on the device), networks, schedule, normalisation, noise
    model, mesh, the step's metric names and the abstract state."""

    config: ml_collections.ConfigDict
    train: PairedImages
    val: PairedImages | None
    test: PairedImages
    nets: Networks
    spe: int
    num_steps: int
    norm: Normalization
    noise: Any
    mesh: Mesh
    data: dict
    names: list[str]
    abstract_state: Any
    init_key: jax.Array
    train_key: jax.Array


def prepare(config: ml_collections.ConfigDict) -> Job:
    """Loads and checks the data (every data error is raised here, before any file is written)
    and builds what the run needs."""
    config_lib.validate(config)
    train_ds, val_ds, test_ds = load_splits(config.data, config.train.batch_size, config.seed)
    nets = build_networks(config)
    spe = steps_per_epoch(config, train_ds.epoch_length)
    norm = compute_normalization(config, train_ds)
    noise = None
    if config.data.get("synthetic", 0.0) > 0:  # the model synthetic noisy images are drawn from
        try:
            noise = fit_noise_model(train_ds.iter_pairs(), allow_constant=True)
        except ValueError as e:
            raise DataError(f"{train_ds.name}: data.synthetic: {e}") from None
        if config.data.get("synthetic_noise", "poisson") == "empirical":
            try:
                noise = dataclasses.replace(
                    noise, empirical=fit_empirical_noise(train_ds.iter_pairs())
                )
            except ValueError as e:  # too few pixels to measure a distribution
                say(f"data.synthetic_noise=empirical: {e}; the Poisson-Gaussian model is used")
        if config.data.get("synthetic_corr", False):
            try:
                noise = dataclasses.replace(
                    noise, corr=fit_noise_correlation(train_ds.noisy_groups())
                )
            except ValueError as e:  # one noisy image per clean one: nothing to fit it on
                say(f"data.synthetic_corr: {e}; the synthetic noise stays independent per pixel")
        msg = f"noise model for synthetic inputs: Var = {noise.gain:.4g} x + {noise.offset:.4g}"
        if noise.empirical is not None:
            msg += (
                f", its shape measured at {len(noise.empirical.levels)} intensities up to "
                f"{noise.empirical.levels[-1]:.4g}"
            )
        if noise.corr != (0.0, 0.0):
            msg += ", neighbour correlation {:.3f} (y), {:.3f} (x)".format(*noise.corr)
        say(msg)
    mesh = make_mesh()  # every device of every process, one `data` axis
    check_batch_divisible(config.train.batch_size, mesh)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    abstract_state = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)),
        jax.eval_shape(functools.partial(init_state, nets), init_key),
    )
    # Every process holds the (few-shot, small) training images and lifts them, replicated.
    data = put_replicated({**train_ds.device_data(), "lr_policy": lr_policy_inputs(config)}, mesh)
    step = jitted_sampled_step(config, nets, spe, norm, mesh, noise)
    # (called from a traced function, as the loop step calls it, so that the loop step's trace
    # finds this one in JAX's cache: arguments that are tracers, not committed arrays)
    abstract_key = jax.ShapeDtypeStruct(train_key.shape, train_key.dtype, sharding=replicated(mesh))
    names = sorted(jax.eval_shape(lambda *a: step(*a), abstract_state, data, abstract_key)[1])
    return Job(
        config, train_ds, val_ds, test_ds, nets, spe, total_steps(config, train_ds.epoch_length),
        norm, noise, mesh, data, names, abstract_state, init_key, train_key,
    )  # fmt: skip


def resume_or_init(
    job: Job, ckpts: Checkpoints, workdir: str
) -> tuple[LoopCarry, jax.Array, int, int | None, list[float]]:
    """(carry, key, start step, last logged step kept, the last validation PSNRs its
    checkpoint kept for `checkpoint.select_window`) from the workdir's latest readable
    checkpoint, or a fresh state (start 0, None, []) when there is none."""
    restored = ckpts.restore_latest(
        job.abstract_state,
        _abstract_loop_item,
        check_meta=functools.partial(check_resumable, job.config, workdir),
        say=say,
    )
    if restored is None:
        keep_metric_lines(workdir, 0, 0)  # lines of a run that never saved a checkpoint
        state = compiled_init(job.config, job.nets, job.mesh)(job.init_key)
        acc, key, start, kept_until = (
            make_metrics_collection(job.names).empty(),
            job.train_key,
            0,
            None,
        )
        recent = []
    else:
        for k, a, b in config_changes(restored.meta["config"], job.config):
            say(f"resuming with a changed config: {k} {a!r} -> {b!r}")
        state, key = restored.state, jax.random.wrap_key_data(restored.loop["rng"])
        job.norm = Normalization.from_dict(restored.meta["normalization"])
        sums = restored.loop["metrics"]
        acc = _accumulator(job.names, sums)
        if restored.meta["metric_names"] != job.names:
            say("the logged metrics changed: the logging interval in progress starts afresh")
        start = int(restored.step)
        recent = [float(x) for x in restored.meta.get("val_recent", [])]
        kept_until = start - (int(next(iter(sums.values()))["count"]) if sums else 0)
        dropped = keep_metric_lines(workdir, kept_until, start)
        say(
            f"resumed from checkpoint {start}"
            + (f" (dropped {dropped} metrics.jsonl lines written after it)" if dropped else "")
        )
    carry = _placed(LoopCarry(state, acc, jnp.int32(-1), jnp.int32(0)))
    key = place(key, jax.tree.leaves(carry.state)[0].sharding)
    return carry, key, start, kept_until, recent


def describe_run(
    job: Job, workdir: str, state: TrainState, writer: MetricWriter, start: int
) -> dict:
    """Writes config.json and the parameter overviews, prints the run's summary; returns the
    metadata every checkpoint records."""
    c = job.config
    meta = run_metadata(c, job.norm, job.train, job.names)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    say(
        f"{c.name}:{c.variant} on {job.train.name} ({job.train.describe()}), "
        f"patch {c.data.patch_size}, batch {c.train.batch_size}, {job.spe} steps/epoch, "
        f"{job.num_steps} steps, devices {jax.devices()}"
        + (f"; validation on {job.val.name}" if job.val is not None else "")
    )
    for name, params in (("generator", state.g_params), ("discriminator", state.d_params)):
        overview = parameter_overview.get_parameter_overview(params, include_stats=False)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, f"parameters_{name}.txt"), "w", encoding="utf-8") as f:
                f.write(overview + "\n")
        n = parameter_overview.count_parameters(params)
        say(f"{name}: {n:,} parameters\n{overview}")
        writer.write_texts(start, {f"parameters/{name}": f"```\n{overview}\n```"})
    return meta


# ------------------------------------------------------------------- logging, saving, stopping


class Logger:
    """Writes the logging interval's mean metrics (metrics.jsonl, TensorBoard, stdout with
    steps/s and the time left) and checks them for non-finite values."""

    def __init__(self, job: Job, writer: MetricWriter):
        self.job, self.writer = job, writer
        self.rate_from: tuple[float, int] | None = None  # (time, step) after the first step

    def first_step_done(self, t0: float, step: int, flag: jax.Array) -> None:
        jax.block_until_ready(flag)  # the first step compiles: time it apart from throughput
        say(f"compiled and ran the first step in {time.perf_counter() - t0:.1f} s")
        self.rate_from = (time.perf_counter(), step)

    def __call__(
        self, carry: LoopCarry, step: int, *, reset: bool, last_saved: int | None
    ) -> LoopCarry:
        check_finite(carry, self.job.names, last_saved)
        values = {k: float(v) for k, v in jax.device_get(carry.metrics.compute()).items()}
        if reset:  # a full interval; a partial one (end, stop) stays open in the checkpoint
            carry = _placed(carry.replace(metrics=make_metrics_collection(self.job.names).empty()))
        self.writer.write_scalars(step, values)
        self.writer.flush()
        rate = float("nan")
        if self.rate_from is not None and step > self.rate_from[1]:
            rate = (step - self.rate_from[1]) / max(time.perf_counter() - self.rate_from[0], 1e-9)
        left = (self.job.num_steps - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "lr")
        say(
            f"step {step}/{self.job.num_steps} (epoch {(step - 1) // self.job.spe + 1}) | {shown} "
            f"| {rate:.2f} steps/s | {_fmt_time(left) if left == left else '?'} left"
        )
        return carry


class Saver:
    """Validates (when asked and there is validation data) and saves a checkpoint; remembers the
    last step saved, which error messages name."""

    def __init__(
        self,
        job: Job,
        ckpts: Checkpoints,
        writer: MetricWriter,
        meta: dict,
        start: int | None,
        recent: list[float] | None = None,
    ):
        self.job, self.ckpts, self.writer, self.meta = job, ckpts, writer, meta
        self.last_saved = start
        # checkpoint.select_window > 1: a checkpoint's score is the mean of its validation PSNR
        # and the window - 1 before it. The last window's PSNRs go into each checkpoint's meta
        # (`recent`: those of the checkpoint resumed from), so a resumed run scores as an
        # uninterrupted one.
        self.window = int(job.config.checkpoint.get("select_window", 1))
        self.recent: list[float] = list(recent or [])[-self.window :]
        self.denoiser = (
            Denoiser(job.nets.generator, None, job.norm, job.config.eval.batch_size)
            if job.val is not None
            else None
        )

    def __call__(self, carry: LoopCarry, key: jax.Array, step: int, *, validate: bool) -> None:
        check_finite(carry, self.job.names, self.last_saved)
        bad = nonfinite_leaves(carry.state)
        if bad:
            raise FloatingPointError(
                f"non-finite values in the train state at step {step} ({', '.join(bad[:3])}); "
                f"not saved. The last checkpoint (step {self.last_saved}) is intact."
            )
        metrics = None
        if validate and self.denoiser is not None:
            psnr = validation_psnr(self.denoiser, self.job.val, carry.state)
            metrics = {BEST_METRIC: psnr}
            scalars = {"val/psnr": psnr}
            line = f"step {step}: validation PSNR {psnr:.3f} dB on {self.job.val.name}"
            if self.window > 1:
                self.recent = [*self.recent, psnr][-self.window :]
                score = float(np.mean(self.recent))
                metrics[SCORE_METRIC] = scalars["val/score"] = score
                line += f" (mean of the last {len(self.recent)}: {score:.3f} dB)"
            self.writer.write_scalars(step, scalars)
            say(line)
        loop = _loop_item(carry, key, self.job.names)
        meta = dict(self.meta, val_recent=self.recent) if self.window > 1 else self.meta
        self.ckpts.save(step, carry.state, loop, meta, metrics=metrics)
        self.last_saved = step


def check_finite(carry: LoopCarry, names: list[str], last_saved: int | None) -> None:
    error = _nonfinite_error(carry, names, last_saved)
    if error:
        raise FloatingPointError(error)


class Divergence:
    """Each step's non-finite flag is copied to the host in the background and read once it is
    ready, so a divergence stops training within a step or two of dispatch without ever waiting
    for the device."""

    def __init__(self) -> None:
        self.pending: collections.deque = collections.deque()

    def watch(
        self, flag: jax.Array, carry: LoopCarry, names: list[str], last_saved: int | None
    ) -> None:
        flag.copy_to_host_async()
        self.pending.append(flag)
        while self.pending and self.pending[0].is_ready():
            if int(self.pending.popleft()) >= 0:
                check_finite(carry, names, last_saved)


# --------------------------------------------------------------------------------- the train loop


@dataclasses.dataclass
class TrainRun:
    """The outcome of `train`."""

    config: ml_collections.ConfigDict
    nets: Networks
    state: TrainState
    norm: Normalization
    step: int
    num_steps: int
    stopped_by: str | None  # the signal that stopped training early, if any
    test: PairedImages
    validated: bool = False  # whether checkpoints carry a validation PSNR


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainRun:
    """Trains in `workdir` (locked while it runs), continuing from its latest checkpoint.

    Bit-exact resume: the state, the PRNG key and the metric sums of the logging interval in
    progress are restored, every step's randomness is fold_in(key, step), and the data stay on
    the device, so an interrupted run continues exactly as if it had not stopped.

    Besides SIGTERM / SIGINT, setting `stop` (from another thread, e.g. a GUI's; one process
    only) stops and saves at the next step; `progress(step, num_steps)` is called at the start
    and after every step (on the training thread: keep it quick)."""
    check_not_busy(workdir, "train")  # refuse at once, before loading anything
    job = prepare(config)
    with WorkdirLock(workdir, "train"):
        return _train(job, workdir, stop_event=stop, progress=progress)


def _train(
    job: Job,
    workdir: str,
    *,
    stop_event: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainRun:
    cc, num_steps = job.config.checkpoint, job.num_steps
    ckpts = Checkpoints(
        workdir, keep=cc.keep, keep_best=bool(cc.keep_best and job.val is not None),
        async_save=cc.async_save,
    )  # fmt: skip
    finished = False
    writer = None
    try:
        carry, key, start, kept_until, recent = resume_or_init(job, ckpts, workdir)
        writer = MetricWriter(workdir, purge_step=None if kept_until is None else kept_until + 1)
        meta = describe_run(job, workdir, carry.state, writer, start)
        loop_step = compiled_loop_step(
            job.config, job.nets, job.spe, job.norm, job.names, job.mesh, job.noise
        )
        log, save = Logger(job, writer), Saver(job, ckpts, writer, meta, start or None, recent)
        divergence, stopped_by, step = Divergence(), None, start
        if progress is not None:
            progress(step, num_steps)
        with StopRequest() as stop:
            while step < num_steps:
                t0 = time.perf_counter()
                carry, flag = loop_step(carry, job.data, key)
                step += 1
                if log.rate_from is None:
                    log.first_step_done(t0, step, flag)
                divergence.watch(flag, carry, job.names, save.last_saved)
                boundary = step % job.config.train.log_every == 0
                stopping = stop.should_stop(step, boundary=boundary)
                if stop_event is not None and stop_event.is_set() and not stopping:
                    stopping, stop.signal_name = True, stop.signal_name or "a stop request"
                if boundary or stopping or step == num_steps:
                    divergence.pending.clear()
                    carry = log(carry, step, reset=boundary, last_saved=save.last_saved)
                periodic = cc.every_steps > 0 and step % cc.every_steps == 0
                if stopping or step == num_steps or periodic:
                    # (no validation for a stop between periodic saves: leave quickly)
                    save(carry, key, step, validate=periodic or step == num_steps)
                if progress is not None:
                    progress(step, num_steps)
                if stopping:
                    stopped_by = stop.signal_name
                    break
        ckpts.wait_until_finished()
        finished = True
    finally:
        if writer is not None:
            writer.flush()
        if finished:
            ckpts.close()
        else:  # an error is on its way out; still let an in-flight (good) save complete
            with contextlib.suppress(Exception):
                ckpts.close()
        if writer is not None:
            writer.close()
    if stopped_by:
        say(
            f"stopped by {stopped_by} at step {step}/{num_steps}: checkpoint {step} saved in "
            f"{ckpts.directory}; run the same `train` command to resume"
        )
    elif start >= num_steps:
        say(f"{workdir} is trained to step {start} (>= {num_steps} steps): nothing to train")
    return TrainRun(
        job.config, job.nets, carry.state, job.norm, step, num_steps, stopped_by, job.test,
        job.val is not None,
    )  # fmt: skip


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Trains the configured model in `workdir` (resuming from its checkpoints), then evaluates
    the checkpoint chosen on the validation data (else the final state) on the test split.
    Stopped by SIGTERM/SIGINT (or `stop`, see `train`), it saves, skips evaluation and returns
    {"stopped_by": signal, "step": step}."""
    check_not_busy(workdir, "train")  # refuse at once, before loading anything
    job = prepare(config)
    with WorkdirLock(workdir, "train"):
        run = _train(job, workdir, stop_event=stop, progress=progress)
        if run.stopped_by:
            return {"stopped_by": run.stopped_by, "step": run.step}
        if run.validated:
            best = restore_run(workdir)
            variables, checkpoint = best.variables, best.checkpoint
            say(f"evaluating checkpoint {best.step}: {best.selected_by}")
        else:
            variables = local_generator_variables(run.state)
            checkpoint = {"step": run.step, "selected_by": "final state (no validation data)"}
        result = evaluate(
            make_denoiser(config, run.nets, variables, run.norm),
            run.test,
            workdir,
            dataset=dataset_name(config),
            baseline_sigmas=tuple(config.eval.baseline_sigmas),
            write=jax.process_index() == 0,
            model_name=f"{config.name}:{config.variant}",
            checkpoint=checkpoint,
        )
        writer = MetricWriter(workdir, tensorboard=True)
        writer.write_scalars(run.step, {f"eval/{k}": v for k, v in result["output"].items()})
        writer.close()
    say(format_result(result))
    return result
