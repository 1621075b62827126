"""The one CLIDiM train step: contrastive D step, GAN D step, G step (docs/method.md section 5).

`make_train_step` returns a pure function `(state, batch, key) -> (state, metrics)`; everything it
does (views, blur, crops, the three updates) is one XLA program under `jax.jit`. Each loss term is
compiled in only when its weight is non-zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clidim_jax import augment, compiler, losses
from clidim_jax.state import Networks, TrainState, linear_policy, policy_lr

Batch = dict[str, jax.Array]  # "noisy", "clean": (B, H, W, 1) float32 in [-1, 1]
Metrics = dict[str, jax.Array]


def _adam_step(tx, grads, opt_state, params, lr, clip: float = 0.0):
    if clip > 0:  # stateless: the optimizer state's structure is the same with or without it
        grads, _ = optax.clip_by_global_norm(clip).update(grads, optax.EmptyState())
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
    return params, opt_state


def make_train_step(
    config: ml_collections.ConfigDict, nets: Networks, steps_per_epoch: int
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    w = config.loss
    schedule = linear_policy(
        config.train.lr, config.train.n_epochs, config.train.n_epochs_decay, steps_per_epoch
    )
    G, D, H = nets.generator, nets.discriminator, nets.head
    contrastive_fn = {"infonce": losses.infonce_loss, "ntxent": losses.ntxent_loss}[
        w.contrastive_loss
    ]
    use_cl = w.contrastive > 0
    # A model knocked off course has gradients thousands of times the usual norm; unbounded,
    # they inflate Adam's second moment for thousands of steps, which then damps every update
    # that could bring it back (QUALITY.md). With train.clip_grad_norm > 0 every gradient is
    # first bounded to that global norm.
    clip = float(config.train.get("clip_grad_norm", 0.0))
    train_head = use_cl and w.head_trainable

    def d_apply(d_params, d_bs, x):
        """D in train mode: batch statistics of this call, running statistics updated."""
        logits, upd = D.apply(
            {"params": d_params, "batch_stats": d_bs}, x, train=True, mutable=["batch_stats"]
        )
        return logits, upd["batch_stats"]

    def contrastive_loss(d_params, head_params, d_bs, real_pairs, fake_pairs, key):
        # The reference runs D four times, B samples each (fake q, fake k, real q, real k): each
        # call has its own BN batch statistics and its own augmentation (and blur) draw.
        keys = jax.random.split(key, 4)
        feats = []
        for k, pairs in zip(keys, (fake_pairs, fake_pairs, real_pairs, real_pairs)):
            view = augment.contrastive_view(
                k, pairs, blur_p=w.blur_p, scale=tuple(w.crop_scale), ratio=tuple(w.crop_ratio)
            )
            logits, d_bs = d_apply(d_params, d_bs, view)
            flat = logits.reshape(logits.shape[0], -1).astype(jnp.float32)
            feats.append(H.apply({"params": head_params}, flat))
        q = jnp.concatenate([feats[0], feats[2]], axis=0)
        k = jnp.concatenate([feats[1], feats[3]], axis=0)
        return w.contrastive * contrastive_fn(q, k, w.tau), d_bs

    def gan_d_loss(d_params, d_bs, noisy, clean, fake):
        fake_logits, d_bs = d_apply(d_params, d_bs, jnp.concatenate([noisy, fake], -1))
        real_logits, d_bs = d_apply(d_params, d_bs, jnp.concatenate([noisy, clean], -1))
        loss = losses.gan_loss_d(real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32))
        aux = (d_bs, jax.nn.sigmoid(real_logits).mean(), jax.nn.sigmoid(fake_logits).mean())
        return w.gan * loss, aux

    def g_loss(fake, d_params, d_bs, noisy, clean):
        terms = {}
        if w.gan > 0:
            logits, d_bs = d_apply(d_params, d_bs, jnp.concatenate([noisy, fake], -1))
            terms["g_gan"] = losses.gan_loss_g(logits.astype(jnp.float32))
        if w.l1 > 0:
            terms["g_l1"] = losses.l1_loss(fake, clean)
        if w.get("l2", 0.0) > 0:
            terms["g_l2"] = losses.l2_loss(fake, clean)
        if w.ssim > 0:
            terms["g_ssim"] = losses.ssim_loss(fake, clean)
        if w.tv > 0:
            terms["g_tv"] = losses.tv_loss(fake)
        weights = {
            "g_gan": w.gan,
            "g_l1": w.l1,
            "g_l2": w.get("l2", 0.0),
            "g_ssim": w.ssim,
            "g_tv": w.tv,
        }
        total = sum(weights[k] * v for k, v in terms.items())
        return total, (terms, d_bs)

    def train_step(state: TrainState, batch: Batch, key: jax.Array):
        key = jax.random.fold_in(key, state.step)
        k_drop, k_cl = jax.random.split(key)
        if "lr_policy" in batch:  # the policy's numbers as inputs (lr_policy_inputs)
            p = batch["lr_policy"]
            lr = policy_lr(state.step, p["base_lr"], p["n_epochs"], p["decay_div"], steps_per_epoch)
        else:
            lr = schedule(state.step)
        noisy, clean = batch["noisy"], batch["clean"]

        # 1. fake = G(noisy), train mode, once: its VJP serves the G step (as PyTorch's graph).
        def g_forward(g_params):
            out, upd = G.apply(
                {"params": g_params, "batch_stats": state.g_batch_stats},
                noisy,
                train=True,
                rngs={"dropout": k_drop},
                mutable=["batch_stats"],
            )
            return out.astype(jnp.float32), upd["batch_stats"]

        fake, g_vjp, g_bs = jax.vjp(g_forward, state.g_params, has_aux=True)
        fake_sg = jax.lax.stop_gradient(fake)
        d_params, d_bs, d_opt = state.d_params, state.d_batch_stats, state.d_opt_state
        head_params, head_opt = state.head_params, state.head_opt_state
        metrics: Metrics = {"lr": lr}

        # 2. Contrastive D step (own Adam update of D, sharing D's optimizer state).
        if use_cl:
            real_pairs = jnp.concatenate([noisy, clean], -1)
            fake_pairs = jnp.concatenate([noisy, fake_sg], -1)
            grad_fn = jax.value_and_grad(contrastive_loss, argnums=(0, 1), has_aux=True)
            (cl, d_bs), (gd, gh) = grad_fn(
                d_params, head_params, d_bs, real_pairs, fake_pairs, k_cl
            )
            d_params, d_opt = _adam_step(nets.d_tx, gd, d_opt, d_params, lr, clip)
            if train_head:
                head_params, head_opt = _adam_step(
                    nets.head_tx, gh, head_opt, head_params, lr, clip
                )
            metrics["d_contrastive"] = cl / w.contrastive

        # 3. GAN D step, with the D parameters from step 2.
        if w.gan > 0:
            grad_fn = jax.value_and_grad(gan_d_loss, has_aux=True)
            (dl, (d_bs, p_real, p_fake)), gd = grad_fn(d_params, d_bs, noisy, clean, fake_sg)
            d_params, d_opt = _adam_step(nets.d_tx, gd, d_opt, d_params, lr, clip)
            metrics.update(d_gan=dl / w.gan, d_real_prob=p_real, d_fake_prob=p_fake)

        # 4. G step against the updated D (D in train mode: its BN statistics move, not its params).
        (g_total, (terms, d_bs)), dfake = jax.value_and_grad(g_loss, has_aux=True)(
            fake, d_params, d_bs, noisy, clean
        )
        (g_grads,) = g_vjp(dfake)
        metrics["g_grad_norm"] = optax.tree.norm(g_grads)  # before any clipping
        g_params, g_opt = _adam_step(
            nets.g_tx, g_grads, state.g_opt_state, state.g_params, lr, clip
        )
        metrics.update(terms)
        metrics["g_total"] = g_total

        new_state = state.replace(
            step=state.step + 1,
            g_params=g_params,
            g_batch_stats=g_bs,
            d_params=d_params,
            d_batch_stats=d_bs,
            head_params=head_params,
            g_opt_state=g_opt,
            d_opt_state=d_opt,
            head_opt_state=head_opt,
        )
        return new_state, metrics

    return train_step


def normalize_batch(noisy: jax.Array, clean: jax.Array, norm: Any) -> Batch:
    """Maps a batch in the data's units to the model's space.

    The stored `Normalization` (deployable: statistics of the training images, and a
    variance-stabilising transform when it has a noise model), except in `reference` mode: one
    min and max over the whole batch of noisy and clean (the reference code).
    """
    if norm.mode == "reference":
        lo = jnp.minimum(noisy.min(), clean.min())
        hi = jnp.maximum(noisy.max(), clean.max())
        scale = 2.0 / jnp.maximum(hi - lo, 1e-12)
        return {"noisy": (noisy - lo) * scale - 1.0, "clean": (clean - lo) * scale - 1.0}
    return {"noisy": norm.apply(noisy), "clean": norm.apply(clean)}


def random_gain(
    key: jax.Array, noisy: jax.Array, clean: jax.Array, gain_range: tuple[float, float]
) -> tuple[jax.Array, jax.Array]:
    """Intensity augmentation: each crop pair times one gain drawn log-uniformly from
    `gain_range` (in the data's units, before normalisation), so the model sees structures
    brighter and dimmer than the training field's."""
    lo, hi = (float(g) for g in gain_range)
    u = jax.random.uniform(key, (noisy.shape[0], 1, 1, 1), jnp.float32)
    g = jnp.exp(jnp.log(lo) + u * (jnp.log(hi) - jnp.log(lo)))
    return noisy * g, clean * g


def step_compiler_options(mesh: Any = None) -> dict[str, Any]:
    """XLA options for `jax.jit(..., compiler_options=...)` of the (donated) train step on the
    mesh's devices (`clidim_jax.compiler`)."""
    return compiler.compiler_options(mesh.devices.flat[0] if mesh is not None else None)


def correlate_noise(r: jax.Array, corr: tuple[float, float]) -> jax.Array:
    """Noise `r` (N, H, W, C) filtered along H and W by the 3-tap kernels [a, 1, a] /
    sqrt(1 + 2 a^2) whose lag-1 correlations are `corr` = (rho_y, rho_x) (2 a / (1 + 2 a^2) =
    rho): each pixel's variance is kept, its neighbours' correlation becomes rho. Edges
    reflect."""
    for axis, rho in ((1, corr[0]), (2, corr[1])):
        if rho == 0.0:
            continue
        a = (1.0 - np.sqrt(1.0 - 2.0 * rho**2)) / (2.0 * rho)
        pad = [(0, 0)] * r.ndim
        pad[axis] = (1, 1)
        p = jnp.pad(r, pad, mode="reflect")
        n = r.shape[axis]
        left, mid, right = (jax.lax.slice_in_dim(p, s, s + n, axis=axis) for s in range(3))
        r = (mid + a * (left + right)) * float(1.0 / np.sqrt(1.0 + 2.0 * a * a))
    return r


def empirical_residual(key: jax.Array, clean: jax.Array, noise: Any) -> jax.Array:
    """Noise for the clean intensities `clean`, drawn by inverse-CDF sampling from the
    measured distribution `noise.empirical` (an `EmpiricalNoise`): at an intensity between
    two measured levels, the two levels' quantile functions and deviations interpolated
    linearly; below the dimmest level, the dimmest's; above the brightest, the brightest's
    shape with the deviation growing as the Poisson-Gaussian model's sqrt(gain x + offset)."""
    emp = noise.empirical
    levels = jnp.asarray(emp.levels, jnp.float32)
    table = jnp.asarray(emp.quantiles, jnp.float32)
    n_lv, n_q = table.shape
    t = jnp.interp(clean, levels, jnp.arange(n_lv, dtype=jnp.float32))
    j0 = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, n_lv - 1)
    j1 = jnp.minimum(j0 + 1, n_lv - 1)
    w = t - j0.astype(jnp.float32)
    v = jax.random.uniform(key, clean.shape, jnp.float32) * n_q - 0.5
    k0 = jnp.clip(jnp.floor(v).astype(jnp.int32), 0, n_q - 1)
    k1 = jnp.minimum(k0 + 1, n_q - 1)
    kw = jnp.clip(v - k0.astype(jnp.float32), 0.0, 1.0)
    q = lambda j: table[j, k0] * (1.0 - kw) + table[j, k1] * kw
    z = q(j0) * (1.0 - w) + q(j1) * w
    top, std_top = float(emp.levels[-1]), float(emp.std[-1])
    var = lambda x: jnp.maximum(float(noise.gain) * x + float(noise.offset), 1e-6)
    std = jnp.where(
        clean > top,
        std_top * jnp.sqrt(var(clean) / var(jnp.float32(top))),
        jnp.interp(clean, levels, jnp.asarray(emp.std, jnp.float32)),
    )
    return std * z


