"""Checkpoints of a run in `WORKDIR/checkpoints/` through one Orbax `CheckpointManager`: the
preservation policy, integrity fingerprints, falling back past a damaged checkpoint, and the
SIGTERM/SIGINT stop request that triggers a preemption save.

A checkpoint is one step directory holding three items:

  state  the `TrainState`: G, D and projection-head parameters, BatchNorm statistics, both
         optimizer states, the step
  loop   what the loop needs to continue exactly: the PRNG key and the metric sums of the
         logging interval in progress
  meta   JSON: the resolved config, the normalisation, the metric names, and a fingerprint of
         every array of `state` and `loop`, checked again on restore

Saves are asynchronous (Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it when
complete), so a process killed during a save leaves the previous checkpoints untouched; a
failed save (a full disk) never deletes an older one, because Orbax only removes old steps
after the new one is committed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from clidim_jax.config_lib import ConfigError

BEST_METRIC = "val_psnr"  # a save's validation PSNR; higher is better
# What chooses the best checkpoint when a save has it: the mean of its validation PSNR and those
# of the validations just before it (`checkpoint.select_window`); else BEST_METRIC.
SCORE_METRIC = "val_score"


def selection_score(m: Any) -> float:
    """The score a save's metrics give it for choosing the best checkpoint."""
    return float(m[SCORE_METRIC] if SCORE_METRIC in m else m[BEST_METRIC])


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no checkpoint of the workdir can be read."""


class IncompatibleCheckpoint(ConfigError):
    """The workdir's checkpoints belong to a run this config cannot continue."""


# --------------------------------------------------------------------------- fingerprints


def _bits(x: jax.Array) -> jax.Array:
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 8:
        return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
    small = {2: jnp.uint16, 1: jnp.uint8}[size]
    return jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)


