"""The features the quality work added: unbounded outputs, residual bases, the variance-stabilising
transform and its noise model, test-time augmentation, and checkpoint selection by validation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from clidim_jax import run as run_lib
from clidim_jax import train as train_lib
from clidim_jax.checkpointing import Checkpoints
from clidim_jax.config_lib import ConfigError, validate
from clidim_jax.data.normalization import NoiseModel, Normalization, fit_noise_model
from clidim_jax.inference import DIHEDRAL, Denoiser, dihedral, dihedral_inverse
from clidim_jax.models.unet import UNetGenerator, gaussian_blur

# ------------------------------------------------------------------ variance-stabilising transform


def test_gat_on_analytic_values():
    # gain 2, offset 1: GAT(x) = 2/2 * sqrt(2 x + 3/8 * 4 + 1) = sqrt(2 x + 2.5)
    m = NoiseModel(gain=2.0, offset=1.0)
    x = np.array([0.0, 1.0, 11.25, 48.75])
    np.testing.assert_allclose(m.gat(x), [np.sqrt(2.5), np.sqrt(4.5), 5.0, 10.0], rtol=1e-12)
    # Pure Poisson (gain 1, offset 0) is Anscombe's transform 2 sqrt(x + 3/8).
    a = NoiseModel(1.0, 0.0)
    np.testing.assert_allclose(a.gat(x), 2 * np.sqrt(x + 0.375), rtol=1e-12)


def test_gat_inverse_inverts_exactly_and_clamps_below_zero():
    m = NoiseModel(gain=0.7, offset=-2.0)
    x = np.linspace(5.0, 500.0, 50)
    np.testing.assert_allclose(m.gat_inverse(m.gat(x)), x, rtol=1e-10)
    lowest = m.gat_inverse(np.array([-3.0, 0.0]))
    assert lowest[0] == lowest[1]  # negative transformed values count as 0


def test_gat_stabilises_poisson_gaussian_noise():
    rng = np.random.default_rng(0)
    gain, read = 3.0, 4.0
    for clean in (50.0, 500.0):  # (below ~10 photons no transform stabilises exactly)
        noisy = gain * rng.poisson(clean / gain, 200_000) + rng.normal(0, read, 200_000)
        m = NoiseModel(gain, read**2)
        assert abs(np.var(m.gat(noisy)) - 1.0) < 0.06, clean


def test_fit_noise_model_recovers_gain_and_offset():
    rng = np.random.default_rng(1)
    gain, read2, dark = 2.5, 9.0, 10.0
    clean = rng.uniform(20, 400, (128, 128))
    noisy = [
        gain * rng.poisson((clean - dark) / gain) + dark + rng.normal(0, 3.0, clean.shape)
        for _ in range(8)
    ]
    m = fit_noise_model([(n, clean) for n in noisy])
    assert m.gain == pytest.approx(gain, rel=0.05)
    # Var = gain * (clean - dark) + read^2 = gain * clean + (read^2 - gain * dark): the fitted
    # line gives the variance across the data's range within a few per cent.
    for x in (50.0, 150.0, 350.0):
        truth = gain * x + read2 - gain * dark
        assert m.gain * x + m.offset == pytest.approx(truth, rel=0.04), x


def test_fit_noise_model_refuses_signal_independent_noise():
    rng = np.random.default_rng(2)
    clean = rng.uniform(0, 100, (64, 64))
    noise = rng.normal(0, 1, clean.shape) * (12 - clean / 10)  # shrinks as the signal grows
    with pytest.raises(ValueError, match="does not grow with the signal"):
        fit_noise_model([(clean + noise, clean)])


def test_normalization_with_a_noise_model_round_trips_and_serialises():
    n = Normalization(1.0, 20.0, "percentile", NoiseModel(1.5, 0.5))
    x = np.linspace(0.0, 300.0, 31)
    np.testing.assert_allclose(n.invert(n.apply(x)), x, rtol=1e-9, atol=1e-9)
    again = Normalization.from_dict(json.loads(n.to_json()))
    assert again == n
    # Works on JAX arrays inside jit too.
    y = jax.jit(n.apply)(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(y), n.apply(x), rtol=1e-5, atol=1e-5)
    # Old model files (no noise model) still load.
    assert Normalization.from_dict({"low": 0, "high": 1}).noise is None


# ------------------------------------------------------------------------ the generator's output


def test_gaussian_blur_equals_scipy_mirror_filter():
    x = np.random.default_rng(3).random((2, 24, 40, 1)).astype(np.float32)
    y = np.asarray(gaussian_blur(jnp.asarray(x), 1.3))
    for i in range(2):
        ref = ndimage.gaussian_filter(x[i, ..., 0].astype(np.float64), 1.3, mode="mirror",
                                      truncate=3.0)  # fmt: skip
        np.testing.assert_allclose(y[i, ..., 0], ref, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("residual", ["input", "smooth"])
def test_residual_generator_adds_its_base_to_the_network(residual):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 16, 16, 1)), jnp.float32)
    g = UNetGenerator(depth=3, ngf=4, output="linear", residual=residual, residual_sigma=1.2)
    v = g.init(jax.random.key(0), x, train=False)
    # The residual G starts as its base (last layer zero): give every weight a random value.
    leaves, tree = jax.tree.flatten(v)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    v = jax.tree.unflatten(
        tree, [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    )
    assert np.abs(np.asarray(g.apply(v, x, train=False)) - np.asarray(x)).max() > 1e-2
    plain = UNetGenerator(depth=3, ngf=4, output="linear", residual="none")
    base = x if residual == "input" else gaussian_blur(x, 1.2)
    np.testing.assert_allclose(
        g.apply(v, x, train=False), plain.apply(v, x, train=False) + base, atol=1e-6
    )


def test_an_untrained_residual_generator_is_its_base():
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 16, 16, 1)), jnp.float32)
    g = UNetGenerator(depth=3, ngf=4, output="linear", residual="smooth", residual_sigma=1.0)
    v = g.init(jax.random.key(0), x, train=False)
    np.testing.assert_allclose(g.apply(v, x, train=False), gaussian_blur(x, 1.0), atol=1e-6)


def test_linear_output_is_unbounded_and_tanh_is_not():
    x = jnp.full((1, 16, 16, 1), 5.0, jnp.float32)
    for output, bounded in (("tanh", True), ("linear", False)):
        g = UNetGenerator(depth=3, ngf=4, output=output)
        v = g.init(jax.random.key(0), x, train=False)
        v = jax.tree.map(lambda a: a * 40.0, v)  # large weights: large pre-activations
        y = np.asarray(g.apply(v, x, train=False))
        assert (np.abs(y).max() <= 1.0) == bounded


@pytest.mark.slow
def test_bright_clean_targets_are_reproduced_without_clipping(tmp_path, tiny):
    """A synthetic pair whose clean image reaches 1.5x the noisy 99.9th percentile: the own-data
    recipe's normalisation and output layer represent it, and a briefly trained model predicts
    intensities above that percentile (a tanh generator on the noisy percentiles cannot)."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:64, :64]
    clean = 10 + 200 * np.exp(-((yy - 32) ** 2 + (xx - 20) ** 2) / 60.0)
    noisy = np.clip(clean + rng.normal(0, 8, (12, 64, 64)), 0, None)
    noisy = np.minimum(noisy, np.percentile(noisy, 99.0))  # the noisy frames saturate earlier
    p999 = np.percentile(noisy, 99.9)
    clean = clean * (1.5 * p999 / clean.max())
    assert clean.max() >= 1.5 * p999 - 1e-6
    tifffile.imwrite(tmp_path / "noisy.tif", noisy.astype(np.float32))
    tifffile.imwrite(tmp_path / "clean.tif", clean.astype(np.float32))
    from clidim_jax.configs import own_data

    c = own_data.get_config("tiny")
    c.data.source = "paired"
    c.data.noisy_path = str(tmp_path / "noisy.tif")
    c.data.clean_path = str(tmp_path / "clean.tif")
    c.data.test_noisy_path = str(tmp_path / "noisy.tif")
    c.data.test_clean_path = str(tmp_path / "clean.tif")
    # Measured pairs only: what must be learnt is the saturated frames' brighter targets
    # (synthetic inputs drawn from the clean image would not saturate).
    c.data.synthetic = 0.0
    c.train.n_epochs, c.train.n_epochs_decay, c.train.steps_per_epoch = 12, 4, 5  # 80 steps
    c.train.lr = 2e-3
    run = train_lib.train(c, str(tmp_path / "run"))
    norm = run.norm
    # Every clean intensity maps inside the generator's range and back exactly.
    np.testing.assert_allclose(norm.invert(norm.apply(clean)), clean, rtol=1e-6)
    den = Denoiser(run.nets.generator, run_lib.local_generator_variables(run.state), norm)
    pred = den(noisy[:2])
    assert pred.max() > 1.2 * p999, (pred.max(), p999)
    # The pix2pix setting (tanh on the noisy percentiles) is bounded by that percentile.
    tanh_norm = Normalization.from_images([noisy], (0.1, 99.9))
    assert tanh_norm.invert(1.0) <= 1.0001 * p999


