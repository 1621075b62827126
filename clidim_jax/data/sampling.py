"""On-device training batches: the data order is a pure function of (seed, step).

The training images stay on the device in their stored dtype; each step draws its crops, flips
and rotations inside the jitted step from `fold_in(key, step)`. There is no iterator state, so a
resumed run continues exactly, and no host input pipeline can starve the device.

The images are *views* (rectangles) of stored planes, `views[i] = (noisy plane, clean plane, y0,
x0, h, w)`: a crop is drawn uniformly inside its view, so spatial splits, regions of different
sizes and repeated acquisitions sharing one clean image need no copies.
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
    views: jax.Array,
    *,
    batch_size: int,
    patch_size: int,
    augment: bool,
    order: jax.Array | None = None,
    crop_tries: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Returns (noisy, clean) float32 crops, NHWC with one channel, in the data's own units.

    `order` (few-shot sets): the view of each position of an epoch, so that N views repeated to
    the full training-set length keep the epoch's number of steps. `crop_tries` > 1 draws that
    many crop positions per sample (the first is the one drawn without it) and keeps the one
    whose clean crop is brightest: fluorescence images are mostly dark background, and this
    shows the model more of the structures whose errors dominate PSNR."""
    noisy, clean, views = jnp.asarray(noisy), jnp.asarray(clean), jnp.asarray(views)
    n_views = views.shape[0]
    length = n_views if order is None else order.shape[0]
    k_perm, k_y, k_x, k_aug = jax.random.split(key, 4)
    idx = epoch_indices(k_perm, step, length, batch_size)
    if order is not None:
        idx = jnp.asarray(order)[idx]
    v = views[idx]
    step_key = jax.random.fold_in
    ys = v[:, 2] + jax.random.randint(
        step_key(k_y, step), (batch_size,), 0, v[:, 4] - patch_size + 1
    )
    xs = v[:, 3] + jax.random.randint(
        step_key(k_x, step), (batch_size,), 0, v[:, 5] - patch_size + 1
    )
    if crop_tries > 1:
        ys, xs = _brightest_of(
            jax.random.fold_in(step_key(k_y, step), 0x7C0), v, ys, xs, clean, patch_size,
            crop_tries,
        )  # fmt: skip
    aug_keys = jax.random.split(step_key(k_aug, step), batch_size)

    def crop(p, c, y, x, k):
        a = jax.lax.dynamic_slice(noisy, (p, y, x), (1, patch_size, patch_size))[0]
        b = jax.lax.dynamic_slice(clean, (c, y, x), (1, patch_size, patch_size))[0]
        pair = jnp.stack([a.astype(jnp.float32), b.astype(jnp.float32)], axis=-1)
        return flip_rot90(k, pair) if augment else pair

    pairs = jax.vmap(crop)(v[:, 0], v[:, 1], ys, xs, aug_keys)
    return pairs[..., :1], pairs[..., 1:]


def _brightest_of(key, v, ys, xs, clean, patch_size: int, tries: int):
    """Per sample, `tries` crop positions (the given one and tries - 1 more drawn inside the
    same view): the one with the largest clean sum."""
    n = ys.shape[0]
    ky, kx = jax.random.split(key)
    shape = (tries - 1, n)
    ys_all = jnp.concatenate(
        [ys[None], v[None, :, 2] + jax.random.randint(ky, shape, 0, v[None, :, 4] - patch_size + 1)]
    )
    xs_all = jnp.concatenate(
        [xs[None], v[None, :, 3] + jax.random.randint(kx, shape, 0, v[None, :, 5] - patch_size + 1)]
    )

    def crop_sum(c, y, x):
        return jax.lax.dynamic_slice(clean, (c, y, x), (1, patch_size, patch_size)).sum()

    sums = jax.vmap(jax.vmap(crop_sum), in_axes=(None, 0, 0))(v[:, 1], ys_all, xs_all)
    best = jnp.argmax(sums, axis=0)
    pick = lambda a: jnp.take_along_axis(a, best[None], axis=0)[0]
    return pick(ys_all), pick(xs_all)
