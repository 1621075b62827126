"""The GAN train state (one pytree of arrays) and the networks and optimizers it belongs to."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clidim_jax.models import PatchGANDiscriminator, ProjectionHead, UNetGenerator

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes: parameters, BatchNorm statistics, optimizer states.

    Pure arrays only (no callables), so it can be sharded, donated and checkpointed as is.
    `d_opt_state` is shared by the contrastive and the GAN D steps (as in the reference).
    """

    step: jax.Array
    g_params: PyTree
    g_batch_stats: PyTree
    d_params: PyTree
    d_batch_stats: PyTree
    head_params: PyTree
    g_opt_state: PyTree
    d_opt_state: PyTree
    head_opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class Networks:
    """The stateless Flax modules and optax transforms of a run (static, not in the pytree)."""

    generator: UNetGenerator
    discriminator: PatchGANDiscriminator
    head: ProjectionHead
    g_tx: optax.GradientTransformation
    d_tx: optax.GradientTransformation
    head_tx: optax.GradientTransformation
    patch_size: int

    @property
    def feature_size(self) -> int:
        """Length of D's flattened logit map for a patch, the projection head's input."""
        s = self.patch_size
        for _ in range(self.discriminator.n_layers):
            s //= 2
        s = s - 2  # two 4x4 stride-1 pad-1 convolutions
        return s * s


def compute_dtype(name: str) -> jnp.dtype:
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
    except KeyError:
        raise ValueError(f"model.compute_dtype must be float32 or bfloat16, got {name!r}") from None


def build_networks(config: ml_collections.ConfigDict) -> Networks:
    m, t = config.model, config.train
    dtype = compute_dtype(m.compute_dtype)
    # Adam's direction only: the learning rate is applied by the step from the *train* step
    # count, because D's Adam count advances twice per step when the contrastive step is on.
    adam = optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=1e-8)
    return Networks(
        generator=UNetGenerator(
            depth=m.depth,
            ngf=m.ngf,
            out_channels=1,
            norm=m.norm,
            use_dropout=m.dropout,
            dtype=dtype,
            output=m.get("output", "tanh"),
            residual=str(m.get("residual", "none")),
            residual_sigma=float(m.get("residual_sigma", 1.0)),
            bias_free=bool(m.get("bias_free", False)),
        ),
        discriminator=PatchGANDiscriminator(
            ndf=m.ndf, n_layers=m.d_layers, norm=m.norm, dtype=dtype
        ),
        head=ProjectionHead(out_features=config.loss.head_features),
        g_tx=adam,
        d_tx=adam,
        head_tx=adam,
        patch_size=config.data.patch_size,
    )


def init_state(nets: Networks, key: jax.Array) -> TrainState:
    """Initialises a fresh state; pure, so `jax.eval_shape` gives the abstract state."""
    k_g, k_d, k_h = jax.random.split(key, 3)
    p = nets.patch_size
    g_vars = nets.generator.init({"params": k_g}, jnp.zeros((1, p, p, 1)), train=False)
    d_vars = nets.discriminator.init({"params": k_d}, jnp.zeros((1, p, p, 2)), train=False)
    h_vars = nets.head.init({"params": k_h}, jnp.zeros((1, nets.feature_size)))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_vars["params"],
        g_batch_stats=g_vars.get("batch_stats", {}),
        d_params=d_vars["params"],
        d_batch_stats=d_vars.get("batch_stats", {}),
        head_params=h_vars["params"],
        g_opt_state=nets.g_tx.init(g_vars["params"]),
        d_opt_state=nets.d_tx.init(d_vars["params"]),
        head_opt_state=nets.head_tx.init(h_vars["params"]),
    )


def steps_per_epoch(config: ml_collections.ConfigDict, n_train_images: int) -> int:
    if config.train.steps_per_epoch > 0:
        return int(config.train.steps_per_epoch)
    return -(-n_train_images // config.train.batch_size)


def total_steps(config: ml_collections.ConfigDict, n_train_images: int) -> int:
    t = config.train
    return (t.n_epochs + t.n_epochs_decay) * steps_per_epoch(config, n_train_images)


def linear_policy(
    base_lr: float, n_epochs: int, n_epochs_decay: int, steps_per_epoch: int
) -> optax.Schedule:
    """pix2pix's "linear" policy: constant for n_epochs, then linear decay, stepped per epoch.

    In (1-based) epoch e the rate is lr * (1 - max(0, e - n_epochs) / (n_epochs_decay + 1)).
    """
    return lambda step: policy_lr(
        step, base_lr, n_epochs, float(n_epochs_decay + 1), steps_per_epoch
    )


def policy_lr(step, base_lr, n_epochs, decay_div, steps_per_epoch: int):
    """`linear_policy`'s rate at `step`, its numbers Python constants or traced arrays (float32
    base_lr and decay_div = n_epochs_decay + 1, int32 n_epochs): the same float32 arithmetic
    either way."""
    epoch = step // steps_per_epoch + 1
    return base_lr * (1.0 - jnp.maximum(0, epoch - n_epochs) / decay_div)


def lr_policy_inputs(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The learning-rate policy's numbers as arrays, for a train step that takes them as an
    input (`batch["lr_policy"]`) rather than compiling them in: runs that differ only in
    learning rate or epochs then share one compiled program."""
    t = config.train
    return {
        "base_lr": np.float32(t.lr),
        "n_epochs": np.int32(t.n_epochs),
        "decay_div": np.float32(t.n_epochs_decay + 1),
    }