# ------------------------------------------------------------------- test-time augmentation


class _ShiftNet:
    """A deliberately non-symmetric 'generator': each output pixel is a weighted sum of its
    right and lower neighbours, so every flip and turn gives a different prediction."""

    depth = 2

    def apply(self, variables, x, train=False):
        return x + 0.5 * jnp.roll(x, -1, axis=2) + 0.25 * jnp.roll(x, -2, axis=1) ** 2


@pytest.mark.parametrize("shape", [(2, 16, 16), (3, 8, 20)])
def test_tta_is_the_mean_of_the_eight_transformed_predictions(shape):
    x = np.random.default_rng(6).random(shape).astype(np.float32)
    norm = Normalization(0.0, 2.0)
    plain = Denoiser(_ShiftNet(), None, norm, batch_size=4)
    tta = Denoiser(_ShiftNet(), None, norm, batch_size=4, tta=True)
    expected = np.mean(
        [dihedral_inverse(plain(np.ascontiguousarray(dihedral(x, k, m))), k, m)
         for k, m in DIHEDRAL],
        axis=0,
    )  # fmt: skip
    got = tta(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(got - plain(x)).max() > 1e-2  # the augmentation changes the prediction
    assert len(set(DIHEDRAL)) == 8


def test_dihedral_inverse_undoes_every_transform():
    x = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    for k, m in DIHEDRAL:
        np.testing.assert_array_equal(dihedral_inverse(dihedral(x, k, m), k, m), x)


# ------------------------------------------------------------ checkpoint selection by validation


@pytest.mark.slow
def test_evaluate_denoise_and_export_use_the_best_validated_checkpoint(tmp_path, tiny):
    c = tiny("pixel")
    c.data.val_fraction = 0.25
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 1
    c.train.n_epochs, c.train.n_epochs_decay = 3, 2  # 10 steps, validated at 2, 4, ..., 10
    wd = str(tmp_path / "run")
    train_lib.train(c, wd)
    scores = {}
    with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "val/psnr" in row:
                scores[row["step"]] = row["val/psnr"]
    assert sorted(scores) == [2, 4, 6, 8, 10]
    best = max(scores, key=lambda s: (scores[s], s))
    restored = run_lib.restore_run(wd)
    assert restored.step == best
    assert "best validation PSNR" in restored.selected_by
    assert int(restored.state.step) == best
    latest = run_lib.restore_run(wd, select="latest")
    assert latest.step == 10
    from clidim_jax.evaluate import evaluate_run

    result = evaluate_run(wd, quiet=True)
    assert result["checkpoint"]["step"] == best
    with open(os.path.join(wd, "eval.json"), encoding="utf-8") as f:
        assert json.load(f)["checkpoint"]["step"] == best
    with open(os.path.join(wd, "eval.md"), encoding="utf-8") as f:
        table = f.read()
    assert f"checkpoint {best} (best validation PSNR" in table and "gaussian_filter" in table
    from clidim_jax.export import export_run

    meta = export_run(wd, str(tmp_path / "m.clidim"))
    assert meta["run"]["step"] == best


def _val_lines(wd: str) -> dict[int, dict]:
    with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r for r in map(json.loads, f) if "val/psnr" in r}


