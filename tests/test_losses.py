"""Loss terms against direct NumPy float64 implementations and analytic cases.

Border convention throughout: 'reflect' without edge repeat (d c b | a b c d | c b a), which is
NumPy's np.pad(mode='reflect') and torch/kornia's 'reflect'.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clidim_jax import losses


def _np_gauss(window: int, sigma: float) -> np.ndarray:
    x = np.arange(window, dtype=np.float64) - window // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _np_filter2d(img: np.ndarray, kernel2d: np.ndarray) -> np.ndarray:
    """Correlate each (n, c) plane of NHWC `img` with a 2-D kernel: reflect borders, plain sum."""
    k = kernel2d.shape[0]
    p = k // 2
    padded = np.pad(img, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    h, w = img.shape[1:3]
    out = np.zeros_like(img, dtype=np.float64)
    for a in range(k):
        for b in range(k):
            out += kernel2d[a, b] * padded[:, a : a + h, b : b + w, :]
    return out


def _np_ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    g = _np_gauss(5, 1.5)
    k2 = np.outer(g, g)
    c1, c2 = 0.01**2, 0.03**2
    mx, my = _np_filter2d(x, k2), _np_filter2d(y, k2)
    sxx = _np_filter2d(x * x, k2) - mx**2
    syy = _np_filter2d(y * y, k2) - my**2
    sxy = _np_filter2d(x * y, k2) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx**2 + my**2 + c1) * (sxx + syy + c2)
    return num / (den + 1e-12)


def _np_ssim_loss(pred: np.ndarray, target: np.ndarray) -> float:
    s = _np_ssim_map((pred + 1) / 2, (target + 1) / 2)
    return float(np.clip((1 - s) / 2, 0, 1).mean())


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    target = np.tanh(rng.normal(0, 0.7, size=(3, 17, 13, 2)))
    pred = np.clip(target + rng.normal(0, 0.3, size=target.shape), -1, 1)
    return pred.astype(np.float32), target.astype(np.float32)


def test_ssim_loss_matches_numpy(images):
    pred, target = images
    got = float(jax.jit(losses.ssim_loss)(pred, target))
    ref = _np_ssim_loss(pred.astype(np.float64), target.astype(np.float64))
    assert got == pytest.approx(ref, abs=1e-5)


def test_ssim_map_matches_numpy_per_pixel(images):
    pred, target = images
    x, y = (pred + 1) / 2, (target + 1) / 2
    got = np.asarray(losses.ssim_map(x, y))
    assert got.shape == x.shape
    np.testing.assert_allclose(
        got, _np_ssim_map(x.astype(np.float64), y.astype(np.float64)), atol=1e-4
    )


def test_ssim_identical_is_one(images):
    _, target = images
    assert float(losses.ssim_loss(target, target)) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(losses.ssim_map((target + 1) / 2, (target + 1) / 2), 1.0, atol=1e-4)


def test_ssim_constant_images_analytic():
    # Constant images: zero variances, so SSIM = (2ab + C1) C2 / ((a^2 + b^2 + C1) C2 + 1e-12).
    a, b = 0.2, 0.7  # in [0, 1]
    c1, c2 = 0.01**2, 0.03**2
    ssim = (2 * a * b + c1) * c2 / ((a * a + b * b + c1) * c2 + 1e-12)
    pred = np.full((2, 8, 8, 1), 2 * a - 1, np.float32)
    target = np.full((2, 8, 8, 1), 2 * b - 1, np.float32)
    # float32: the variances E[x^2] - mu^2 of a constant image cancel only to rounding noise of
    # order a^2 * 2^-23 (the Gaussian taps sum to 1 up to rounding), which dividing by
    # C2 = 9e-4 turns into a few 1e-5 of the loss, depending on the order of the filter's sum.
    assert float(losses.ssim_loss(pred, target)) == pytest.approx((1 - ssim) / 2, abs=5e-5)


def _jnp_filter2d_reference(x: jax.Array, taps: jax.Array) -> jax.Array:
    """The k x k outer-product filter as a plain jnp sum of k^2 shifted slices (autodiff grads)."""
    k = taps.shape[0]
    lo, hi = (k - 1) // 2, k // 2
    xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)), mode="reflect")
    h, w = x.shape[1:3]
    return sum(taps[a] * taps[b] * xp[:, a : a + h, b : b + w] for a in range(k) for b in range(k))


@pytest.mark.parametrize("window, shape", [(5, (2, 9, 7, 3)), (3, (1, 6, 8, 2)), (4, (1, 7, 5, 1))])
def test_separable_filter_value_and_gradients_match_direct_sum(window, shape):
    # The filter's gradient is a hand-written adjoint (custom VJP): check it, for the input and
    # the taps, against autodiff of the direct k^2-term sum, including the reflect borders.
    rng = np.random.default_rng(window)
    x, cot = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
    taps = jnp.asarray(rng.uniform(0.1, 1.0, window), jnp.float32)  # not symmetric
    ours, vjp = jax.vjp(losses.separable_depthwise_filter, x, taps)
    ref, vjp_ref = jax.vjp(_jnp_filter2d_reference, x, taps)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(cot), vjp_ref(cot), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_ssim_gradient_is_finite(images):
    pred, target = images
    g = jax.grad(losses.ssim_loss)(jnp.asarray(pred), jnp.asarray(target))
    assert np.isfinite(np.asarray(g)).all()


def test_tv_matches_numpy(images):
    pred, _ = images
    p = pred.astype(np.float64)
    ref = (
        np.abs(np.diff(p, axis=1)).sum(axis=(1, 2, 3))
        + np.abs(np.diff(p, axis=2)).sum(axis=(1, 2, 3))
    ).mean()
    assert float(losses.tv_loss(pred)) == pytest.approx(ref, rel=1e-5)


def test_tv_step_edge_analytic():
    # A vertical step of height s: each of the H rows crosses it once; no vertical differences.
    n, h, w, c, s = 2, 6, 9, 3, 0.75
    img = np.zeros((n, h, w, c), np.float32)
    img[:, :, 4:, :] = s
    assert float(losses.tv_loss(img)) == pytest.approx(s * h * c, rel=1e-6)


def _np_infonce(q: np.ndarray, k: np.ndarray, tau: float) -> float:
    logits = q @ k.T
    logits = (logits - logits.max(axis=1, keepdims=True)) / tau
    m = logits.max(axis=1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    return float(-np.mean(np.diag(logp)))


def _np_ntxent(q: np.ndarray, k: np.ndarray, tau: float) -> float:
    n = q.shape[0]
    z = np.concatenate([q, k])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = np.array([z[i] @ z[j] / tau for j in range(2 * n) if j != i])
        total += -(z[i] @ z[pos] / tau) + np.log(np.exp(sims).sum())
    return total / (2 * n)


@pytest.fixture
def features():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(6, 16))
    k = q + 0.5 * rng.normal(size=q.shape)
    return q.astype(np.float32), k.astype(np.float32)


def test_infonce_matches_numpy(features):
    q, k = features
    for tau in (0.1, 1.0):
        ref = _np_infonce(q.astype(np.float64), k.astype(np.float64), tau)
        assert float(losses.infonce_loss(q, k, tau)) == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_infonce_analytic_cases():
    n = 5
    onehot = 10.0 * np.eye(n, dtype=np.float32)
    # Diagonal logit 100, others 0: after /tau the negatives are e^-1000 away, loss ~ 0.
    assert float(losses.infonce_loss(onehot, onehot)) == pytest.approx(0.0, abs=1e-6)
    same = np.ones((n, 4), np.float32)
    assert float(losses.infonce_loss(same, same)) == pytest.approx(np.log(n), rel=1e-6)


def test_infonce_large_logits_are_stable():
    q = 1e3 * np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
    val, g = jax.value_and_grad(losses.infonce_loss)(jnp.asarray(q), jnp.asarray(q))
    assert np.isfinite(float(val)) and np.isfinite(np.asarray(g)).all()


def test_ntxent_matches_numpy(features):
    q, k = features
    for tau in (0.1, 0.5):
        ref = _np_ntxent(q.astype(np.float64), k.astype(np.float64), tau)
        assert float(losses.ntxent_loss(q, k, tau)) == pytest.approx(ref, rel=1e-4)


def test_ntxent_is_scale_invariant_and_symmetric(features):
    q, k = features
    a = float(losses.ntxent_loss(q, k))
    assert float(losses.ntxent_loss(3 * q, 0.5 * k)) == pytest.approx(a, rel=1e-5)
    assert float(losses.ntxent_loss(k, q)) == pytest.approx(a, rel=1e-5)
    g = jax.grad(losses.ntxent_loss)(jnp.asarray(q), jnp.asarray(k))
    assert np.isfinite(np.asarray(g)).all()


def _np_bce(logits: np.ndarray, label: float) -> float:
    p = 1 / (1 + np.exp(-logits))
    return float(np.mean(-(label * np.log(p) + (1 - label) * np.log(1 - p))))


def test_gan_losses_match_numpy():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(2, 5, 5, 1)).astype(np.float32)
    fake = rng.normal(size=(2, 5, 5, 1)).astype(np.float32)
    r64, f64 = real.astype(np.float64), fake.astype(np.float64)
    assert float(losses.gan_loss_g(fake)) == pytest.approx(_np_bce(f64, 1.0), rel=1e-5)
    ref_d = 0.5 * (_np_bce(r64, 1.0) + _np_bce(f64, 0.0))
    assert float(losses.gan_loss_d(real, fake)) == pytest.approx(ref_d, rel=1e-5)
    # Stable for extreme logits (a naive log(sigmoid) gives inf here).
    assert float(losses.gan_loss_g(np.full((3,), 200.0, np.float32))) == pytest.approx(0.0)
    assert float(losses.gan_loss_g(np.full((3,), -200.0, np.float32))) == pytest.approx(200.0)


def test_l1_matches_numpy(images):
    pred, target = images
    ref = np.abs(pred.astype(np.float64) - target).mean()
    assert float(losses.l1_loss(pred, target)) == pytest.approx(ref, rel=1e-6)


def test_losses_vmap_over_groups(images):
    # vmap-friendliness: a vmapped loss equals the loss of each slice.
    pred, target = images
    batched = jax.vmap(losses.ssim_loss)(pred[:, None], target[:, None])
    for i in range(pred.shape[0]):
        assert float(batched[i]) == pytest.approx(
            float(losses.ssim_loss(pred[i : i + 1], target[i : i + 1])), abs=1e-6
        )
