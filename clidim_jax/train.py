"""`train_and_evaluate(config, workdir)`: data on device, the jitted step loop, logging, checkpoint,
evaluation. Also `evaluate_workdir` for re-evaluating a finished run."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
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
    Checkpoints,
    IncompatibleCheckpoint,
    StopRequest,
    nonfinite_leaves,
)
from clidim_jax.data import DataError, Normalization, PairedImages
from clidim_jax.data.datasets import load_splits
from clidim_jax.data.normalization import fit_noise_model, percentiles
from clidim_jax.evaluate import evaluate, format_result
from clidim_jax.inference import Denoiser
from clidim_jax.sharding import (
    check_batch_divisible,
    make_mesh,
    place,
    put_replicated,
    replicated,
)
from clidim_jax.state import (
    Networks,
    TrainState,
    build_networks,
    init_state,
    steps_per_epoch,
    total_steps,
)
from clidim_jax.step import make_sampled_train_step, step_compiler_options
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
        lo = float(
            min(min(a.min() for a in train.iter_noisy()), min(c.min() for c in train.iter_clean()))
        )
        hi = float(
            max(max(a.max() for a in train.iter_noisy()), max(c.max() for c in train.iter_clean()))
        )
        return Normalization(lo, hi if hi > lo else lo + 1.0, "reference")
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


def run_metadata(
    config: ml_collections.ConfigDict,
    norm: Normalization,
    train: PairedImages,
    metric_names: list[str] | None = None,
) -> dict:
    return {
        "config": json.loads(config.to_json_best_effort()),
        "normalization": json.loads(norm.to_json()),
        "train_region": train.name,
        "n_train_images": len(train),
        "metric_names": list(metric_names or []),
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


def local_generator_variables(state: TrainState) -> dict:
    """G's variables as host arrays: the local copy of the replicated state, so that inference
    runs on each process's own device whatever the mesh (and reads no donated buffer later)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), generator_variables(state))


def generator_variables(state: TrainState) -> dict:
    return {"params": state.g_params, "batch_stats": state.g_batch_stats}


# ------------------------------------------------------------------------------------ resuming

# Config fields a resumed run must share with its checkpoint: they fix the arrays of the state,
# or the data and the random stream the state was trained on. Other fields (training length,
# loss weights, logging, checkpoint policy) may change on resume; the change is reported.
FIXED_ON_RESUME = (
    "seed",
    "model.",
    "data.source",
    "data.path",
    "data.noisy_path",
    "data.clean_path",
    "data.axes",
    "data.test_fraction",
    "data.test_region",
    "data.train_regions",
    "data.ground_truth",
    "data.n_samples",
    "data.val_fraction",
    "data.val_noisy_path",
    "data.val_clean_path",
    "data.patch_size",
    "data.normalization",
    "data.percentiles",
    "data.headroom",
    "data.vst",
    "data.gain_augment",
    "data.crop_tries",
    "data.synthetic",
    "data.synthetic_gain",
    "loss.head_features",
)


