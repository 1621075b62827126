"""CLIDiM loss terms (METHOD.md sections 3 and 4) as pure, jit- and vmap-friendly JAX functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def gan_loss_g(fake_logits: jax.Array) -> jax.Array:
    """Generator GAN loss: BCE-with-logits of D(noisy, G(noisy)) against 1, mean."""
    return optax.sigmoid_binary_cross_entropy(fake_logits, jnp.ones_like(fake_logits)).mean()


def gan_loss_d(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Discriminator GAN loss: 0.5 * (BCE(real, 1) + BCE(fake, 0)), each a mean."""
    real = optax.sigmoid_binary_cross_entropy(real_logits, jnp.ones_like(real_logits)).mean()
    fake = optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits)).mean()
    return 0.5 * (real + fake)


def l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error."""
    return jnp.abs(pred - target).mean()


def gaussian_kernel_1d(window: int, sigma: float) -> jax.Array:
    """Normalised 1-D Gaussian taps at integer offsets centred on the window (kornia's rule)."""
    x = jnp.arange(window, dtype=jnp.float32) - window // 2
    if window % 2 == 0:
        # kornia centres an even window between two taps.
        x = x + 0.5
    g = jnp.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def separable_depthwise_filter(x: jax.Array, taps: jax.Array) -> jax.Array:
    """Filters every channel of NHWC `x` with the outer product of `taps` with itself.

    Borders are 'reflect' (no edge repeat: numpy/torch/kornia 'reflect', d c b | a b c d | c b a),
    so the output has the input's size. Two 1-D depthwise convolutions cost 2k instead of k^2
    multiplies per pixel, which matters on CPU.
    """
    k = taps.shape[0]
    lo, hi = (k - 1) // 2, k // 2
    c = x.shape[-1]
    xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)), mode="reflect")
    taps = taps.astype(x.dtype)
    dn = ("NHWC", "HWIO", "NHWC")
    kv = jnp.tile(taps.reshape(k, 1, 1, 1), (1, 1, 1, c))
    kh = jnp.tile(taps.reshape(1, k, 1, 1), (1, 1, 1, c))
    y = jax.lax.conv_general_dilated(
        xp, kv, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c
    )
    return jax.lax.conv_general_dilated(
        y, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c
    )


def ssim_map(
    x: jax.Array,
    y: jax.Array,
    *,
    window: int = 5,
    sigma: float = 1.5,
    c1: float = 0.01**2,
    c2: float = 0.03**2,
) -> jax.Array:
    """Per-pixel, per-channel SSIM of NHWC images in [0, 1] (kornia.metrics.ssim's definition).

    Gaussian-weighted biased moments with reflect borders, so the map has the input's shape.
    """
    c = x.shape[-1]
    # One depthwise call for all five moments instead of five convolutions.
    stacked = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)
    m = separable_depthwise_filter(stacked, gaussian_kernel_1d(window, sigma))
    mu_x, mu_y, e_xx, e_yy, e_xy = (m[..., i * c : (i + 1) * c] for i in range(5))
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = e_xx - mu_xx, e_yy - mu_yy, e_xy - mu_xy
    num = (2.0 * mu_xy + c1) * (2.0 * cov + c2)
    den = (mu_xx + mu_yy + c1) * (var_x + var_y + c2)
    return num / (den + 1e-12)


def ssim_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """clip((1 - SSIM) / 2, 0, 1), mean over pixels, channels and batch; inputs in [-1, 1]."""
    s = ssim_map((pred + 1.0) / 2.0, (target + 1.0) / 2.0)
    return jnp.clip((1.0 - s) / 2.0, 0.0, 1.0).mean()


def tv_loss(img: jax.Array) -> jax.Array:
    """Anisotropic total variation: per-image sum over H, W, C of |dy| + |dx|, mean over batch."""
    dy = jnp.abs(img[:, 1:, :, :] - img[:, :-1, :, :]).sum(axis=(1, 2, 3))
    dx = jnp.abs(img[:, :, 1:, :] - img[:, :, :-1, :]).sum(axis=(1, 2, 3))
    return (dy + dx).mean()


def infonce_loss(q: jax.Array, k: jax.Array, tau: float = 0.1) -> jax.Array:
    """One-directional InfoNCE of the reference code: raw dot products, no normalisation.

    logits = (q k^T - rowmax) / tau; cross-entropy with the diagonal as labels, mean over rows.
    The row max only guards exp() against overflow (cross-entropy is shift-invariant), so it is
    held constant for the gradient, as the reference detaches it.
    """
    logits = q @ k.T
    logits = (logits - jax.lax.stop_gradient(logits.max(axis=1, keepdims=True))) / tau
    logp = jax.nn.log_softmax(logits, axis=1)
    return -jnp.diagonal(logp).mean()


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    # torch.nn.functional.normalize: x / max(||x||, eps), so a zero row stays finite.
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def ntxent_loss(q: jax.Array, k: jax.Array, tau: float = 0.1) -> jax.Array:
    """SimCLR NT-Xent (the paper's text): cosine similarities over the 2N views, symmetric.

    Anchor i's positive is its other view (i + N mod 2N); every other view except itself is a
    negative. Mean over all 2N anchors.
    """
    n = q.shape[0]
    z = _l2_normalize(jnp.concatenate([q, k], axis=0))
    sim = (z @ z.T) / tau
    # A finite mask value keeps the backward pass free of inf - inf; |sim| <= 1 / tau anyway.
    sim = jnp.where(jnp.eye(2 * n, dtype=bool), jnp.finfo(sim.dtype).min / 2, sim)
    logp = jax.nn.log_softmax(sim, axis=1)
    pos = (jnp.arange(2 * n) + n) % (2 * n)
    return -jnp.take_along_axis(logp, pos[:, None], axis=1).mean()