def test_a_selection_window_chooses_by_the_mean_of_the_last_validations(tmp_path, tiny):
    """checkpoint.select_window=3: each checkpoint's score is the mean of its validation PSNR
    and the two before (recomputed here from the logged PSNRs), the best score chooses, and a
    run stopped and resumed in the middle scores and chooses exactly as an uninterrupted one."""

    def cfg(n_steps):
        c = tiny("pixel")
        c.data.val_fraction = 0.25
        c.train.steps_per_epoch, c.train.n_epochs, c.train.n_epochs_decay = 1, n_steps, 0
        c.checkpoint.every_steps, c.checkpoint.keep, c.checkpoint.select_window = 2, 1, 3
        return c

    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train_lib.train(cfg(12), whole)
    train_lib.train(cfg(6), parts)  # constant learning rate: a prefix of the 12-step run
    train_lib.train(cfg(12), parts)
    rows = _val_lines(whole)
    assert sorted(rows) == [2, 4, 6, 8, 10, 12]
    psnr = [rows[s]["val/psnr"] for s in sorted(rows)]
    want = {s: float(np.mean(psnr[max(0, i - 2) : i + 1])) for i, s in enumerate(sorted(rows))}
    for s, r in rows.items():
        assert r["val/score"] == pytest.approx(want[s], abs=1e-9)
    assert _val_lines(parts) == rows
    kept = Checkpoints(whole, read_only=True, async_save=False).validation_scores()
    assert kept and all(v == pytest.approx(want[s], abs=1e-9) for s, v in kept.items())
    best = max(want, key=lambda s: (want[s], s))
    for wd in (whole, parts):
        restored = run_lib.restore_run(wd)
        assert restored.step == best
        assert "averaged over it and the 2 before" in restored.selected_by


