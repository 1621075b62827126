"""Augmentations against NumPy references, geometric invariants and fixed-key statistics.

Border convention: 'reflect' without edge repeat (np.pad mode='reflect' == torch 'reflect').
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clidim_jax import augment

# One compile per distinct static configuration instead of op-by-op dispatch.
_boxes = jax.jit(augment.random_resized_crop_boxes, static_argnums=(1, 2, 3, 4, 5))


def _np_bilinear_align_corners(img, box, out_h, out_w):
    """PyTorch F.interpolate(crop, bilinear, align_corners=True), one pixel at a time, float64."""
    top, left, h, w = (int(v) for v in box)
    crop = img[top : top + h, left : left + w].astype(np.float64)
    out = np.zeros((out_h, out_w, img.shape[2]))
    for i in range(out_h):
        sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = int(np.floor(sy))
        y1 = min(y0 + 1, h - 1)
        fy = sy - y0
        for j in range(out_w):
            sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = int(np.floor(sx))
            x1 = min(x0 + 1, w - 1)
            fx = sx - x0
            out[i, j] = (1 - fy) * ((1 - fx) * crop[y0, x0] + fx * crop[y0, x1]) + fy * (
                (1 - fx) * crop[y1, x0] + fx * crop[y1, x1]
            )
    return out


@pytest.fixture
def img():
    return np.random.default_rng(0).normal(size=(12, 15, 2)).astype(np.float32)


@pytest.mark.parametrize(
    "box,out",
    [
        ((2, 3, 7, 9), (12, 15)),
        ((0, 0, 12, 15), (5, 4)),
        ((5, 1, 1, 6), (3, 10)),
        ((4, 7, 8, 8), (1, 1)),
        ((11, 14, 1, 1), (4, 4)),
    ],
)
def test_resize_crop_matches_numpy(img, box, out):
    fn = jax.jit(augment.resize_crop_bilinear, static_argnums=(2, 3))
    got = np.asarray(fn(img, jnp.asarray(box, jnp.int32), *out))
    np.testing.assert_allclose(got, _np_bilinear_align_corners(img, box, *out), atol=1e-5)


def test_full_box_resize_is_identity(img):
    got = augment.resize_crop_bilinear(img, jnp.array([0, 0, 12, 15]), 12, 15)
    np.testing.assert_array_equal(np.asarray(got), img)


def test_boxes_inside_image_and_within_scale_and_ratio():
    h, w, n = 24, 40, 2000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = np.asarray(_boxes(jax.random.key(0), n, h, w, scale, ratio))
    top, left, bh, bw = boxes.T
    assert boxes.dtype == np.int32
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    # torchvision's fallback for a 24x40 image (40/24 > 4/3): h = 24, w = round(24 * 4/3) = 32,
    # centred at left = 4.
    fallback = (top == 0) & (left == 4) & (bh == 24) & (bw == 32)
    drawn = ~fallback
    assert drawn.mean() > 0.9
    hh, ww = bh[drawn].astype(float), bw[drawn].astype(float)
    # w, h are sqrt(area * aspect), sqrt(area / aspect) rounded to integers, so within +-0.5.
    assert ((hh + 0.5) * (ww + 0.5) >= scale[0] * h * w).all()
    assert ((hh - 0.5) * (ww - 0.5) <= scale[1] * h * w).all()
    assert ((ww + 0.5) / (hh - 0.5) >= ratio[0]).all()
    assert ((ww - 0.5) / (hh + 0.5) <= ratio[1]).all()


def test_box_positions_cover_all_offsets():
    # A fixed 20x20 box (area fraction and ratio pinned) in a 24x40 image: top in 0..4, left 0..20.
    frac = 400 / (24 * 40)
    boxes = np.asarray(_boxes(jax.random.key(2), 1000, 24, 40, (frac, frac), (1.0, 1.0)))
    assert (boxes[:, 2:] == 20).all()
    assert set(boxes[:, 0]) == set(range(5)) and set(boxes[:, 1]) == set(range(21))


def test_box_fallback_is_torchvision_centre_crop():
    # Areas above the image can never fit: every sample falls back to the centre crop.
    boxes = _boxes(jax.random.key(1), 5, 20, 40, (2.0, 3.0), (1.0, 1.0))
    np.testing.assert_array_equal(np.asarray(boxes), np.tile([0, 10, 20, 20], (5, 1)))
    boxes = _boxes(jax.random.key(1), 3, 40, 20, (2.0, 3.0), (0.5, 0.75))
    # Tall image, 20/40 = 0.5 inside [0.5, 0.75]: the whole image.
    np.testing.assert_array_equal(np.asarray(boxes), np.tile([0, 0, 40, 20], (3, 1)))
    boxes = _boxes(jax.random.key(1), 3, 40, 20, (2.0, 3.0), (0.75, 1.0))
    # 0.5 < 0.75: w = 20, h = round(20 / 0.75) = 27, top = (40 - 27) // 2 = 6.
    np.testing.assert_array_equal(np.asarray(boxes), np.tile([6, 0, 27, 20], (3, 1)))


def _np_blur3(x):
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 1.5**2))
    k = np.outer(g, g) / np.outer(g, g).sum()
    p = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    h, w = x.shape[1:3]
    return sum(k[a, b] * p[:, a : a + h, b : b + w] for a in range(3) for b in range(3))


def test_blur_matches_numpy():
    x = np.random.default_rng(4).normal(size=(2, 9, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(augment.gaussian_blur_3x3(x)), _np_blur3(x), atol=1e-5)


def _aligned_pairs(b=4, h=16, w=16):
    ch0 = np.random.default_rng(5).uniform(-1, 1, size=(b, h, w, 1)).astype(np.float32)
    return np.concatenate([ch0, 2 * ch0 + 1], axis=-1)


def test_contrastive_view_keeps_channels_aligned_and_changes_samples():
    pairs = _aligned_pairs()
    fn = jax.jit(lambda k, x: augment.contrastive_view(k, x, blur_p=0.5))
    for seed in range(6):
        out = np.asarray(fn(jax.random.key(seed), pairs))
        assert out.shape == pairs.shape
        # Every step is an affine combination of pixels (weights sum to 1): ch1 = 2 ch0 + 1 holds.
        np.testing.assert_allclose(out[..., 1], 2 * out[..., 0] + 1, atol=1e-5)
    out = np.asarray(fn(jax.random.key(0), pairs))
    assert not np.allclose(out, pairs)


def test_contrastive_view_is_deterministic_and_independent_across_samples():
    # Four copies of one sample: independent per-sample transforms make the copies differ.
    pairs = np.repeat(_aligned_pairs(b=1), 4, axis=0)
    fn = jax.jit(augment.contrastive_view)
    a = np.asarray(fn(jax.random.key(7), pairs))
    np.testing.assert_array_equal(a, np.asarray(fn(jax.random.key(7), pairs)))
    assert not np.array_equal(a, np.asarray(fn(jax.random.key(8), pairs)))
    assert all(not np.allclose(a[0], a[i]) for i in range(1, 4))


def test_blur_drawn_once_per_batch_with_probability_p():
    # Scale and ratio 1: the crop is the whole image (identity); rows vary, columns don't, so a
    # flip is invisible and only the blur can change the batch.
    rows = np.random.default_rng(6).normal(size=(3, 10, 1, 2)).astype(np.float32)
    pairs = np.broadcast_to(rows, (3, 10, 10, 2)).copy()
    blurred = _np_blur3(pairs)

    def view(k, p):
        return augment.contrastive_view(k, pairs, blur_p=p, scale=(1.0, 1.0), ratio=(1.0, 1.0))

    keys = jax.random.split(jax.random.key(9), 400)
    # blur_p traced: one compile serves all three probabilities.
    fn = jax.jit(jax.vmap(view, in_axes=(0, None)))
    for p, lo, hi in ((0.1, 20, 65), (0.0, 0, 0), (1.0, 400, 400)):
        outs = np.asarray(fn(keys, p))
        same = np.abs(outs - pairs).max(axis=(1, 2, 3, 4)) < 1e-6
        blur = np.abs(outs - blurred).max(axis=(1, 2, 3, 4)) < 1e-5
        assert (same ^ blur).all()  # all samples of a batch share one draw
        assert lo <= blur.sum() <= hi


def _dihedral(x):
    return [np.rot90(f, r, axes=(0, 1)) for f in (x, x[:, ::-1]) for r in range(4)]


def test_flip_rot90_covers_dihedral_group_and_keeps_alignment():
    ch0 = np.arange(25, dtype=np.float32).reshape(5, 5, 1)
    patch = np.concatenate([ch0, 2 * ch0 + 1], axis=-1)
    keys = jax.random.split(jax.random.key(10), 128)
    outs = np.asarray(jax.jit(jax.vmap(augment.flip_rot90, in_axes=(0, None)))(keys, patch))
    candidates = _dihedral(patch)
    seen = set()
    for o in outs:
        idx = [i for i, c in enumerate(candidates) if np.array_equal(o, c)]
        assert len(idx) == 1
        seen.add(idx[0])
        np.testing.assert_array_equal(np.sort(o[..., 0].ravel()), np.sort(ch0.ravel()))
        np.testing.assert_array_equal(o[..., 1], 2 * o[..., 0] + 1)
    assert seen == set(range(8))
    a = augment.flip_rot90(jax.random.key(3), patch)
    np.testing.assert_array_equal(
        np.asarray(a), np.asarray(augment.flip_rot90(jax.random.key(3), patch))
    )


def test_flip_rot90_rejects_non_square():
    with pytest.raises(ValueError):
        augment.flip_rot90(jax.random.key(0), np.zeros((4, 6, 2), np.float32))
