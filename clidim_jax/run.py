"""A trained run on disk: its metadata, the rules for resuming it, its lock, reading it back, and
the `Denoiser` built from it. `train`, `evaluate`, `denoise` and `export` all go through here.

A run directory (`--workdir`) holds `checkpoints/` (`clidim_jax.checkpointing`), `config.json`
(the metadata of `run_metadata`), `metrics.jsonl`, TensorBoard events, `eval.*` and `.lock`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from clidim_jax import config_lib
from clidim_jax.checkpointing import Checkpoints, IncompatibleCheckpoint
from clidim_jax.data import Normalization, PairedImages
from clidim_jax.inference import Denoiser, inference_settings
from clidim_jax.state import Networks, TrainState, build_networks, init_state


def say(msg: str) -> None:
    """Prints on the first process only (every process runs the same code)."""
    if jax.process_index() == 0:
        print(msg, flush=True)


# ----------------------------------------------------------------------------------- metadata


def run_metadata(
    config: ml_collections.ConfigDict,
    norm: Normalization,
    train: PairedImages,
    metric_names: list[str] | None = None,
) -> dict:
    """What a checkpoint (and `config.json`) records besides the arrays."""
    return {
        "config": json.loads(config.to_json_best_effort()),
        "normalization": json.loads(norm.to_json()),
        "train_region": train.name,
        "n_train_images": len(train),
        "metric_names": list(metric_names or []),
    }


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def config_fields(config: ml_collections.ConfigDict) -> dict:
    """The config as flat `field: JSON value` pairs."""
    return flatten(json.loads(config.to_json_best_effort()))


def config_from_metadata(meta: dict) -> ml_collections.ConfigDict:
    c = config_lib.base_config()
    c.update_from_flattened_dict(
        {k: (tuple(v) if isinstance(v, list) else v) for k, v in flatten(meta["config"]).items()}
    )
    return c


def dataset_name(config: ml_collections.ConfigDict) -> str:
    """A short name of the run's data for reports."""
    d = config.data
    if d.source == "demo":
        return "acsn_tirf"
    if d.source == "stack":
        return os.path.basename(d.path)
    if d.source == "paired":
        return os.path.basename(os.path.normpath(d.noisy_path))
    return d.source  # a benchmark


# ----------------------------------------------------------------------------------- resuming

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
    "data.channel",
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
    "data.synthetic_corr",
    "data.synthetic_noise",
    "loss.head_features",
)


def config_changes(stored: dict, config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """(field, value in the checkpoint, value now) for the fields both have that differ."""
    old, new = flatten(stored), config_fields(config)
    return [(k, old[k], new[k]) for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def check_resumable(config: ml_collections.ConfigDict, workdir: str, meta: dict) -> None:
    """Raises IncompatibleCheckpoint unless `config` may continue the run `meta` describes."""
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


def keep_metric_lines(workdir: str, train_until: int, saved_until: int) -> int:
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


# ---------------------------------------------------------------------------------------- lock


# ------------------------------------------------------------------------------- reading back


def generator_variables(state: TrainState) -> dict:
    return {"params": state.g_params, "batch_stats": state.g_batch_stats}


def local_generator_variables(state: TrainState) -> dict:
    """G's variables as host arrays: the local copy of the replicated state, so that inference
    runs on each process's own device whatever the mesh (and reads no donated buffer later)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), generator_variables(state))


def make_denoiser(
    config: ml_collections.ConfigDict,
    nets: Networks,
    variables: Any,
    norm: Normalization,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    tta: bool | None = None,
) -> Denoiser:
    """G of a run as a `Denoiser`, with the run's `eval` settings unless given."""
    given = dict(tile=tile, overlap=overlap, batch_size=batch_size, tta=tta)
    return Denoiser(nets.generator, variables, norm, **inference_settings(config.eval, **given))


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

    @property
    def variables(self) -> dict:
        """G's variables on the host."""
        return jax.device_get(generator_variables(self.state))

    @property
    def checkpoint(self) -> dict:
        """Which checkpoint this is, for eval.json and model files."""
        return {"step": self.step, "selected_by": self.selected_by}

    def denoiser(self, **kwargs: Any) -> Denoiser:
        """`make_denoiser` for this run (tile, overlap, batch_size, tta)."""
        return make_denoiser(self.config, self.nets, self.variables, self.norm, **kwargs)


def require_checkpoints(workdir: str) -> None:
    """Raises FileNotFoundError (one line for the CLI) unless `workdir` holds checkpoints."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir}: no checkpoint found (train a model there first)")


def restore_run(workdir: str, *, select: str = "best") -> RestoredRun:
    """Rebuilds config, networks, state and normalisation from a workdir's checkpoints.

    `select="best"`: the checkpoint with the best validation PSNR when the run has validation
    data (its checkpoints carry the score), else the latest; `"latest"`: the latest. A damaged
    checkpoint is reported and skipped (not moved) in favour of the next candidate."""
    if select not in ("best", "latest"):
        raise ValueError(f"select must be 'best' or 'latest', got {select!r}")
    require_checkpoints(workdir)
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
                say(f"checkpoint {step} is damaged ({type(e).__name__}: {e}); trying another one")
                continue
            if step in scores:
                window = int(config.checkpoint.get("select_window", 1))
                over = f" averaged over it and the {window - 1} before" if window > 1 else ""
                how = (
                    f"best validation PSNR{over} ({scores[step]:.3f} dB) of "
                    f"{len(scores)} validated checkpoints"
                )
            else:
                how = "latest checkpoint"
            norm = Normalization.from_dict(meta["normalization"])
            return RestoredRun(config, nets, state, norm, int(step), how)
    finally:
        ckpts.close()
    raise FileNotFoundError(f"{workdir}: no checkpoint found (train a model there first)")


def denoiser_from_run(workdir: str, **kwargs: Any) -> Denoiser:
    """A `Denoiser` for the selected checkpoint of a training run (the best by validation PSNR
    when the run has validation data, else the latest), with its config's tiling and
    test-time-augmentation defaults unless given (tile, overlap, batch_size, tta)."""
    return restore_run(workdir).denoiser(**kwargs)