@pytest.mark.slow
def test_a_run_without_validation_uses_its_final_state(tmp_path, tiny):
    c = tiny("pixel")
    wd = str(tmp_path / "run")
    result = train_lib.train_and_evaluate(c, wd)
    assert result["checkpoint"]["step"] == 6
    assert "final" in result["checkpoint"]["selected_by"]
    assert run_lib.restore_run(wd).selected_by == "latest checkpoint"
    # `evaluate --tta` through the command line: the flag reaches eval.json and the prediction.
    from conftest import run_cli

    run_cli("evaluate", "--workdir", wd, "--tta")
    with open(os.path.join(wd, "eval.json"), encoding="utf-8") as f:
        with_tta = json.load(f)
    assert with_tta["tta"] is True and with_tta["checkpoint"]["step"] == 6
    assert with_tta["output"]["psnr"] != result["output"]["psnr"]


def test_validation_pairs_from_files(tmp_path, tiny):
    rng = np.random.default_rng(7)
    clean = rng.uniform(0, 100, (48, 48)).astype(np.float32)
    for name in ("tr", "va"):
        noisy = (clean + rng.normal(0, 5, (3, 48, 48))).astype(np.float32)
        tifffile.imwrite(tmp_path / f"{name}_n.tif", noisy, photometric="minisblack")
        tifffile.imwrite(tmp_path / f"{name}_c.tif", clean)
    from clidim_jax.data.datasets import load_splits

    c = tiny("pixel")
    c.data.source = "paired"
    c.data.noisy_path, c.data.clean_path = str(tmp_path / "tr_n.tif"), str(tmp_path / "tr_c.tif")
    c.data.test_noisy_path, c.data.test_clean_path = c.data.noisy_path, c.data.clean_path
    c.data.val_noisy_path, c.data.val_clean_path = (
        str(tmp_path / "va_n.tif"), str(tmp_path / "va_c.tif"))  # fmt: skip
    _, val, _ = load_splits(c.data)
    assert len(val) == 3 and val.min_size == (48, 48)
    c.data.val_fraction = 0.2  # the files take precedence over a validation region
    train2, val2, _ = load_splits(c.data)
    assert len(val2) == 3 and train2.min_size == (48, 48)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.output", "relu", "model.output"),
        ("model.residual", "yes", "model.residual"),
        ("data.vst", "anscombe", "data.vst"),
        ("data.gain_augment", (2.0, 1.0), "gain_augment"),
        ("model.residual_sigma", 0.0, "residual_sigma"),
        ("data.synthetic_noise", "gaussian", "synthetic_noise"),
        ("train.clip_grad_norm", -1.0, "clip_grad_norm"),
        ("checkpoint.select_window", 0, "select_window"),
    ],
)
def test_new_config_values_are_validated(tiny, field, value, message):
    c = tiny()
    group, name = field.split(".")
    c[group][name] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)


# ------------------------------------------------------------ bias-free G, scale, bright crops


def _randomised(v, seed: int = 1):
    leaves, tree = jax.tree.flatten(v)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    )


