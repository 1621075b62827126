"""Demo/stack loading, the spatial split, normalisation, and deterministic on-device sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from conftest import tiny_config

from clidim_jax.data import DataError, Normalization, load_datasets
from clidim_jax.data.datasets import demo_stack_path
from clidim_jax.data.sampling import epoch_indices, sample_batch


def test_bundled_demo_stack_and_split():
    c = tiny_config()
    train, test = load_datasets(c.data)
    stack = tifffile.imread(demo_stack_path())
    assert stack.shape == (20, 256, 256) and stack.dtype == np.uint16
    gt = stack.astype(np.float64).mean(0)
    assert train.noisy.dtype == np.uint16 and len(train) == len(test) == 20
    assert train.shape == test.shape == (256, 128)
    for i in (0, 7, 19):
        a, b = train.pair(i)
        np.testing.assert_array_equal(a, stack[i, :, 128:])
        np.testing.assert_allclose(b, gt[:, 128:], rtol=1e-6)
        a, b = test.pair(i)
        np.testing.assert_array_equal(a, stack[i, :, :128])
        np.testing.assert_allclose(b, gt[:, :128], rtol=1e-6)
    # On the device: only the training columns, in the stored dtype, one clean image.
    d = train.device_data()
    np.testing.assert_array_equal(d["noisy"], stack[:, :, 128:])
    assert d["noisy"].dtype == np.uint16 and d["clean"].shape == (1, 256, 128)
    assert (d["views"][:, 2:] == [0, 0, 256, 128]).all() and "order" not in d


def test_stack_source_and_errors(tmp_path):
    c = tiny_config()
    c.data.source = "stack"
    c.data.path = str(tmp_path / "missing.tif")
    with pytest.raises(DataError, match="not found"):
        load_datasets(c.data)
    one = tmp_path / "one.tif"
    tifffile.imwrite(one, np.zeros((64, 64), np.uint16))
    c.data.path = str(one)
    with pytest.raises(DataError, match="at least 2 frames"):
        load_datasets(c.data)
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros((3, 16, 16), np.uint16))
    c.data.path = str(small)
    with pytest.raises(DataError, match=r"smaller than data\.patch_size"):
        load_datasets(c.data)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"this is not a tiff")
    c.data.path = str(bad)
    with pytest.raises(DataError, match="not a readable TIFF"):
        load_datasets(c.data)
    nan = tmp_path / "nan.tif"
    arr = np.ones((3, 64, 64), np.float32)
    arr[1, 2, 3] = np.nan
    tifffile.imwrite(nan, arr)
    c.data.path = str(nan)
    with pytest.raises(DataError, match="NaN"):
        load_datasets(c.data)


def test_normalization_roundtrip_and_percentiles():
    x = np.arange(1001, dtype=np.float64)
    n = Normalization.from_images(x, (0.0, 100.0))
    assert (n.low, n.high) == (0.0, 1000.0)
    np.testing.assert_allclose(n.apply(np.array([0.0, 500.0, 1000.0])), [-1, 0, 1])
    np.testing.assert_allclose(n.invert(n.apply(x)), x, rtol=0, atol=1e-9)
    assert Normalization.from_dict({"low": 1, "high": 2}) == Normalization(1.0, 2.0)


def test_epoch_indices_visit_every_image_once_per_epoch():
    key = jax.random.key(3)
    seen = np.concatenate([np.asarray(epoch_indices(key, jnp.int32(s), 10, 5)) for s in range(2)])
    assert sorted(seen) == list(range(10))
    nxt = np.concatenate([np.asarray(epoch_indices(key, jnp.int32(s), 10, 5)) for s in (2, 3)])
    assert sorted(nxt) == list(range(10)) and not np.array_equal(seen, nxt)


def test_sampling_is_a_function_of_key_and_step_and_keeps_pairs_aligned():
    rng = np.random.default_rng(0)
    noisy = jnp.asarray(rng.integers(0, 60000, (4, 40, 48)), jnp.uint16)
    # Clean images stored in reverse order, so the view's clean plane must be honoured: clean[3-i]
    # pairs with noisy[i] through the exact relation clean = 0.5 * noisy + 7.
    clean = (noisy.astype(jnp.float32) * 0.5 + 7.0)[::-1]
    views = jnp.array([(i, 3 - i, 0, 0, 40, 48) for i in range(4)], jnp.int32)
    kw = dict(batch_size=6, patch_size=16, augment=True)
    key = jax.random.key(0)
    fn = jax.jit(lambda k, s: sample_batch(k, s, noisy, clean, views, **kw))
    a1, b1 = fn(key, jnp.int32(5))
    a2, b2 = fn(key, jnp.int32(5))
    a3, _ = fn(key, jnp.int32(6))
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert not np.array_equal(a1, a3)
    assert a1.shape == (6, 16, 16, 1) and a1.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b1), np.asarray(a1) * 0.5 + 7.0, rtol=1e-6)


def test_crops_stay_inside_views_of_different_sizes():
    """Each stored pixel encodes its own (plane, y, x); every crop must come from inside its
    view (a region of a plane), and every view must be drawn from."""
    p_, h, w = 3, 40, 50
    pp, yy, xx = np.meshgrid(np.arange(p_), np.arange(h), np.arange(w), indexing="ij")
    noisy = jnp.asarray(pp * 10000 + yy * 100 + xx, jnp.float32)
    clean = noisy + 0.5
    views = np.array([(0, 0, 0, 0, 40, 20), (1, 1, 5, 20, 16, 30), (2, 2, 10, 3, 30, 16)], np.int32)
    kw = dict(batch_size=8, patch_size=16, augment=False)
    fn = jax.jit(lambda k, s: sample_batch(k, s, noisy, clean, jnp.asarray(views), **kw))
    seen = set()
    for s in range(12):
        a, b = (np.asarray(t)[..., 0] for t in fn(jax.random.key(1), jnp.int32(s)))
        np.testing.assert_array_equal(b, a + 0.5)
        for crop in a:
            plane, y, x = (
                int(crop[0, 0]) // 10000,
                int(crop[0, 0]) % 10000 // 100,
                int(crop[0, 0]) % 100,
            )
            v = views[plane]
            assert v[2] <= y <= v[2] + v[4] - 16 and v[3] <= x <= v[3] + v[5] - 16
            np.testing.assert_array_equal(crop, noisy[plane, y : y + 16, x : x + 16])
            seen.add(plane)
    assert seen == {0, 1, 2}
