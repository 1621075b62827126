"""Whole-image and tiled prediction: padding, receptive field, blending, tiled == whole."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clidim_jax.data.normalization import Normalization
from clidim_jax.inference import (
    Denoiser,
    Tiling,
    inference_settings,
    pad_to_multiple,
    receptive_field,
    receptive_field_margin,
)
from clidim_jax.models import UNetGenerator


@functools.cache
def random_generator(depth=3, ngf=4, seed=0):
    """A U-Net with random weights (3x the init scale) and random BatchNorm running statistics,
    so that eval-mode BN is a non-trivial affine map and no ReLU path is dead."""
    g = UNetGenerator(depth=depth, ngf=ngf)
    x = jnp.zeros((1, 2**depth, 2**depth, 1))
    variables = jax.jit(lambda k: g.init(k, x, train=False))(jax.random.key(seed))
    params = jax.tree.map(lambda a: 3.0 * np.asarray(a), variables["params"])
    rng = np.random.default_rng(seed)
    stats = jax.tree.map_with_path(
        lambda path, v: (
            rng.uniform(-0.1, 0.1, v.shape).astype(np.float32)
            if "mean" in str(path[-1])
            else rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        ),
        variables["batch_stats"],
    )
    return g, {"params": params, "batch_stats": stats}


def test_pad_to_multiple_reflects():
    img = np.arange(12.0).reshape(3, 4)
    p, (h, w) = pad_to_multiple(img, 4)
    assert p.shape == (4, 4) and (h, w) == (3, 4)
    np.testing.assert_array_equal(p[3], img[1])  # reflect: the row before the last


def test_receptive_field_is_the_exact_dependency_range():
    depth = 3
    g, variables = random_generator(depth)
    left, right = receptive_field(depth)
    n = 64
    x = np.asarray(jax.random.normal(jax.random.key(2), (n, n)))
    rows = range(24, 32)  # every alignment modulo 2**depth
    # perturb each pixel of row o in turn: output (o, o) changes exactly where it depends on it
    batch = np.repeat(x[None], len(rows) * n + 1, 0)
    for r, o in enumerate(rows):
        batch[1 + r * n + np.arange(n), o, np.arange(n)] += 1.0
    y = np.asarray(jax.jit(lambda v, b: g.apply(v, b, train=False))(variables, batch[..., None]))
    seen = []
    for r, o in enumerate(rows):
        changed = y[1 + r * n : 1 + (r + 1) * n, o, o, 0] != y[0, o, o, 0]
        cols = np.nonzero(changed)[0]
        assert cols.min() >= o - left and cols.max() <= o + right
        seen += [o - cols.min(), cols.max() - o]
    assert max(seen) == max(left, right)  # and the bound is reached
    assert receptive_field_margin(depth) == max(left, right)
    # it grows like 2**depth: the reference's 8 levels see over 1000 pixels
    assert receptive_field_margin(8) > 500 > receptive_field_margin(4)


def test_blending_windows_are_a_partition_of_unity():
    tl = Tiling.make(8, 64, 32, 8)
    length = 64 + 3 * (64 - 32)  # four tiles, every overlap exactly 32
    total = np.zeros(length)
    for p in tl.positions(length):
        total[p : p + 64] += tl.window(p, 64, length)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    w = tl.window(32, 64, length)
    assert np.all(w[:8] == 0) and np.all(w[-8:] == 0) and w[32] == 1.0


def test_tile_positions_are_aligned_and_cover():
    tl = Tiling.make(16, 100, 20)  # rounded to tile 96, overlap 32
    assert (tl.tile, tl.overlap, tl.margin) == (96, 32, 8)
    for length in (96, 112, 400, 1024):
        ps = tl.positions(length)
        assert all(p % 16 == 0 for p in ps) and ps[0] == 0
        assert min(length, ps[-1] + 96) == length
        assert all(b - a <= 96 - 32 for a, b in itertools.pairwise(ps))
    with pytest.raises(ValueError, match="smaller than"):
        Tiling.make(16, 8)


def test_tiled_equals_whole_image_when_the_margin_covers_the_receptive_field():
    depth = 3
    g, variables = random_generator(depth)
    norm = Normalization(100.0, 900.0)
    rng = np.random.default_rng(0)
    img = (rng.gamma(2.0, 150.0, size=(203, 150)) + 100).astype(np.float32)
    m = receptive_field_margin(depth)
    overlap = -(-(2 * m + 8) // 8) * 8
    whole = Denoiser(g, variables, norm, 2, tile=512)
    tiled = Denoiser(g, variables, norm, 2, tile=overlap + 32, overlap=overlap, margin=m)
    assert tiled.exact_tiling and not tiled.fits_whole(img.shape)
    a, b = whole(img), tiled(img)
    assert a.shape == b.shape == img.shape and a.dtype == np.float32
    err = np.max(np.abs(a - b)) / (a.max() - a.min())
    assert err < 1e-4, err
    # one compiled program per tile shape: all tiles of this image share one shape
    assert tiled._predict._cache_size() == 1
    # with a margin smaller than the receptive field, tile borders show
    loose = Denoiser(g, variables, norm, 2, tile=overlap + 32, overlap=overlap, margin=0)
    assert not loose.exact_tiling
    assert np.max(np.abs(a - loose(img))) / (a.max() - a.min()) > 1e-3


def test_denoiser_batches_and_per_image_normalisation():
    g, variables = random_generator(3)
    norm = Normalization(0.0, 1000.0)
    rng = np.random.default_rng(1)
    imgs = rng.uniform(0, 1000, size=(3, 20, 28)).astype(np.float32)
    d = Denoiser(g, variables, norm, 2)
    out = d(imgs)
    assert out.shape == imgs.shape
    np.testing.assert_allclose(out[2], d(imgs[2]), rtol=1e-6, atol=1e-3)
    # a per-image normalisation changes the prediction, and maps back to original units
    other = Normalization(0.0, 2000.0)
    out2 = d(imgs, norms=[norm, other, norm])
    np.testing.assert_allclose(out2[0], out[0], rtol=1e-6)
    assert not np.allclose(out2[1], out[1])
    assert other.low <= out2[1].min() and out2[1].max() <= other.high


def test_inference_settings_take_the_given_then_the_stored_then_the_defaults():
    defaults = {"batch_size": 4, "tile": 512, "overlap": None, "tta": False}
    assert inference_settings() == defaults
    assert inference_settings({}, tile=None, overlap=None, batch_size=None, tta=None) == defaults
    stored = {"batch_size": 2, "tile": 256, "tile_overlap": 64, "tta": True}
    assert inference_settings(stored) == {"batch_size": 2, "tile": 256, "overlap": 64, "tta": True}
    given = inference_settings(stored, batch_size=8, tile=128, overlap=32, tta=False)
    assert given == {"batch_size": 8, "tile": 128, "overlap": 32, "tta": False}
    # a stored overlap of 0 (the config's "a quarter tile") is the Tiling default, None
    assert inference_settings({"tile_overlap": 0})["overlap"] is None