def test_a_bias_free_generator_is_positively_homogeneous():
    x = jnp.asarray(np.random.default_rng(9).random((2, 16, 16, 1)), jnp.float32)
    for bias_free in (True, False):
        g = UNetGenerator(depth=3, ngf=4, norm="none", output="linear", residual="smooth",
                          bias_free=bias_free)  # fmt: skip
        v = _randomised(g.init(jax.random.key(0), x, train=False))
        y, y3 = g.apply(v, x, train=False), g.apply(v, 3.0 * x, train=False)
        homogeneous = np.allclose(np.asarray(y3), 3.0 * np.asarray(y), rtol=1e-4, atol=1e-5)
        assert homogeneous == bias_free
    with pytest.raises(ValueError, match="bias-free"):
        UNetGenerator(depth=3, ngf=4, norm="batch", output="linear", bias_free=True).init(
            jax.random.key(0), x, train=False
        )


def test_scale_normalisation_puts_the_dark_level_at_zero():
    n = Normalization(3.0, 103.0, "scale")
    np.testing.assert_allclose(n.apply(np.array([3.0, 53.0, 103.0])), [0.0, 1.0, 2.0])
    x = np.linspace(0.0, 500.0, 11)
    np.testing.assert_allclose(n.invert(n.apply(x)), x, rtol=1e-12)
    # Brightness above the dark level is a multiplication in the model's space.
    np.testing.assert_allclose(n.apply(3.0 + 2 * (x - 3.0)), 2 * n.apply(x), rtol=1e-12)


def test_crop_tries_keep_the_brightest_of_the_candidates():
    from clidim_jax.data.sampling import sample_batch

    rng = np.random.default_rng(10)
    clean = rng.random((2, 48, 48)).astype(np.float32)
    clean[0, 30:, 30:] += 5.0
    noisy = clean.copy()
    views = np.array([[0, 0, 0, 0, 48, 48], [1, 1, 0, 0, 48, 48]], np.int32)
    args = dict(batch_size=16, patch_size=12, augment=False)
    key, step = jax.random.key(3), jnp.int32(7)
    _, one = sample_batch(key, step, noisy, clean, views, **args)
    _, four = sample_batch(key, step, noisy, clean, views, crop_tries=4, **args)
    s1, s4 = np.asarray(one).sum(axis=(1, 2, 3)), np.asarray(four).sum(axis=(1, 2, 3))
    assert (s4 >= s1 - 1e-3).all()  # the uniform draw is one of the candidates
    assert s4.mean() > s1.mean() + 1.0


@pytest.mark.slow
@pytest.mark.parametrize("offset", [9.0, -12.0])
def test_synthetic_noise_follows_the_fitted_model(offset):
    from clidim_jax.step import synthesize_noisy

    model = NoiseModel(gain=3.0, offset=offset)
    for level in (20.0, 150.0):
        clean = jnp.full((8, 64, 64, 1), level, jnp.float32)
        noisy, c = synthesize_noisy(jax.random.key(4), clean, model, (1.0, 1.0), integer=False)
        np.testing.assert_array_equal(np.asarray(c), np.asarray(clean))
        var = 3.0 * level + offset
        assert float(noisy.mean()) == pytest.approx(level, abs=0.05 * np.sqrt(var))
        assert float(noisy.var()) == pytest.approx(var, rel=0.05)
    # Random brightness, one gain per image within the range; integer data stays integer.
    clean = jnp.full((64, 8, 8, 1), 50.0, jnp.float32)
    noisy, c = synthesize_noisy(jax.random.key(5), clean, model, (0.5, 2.0), integer=True)
    gains = np.asarray(c)[:, 0, 0, 0] / 50.0
    assert gains.min() >= 0.5 - 1e-6 and gains.max() <= 2.0 + 1e-6 and np.ptp(gains) > 0.5
    n = np.asarray(noisy)
    assert (n == np.round(n)).all() and n.min() >= 0