def synthesize_noisy(
    key: jax.Array,
    clean: jax.Array,
    noise: Any,
    gain_range: tuple[float, float],
    integer: bool,
    top: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """New noisy images for clean ones brightened or dimmed by a random gain (log-uniform in
    `gain_range`, one per image), drawn from the fitted Poisson-Gaussian model Var = gain_n x +
    offset: x = gain_n (P + d) + N(0, s^2), P ~ Poisson, with s^2 = offset (offset >= 0) or a
    dark level d = -offset / gain_n^2 (offset < 0), or with `noise.empirical` from the measured
    distribution (`empirical_residual`); with `noise.corr`, spatially correlated
    (`correlate_noise`). Rounded (and kept >= 0) for integer data, and kept <= `top` (the
    largest value the data type holds: a detector saturates there, so no real input exceeds it,
    though a brightened clean crop plus its noise can).
    Physically right at any brightness, unlike scaling a measured noisy image."""
    k_g, k_p, k_n = jax.random.split(key, 3)
    lo, hi = (float(g) for g in gain_range)
    u = jax.random.uniform(k_g, (clean.shape[0], 1, 1, 1), jnp.float32)
    clean = clean * jnp.exp(jnp.log(lo) + u * (jnp.log(hi) - jnp.log(lo)))
    a, b = float(noise.gain), float(noise.offset)
    if noise.empirical is not None:
        noisy = clean + empirical_residual(k_p, clean, noise)
    else:
        if a > 0:
            s2, d = (b, 0.0) if b >= 0 else (0.0, -b / a**2)
            rate = jnp.maximum(clean / a - d, 0.0)
            noisy = a * (jax.random.poisson(k_p, rate).astype(jnp.float32) + d)
        else:  # signal-independent noise (gain 0): Gaussian of variance `offset`
            s2, noisy = max(b, 0.0), clean
        noisy = noisy + float(np.sqrt(s2)) * jax.random.normal(k_n, clean.shape, jnp.float32)
    if tuple(noise.corr) != (0.0, 0.0):
        noisy = clean + correlate_noise(noisy - clean, tuple(float(r) for r in noise.corr))
    if integer:
        noisy = jnp.maximum(jnp.round(noisy), 0.0)
    if top is not None:
        noisy = jnp.minimum(noisy, top)
    return noisy, clean


def make_sampled_train_step(
    config: ml_collections.ConfigDict,
    nets: Networks,
    steps_per_epoch: int,
    norm: Any,
    mesh: Any = None,
    noise: Any = None,
) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, Metrics]]:
    """The train step with on-device batch sampling in front: `(state, data, key)`, where `data`
    holds the training images resident on the device (`PairedImages.device_data()`: "noisy",
    "clean", "views" and, for few-shot sets, "order") and optionally "lr_policy"
    (`state.lr_policy_inputs`: the learning-rate policy as inputs, not constants of the program).

    With a `mesh`, the sampled global batch is constrained to the `data` axis, so each device
    draws and processes only its own part of it. With `config.data.synthetic` > 0, that fraction
    of each batch gets synthetic noisy images from `noise` (a fitted `NoiseModel`) at random
    brightness (`synthesize_noisy`).
    """
    from clidim_jax.data.sampling import sample_batch

    step_fn = make_train_step(config, nets, steps_per_epoch)
    if mesh is not None:
        from clidim_jax.sharding import shard_batch_fn

        constrain = shard_batch_fn(mesh)
    else:
        constrain = lambda x: x

    def sampled_step(state, data, key):
        k_data, k_step = jax.random.split(key)
        noisy, clean = sample_batch(
            k_data,
            state.step,
            data["noisy"],
            data["clean"],
            data["views"],
            batch_size=config.train.batch_size,
            patch_size=config.data.patch_size,
            augment=config.data.augment,
            order=data.get("order"),
            crop_tries=int(config.data.get("crop_tries", 1)),
        )
        n_syn = int(round(config.data.get("synthetic", 0.0) * config.train.batch_size))
        if n_syn > 0:
            k_syn = jax.random.fold_in(jax.random.fold_in(k_data, state.step), 0x5E7)
            integer = jnp.issubdtype(data["noisy"].dtype, jnp.integer)
            top = float(jnp.iinfo(data["noisy"].dtype).max) if integer else None
            syn_noisy, syn_clean = synthesize_noisy(
                k_syn, clean[:n_syn], noise, tuple(config.data.synthetic_gain), integer, top
            )
            noisy = jnp.concatenate([syn_noisy, noisy[n_syn:]], 0)
            clean = jnp.concatenate([syn_clean, clean[n_syn:]], 0)
        gain_range = tuple(config.data.gain_augment)
        if gain_range != (1.0, 1.0):
            # (a key of its own, so the crops of runs without it are unchanged)
            k_gain = jax.random.fold_in(jax.random.fold_in(k_data, state.step), 0x6A17)
            noisy, clean = random_gain(k_gain, noisy, clean, gain_range)
        noisy, clean = constrain(noisy), constrain(clean)
        batch = normalize_batch(noisy, clean, norm)
        if "lr_policy" in data:
            batch["lr_policy"] = data["lr_policy"]
        return step_fn(state, batch, k_step)

    return sampled_step
