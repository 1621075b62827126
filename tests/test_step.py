"""The fused train step: compiles once, never retraces, learns, and switches terms by weight."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from clidim_jax.data.normalization import Normalization
from clidim_jax.state import build_networks, init_state, linear_policy
from clidim_jax.step import make_train_step, normalize_batch


def _one_pair_batch(batch_size=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    clean = 0.6 * np.sin(6 * xx) * np.cos(4 * yy)
    noisy = clean + 0.3 * rng.standard_normal(clean.shape)
    tile = lambda a: jnp.asarray(np.repeat(a[None, :, :, None], batch_size, 0), jnp.float32)
    return {"noisy": tile(np.clip(noisy, -1, 1)), "clean": tile(clean)}


def _setup(variant="cl_tv_ssim", **overrides):
    c = tiny_config(variant)
    for k, v in overrides.items():
        sect, field = k.split(".")
        c[sect][field] = v
    nets = build_networks(c)
    state = jax.jit(functools.partial(init_state, nets))(jax.random.key(0))
    return c, nets, state


def _adam_counts(opt_state) -> list[int]:
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "count"))
    return [int(x.count) for x in leaves if hasattr(x, "count")]


@pytest.fixture(scope="module")
def full_run():
    """4 steps of the full method (CL + TV + SSIM) through a jitted step that counts its
    traces; the Adam step counts and the contrastive head before and after the first step."""
    c, nets, state = _setup()
    traces = []
    raw = make_train_step(c, nets, steps_per_epoch=2)

    def counted(state, batch, key):
        traces.append(1)
        return raw(state, batch, key)

    step = jax.jit(counted, donate_argnums=(0,))
    batch, key = _one_pair_batch(), jax.random.key(1)
    head0 = jax.tree.map(np.asarray, state.head_params)
    first = None
    for _ in range(4):
        state, metrics = step(state, batch, key)
        if first is None:
            first = {
                "d_counts": _adam_counts(state.d_opt_state),
                "g_counts": _adam_counts(state.g_opt_state),
                "head": jax.tree.map(np.asarray, state.head_params),
            }
    jax.block_until_ready(state)
    return {"traces": traces, "step": step, "state": state, "metrics": metrics, "head0": head0,
            "first": first}  # fmt: skip


@pytest.mark.slow
def test_step_compiles_once_and_is_not_retraced(full_run):
    assert len(full_run["traces"]) == 1
    assert full_run["step"]._cache_size() == 1
    assert int(full_run["state"].step) == 4
    metrics = full_run["metrics"]
    for name in ("g_gan", "g_l1", "g_ssim", "g_tv", "d_gan", "d_contrastive", "g_total", "lr"):
        assert name in metrics and np.isfinite(float(metrics[name])), name


@pytest.fixture(scope="module")
def baseline_run():
    """40 steps of pix2pix (GAN + L1) on one pair at a constant learning rate: the BatchNorm
    statistics before and after the first step, and the L1 loss of every step."""
    c, nets, state = _setup("baseline")
    c.train.n_epochs, c.train.n_epochs_decay = 1000, 0  # constant lr
    step = jax.jit(make_train_step(c, nets, steps_per_epoch=1), donate_argnums=(0,))
    batch, key = _one_pair_batch(), jax.random.key(2)
    stats = lambda s: jax.tree.map(np.asarray, (s.d_batch_stats, s.g_batch_stats))
    before = stats(state)
    l1 = []
    for i in range(40):
        state, m = step(state, batch, key)
        l1.append(float(m["g_l1"]))
        if i == 0:
            after_one = stats(state)
    return {"l1": l1, "stats_before": before, "stats_after_one_step": after_one}


@pytest.mark.slow
def test_few_dozen_steps_reduce_l1_on_one_pair(baseline_run):
    l1 = baseline_run["l1"]
    assert np.mean(l1[-5:]) < 0.5 * np.mean(l1[:3]), l1


@pytest.mark.parametrize(
    "variant,present,absent",
    [
        ("baseline", {"g_gan", "g_l1", "d_gan"}, {"g_ssim", "g_tv", "d_contrastive"}),
        ("tv", {"g_tv"}, {"g_ssim", "d_contrastive"}),
        ("ssim", {"g_ssim"}, {"g_tv", "d_contrastive"}),
        ("cl", {"d_contrastive"}, {"g_ssim", "g_tv"}),
    ],
)
def test_terms_switch_on_by_weight(variant, present, absent):
    c, nets, state = _setup(variant)
    # Tracing alone shows which terms the program computes (no compilation needed).
    _, m = jax.eval_shape(make_train_step(c, nets, 2), state, _one_pair_batch(), jax.random.key(0))
    assert present <= set(m) and not (absent & set(m))


@pytest.mark.slow
def test_contrastive_step_advances_d_adam_twice_and_head_frozen_by_default(full_run):
    first = full_run["first"]  # after one step of the full method (the contrastive D step on)
    assert first["d_counts"] == [2]
    assert first["g_counts"] == [1]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(full_run["head0"]), jax.tree.leaves(first["head"]))
    )


@pytest.mark.slow
def test_trainable_head_option_updates_head():
    c, nets, state = _setup("cl", **{"loss.head_trainable": True})
    head0 = jax.tree.map(np.asarray, state.head_params)
    new, _ = jax.jit(make_train_step(c, nets, 2))(state, _one_pair_batch(), jax.random.key(0))
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(head0), jax.tree.leaves(new.head_params))
    )


@pytest.mark.slow
def test_generator_step_uses_updated_discriminator_and_updates_bn_stats(baseline_run):
    # D's and G's BatchNorm statistics both move in one step.
    for old, cur in zip(baseline_run["stats_before"], baseline_run["stats_after_one_step"]):
        assert any(
            not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(cur))
        )


def test_linear_policy_matches_pix2pix_rule():
    sched = linear_policy(2e-4, n_epochs=3, n_epochs_decay=2, steps_per_epoch=4)
    # 1-based epoch e: lr * (1 - max(0, e - 3) / 3)
    expected = {0: 1.0, 11: 1.0, 12: 2 / 3, 15: 2 / 3, 16: 1 / 3, 19: 1 / 3}
    for step, f in expected.items():
        np.testing.assert_allclose(float(sched(step)), 2e-4 * f, rtol=1e-6)


def test_reference_normalization_is_batch_min_max_of_noisy_and_clean():
    noisy = jnp.array([[10.0, 20.0]]).reshape(1, 1, 2, 1)
    clean = jnp.array([[15.0, 30.0]]).reshape(1, 1, 2, 1)
    b = normalize_batch(noisy, clean, Normalization(0.0, 1.0, "reference"))
    np.testing.assert_allclose(np.ravel(b["noisy"]), [-1.0, 0.0])
    np.testing.assert_allclose(np.ravel(b["clean"]), [-0.5, 1.0])
    b = normalize_batch(noisy, clean, Normalization(10.0, 30.0, "percentile"))
    np.testing.assert_allclose(np.ravel(b["clean"]), [-0.5, 1.0])


# --------------------------------------------------------------------------- gradient clipping


def _direct_g_grads(nets, state, batch, l2):
    """The generator's gradient of l2 * MSE, straight from `jax.grad` of the model (no dropout),
    as the step should compute it through its VJP."""

    def loss(p):
        out, _ = nets.generator.apply(
            {"params": p, "batch_stats": state.g_batch_stats}, batch["noisy"], train=True,
            mutable=["batch_stats"],
        )  # fmt: skip
        return l2 * jnp.mean((out.astype(jnp.float32) - batch["clean"]) ** 2)

    return jax.grad(loss)(state.g_params)


def _norm64(tree) -> float:
    leaves = jax.tree.leaves(tree)
    return float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in leaves)))


def _pixel_setup(clip):
    overrides = {"loss.l1": 0.0, "loss.l2": 100.0, "model.dropout": False, "model.norm": "none"}
    return _setup("pixel", **overrides, **{"train.clip_grad_norm": clip})


def test_g_grad_norm_is_the_generators_gradient_norm():
    c, nets, state = _pixel_setup(0.0)
    batch = _one_pair_batch()
    want = _norm64(_direct_g_grads(nets, state, batch, 100.0))
    _, m = jax.jit(make_train_step(c, nets, 2))(state, batch, jax.random.key(0))
    assert want > 0
    np.testing.assert_allclose(float(m["g_grad_norm"]), want, rtol=1e-4)


def _nu(opt_state):
    return [np.asarray(x) for x in jax.tree.leaves(opt_state.nu)]


def test_clipping_bounds_the_update_of_one_outlying_batch():
    """Three ordinary steps, then a batch whose targets are far off (a loss spike). Unclipped,
    the spike's gradient multiplies Adam's second moment by orders of magnitude (which then
    damps every later update for thousands of steps). With train.clip_grad_norm at twice the
    ordinary norms, the ordinary steps are untouched, and the spike's gradient enters Adam
    rescaled to the bound (checked against Adam applied by hand to the rescaled direct
    gradient), leaving the second moment about where it was."""
    batch = _one_pair_batch()
    spike = {"noisy": batch["noisy"], "clean": batch["clean"] + 20.0}
    batches = [batch] * 3 + [spike]

    def run(clip):
        c, nets, state = _pixel_setup(clip)
        step = jax.jit(make_train_step(c, nets, 2))
        states, norms = [state], []
        for i, b in enumerate(batches):
            state, m = step(state, b, jax.random.key(i))
            states.append(state)
            norms.append(float(m["g_grad_norm"]))
        return c, nets, states, norms

    _, _, plain, norms = run(0.0)
    bound = 2.0 * max(norms[:3])
    assert norms[3] > 100 * bound  # the spike
    c, nets, clipped, _ = run(bound)
    for a, b in zip(jax.tree.leaves(clipped[3].g_params), jax.tree.leaves(plain[3].g_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    before, after = clipped[3], clipped[4]
    g = _direct_g_grads(nets, before, spike, 100.0)
    g = jax.tree.map(lambda t: t * (bound / _norm64(g)), g)
    upd, _ = nets.g_tx.update(g, before.g_opt_state, before.g_params)
    lr = float(linear_policy(c.train.lr, c.train.n_epochs, c.train.n_epochs_decay, 2)(3))
    want = jax.tree.map(lambda p, u: p - lr * u, before.g_params, upd)
    for a, b in zip(jax.tree.leaves(after.g_params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    grow = lambda s0, s1: sum(map(np.sum, _nu(s1))) / sum(map(np.sum, _nu(s0)))
    assert grow(plain[3].g_opt_state, plain[4].g_opt_state) > 1e3
    assert grow(before.g_opt_state, after.g_opt_state) < 10