def test_synthetic_inputs_saturate_where_the_data_type_does(tmp_path, monkeypatch):
    """A brightened clean crop plus its noise can exceed what the detector records; no real
    8-bit input exceeds 255, so neither does a synthetic one (and float data is not bounded)."""
    from clidim_jax.configs import own_data

    from clidim_jax import step as step_mod

    model = NoiseModel(gain=3.0, offset=0.0)
    clean = jnp.full((16, 32, 32, 1), 200.0, jnp.float32)  # times 1.6: 320, far above 255
    free, _ = step_mod.synthesize_noisy(jax.random.key(9), clean, model, (1.6, 1.6), True)
    capped, _ = step_mod.synthesize_noisy(jax.random.key(9), clean, model, (1.6, 1.6), True, 255.0)
    free, capped = np.asarray(free), np.asarray(capped)
    assert free.max() > 300 and capped.max() == 255.0
    np.testing.assert_array_equal(capped, np.minimum(free, 255.0))  # the same draw, clipped
    # Training passes the stored data type's maximum: 255 for uint8, none for float32.
    rng = np.random.default_rng(12)
    base = np.repeat(np.linspace(20, 200, 96)[None, :], 64, 0)
    seen = []
    real = step_mod.synthesize_noisy

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("top"))
        return real(*args, **kwargs)

    monkeypatch.setattr(step_mod, "synthesize_noisy", spy)
    for dtype, expected in ((np.uint8, 255.0), (np.float32, None)):
        frames = np.clip(np.round(base + rng.normal(0, 8, (16, 64, 96))), 0, 255).astype(dtype)
        tifffile.imwrite(tmp_path / "stack.tif", frames)
        c = own_data.get_config("tiny")
        c.data.source, c.data.path = "stack", str(tmp_path / "stack.tif")
        job = train_lib.prepare(c)
        seen.clear()
        fn = step_mod.make_sampled_train_step(c, job.nets, job.spe, job.norm, noise=job.noise)
        jax.eval_shape(fn, job.abstract_state, job.data, job.train_key)  # traces: calls spy
        assert seen == [expected]


def test_noise_that_does_not_grow_gives_a_constant_model_for_synthesis():
    from clidim_jax.step import synthesize_noisy

    rng = np.random.default_rng(11)
    clean = rng.uniform(0, 100, (128, 128))
    noise = rng.normal(0, 1, clean.shape) * (12 - clean / 10)  # variance 144 .. 4
    m = fit_noise_model([(clean + noise, clean)], allow_constant=True)
    expected = 144 - 2.4 * 50 + 0.01 * 100**2 / 3  # the mean of (12 - c/10)^2 over c in [0, 100]
    assert m.gain == 0.0 and m.offset == pytest.approx(expected, rel=0.1)
    noisy, _ = synthesize_noisy(
        jax.random.key(0), jnp.full((4, 32, 32, 1), 50.0), m, (1.0, 1.0), integer=False
    )
    assert float(noisy.var()) == pytest.approx(m.offset, rel=0.1)


def test_large_stacks_fit_the_noise_model_one_image_at_a_time(monkeypatch):
    from clidim_jax.data import normalization

    rng = np.random.default_rng(12)
    clean = rng.uniform(10, 300, (96, 96))
    pairs = [(2.0 * rng.poisson(clean / 2.0) + rng.normal(0, 2, clean.shape), clean)
             for _ in range(6)]  # fmt: skip
    whole = fit_noise_model(pairs)
    monkeypatch.setattr(normalization, "_FIT_IN_ONE_GO", 0)
    streamed = fit_noise_model(pairs)
    assert streamed.gain == pytest.approx(whole.gain, rel=0.03)
    for x in (50.0, 250.0):
        assert streamed.gain * x + streamed.offset == pytest.approx(
            whole.gain * x + whole.offset, rel=0.03
        )


# ------------------------------------------------------------------ spatially correlated noise


def _correlate_numpy(r: np.ndarray, corr: tuple[float, float]) -> np.ndarray:
    """A direct NumPy statement of the 3-tap filter: a = the root of 2a / (1 + 2a^2) = rho."""
    for axis, rho in ((1, corr[0]), (2, corr[1])):
        if rho == 0:
            continue
        roots = np.roots([2 * rho, -2.0, rho]).real
        a = roots[np.argmin(np.abs(roots))]  # (the root with |a| < 1)
        pad = [(0, 0)] * r.ndim
        pad[axis] = (1, 1)
        p = np.pad(r, pad, mode="reflect")
        n = r.shape[axis]
        t = [np.take(p, np.arange(s, s + n), axis=axis) for s in range(3)]
        r = (t[1] + a * (t[0] + t[2])) / np.sqrt(1 + 2 * a * a)
    return r


