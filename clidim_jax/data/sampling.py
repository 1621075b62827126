"""On-device training batches: the data order is a pure function of (seed, step).

The training images stay on the device in their stored dtype; each step draws its crops, flips
and rotations inside the jitted step from `fold_in(key, step)`. There is no iterator state, so a
resumed run continues exactly, and no host input pipeline can starve the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clidim_jax.augment import flip_rot90


def epoch_indices(key: jax.Array, step: jax.Array, n_images: int, batch_size: int) -> jax.Array:
    """Image indices of a step: each epoch visits a fresh permutation of the images, like the
    reference's shuffled DataLoader (an epoch = ceil(N / B) steps; a short last batch wraps)."""
    steps_per_epoch = -(-n_images // batch_size)
    epoch = step // steps_per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n_images)
    pos = (step % steps_per_epoch) * batch_size + jnp.arange(batch_size)
    return perm[pos % n_images]


def sample_batch(
    key: jax.Array,
    step: jax.Array,
    noisy: jax.Array,
    clean: jax.Array,
    clean_index: jax.Array,
    *,
    batch_size: int,
    patch_size: int,
    augment: bool,
) -> tuple[jax.Array, jax.Array]:
    """Returns (noisy, clean) float32 crops, NHWC with one channel, in the data's own units."""
    n, h, w = noisy.shape
    if h < patch_size or w < patch_size:
        raise ValueError(f"images of {h}x{w} are smaller than the patch size {patch_size}")
    k_perm, k_y, k_x, k_aug = jax.random.split(key, 4)
    idx = epoch_indices(k_perm, step, n, batch_size)
    step_key = jax.random.fold_in
    ys = jax.random.randint(step_key(k_y, step), (batch_size,), 0, h - patch_size + 1)
    xs = jax.random.randint(step_key(k_x, step), (batch_size,), 0, w - patch_size + 1)
    aug_keys = jax.random.split(step_key(k_aug, step), batch_size)

    def crop(i, y, x, k):
        a = jax.lax.dynamic_slice(noisy, (i, y, x), (1, patch_size, patch_size))[0]
        b = jax.lax.dynamic_slice(clean, (clean_index[i], y, x), (1, patch_size, patch_size))[0]
        pair = jnp.stack([a.astype(jnp.float32), b.astype(jnp.float32)], axis=-1)
        return flip_rot90(k, pair) if augment else pair

    pairs = jax.vmap(crop)(idx, ys, xs, aug_keys)
    return pairs[..., :1], pairs[..., 1:]