@jax.jit
def _leaf_fingerprints(leaves: list[jax.Array]) -> jax.Array:
    def one(x):
        b = _bits(x)
        odd = jnp.arange(b.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        return jnp.sum(b * odd, dtype=jnp.uint32)

    return jnp.stack([one(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)


def fingerprint(tree: Any) -> dict[str, int]:
    """Per array, sum_i bits(x_i) * (2i + 1) mod 2**32, computed on the device.

    Any change of a single element changes its array's value (the weights are odd, hence
    invertible mod 2**32); integer sums are exact, so the value does not depend on the device
    or the reduction order."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = np.asarray(_leaf_fingerprints([leaf for _, leaf in flat]))
    return {jax.tree_util.keystr(path): int(v) for (path, _), v in zip(flat, values)}


def _check_fingerprint(name: str, tree: Any, expected: dict[str, int] | None) -> None:
    if expected is None:
        return
    got = fingerprint(tree)
    if set(got) != set(expected):
        raise CheckpointError(f"{name}: the arrays differ from those the checkpoint recorded")
    bad = [k for k in got if got[k] != expected[k]]
    if bad:
        raise CheckpointError(f"{name}{bad[0]}: contents differ from the fingerprint saved")


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point arrays of `tree` holding a NaN or an Inf (one device sync)."""
    flat = [
        (path, x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    if not flat:
        return []
    ok = np.asarray(_all_finite([x for _, x in flat]))
    return [jax.tree_util.keystr(p) for (p, _), good in zip(flat, ok) if not good]


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


# --------------------------------------------------------------------------- the manager


def _registry() -> Any:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in ("state", "loop"):
        registry.add(item, ocp.args.StandardSave)
        registry.add(item, ocp.args.StandardRestore)
    registry.add("meta", ocp.args.JsonSave)
    registry.add("meta", ocp.args.JsonRestore)
    return registry


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    loop: Any | None
    meta: dict
    skipped: list[tuple[int, str]]  # newer checkpoints that could not be read, and why


class Checkpoints:
    """`WORKDIR/checkpoints/<step>/{state, loop, meta}`.

    Preservation: the latest `keep` checkpoints, plus (with `keep_best`) the one with the best
    validation PSNR among those saved with metrics. Saves are always explicit (`force`): when to
    save (every N steps, at the end, on a stop request) is the training loop's decision.
    """

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 2,
        keep_best: bool = False,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        preservation = policies.LatestN(n=keep)
        best_fn = None
        if keep_best:
            best_fn = selection_score
            best = policies.BestN(
                get_metric_fn=best_fn,
                reverse=False,  # ascending: the last n (the highest PSNR) are kept
                n=1,
                keep_checkpoints_without_metrics=False,
            )
            preservation = policies.AnyPreservationPolicy([preservation, best])
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation,
                best_fn=best_fn,  # (Orbax stores a save's metrics only when this is set)
                best_mode="max",
                save_interval_steps=0 if read_only else 1,
                enable_async_checkpointing=async_save,
                create=not read_only,
                read_only=read_only,
                cleanup_tmp_directories=not read_only,
            ),
            handler_registry=_registry(),
        )
        self._pending: int | None = None  # step of an asynchronous save not yet known complete

    # ---- reading

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def validation_scores(self) -> dict[int, float]:
        """step -> selection score (`selection_score`: the validation PSNR, or its mean with the
        validations before) of the checkpoints saved with one (unreadable ones left out)."""
        out = {}
        for step in self.all_steps():
            try:
                m = self.manager.metrics(step)
            except Exception:
                continue
            if isinstance(m, dict) and (BEST_METRIC in m or SCORE_METRIC in m):
                out[step] = selection_score(m)
        return out

    def read_meta(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        if not isinstance(meta, dict) or "config" not in meta:
            raise CheckpointError("its metadata has no config")
        return meta

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.read_meta(step)

    def _check_shapes(self, step: int, item: str, abstract: Any) -> None:
        stored = self.manager.item_metadata(step)[item]
        if stored is None:
            raise CheckpointError(f"item {item!r} is missing")
        want = _shapes(abstract)
        have = _shapes(stored)
        if want == have:
            return
        for path in sorted(set(want) | set(have)):
            if want.get(path) != have.get(path):
                mine = want.get(path, "absent")
                theirs = have.get(path, "absent")
                raise IncompatibleCheckpoint(
                    f"{self.directory}/{step}: {item}/{path} is {_fmt(theirs)} in the checkpoint "
                    f"but {_fmt(mine)} in this run's model"
                )

    def restore_step(
        self, step: int, abstract_state: Any, abstract_loop: Any | None = None, meta=None
    ) -> tuple[Any, Any | None, dict]:
        """Restores one step and checks it against its fingerprints. Raises IncompatibleCheckpoint
        if the arrays do not fit the abstract trees, anything else if the step is damaged."""
        meta = self.read_meta(step) if meta is None else meta
        self._check_shapes(step, "state", abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if abstract_loop is not None:
            self._check_shapes(step, "loop", abstract_loop)
            items["loop"] = ocp.args.StandardRestore(abstract_loop)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        prints = meta.get("fingerprint", {})
        _check_fingerprint("state", out["state"], prints.get("state"))
        loop = out.get("loop") if abstract_loop is not None else None
        if loop is not None:
            _check_fingerprint("loop", loop, prints.get("loop"))
        return out["state"], loop, meta

    def restore_latest(
        self,
        abstract_state: Any,
        abstract_loop: Callable[[dict], Any] | None = None,
        *,
        check_meta: Callable[[dict], None] | None = None,
        quarantine: bool = True,
        say: Callable[[str], None] = print,
    ) -> Restored | None:
        """Restores the newest readable checkpoint, or returns None if there is none at all.

        A checkpoint that cannot be read or fails its fingerprint is reported and skipped; with
        `quarantine`, it is moved to `WORKDIR/corrupt_checkpoints/` (kept, not deleted) so that the
        resumed run can save that step again. `check_meta(meta)` may raise IncompatibleCheckpoint
        to refuse a run that does not fit (nothing is moved then). `abstract_loop(meta)` gives the
        loop tree to restore, from the checkpoint's own metadata."""
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # any read error: a damaged checkpoint
                skipped.append((step, _why(e)))
                say(f"checkpoint {step} is unreadable ({_why(e)}); trying an older one")
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                loop_abs = abstract_loop(meta) if abstract_loop is not None else None
                state, loop, meta = self.restore_step(step, abstract_state, loop_abs, meta)
            except IncompatibleCheckpoint:
                raise
            except Exception as e:
                skipped.append((step, _why(e)))
                say(f"checkpoint {step} is damaged ({_why(e)}); trying an older one")
                continue
            if skipped and quarantine:
                self._quarantine([s for s, _ in skipped], say)
            return Restored(step, state, loop, meta, skipped)
        if skipped:
            details = "; ".join(f"step {s}: {why}" for s, why in skipped)
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored ({details}). Nothing was "
                "changed; move the directory away to start afresh."
            )
        return None

    def _quarantine(self, steps: list[int], say: Callable[[str], None]) -> None:
        if jax.process_index() == 0:
            dest_root = os.path.join(self.workdir, "corrupt_checkpoints")
            os.makedirs(dest_root, exist_ok=True)
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dest = os.path.join(dest_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(src, dest)
                say(f"moved the damaged checkpoint {step} to {dest}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("clidim_jax:quarantine")
        self.manager.reload()

    # ---- writing

    def save(
        self,
        step: int,
        state: Any,
        loop: Any,
        meta: dict,
        *,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Starts an asynchronous save (the arrays are copied off the device before it returns).

        Raises CheckpointError if this save or a previous asynchronous one failed."""
        meta = dict(meta, fingerprint={"state": fingerprint(state), "loop": fingerprint(loop)})
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            loop=ocp.args.StandardSave(loop),
            meta=ocp.args.JsonSave(meta),
        )
        self.wait_until_finished()
        try:
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:
            raise self._save_error(step, e) from e
        self._pending = step

    def wait_until_finished(self) -> None:
        """Blocks until the save in flight is committed; raises CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            step, self._pending = self._pending, None
            raise self._save_error(step, e) from e
        self._pending = None

    def _save_error(self, step: int | None, e: BaseException) -> CheckpointError:
        # The directory, not the manager's list: that already forgot the steps this save
        # would have made obsolete, which stay on disk until it is committed.
        on_disk = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        done = sorted(int(n) for n in on_disk if n.isdigit() and int(n) != step)
        kept = f"checkpoint {done[-1]} is intact" if done else "there is no earlier checkpoint"
        hint = ""
        if _is_disk_full(e):
            free = shutil.disk_usage(self.directory).free if os.path.isdir(self.directory) else 0
            hint = f" Out of disk space or over a file-size limit ({free / 2**20:.0f} MiB free)."
        return CheckpointError(
            f"saving checkpoint {step} in {self.directory} failed: {_why(e)}.{hint} Training "
            f"stopped; {kept}: free some space and run `train` again to resume from it."
        )

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:
            self.manager.close()


def _shapes(tree: Any) -> dict[str, tuple]:
    """{path: (shape, dtype)}, with paths that do not depend on the container types (Orbax's
    metadata has dicts where the state has dataclasses)."""

    def name(k) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return {
        "/".join(name(k) for k in path): (tuple(x.shape), np.dtype(x.dtype))
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _fmt(x) -> str:
    if isinstance(x, tuple):
        shape, dtype = x
        return f"{dtype}{list(shape)}"
    return str(x)


def _why(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def _is_disk_full(e: BaseException) -> bool:
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "File too large" in text or "Disk quota" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


# --------------------------------------------------------------------------- stop requests


class StopRequest:
    """SIGTERM / SIGINT during training -> stop (and save) at the next step boundary.

    One process: a signal handler sets a flag. Several processes: every process must stop at the
    same step, so the decision comes from JAX's preemption sync point
    (`multihost_utils.reached_preemption_sync_point`, which JAX's coordination service drives from
    a SIGTERM on any host); a SIGINT is forwarded to this process as SIGTERM to take the same
    path. Without the preemption service, the local flags are combined at logging boundaries.
    A second SIGINT aborts at once (KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1
        self._sync_point = self._multi

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self
        # With several processes JAX's preemption notifier owns SIGTERM: leave it installed.
        signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self._multi and self._sync_point and signum == signal.SIGINT:
            signal.raise_signal(signal.SIGTERM)

    def should_stop(self, step: int, *, boundary: bool) -> bool:
        """Called after every step (all processes, same steps); `boundary`: a logging step."""
        if not self._multi:
            return self.signal_name is not None
        if self._sync_point:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signal_name = self.signal_name or "SIGTERM"
                    return True
                return False
            except RuntimeError:  # the preemption service is off: fall back to our flags
                self._sync_point = False
        if not boundary:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
        if np.any(flags):
            self.signal_name = self.signal_name or "a stop request on another process"
            return True
        return False