def config_changes(stored: dict, config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """(field, value in the checkpoint, value now) for the fields both have that differ."""
    old = _flatten(stored)
    new = _flatten(json.loads(config.to_json_best_effort()))
    return [(k, old[k], new[k]) for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def _check_resumable(config: ml_collections.ConfigDict, workdir: str, meta: dict) -> None:
    if "metric_names" not in meta:
        raise IncompatibleCheckpoint(
            f"{workdir}: its checkpoints were written by an older clidim-jax without the loop "
            "state needed to resume; evaluate them, or train in a new --workdir"
        )
    fixed = [
        (k, a, b)
        for k, a, b in config_changes(meta["config"], config)
        if any(k == f or (f.endswith(".") and k.startswith(f)) for f in FIXED_ON_RESUME)
    ]
    if fixed:
        diffs = "; ".join(f"config.{k} is {a!r} in the checkpoint, {b!r} now" for k, a, b in fixed)
        raise IncompatibleCheckpoint(
            f"{workdir} holds a run this config cannot continue: {diffs}. Use the same value, "
            "or another --workdir for a new run (nothing in the workdir was changed)"
        )


def _keep_metric_lines(workdir: str, train_until: int, saved_until: int) -> int:
    """Drops from metrics.jsonl what a run wrote after its last checkpoint, which the resumed run
    writes again: training lines after `train_until` (the last logging step the checkpoint's
    interval sums start from), validation lines after `saved_until` (the checkpoint's step),
    and the `eval/` lines of a final evaluation (stale once training goes on). Returns how many
    lines were dropped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
            until = saved_until if "val/psnr" in row else train_until
            if row["step"] <= until and not any(k.startswith("eval/") for k in row):
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


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


# Config fields the compiled loop step does not depend on.
_NOT_IN_STEP = ("name", "seed", "checkpoint", "eval", "train.log_every")
_compiled_steps: collections.OrderedDict = collections.OrderedDict()


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
    fields = {
        k: v
        for k, v in _flatten(json.loads(config.to_json_best_effort())).items()
        if not any(k == f or k.startswith(f + ".") for f in _NOT_IN_STEP)
    }
    key = (
        json.dumps(fields, sort_keys=True),
        spe,
        norm.to_json(),
        tuple(names),
        repr(noise),
        _mesh_key(mesh),
        make_sampled_train_step,  # (tests replace it to inject faults)
    )
    if key not in _compiled_steps:
        step = make_loop_step(
            make_sampled_train_step(config, nets, spe, norm, mesh=mesh, noise=noise), names
        )
        _compiled_steps[key] = jax.jit(
            step, donate_argnums=(0,), compiler_options=step_compiler_options(mesh)
        )
        while len(_compiled_steps) > 4:
            _compiled_steps.popitem(last=False)
    _compiled_steps.move_to_end(key)
    return _compiled_steps[key]


_compiled_inits: dict = {}


def _mesh_key(mesh: Mesh) -> tuple:
    return (tuple(d.id for d in mesh.devices.flat), mesh.axis_names)


def compiled_init(config: ml_collections.ConfigDict, nets: Networks, mesh: Mesh) -> Callable:
    """`init_state` jitted once per model in a process (keyed on what shapes the networks),
    writing its outputs straight into the replicated sharding of the mesh."""
    fields = _flatten(json.loads(config.to_json_best_effort()))
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
    """Mean PSNR (comparable convention, METHOD.md section 7) of G on the validation region."""
    denoiser.variables = local_generator_variables(state)
    try:
        preds = denoiser(val.images())
    finally:
        denoiser.variables = None  # the state's buffers are donated to the next step
    return float(np.mean([metrics_lib.psnr(val.pair(i)[1], p) for i, p in enumerate(preds)]))


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


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainRun:
    """Trains in `workdir`, continuing from its latest checkpoint if there is one.

    Bit-exact resume: the state, the PRNG key and the metric sums of the logging interval in
    progress are restored, every step's randomness is fold_in(key, step), and the data stay on
    the device, so an interrupted run continues exactly as if it had not stopped."""
    config_lib.validate(config)
    # Every data error is raised here, before the workdir is touched.
    train_ds, val_ds, test_ds = load_splits(config.data, config.train.batch_size, config.seed)
    nets = build_networks(config)
    spe = steps_per_epoch(config, train_ds.epoch_length)
    num_steps = total_steps(config, train_ds.epoch_length)
    norm = compute_normalization(config, train_ds)
    noise = None
    if config.data.get("synthetic", 0.0) > 0:  # the model synthetic noisy images are drawn from
        try:
            noise = fit_noise_model(train_ds.iter_pairs(), allow_constant=True)
        except ValueError as e:
            raise DataError(f"{train_ds.name}: data.synthetic: {e}") from None
        _say(f"noise model for synthetic inputs: Var = {noise.gain:.4g} x + {noise.offset:.4g}")
    cc = config.checkpoint

    mesh = make_mesh()  # every device of every process, one `data` axis
    check_batch_divisible(config.train.batch_size, mesh)

    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    abstract_state = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)),
        jax.eval_shape(functools.partial(init_state, nets), init_key),
    )
    # Every process holds the (few-shot, small) training images and lifts them, replicated.
    data = put_replicated(train_ds.device_data(), mesh)
    names = sorted(
        jax.eval_shape(
            make_sampled_train_step(config, nets, spe, norm, mesh=mesh, noise=noise),
            abstract_state,
            data,
            train_key,
        )[1]
    )

    ckpts = Checkpoints(
        workdir,
        keep=cc.keep,
        keep_best=bool(cc.keep_best and val_ds is not None),
        async_save=cc.async_save,
    )
    try:
        restored = ckpts.restore_latest(
            abstract_state,
            _abstract_loop_item,
            check_meta=functools.partial(_check_resumable, config, workdir),
            say=_say,
        )
    except BaseException:
        ckpts.close()
        raise
    if restored is not None:
        for k, a, b in config_changes(restored.meta["config"], config):
            _say(f"resuming with a changed config: {k} {a!r} -> {b!r}")
        state, key = restored.state, jax.random.wrap_key_data(restored.loop["rng"])
        norm = Normalization.from_dict(restored.meta["normalization"])
        sums = restored.loop["metrics"]
        in_interval = int(next(iter(sums.values()))["count"]) if sums else 0
        acc = _accumulator(names, sums)
        if restored.meta["metric_names"] != names:
            _say("the logged metrics changed: the logging interval in progress starts afresh")
        kept_until = restored.step - in_interval
        dropped = _keep_metric_lines(workdir, kept_until, restored.step)
        _say(
            f"resumed from checkpoint {restored.step}"
            + (f" (dropped {dropped} metrics.jsonl lines written after it)" if dropped else "")
        )
    else:
        kept_until = None
        _keep_metric_lines(workdir, 0, 0)  # lines of a run that never saved a checkpoint
        state = compiled_init(config, nets, mesh)(init_key)
        key, acc = train_key, make_metrics_collection(names).empty()
    start = int(restored.step) if restored is not None else 0
    last_saved = start if restored is not None else None

    meta = run_metadata(config, norm, train_ds, names)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    _say(
        f"{config.name}:{config.variant} on {train_ds.name} ({train_ds.describe()}), "
        f"patch {config.data.patch_size}, "
        f"batch {config.train.batch_size}, {spe} steps/epoch, {num_steps} steps, "
        f"devices {jax.devices()}"
        + (f"; validation on {val_ds.name}" if val_ds is not None else "")
    )
    writer = MetricWriter(workdir, purge_step=None if kept_until is None else kept_until + 1)
    for name, params in (("generator", state.g_params), ("discriminator", state.d_params)):
        overview = parameter_overview.get_parameter_overview(params, include_stats=False)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, f"parameters_{name}.txt"), "w", encoding="utf-8") as f:
                f.write(overview + "\n")
        n = parameter_overview.count_parameters(params)
        _say(f"{name}: {n:,} parameters\n{overview}")
        writer.write_texts(start, {f"parameters/{name}": f"```\n{overview}\n```"})

    loop_step = compiled_loop_step(config, nets, spe, norm, names, mesh, noise)
    denoiser = (
        Denoiser(nets.generator, None, norm, config.eval.batch_size) if val_ds is not None else None
    )
    carry = _placed(LoopCarry(state, acc, jnp.int32(-1), jnp.int32(0)))
    key = place(key, jax.tree.leaves(carry.state)[0].sharding)  # (restored: committed)
    del state, acc
    log_every, every = config.train.log_every, cc.every_steps

    def log(step: int, rate_from: tuple[float, int] | None, reset: bool) -> None:
        nonlocal carry
        error = _nonfinite_error(carry, names, last_saved)
        if error:
            raise FloatingPointError(error)
        values = {k: float(v) for k, v in jax.device_get(carry.metrics.compute()).items()}
        if reset:  # a full interval; a partial one (end, stop) stays open in the checkpoint
            carry = _placed(carry.replace(metrics=make_metrics_collection(names).empty()))
        writer.write_scalars(step, values)
        writer.flush()
        rate = float("nan")
        if rate_from is not None and step > rate_from[1]:
            rate = (step - rate_from[1]) / max(time.perf_counter() - rate_from[0], 1e-9)
        left = (num_steps - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "lr")
        _say(
            f"step {step}/{num_steps} (epoch {(step - 1) // spe + 1}) | {shown} | "
            f"{rate:.2f} steps/s | {_fmt_time(left) if left == left else '?'} left"
        )

    def save(step: int, *, validate: bool) -> None:
        nonlocal last_saved
        error = _nonfinite_error(carry, names, last_saved)
        if error:
            raise FloatingPointError(error)
        bad = nonfinite_leaves(carry.state)
        if bad:
            raise FloatingPointError(
                f"non-finite values in the train state at step {step} ({', '.join(bad[:3])}); "
                f"not saved. The last checkpoint (step {last_saved}) is intact."
            )
        metrics = None
        if validate and denoiser is not None:
            psnr = validation_psnr(denoiser, val_ds, carry.state)
            metrics = {BEST_METRIC: psnr}
            writer.write_scalars(step, {"val/psnr": psnr})
            _say(f"step {step}: validation PSNR {psnr:.3f} dB on {val_ds.name}")
        ckpts.save(step, carry.state, _loop_item(carry, key, names), meta, metrics=metrics)
        last_saved = step

    step = start
    stopped_by = None
    rate_from = None
    pending: collections.deque = collections.deque()
    finished = False
    try:
        with StopRequest() as stop:
            while step < num_steps:
                t0 = time.perf_counter()
                carry, flag = loop_step(carry, data, key)
                step += 1
                if rate_from is None:  # the first step compiles: time it apart from throughput
                    jax.block_until_ready(flag)
                    _say(f"compiled and ran the first step in {time.perf_counter() - t0:.1f} s")
                    rate_from = (time.perf_counter(), step)
                # Non-finite losses: each step's flag is copied to the host in the background
                # and read once it is ready, so a divergence stops training within a step or two
                # of dispatch without ever waiting for the device.
                flag.copy_to_host_async()
                pending.append(flag)
                while pending and pending[0].is_ready():
                    if int(pending.popleft()) >= 0:
                        raise FloatingPointError(_nonfinite_error(carry, names, last_saved))
                boundary = step % log_every == 0
                stopping = stop.should_stop(step, boundary=boundary)
                if boundary or stopping or step == num_steps:
                    pending.clear()
                    log(step, rate_from, reset=boundary)
                periodic = every > 0 and step % every == 0
                if stopping or step == num_steps or periodic:
                    # (no validation for a stop between periodic saves: leave quickly)
                    save(step, validate=periodic or step == num_steps)
                if stopping:
                    stopped_by = stop.signal_name
                    break
        ckpts.wait_until_finished()
        finished = True
    finally:
        writer.flush()
        if finished:
            ckpts.close()
        else:  # an error is on its way out; still let an in-flight (good) save complete
            with contextlib.suppress(Exception):
                ckpts.close()
            writer.close()
    if stopped_by:
        _say(
            f"stopped by {stopped_by} at step {step}/{num_steps}: checkpoint {step} saved in "
            f"{ckpts.directory}; run the same `train` command to resume"
        )
    elif start >= num_steps:
        _say(f"{workdir} is trained to step {start} (>= {num_steps} steps): nothing to train")
    writer.close()
    return TrainRun(
        config, nets, carry.state, norm, step, num_steps, stopped_by, test_ds, val_ds is not None
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains the configured model in `workdir` (resuming from its checkpoints), then evaluates
    it on the test split. Stopped by SIGTERM/SIGINT, it saves, skips evaluation and returns
    {"stopped_by": signal, "step": step}."""
    run = train(config, workdir)
    if run.stopped_by:
        return {"stopped_by": run.stopped_by, "step": run.step}
    variables, checkpoint = local_generator_variables(run.state), None
    if run.validated:  # evaluate the checkpoint chosen on the validation data
        best = restore_run(workdir)
        variables = jax.device_get(generator_variables(best.state))
        checkpoint = {"step": best.step, "selected_by": best.selected_by}
        _say(f"evaluating checkpoint {best.step}: {best.selected_by}")
    else:
        checkpoint = {"step": run.step, "selected_by": "final state (no validation data)"}
    denoiser = Denoiser(
        run.nets.generator,
        variables,
        run.norm,
        config.eval.batch_size,
        tile=config.eval.tile,
        overlap=config.eval.tile_overlap,
        tta=config.eval.tta,
    )
    result = evaluate(
        denoiser,
        run.test,
        workdir,
        dataset=_dataset_name(config),
        baseline_sigmas=tuple(config.eval.baseline_sigmas),
        write=jax.process_index() == 0,
        model_name=f"{config.name}:{config.variant}",
        checkpoint=checkpoint,
    )
    writer = MetricWriter(workdir, tensorboard=True)
    writer.write_scalars(run.step, {f"eval/{k}": v for k, v in result["output"].items()})
    writer.close()
    _say(format_result(result))
    return result


def _dataset_name(config: ml_collections.ConfigDict) -> str:
    d = config.data
    if d.source == "demo":
        return "acsn_tirf"
    if d.source == "stack":
        return os.path.basename(d.path)
    if d.source == "paired":
        return os.path.basename(os.path.normpath(d.noisy_path))
    return d.source  # a benchmark


@dataclasses.dataclass
class RestoredRun:
    """A trained run read back from its workdir: what evaluation, denoising and export need."""

    config: ml_collections.ConfigDict
    nets: Networks
    state: TrainState
    norm: Normalization
    step: int
    selected_by: str  # how `step` was chosen

    def __iter__(self):  # (config, nets, state, norm) = restore_run(...)
        return iter((self.config, self.nets, self.state, self.norm))


def restore_run(workdir: str, *, select: str = "best") -> RestoredRun:
    """Rebuilds config, networks, state and normalisation from a workdir's checkpoints.

    `select="best"`: the checkpoint with the best validation PSNR when the run has validation
    data (its checkpoints carry the score), else the latest; `"latest"`: the latest. A damaged
    checkpoint is reported and skipped (not moved) in favour of the next candidate."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir}: no checkpoint found (train a model there first)")
    ckpts = Checkpoints(workdir, read_only=True, async_save=False)
    try:
        steps = list(reversed(ckpts.all_steps()))
        scores = ckpts.validation_scores() if select == "best" else {}
        if scores:  # best first (the later step on a tie), then the rest newest first
            best = sorted(scores, key=lambda s: (scores[s], s), reverse=True)
            steps = best + [s for s in steps if s not in scores]
        for step in steps:
            try:
                meta = ckpts.read_meta(step)
                config = config_from_metadata(meta)
                nets = build_networks(config)
                abstract = jax.eval_shape(functools.partial(init_state, nets), jax.random.key(0))
                state, _, _ = ckpts.restore_step(step, abstract, None, meta)
            except IncompatibleCheckpoint:
                raise
            except Exception as e:  # a damaged checkpoint: try the next one
                _say(f"checkpoint {step} is damaged ({type(e).__name__}: {e}); trying another one")
                continue
            if step in scores:
                how = (
                    f"best validation PSNR ({scores[step]:.3f} dB) of "
                    f"{len(scores)} validated checkpoints"
                )
            else:
                how = "latest checkpoint"
            norm = Normalization.from_dict(meta["normalization"])
            return RestoredRun(config, nets, state, norm, int(step), how)
    finally:
        ckpts.close()
    raise FileNotFoundError(f"{workdir}: no checkpoint found (train a model there first)")


def evaluate_workdir(workdir: str, **kwargs: Any) -> dict[str, Any]:
    """Re-evaluates a finished run (`clidim_jax.evaluate.evaluate_run`: split, metrics, tile)."""
    from clidim_jax.evaluate import evaluate_run

    return evaluate_run(workdir, **kwargs)