def _lag1(r: np.ndarray, axis: int) -> float:
    r = r - r.mean()
    n = r.shape[axis]
    a, b = np.take(r, np.arange(1, n), axis=axis), np.take(r, np.arange(n - 1), axis=axis)
    return float((a * b).mean() / (r * r).mean())


def test_correlated_noise_equals_the_numpy_filter_and_has_the_asked_correlation():
    from clidim_jax.step import correlate_noise

    r = np.random.default_rng(21).normal(0, 3.0, (4, 128, 128, 1)).astype(np.float32)
    for corr in [(0.0, 0.3), (0.1, -0.2), (0.45, 0.45)]:
        got = np.asarray(correlate_noise(jnp.asarray(r), corr))
        np.testing.assert_allclose(got, _correlate_numpy(r.astype(np.float64), corr), atol=1e-5)
        assert _lag1(got, 1) == pytest.approx(corr[0], abs=0.02)
        assert _lag1(got, 2) == pytest.approx(corr[1], abs=0.02)
        assert float(got.var()) == pytest.approx(9.0, rel=0.03)  # each pixel's variance kept


def test_the_noise_correlation_is_fitted_from_repeated_frames():
    from clidim_jax.data.normalization import fit_noise_correlation

    rng = np.random.default_rng(22)
    yy, xx = np.mgrid[:256, :256]
    clean = 100 + 80 * np.sin(xx / 5.0) * np.cos(yy / 7.0)  # structure, which must cancel
    truth = (0.0, 0.25)
    frames = [
        clean + 0.97**k * 3 * np.sin(yy / 40.0)  # a slow drift, frame to frame
        + _correlate_numpy(rng.normal(0, 1, (1, 256, 256)) * np.sqrt(clean), truth)[0]
        for k in range(6)
    ]  # fmt: skip
    rho_y, rho_x = fit_noise_correlation([frames[:3], frames[3:]])
    assert rho_y == pytest.approx(truth[0], abs=0.01)
    assert rho_x == pytest.approx(truth[1], abs=0.01)
    # White noise gives ~0; no group of two frames is an error that says what is needed.
    white = [clean + rng.normal(0, 5, clean.shape) for _ in range(3)]
    assert max(abs(v) for v in fit_noise_correlation([white])) < 0.01
    with pytest.raises(ValueError, match="two noisy images of one clean image"):
        fit_noise_correlation([[white[0]], [white[1]]])


def test_synthetic_correlated_noise_follows_the_model():
    from clidim_jax.step import synthesize_noisy

    model = NoiseModel(gain=3.0, offset=9.0, corr=(0.05, 0.3))
    clean = jnp.full((8, 64, 64, 1), 100.0, jnp.float32)
    noisy, _ = synthesize_noisy(jax.random.key(6), clean, model, (1.0, 1.0), integer=False)
    r = np.asarray(noisy) - 100.0
    assert float(r.var()) == pytest.approx(309.0, rel=0.05)
    assert _lag1(r, 1) == pytest.approx(0.05, abs=0.03)
    assert _lag1(r, 2) == pytest.approx(0.3, abs=0.03)


