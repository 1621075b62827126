"""Metric writers: JSON lines + TensorBoard event files (tensorboardX, no TensorFlow).

Mirrors the `clu.metric_writers` interface (write_scalars / write_texts / flush / close), whose
package itself imports TensorFlow. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np


def _to_python(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, purge_step: int | None = None):
        """`purge_step`: a resumed run hides the TensorBoard events of steps >= purge_step that
        the interrupted run wrote after its last checkpoint."""
        self.active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                logdir=os.path.join(workdir, "tensorboard"), purge_step=purge_step
            )

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, global_step=int(step))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        if self.active and self._tb is not None:
            for k, v in texts.items():
                self._tb.add_text(k, v, global_step=int(step))

    def flush(self) -> None:
        if not self.active:
            return
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.active:
            return
        self.flush()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
