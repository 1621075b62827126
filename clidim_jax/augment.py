"""Jittable augmentations: contrastive views (docs/method.md section 4), flips, rotations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from clidim_jax.losses import gaussian_kernel_1d, separable_depthwise_filter


def _center_crop_fallback(
    height: int, width: int, ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's fallback when all tries fail: the image clamped to the ratio range, centred."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_boxes(
    key: jax.Array,
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    tries: int = 10,
) -> jax.Array:
    """`n` integer crop boxes, (n, 4) int32 rows of (top, left, h, w), torchvision's rule.

    Per sample: area = U(scale) * H * W, aspect = exp(U(log ratio)), w = round(sqrt(area * aspect)),
    h = round(sqrt(area / aspect)); the first of `tries` draws with 0 < w <= W and 0 < h <= H wins,
    its top/left uniform integers; if none does, torchvision's centre crop. All tries are drawn
    at once so shapes stay static (the unused draws cost nothing of note).
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(k_area, (n, tries), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(
        k_ratio, (n, tries), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
    )
    aspect = jnp.exp(log_r)
    # jnp.round is round-half-to-even, like Python's round() in torchvision.
    w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(valid, axis=1)  # index of the first valid try (0 if none: masked below)
    found = valid.any(axis=1)
    h = jnp.take_along_axis(h, first[:, None], axis=1)[:, 0]
    w = jnp.take_along_axis(w, first[:, None], axis=1)[:, 0]
    # Clamp so a failed sample's (ignored) draws stay legal for randint.
    h_ok, w_ok = jnp.clip(h, 1, height), jnp.clip(w, 1, width)
    top = jax.random.randint(k_top, (n,), 0, height - h_ok + 1)
    left = jax.random.randint(k_left, (n,), 0, width - w_ok + 1)
    fallback = jnp.asarray(_center_crop_fallback(height, width, ratio), dtype=jnp.int32)
    boxes = jnp.stack([top, left, h_ok, w_ok], axis=1).astype(jnp.int32)
    return jnp.where(found[:, None], boxes, fallback[None, :])


def _align_corners_coords(
    start: jax.Array, size: jax.Array, out: int, limit: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Source indices (i0, i1) and weight of i1 for `out` samples spanning [start, start+size-1]."""
    i = jnp.arange(out, dtype=jnp.int32)
    # Source position start + i * (size - 1) / (out - 1), split in integer arithmetic: XLA turns
    # a float division by a constant into a reciprocal multiply, which would move exact grid
    # hits (the full-image box, the box's last pixel) off by an ulp and across a floor().
    num = i * jnp.maximum(size - 1, 0)
    den = max(out - 1, 1)  # PyTorch: scale 0 when the output has 1 pixel (num is 0 then)
    i0 = start + num // den
    frac = (num % den).astype(jnp.float32) / den
    i0 = jnp.clip(i0, 0, limit - 1)
    i1 = jnp.minimum(i0 + 1, limit - 1)
    return i0, i1, frac


def resize_crop_bilinear(img: jax.Array, box: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Crops `box` = (top, left, h, w) (traced ints) from an HWC image and resizes it to
    (out_h, out_w): bilinear, align_corners=True (PyTorch F.interpolate semantics).

    The crop is never materialised: the sample grid is computed from the box, so all shapes are
    static and it vmaps over boxes.
    """
    height, width = img.shape[0], img.shape[1]
    top, left, h, w = box[0], box[1], box[2], box[3]
    y0, y1, wy = _align_corners_coords(top, h, out_h, height)
    x0, x1, wx = _align_corners_coords(left, w, out_w, width)
    wy = wy.astype(img.dtype)[:, None, None]
    wx = wx.astype(img.dtype)[None, :, None]
    r0, r1 = jnp.take(img, y0, axis=0), jnp.take(img, y1, axis=0)
    top_row = jnp.take(r0, x0, axis=1) * (1 - wx) + jnp.take(r0, x1, axis=1) * wx
    bot_row = jnp.take(r1, x0, axis=1) * (1 - wx) + jnp.take(r1, x1, axis=1) * wx
    return top_row * (1 - wy) + bot_row * wy


def gaussian_blur_3x3(img_batch: jax.Array, sigma: float = 1.5) -> jax.Array:
    """3x3 normalised Gaussian blur of every channel of an NHWC batch, reflect borders."""
    return separable_depthwise_filter(img_batch, gaussian_kernel_1d(3, sigma))


def contrastive_view(
    key: jax.Array,
    pairs: jax.Array,
    *,
    blur_p: float = 0.1,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> jax.Array:
    """One augmented view of a (B, H, W, C) batch of (noisy, candidate) pairs, same shape.

    In order: horizontal flip (p=0.5, per sample); Gaussian blur 3x3 sigma 1.5 of the
    whole batch with probability `blur_p` (one draw per call, as the reference); random resized
    crop back to (H, W) per sample, bilinear with align_corners=True. All channels of a sample
    share its transform.
    """
    b, height, width, _ = pairs.shape
    k_flip, k_blur, k_crop = jax.random.split(key, 3)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    x = jnp.where(flip[:, None, None, None], pairs[:, :, ::-1, :], pairs)
    do_blur = jax.random.bernoulli(k_blur, blur_p)
    x = jax.lax.cond(do_blur, gaussian_blur_3x3, lambda v: v, x)
    boxes = random_resized_crop_boxes(k_crop, b, height, width, scale, ratio)
    return jax.vmap(lambda im, bx: resize_crop_bilinear(im, bx, height, width))(x, boxes)


def flip_rot90(key: jax.Array, x: jax.Array) -> jax.Array:
    """Training-crop geometry of one square HWC patch: hflip (p=0.5), then rot90 by k ~ U{0..3}.

    All channels get the same transform, so (noisy, clean) stacked on channels stay aligned.
    """
    if x.shape[0] != x.shape[1]:
        # Odd rotations would change the shape, which lax.switch (and a static batch) forbids.
        raise ValueError(f"flip_rot90 needs a square patch, got {x.shape[0]}x{x.shape[1]}")
    k_flip, k_rot = jax.random.split(key)
    x = jnp.where(jax.random.bernoulli(k_flip, 0.5), x[:, ::-1, :], x)
    k = jax.random.randint(k_rot, (), 0, 4)
    branches = [lambda v, r=r: jnp.rot90(v, r, axes=(0, 1)) for r in range(4)]
    return jax.lax.switch(k, branches, x)