def test_training_fits_the_correlation_on_a_stack_and_says_when_it_cannot(tmp_path, capsys):
    from clidim_jax.configs import own_data

    rng = np.random.default_rng(23)
    xx = np.mgrid[:96, :128][1]
    clean = 50 + 40 * np.sin(xx / 6.0) ** 2
    noise = _correlate_numpy(rng.normal(0, 6, (16, 96, 128)), (0.0, 0.3))
    stack = np.round(np.clip(clean + noise, 0, None)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    c = own_data.get_config("tiny")
    c.data.source, c.data.path = "stack", str(tmp_path / "stack.tif")
    c.data.synthetic_corr = True
    job = train_lib.prepare(c)
    assert job.noise.corr[0] == pytest.approx(0.0, abs=0.03)
    assert job.noise.corr[1] == pytest.approx(0.3, abs=0.03)
    assert "neighbour correlation" in capsys.readouterr().out
    # One noisy image per clean one: independent noise, and a line that says so.
    tifffile.imwrite(tmp_path / "noisy.tif", stack[0])
    tifffile.imwrite(tmp_path / "clean.tif", clean.astype(np.float32))
    c.data.source = "paired"
    c.data.noisy_path, c.data.clean_path = str(tmp_path / "noisy.tif"), str(tmp_path / "clean.tif")
    job = train_lib.prepare(c)
    assert job.noise.corr == (0.0, 0.0)
    assert "stays independent per pixel" in capsys.readouterr().out


# ------------------------------------------------------------------- measured noise distribution


def _skewed_noise(rng, clean):
    """A noise no Poisson-Gaussian model describes: a gamma-distributed (skewed) excess of
    standard deviation 1 + 0.3 sqrt(c), centred."""
    std = 1.0 + 0.3 * np.sqrt(clean)
    k = 2.0  # gamma shape: skewness 2 / sqrt(k)
    return clean + std * (rng.gamma(k, 1.0, clean.shape) - k) / np.sqrt(k)


def test_empirical_noise_reproduces_a_measured_skewed_distribution():
    from scipy import stats

    from clidim_jax.data.normalization import fit_empirical_noise
    from clidim_jax.step import synthesize_noisy

    rng = np.random.default_rng(31)
    clean = np.repeat(np.linspace(10, 200, 256)[None, :], 256, 0)  # every intensity 10..200
    pairs = [(_skewed_noise(rng, clean), clean) for _ in range(4)]
    emp = fit_empirical_noise(pairs)
    assert emp.quantiles.shape == (len(emp.levels), 512) and np.all(np.diff(emp.levels) > 0)
    model = fit_noise_model(pairs)
    noise = NoiseModel(model.gain, model.offset, empirical=emp)
    for level in (37.0, 120.0):  # between measured levels: interpolated
        c = jnp.full((8, 64, 64, 1), level, jnp.float32)
        noisy, _ = synthesize_noisy(jax.random.key(7), c, noise, (1.0, 1.0), integer=False)
        r = np.asarray(noisy).ravel() - level
        truth = _skewed_noise(rng, np.full(r.size, level)) - level
        assert stats.ks_2samp(r, truth).statistic < 0.03  # the same distribution ...
        assert float(r.mean()) == pytest.approx(0.0, abs=0.05)
        assert float(r.std()) == pytest.approx(float(truth.std()), rel=0.03)
        assert stats.skew(r) == pytest.approx(stats.skew(truth), abs=0.15)  # ... skew included
        if level == 37.0:  # the fitted Poisson-Gaussian model alone does not match it
            alone, _ = synthesize_noisy(jax.random.key(7), c, model, (1.0, 1.0), integer=False)
            r_model = np.asarray(alone).ravel() - level
            assert stats.ks_2samp(r_model, truth).statistic > 0.05
    # Above the brightest measured level, the deviation grows as the model's sqrt(a x + b).
    top = float(emp.levels[-1])
    c = jnp.full((8, 64, 64, 1), 2.0 * top, jnp.float32)
    noisy, _ = synthesize_noisy(jax.random.key(8), c, noise, (1.0, 1.0), integer=False)
    var = lambda x: model.gain * x + model.offset
    expected = emp.std[-1] * np.sqrt(var(2.0 * top) / var(top))
    assert float(np.asarray(noisy).std()) == pytest.approx(expected, rel=0.03)


def test_empirical_noise_refuses_too_few_pixels_and_training_falls_back(tmp_path, capsys):
    from clidim_jax.configs import own_data

    from clidim_jax.data.normalization import fit_empirical_noise

    rng = np.random.default_rng(32)
    clean = np.repeat(np.linspace(20, 120, 128)[None, :], 96, 0)
    with pytest.raises(ValueError, match="too few to measure"):
        fit_empirical_noise([(_skewed_noise(rng, clean[:50, :50]), clean[:50, :50])])
    stack = np.round(np.stack([_skewed_noise(rng, clean) for _ in range(16)])).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    c = own_data.get_config("tiny")
    c.data.source, c.data.path = "stack", str(tmp_path / "stack.tif")
    c.data.synthetic_noise = "empirical"
    job = train_lib.prepare(c)
    assert job.noise.empirical is not None
    assert "its shape measured at" in capsys.readouterr().out
    tifffile.imwrite(tmp_path / "small.tif", stack[:4, :40, :80])  # 4 x 40 x 36 pixels to train
    c.data.path = str(tmp_path / "small.tif")
    job = train_lib.prepare(c)
    assert job.noise.empirical is None
    assert "the Poisson-Gaussian model is used" in capsys.readouterr().out
