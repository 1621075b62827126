"""Tests of the networks: exact pix2pix parameter counts, shapes, the phase-decomposed transposed
convolution against lax and a NumPy PyTorch-semantics reference, dropout, BatchNorm and init."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from clidim_jax.models import (
    ConvTranspose4x4,
    PatchGANDiscriminator,
    ProjectionHead,
    UNetGenerator,
    conv_transpose_4x4_s2,
    count_params,
)


def init(module: nn.Module, seed: int, x: jax.Array, **kwargs) -> dict:
    """module.init under jit: eager init compiles every random draw separately (seconds on CPU)."""
    return jax.jit(lambda key, x: module.init(key, x, **kwargs))(jax.random.key(seed), x)


def abstract_variables(module: nn.Module, shape: tuple[int, ...], **kwargs) -> dict:
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), **kwargs))


# ---------------------------------------------------------------- parameter counts and shapes


@pytest.mark.parametrize(
    "depth, size, channels, expected",
    [(8, 256, 1, 54_407_809), (7, 128, 1, 41_822_849), (8, 256, 3, 54_413_955)],
)
def test_generator_param_count(depth: int, size: int, channels: int, expected: int) -> None:
    g = UNetGenerator(depth=depth, out_channels=channels)
    variables = abstract_variables(g, (1, size, size, channels), train=False)
    assert count_params(variables["params"]) == expected


@pytest.mark.parametrize("channels, expected", [(2, 2_764_609), (6, 2_768_705)])
def test_discriminator_param_count(channels: int, expected: int) -> None:
    variables = abstract_variables(PatchGANDiscriminator(), (1, 256, 256, channels), train=False)
    assert count_params(variables["params"]) == expected


def test_head_param_count_and_shape() -> None:
    head = ProjectionHead()
    variables = abstract_variables(head, (4, 900))
    assert count_params(variables["params"]) == 900 * 900 + 900 * 128
    out = jax.eval_shape(lambda v: head.apply(v, jnp.zeros((4, 900))), variables)
    assert out.shape == (4, 128)
    hidden = abstract_variables(ProjectionHead(out_features=16, hidden_features=32), (4, 196))
    assert count_params(hidden["params"]) == 196 * 32 + 32 * 16


def test_count_params_on_real_arrays() -> None:
    assert count_params({"a": jnp.zeros((3, 4)), "b": [jnp.zeros(5)]}) == 17


def test_full_size_output_shapes() -> None:
    g = UNetGenerator()
    gv = abstract_variables(g, (2, 256, 256, 1), train=False)
    out = jax.eval_shape(lambda v: g.apply(v, jnp.zeros((2, 256, 256, 1)), train=False), gv)
    assert out.shape == (2, 256, 256, 1) and out.dtype == jnp.float32
    d = PatchGANDiscriminator()
    dv = abstract_variables(d, (2, 256, 256, 2), train=False)
    out = jax.eval_shape(lambda v: d.apply(v, jnp.zeros((2, 256, 256, 2)), train=False), dv)
    assert out.shape == (2, 30, 30, 1)


def test_generator_param_layout() -> None:
    params = abstract_variables(UNetGenerator(), (1, 256, 256, 1), train=False)["params"]
    assert params["down0"]["kernel"].shape == (4, 4, 1, 64)
    assert "bias" not in params["down0"] and "down0_norm" not in params
    assert "down7_norm" not in params  # innermost: no norm after its conv
    assert params["up7"]["kernel"].shape == (4, 4, 512, 512)
    assert params["up6"]["kernel"].shape == (4, 4, 1024, 512)
    assert params["up0"]["kernel"].shape == (4, 4, 128, 1)
    assert params["up0"]["bias"].shape == (1,)
    assert "bias" not in params["up1"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_instance_norm_adds_biases_and_no_stats() -> None:
    g = UNetGenerator(depth=4, ngf=4, norm="instance")
    variables = abstract_variables(g, (1, 16, 16, 1), train=False)
    assert "batch_stats" not in variables
    assert variables["params"]["down1"]["bias"].shape == (8,)
    assert variables["params"]["up1"]["bias"].shape == (4,)
    none = abstract_variables(UNetGenerator(depth=4, ngf=4, norm="none"), (1, 16, 16, 1), train=False)
    assert "batch_stats" not in none and "bias" not in none["params"]["down1"]
    with pytest.raises(ValueError, match="norm"):
        abstract_variables(UNetGenerator(depth=4, norm="layer"), (1, 16, 16, 1), train=False)


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_small_forward_passes(norm: str) -> None:
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1), minval=-1, maxval=1)
    g = UNetGenerator(depth=4, ngf=8, norm=norm)
    gv = init(g, 0, x, train=False)
    y = g.apply(gv, x, train=False)
    assert y.shape == (2, 16, 16, 1)
    assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.abs(y).max()) <= 1.0
    y_train, _ = g.apply(gv, x, train=True, mutable=["batch_stats"])
    assert bool(jnp.all(jnp.isfinite(y_train))) and float(jnp.abs(y_train).max()) <= 1.0

    d = PatchGANDiscriminator(ndf=8, norm=norm)
    pair = jnp.concatenate([x, y], axis=-1)
    pair = jnp.concatenate([pair, pair], axis=1).repeat(2, axis=2)  # 32x32
    dv = init(d, 2, pair, train=False)
    logits = d.apply(dv, pair, train=False)
    assert logits.shape == (2, 2, 2, 1) and bool(jnp.all(jnp.isfinite(logits)))


def test_bfloat16_compute_keeps_float32_params_and_output() -> None:
    x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 1), minval=-1, maxval=1)
    g = UNetGenerator(depth=4, ngf=8, dtype=jnp.bfloat16)
    gv = init(g, 0, x, train=False)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(gv))
    y = g.apply(gv, x, train=False)
    y32 = UNetGenerator(depth=4, ngf=8).apply(gv, x, train=False)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, y32, atol=0.05)


@pytest.mark.parametrize("shape", [(1, 100, 256, 1), (1, 256, 200, 1)])
def test_generator_rejects_indivisible_size(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"2\*\*depth = 256 \(depth 8\)") as info:
        abstract_variables(UNetGenerator(), shape, train=False)
    assert f"{shape[1]}x{shape[2]}" in str(info.value)


# ---------------------------------------------------------------- transposed convolution


def lax_reference(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_transpose(
        x, kernel, strides=(2, 2), padding=((2, 2), (2, 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def torch_conv_transpose_numpy(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """PyTorch ConvTranspose2d(4, stride=2, padding=1) as a scatter; w is (Cin, Cout, 4, 4)."""
    n, h, wd, _ = x.shape
    y = np.zeros((n, 2 * h, 2 * wd, w.shape[1]), np.float64)
    for iy in range(h):
        for ix in range(wd):
            for ty in range(4):
                for tx in range(4):
                    oy, ox = 2 * iy - 1 + ty, 2 * ix - 1 + tx
                    if 0 <= oy < 2 * h and 0 <= ox < 2 * wd:
                        y[:, oy, ox] += x[:, iy, ix] @ w[:, :, ty, tx]
    return y


def torch_weight_to_kernel(w: np.ndarray) -> np.ndarray:
    """The flip documented in `conv_transpose_4x4_s2`."""
    return w.transpose(2, 3, 0, 1)[::-1, ::-1]


CT_SHAPES = [((2, 5, 7, 3), 4), ((1, 6, 6, 5), 2), ((3, 1, 1, 2), 3), ((1, 17, 16, 2), 3)]


@pytest.mark.parametrize("method", ["auto", "phases", "fused"])
@pytest.mark.parametrize("x_shape, cout", CT_SHAPES)
def test_conv_transpose_matches_lax_value_and_grads(
    x_shape: tuple[int, ...], cout: int, method: str
) -> None:
    kx, kk, kg = jax.random.split(jax.random.key(sum(x_shape) + cout), 3)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kk, (4, 4, x_shape[-1], cout)) * 0.5
    out_shape = (x_shape[0], 2 * x_shape[1], 2 * x_shape[2], cout)
    cot = jax.random.normal(kg, out_shape)

    ours = conv_transpose_4x4_s2(x, kernel, method=method)
    ref = lax_reference(x, kernel)
    assert ours.shape == ref.shape == out_shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, k: jnp.vdot(fn(x, k), cot)

    ours_g = jax.grad(loss(lambda x, k: conv_transpose_4x4_s2(x, k, method=method)), (0, 1))(
        x, kernel
    )
    ref_g = jax.grad(loss(lax_reference), (0, 1))(x, kernel)
    for a, b in zip(ours_g, ref_g, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["phases", "fused"])
@pytest.mark.parametrize("x_shape, cout", CT_SHAPES[:2])
def test_conv_transpose_matches_pytorch_semantics(
    x_shape: tuple[int, ...], cout: int, method: str
) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((x_shape[-1], cout, 4, 4)).astype(np.float32)  # PyTorch layout
    expected = torch_conv_transpose_numpy(x.astype(np.float64), w.astype(np.float64))
    kernel = jnp.asarray(torch_weight_to_kernel(w))
    np.testing.assert_allclose(
        conv_transpose_4x4_s2(jnp.asarray(x), kernel, method=method), expected, atol=1e-5
    )
    np.testing.assert_allclose(lax_reference(jnp.asarray(x), kernel), expected, atol=1e-5)


def test_conv_transpose_module_matches_flax_conv_transpose() -> None:
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    ours = ConvTranspose4x4(4, use_bias=True, bias_init=nn.initializers.normal(1.0))
    v = init(ours, 1, x)
    assert v["params"]["kernel"].shape == (4, 4, 3, 4) and v["params"]["bias"].shape == (4,)
    flax_ct = nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)))
    np.testing.assert_allclose(ours.apply(v, x), flax_ct.apply(v, x), rtol=1e-5, atol=1e-5)


def test_conv_transpose_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        conv_transpose_4x4_s2(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2)))
    with pytest.raises(ValueError, match="method"):
        conv_transpose_4x4_s2(jnp.zeros((1, 4, 4, 3)), jnp.zeros((4, 4, 3, 2)), method="x")


# ---------------------------------------------------------------- dropout and BatchNorm


@pytest.fixture(scope="module")
def dropout_net() -> tuple[UNetGenerator, dict, jax.Array]:
    g = UNetGenerator(depth=6, ngf=4)  # dropout on level 4 only (depth - 5 = 1 block)
    x = jax.random.normal(jax.random.key(3), (2, 64, 64, 1))
    return g, init(g, 0, x, train=False), x


def test_dropout_only_in_train_mode(dropout_net) -> None:
    g, v, x = dropout_net

    def train_apply(seed: int) -> jax.Array:
        out, _ = g.apply(
            v, x, train=True, rngs={"dropout": jax.random.key(seed)}, mutable=["batch_stats"]
        )
        return out

    a, a_again, b = train_apply(0), train_apply(0), train_apply(1)
    np.testing.assert_array_equal(a, a_again)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(g.apply(v, x, train=False), g.apply(v, x, train=False))
    no_dropout = UNetGenerator(depth=6, ngf=4, use_dropout=False)
    c, _ = no_dropout.apply(v, x, train=True, mutable=["batch_stats"])  # needs no rng
    assert c.shape == x.shape


def test_dropout_levels() -> None:
    def dropout_names(depth: int) -> list[str]:
        g = UNetGenerator(depth=depth, ngf=1, use_dropout=True)
        x = jnp.zeros((1, 2**depth, 2**depth, 1))
        _, state = jax.eval_shape(
            lambda: g.init_with_output(
                {"params": jax.random.key(0), "dropout": jax.random.key(1)},
                x, train=True, capture_intermediates=lambda m, _: isinstance(m, nn.Dropout),
            )
        )
        return sorted(state["intermediates"])

    assert dropout_names(8) == ["up4_dropout", "up5_dropout", "up6_dropout"]
    assert dropout_names(7) == ["up4_dropout", "up5_dropout"]
    assert dropout_names(5) == []


def test_batchnorm_running_stats_update_and_eval_use() -> None:
    g = UNetGenerator(depth=4, ngf=4, use_dropout=False)
    x = jax.random.normal(jax.random.key(4), (3, 16, 16, 1)) + 0.5
    v = init(g, 0, x, train=False)
    stats0 = v["batch_stats"]

    _, s1 = g.apply(v, x, train=True, mutable=["batch_stats"])
    _, s2 = g.apply({**v, **s1}, x, train=True, mutable=["batch_stats"])
    # PyTorch momentum 0.1: m1 = 0.1 mu, m2 = 0.9 m1 + 0.1 mu = 1.9 m1 (train mode normalises
    # with batch statistics, so both steps see the same activations).
    for m1, m0 in zip(jax.tree.leaves(s1["batch_stats"]), jax.tree.leaves(stats0), strict=True):
        assert not np.allclose(m1, m0)
    for name, layer in s1["batch_stats"].items():
        np.testing.assert_allclose(
            s2["batch_stats"][name]["mean"], 1.9 * layer["mean"], rtol=1e-4, atol=1e-6,
            err_msg=name,
        )
        var_batch = (layer["var"] - 0.9) / 0.1
        np.testing.assert_allclose(
            s2["batch_stats"][name]["var"], 0.81 + 0.19 * var_batch, rtol=1e-4, atol=1e-6,
            err_msg=name,
        )

    # Eval mode uses the running statistics: it depends on them, and a sample's output does not
    # depend on the rest of its batch (it does in train mode).
    updated = {**v, **s1}
    eval_full = g.apply(updated, x, train=False)
    assert not np.allclose(eval_full, g.apply(v, x, train=False))
    np.testing.assert_allclose(eval_full[:1], g.apply(updated, x[:1], train=False), atol=1e-6)
    train_full, _ = g.apply(updated, x, train=True, mutable=["batch_stats"])
    train_one, _ = g.apply(updated, x[:1], train=True, mutable=["batch_stats"])
    assert not np.allclose(train_full[:1], train_one)


# ---------------------------------------------------------------- initialisation


def test_init_distributions() -> None:
    g = UNetGenerator(depth=5, ngf=32)
    params = init(g, 0, jnp.zeros((1, 32, 32, 1)), train=False)["params"]
    for name in ("down3", "down4", "up4", "up3"):
        k = np.asarray(params[name]["kernel"])
        assert k.size > 100_000
        assert abs(k.mean()) < 1e-3, name
        assert abs(k.std() - 0.02) < 0.02 * 0.02, name  # relative sd error ~ 1/sqrt(2n) < 0.3%
    scales = np.concatenate(
        [np.asarray(layer["scale"]) for n, layer in params.items() if n.endswith("_norm")]
    )
    assert scales.size >= 900
    assert abs(scales.mean() - 1.0) < 0.005  # sd of the mean: 0.02/30
    assert abs(scales.std() - 0.02) < 0.004
    for n, layer in params.items():
        if n.endswith("_norm"):
            assert not np.any(layer["bias"]), n
    assert not np.any(params["up0"]["bias"])

    dp = init(PatchGANDiscriminator(ndf=16), 1, jnp.zeros((1, 64, 64, 2)), train=False
    )["params"]
    assert abs(float(dp["conv3"]["kernel"].std()) - 0.02) < 0.001
    assert not np.any(dp["conv0"]["bias"]) and not np.any(dp["conv4"]["bias"])


def test_head_init_is_pytorch_linear_default() -> None:
    params = init(ProjectionHead(), 0, jnp.zeros((1, 900)))["params"]
    for name, fan_in in (("fc1", 900), ("fc2", 900)):
        k = np.asarray(params[name]["kernel"])
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(k).max() <= bound
        assert np.abs(k).max() > 0.99 * bound
        assert abs(k.std() - bound / np.sqrt(3)) < 0.01 * bound
    assert params["fc2"]["kernel"].shape == (900, 128)
