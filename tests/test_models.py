"""Tests of the networks: exact pix2pix parameter counts, shapes, the transposed convolution and
the custom-gradient 4x4 convolution against lax (value and both gradients, every formulation of
each, the private ones of `models.layers` and the reference ones kept here) and a NumPy
PyTorch-semantics reference, dropout, BatchNorm and init."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from clidim_jax.models import (
    Conv4x4,
    ConvTranspose4x4,
    PatchGANDiscriminator,
    ProjectionHead,
    UNetGenerator,
    bn_scale_init,
    conv_4x4,
    conv_transpose_4x4_s2,
    count_params,
    layers,
    normal_init,
)
from clidim_jax.models.layers import BatchNorm, conv_transpose_breakpoints, make_norm


def init(module: nn.Module, seed: int, x: jax.Array, **kwargs) -> dict:
    """module.init under jit: eager init compiles every random draw separately (seconds on CPU)."""
    return jax.jit(lambda key, x: module.init(key, x, **kwargs))(jax.random.key(seed), x)


_FORWARDS: dict[tuple[nn.Module, bool], object] = {}


def forward(
    module: nn.Module, variables: dict, x: jax.Array, *, train: bool, seed: int | None = None
):
    """module.apply under jit, one compiled function per (module, train); train mode returns
    (output, {"batch_stats": ...}). Eager applies compile op by op: slower on this CPU."""
    if (module, train) not in _FORWARDS:
        mutable = ["batch_stats"] if train else False
        _FORWARDS[module, train] = jax.jit(
            lambda v, x, r: module.apply(v, x, train=train, rngs=r, mutable=mutable)
        )
    rngs = {} if seed is None else {"dropout": jax.random.key(seed)}
    return _FORWARDS[module, train](variables, x, rngs)


def randn(seed: int, *shapes: tuple[int, ...]) -> list[jax.Array]:
    """Test data from NumPy: an eager rank-4 jax.random draw compiles for about a second here."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes]


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
    none = abstract_variables(
        UNetGenerator(depth=4, ngf=4, norm="none"), (1, 16, 16, 1), train=False
    )
    assert "batch_stats" not in none and "bias" not in none["params"]["down1"]
    with pytest.raises(ValueError, match="norm"):
        abstract_variables(UNetGenerator(depth=4, norm="layer"), (1, 16, 16, 1), train=False)


SMALL_G = UNetGenerator(depth=4, ngf=8)  # 16x16 input; no dropout levels below depth 6


@pytest.fixture(scope="module")
def small() -> tuple[dict, jax.Array]:
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
    return init(SMALL_G, 0, x, train=False), x


def assert_tanh_range(y: jax.Array) -> None:
    assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.abs(y).max()) <= 1.0


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_small_generator_forward(norm: str, small) -> None:
    v, x = small
    g = SMALL_G if norm == "batch" else UNetGenerator(depth=4, ngf=8, norm=norm)
    if norm != "batch":
        v = init(g, 0, x, train=False)
    y = forward(g, v, x, train=False)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert_tanh_range(y)
    if norm == "batch":  # the other norms do not depend on the mode
        y_train, _ = forward(g, v, x, train=True)
        assert_tanh_range(y_train)


SMALL_D = PatchGANDiscriminator(ndf=8)


@pytest.fixture(scope="module")
def small_d() -> tuple[dict, jax.Array]:
    pair = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 2)), jnp.float32)
    return init(SMALL_D, 2, pair, train=False), pair


def test_small_discriminator_forward(small_d) -> None:
    d = SMALL_D
    dv, pair = small_d
    logits = forward(d, dv, pair, train=False)
    assert logits.shape == (2, 2, 2, 1) and bool(jnp.all(jnp.isfinite(logits)))
    logits, _ = forward(d, dv, pair, train=True)
    assert logits.shape == (2, 2, 2, 1) and bool(jnp.all(jnp.isfinite(logits)))


def test_bfloat16_compute_keeps_float32_params_and_output(small) -> None:
    v, x = small
    g = UNetGenerator(depth=4, ngf=8, dtype=jnp.bfloat16)
    assert jax.tree.map(jnp.shape, abstract_variables(g, x.shape, train=False)) == jax.tree.map(
        jnp.shape, v
    )
    y = forward(g, v, x, train=False)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, forward(SMALL_G, v, x, train=False), atol=0.05)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v))


@pytest.mark.parametrize("shape", [(1, 100, 256, 1), (1, 256, 200, 1)])
def test_generator_rejects_indivisible_size(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"2\*\*depth = 256 \(depth 8\)") as info:
        abstract_variables(UNetGenerator(), shape, train=False)
    assert f"{shape[1]}x{shape[2]}" in str(info.value)


# ---------------------------------------------------------------- transposed convolution


def lax_reference(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_transpose(
        x,
        kernel,
        strides=(2, 2),
        padding=((2, 2), (2, 2)),
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


def conv_transpose_phases(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A formulation that lost to both of `models.layers`' (kept as a reference): four stride-1
    2x2 convolutions, one per output phase, then an interleave."""
    n, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = []
    for py in (0, 1):
        cols = [
            lax.conv_general_dilated(
                xp[:, py : py + h + 1, px : px + w + 1],
                kernel[py::2, px::2],
                (1, 1),
                "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            for px in (0, 1)
        ]
        rows.append(jnp.stack(cols, axis=3))  # (N, H, W, px, C)
    return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, -1)  # (N, H, py, W, px, C)


# The forward formulations: the two `conv_transpose_4x4_s2` picks by size, and the reference.
CT_FORMS = {
    "dot": layers._conv_transpose_dot,
    "phases": conv_transpose_phases,
    "fused": layers._conv_transpose_fused,
}

# The last two are large enough for `conv_transpose_4x4_s2` to pick the convolution forms
# ("fused" value when above the breakpoint, convolution input gradient; "im2col" weight
# gradient for 3 output channels, "fused" for 5).
CT_SHAPES = [
    ((2, 5, 7, 3), 4),
    ((1, 6, 6, 5), 2),
    ((3, 1, 1, 2), 3),
    ((1, 17, 16, 2), 3),
    ((1, 9, 8, 3), 5),
]


def value_and_grads(fn, x: jax.Array, kernel: jax.Array, cotangent: jax.Array):
    """fn(x, kernel) and the gradients of <fn(x, kernel), cotangent> w.r.t. x and kernel."""
    y, vjp = jax.vjp(fn, x, kernel)
    return (y, *vjp(cotangent))


def ct_data(x_shape: tuple[int, ...], cout: int) -> list[jax.Array]:
    """x, kernel and an output cotangent for a transposed convolution."""
    out_shape = (x_shape[0], 2 * x_shape[1], 2 * x_shape[2], cout)
    return randn(sum(x_shape) + cout, x_shape, (4, 4, x_shape[-1], cout), out_shape)


@pytest.mark.parametrize("form", list(CT_FORMS))
@pytest.mark.parametrize("x_shape, cout", CT_SHAPES)
def test_conv_transpose_forms_match_lax_value_and_autodiff_grads(
    x_shape: tuple[int, ...], cout: int, form: str
) -> None:
    """Each forward formulation, with its autodiff gradients."""
    x, kernel, cotangent = ct_data(x_shape, cout)
    ours = jax.jit(lambda *a: value_and_grads(CT_FORMS[form], *a))(x, kernel, cotangent)
    ref = jax.jit(lambda *a: value_and_grads(lax_reference, *a))(x, kernel, cotangent)
    assert ours[0].shape == ref[0].shape == cotangent.shape
    for name, a, b in zip(("value", "grad x", "grad kernel"), ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("x_shape, cout", CT_SHAPES)
def test_conv_transpose_matches_lax_value_and_grads(x_shape: tuple[int, ...], cout: int) -> None:
    """`conv_transpose_4x4_s2` (the formulations it picks, with its custom VJP), and every
    custom gradient formulation on every shape: input gradient as per-tap dots or as the
    adjoint convolution, weight gradient as per-tap dots (im2col) or that of the "fused" form."""
    x, kernel, cotangent = ct_data(x_shape, cout)

    def ours(x, kernel, dy):
        taps = layers._conv_transpose_grad_taps(dy)
        return {
            "value, grads": value_and_grads(conv_transpose_4x4_s2, x, kernel, dy),
            "grad x (dot)": layers._conv_transpose_input_grad_dot(taps, kernel),
            "grad x (conv)": layers._conv_transpose_input_grad_conv(kernel, dy),
            "grad kernel (im2col)": layers._conv_transpose_kernel_grad_im2col(x, taps),
            "grad kernel (fused)": layers._conv_transpose_kernel_grad_fused(x, kernel, dy),
        }

    got = jax.jit(ours)(x, kernel, cotangent)
    ref = jax.jit(lambda *a: value_and_grads(lax_reference, *a))(x, kernel, cotangent)
    assert got["value, grads"][0].shape == ref[0].shape == cotangent.shape
    expected = {
        "value, grads": ref,
        "grad x (dot)": ref[1],
        "grad x (conv)": ref[1],
        "grad kernel (im2col)": ref[2],
        "grad kernel (fused)": ref[2],
    }
    for name, a in got.items():
        jax.tree.map(
            lambda a, b, name=name: np.testing.assert_allclose(
                a, b, rtol=1e-5, atol=1e-5, err_msg=name
            ),
            a,
            expected[name],
        )


def test_conv_transpose_formulation_changes_only_at_the_breakpoints() -> None:
    """`conv_transpose_breakpoints` (model export relies on it) states where the value's
    formulation changes: dots up to the breakpoint, a convolution above."""
    (limit,) = conv_transpose_breakpoints()
    k = jnp.zeros((4, 4, 2, 3))

    def primitives(h: int, w: int) -> set[str]:
        jaxpr = jax.make_jaxpr(layers._conv_transpose_value)(jnp.zeros((1, h, w, 2)), k)
        return {eqn.primitive.name for eqn in jaxpr.eqns}

    for h, w in ((1, 1), (1, limit), (limit // 2, 2)):
        assert "dot_general" in primitives(h, w) and "conv_general_dilated" not in primitives(h, w)
    for h, w in ((1, limit + 1), (limit + 1, 1), (limit, limit)):
        assert "conv_general_dilated" in primitives(h, w) and "dot_general" not in primitives(h, w)


@pytest.mark.parametrize("form", ["public", *CT_FORMS])
@pytest.mark.parametrize("x_shape, cout", CT_SHAPES[:2])
def test_conv_transpose_matches_pytorch_semantics(
    x_shape: tuple[int, ...], cout: int, form: str
) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((x_shape[-1], cout, 4, 4)).astype(np.float32)  # PyTorch layout
    expected = torch_conv_transpose_numpy(x.astype(np.float64), w.astype(np.float64))
    kernel = jnp.asarray(torch_weight_to_kernel(w))
    fn = conv_transpose_4x4_s2 if form == "public" else CT_FORMS[form]
    np.testing.assert_allclose(fn(jnp.asarray(x), kernel), expected, atol=1e-5)
    np.testing.assert_allclose(lax_reference(jnp.asarray(x), kernel), expected, atol=1e-5)


def test_conv_transpose_module_matches_flax_conv_transpose() -> None:
    (x,) = randn(0, (2, 5, 6, 3))
    ours = ConvTranspose4x4(4, use_bias=True, bias_init=nn.initializers.normal(1.0))
    v = init(ours, 1, x)
    assert v["params"]["kernel"].shape == (4, 4, 3, 4) and v["params"]["bias"].shape == (4,)
    flax_ct = nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)))
    np.testing.assert_allclose(ours.apply(v, x), flax_ct.apply(v, x), rtol=1e-5, atol=1e-5)


def test_conv_transpose_rejects_bad_shapes_and_takes_no_formulation() -> None:
    x, k = jnp.zeros((1, 4, 4, 3)), jnp.zeros((4, 4, 3, 2))
    with pytest.raises(ValueError):
        conv_transpose_4x4_s2(x, jnp.zeros((3, 3, 3, 2)))
    for strategy in ("method", "input_grad", "kernel_grad"):
        with pytest.raises(TypeError, match=strategy):
            conv_transpose_4x4_s2(x, k, **{strategy: "auto"})


# ---------------------------------------------------------------- 4x4 convolution (down)


def lax_conv_reference(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def torch_conv_numpy(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """PyTorch Conv2d(4, stride, padding=1) as a loop; w is (Cout, Cin, 4, 4)."""
    n, h, wd, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = (h + 2 - 4) // stride + 1, (wd + 2 - 4) // stride + 1
    y = np.zeros((n, ho, wo, w.shape[0]), np.float64)
    for oy in range(ho):
        for ox in range(wo):
            patch = xp[:, stride * oy : stride * oy + 4, stride * ox : stride * ox + 4]
            y[:, oy, ox] = np.einsum("nhwc,ochw->no", patch, w)
    return y


# (x shape, Cout, stride): even and odd sizes, the 2x2 -> 1x1 innermost level, one input channel.
CONV_CASES = [
    ((2, 8, 6, 3), 4, 2),
    ((1, 20, 18, 6), 3, 2),
    ((1, 7, 9, 2), 3, 2),
    ((3, 2, 2, 5), 2, 2),
    ((2, 16, 16, 1), 3, 2),
    ((2, 6, 5, 3), 2, 1),
    ((1, 4, 4, 4), 1, 1),
    ((1, 7, 6, 8), 1, 1),  # "auto" weight gradient: "shift"
]


def conv_data(x_shape: tuple[int, ...], cout: int, stride: int) -> list[jax.Array]:
    """x, kernel and an output cotangent for a 4x4 convolution."""
    n, h, w, cin = x_shape
    out_shape = (n, (h - 2) // stride + 1, (w - 2) // stride + 1, cout)
    return randn(sum(x_shape) + cout, x_shape, (4, 4, cin, cout), out_shape)


@pytest.mark.parametrize("x_shape, cout, stride", CONV_CASES)
def test_conv_4x4_matches_lax_value_and_grads(
    x_shape: tuple[int, ...], cout: int, stride: int
) -> None:
    """`conv_4x4` (the gradient formulations it picks, its custom VJP), and every gradient
    formulation on every case it applies to: the phase forms (input gradient as a dot or as the
    transposed convolution, weight gradient "s2d") for stride 2 and even sizes only, "shift"
    for stride 1 only; autodiff and im2col everywhere."""
    (_, h, w, _) = x_shape
    phases = stride == 2 and h % 2 == 0 and w % 2 == 0
    x, kernel, cotangent = conv_data(x_shape, cout, stride)

    def ours(x, kernel, dy):
        out = {
            "value, grads": value_and_grads(lambda x, k: conv_4x4(x, k, stride), x, kernel, dy),
            "grad x (lax)": layers._conv_input_grad_lax(x, kernel, dy, stride),
            "grad kernel (lax)": layers._conv_kernel_grad_lax(x, kernel, dy, stride),
            "grad kernel (im2col)": layers._conv_kernel_grad_im2col(x, dy, stride),
        }
        if phases:
            out["grad x (dot)"] = layers._conv_input_grad_dot(kernel, dy)
            out["grad x (transposed)"] = layers._conv_input_grad_transposed(kernel, dy)
            out["grad kernel (s2d)"] = layers._conv_kernel_grad_s2d(x, kernel, dy)
        if stride == 1:
            out["grad kernel (shift)"] = layers._conv_kernel_grad_shift(x, dy)
        return out

    got = jax.jit(ours)(x, kernel, cotangent)
    ref = jax.jit(lambda *a: value_and_grads(lambda x, k: lax_conv_reference(x, k, stride), *a))(
        x, kernel, cotangent
    )
    assert got["value, grads"][0].shape == ref[0].shape == cotangent.shape
    assert len(got) == 4 + 3 * phases + (stride == 1)
    for name, a in got.items():
        b = ref if name == "value, grads" else ref[1] if name.startswith("grad x") else ref[2]
        jax.tree.map(
            lambda a, b, name=name: np.testing.assert_allclose(
                a, b, rtol=1e-5, atol=1e-5, err_msg=name
            ),
            a,
            b,
        )


@pytest.mark.parametrize("x_shape, cout, stride", CONV_CASES[:2] + CONV_CASES[4:5])
def test_conv_4x4_matches_pytorch_semantics(
    x_shape: tuple[int, ...], cout: int, stride: int
) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((cout, x_shape[-1], 4, 4)).astype(np.float32)  # PyTorch layout
    expected = torch_conv_numpy(x.astype(np.float64), w.astype(np.float64), stride)
    kernel = jnp.asarray(w.transpose(2, 3, 1, 0))  # (Cout, Cin, kh, kw) -> HWIO, no flip
    np.testing.assert_allclose(conv_4x4(jnp.asarray(x), kernel, stride), expected, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_module_matches_flax_conv_variables_and_output(stride: int) -> None:
    """Same parameter names, shapes and initial values as the `nn.Conv` it replaces (checkpoints
    and parameter counts carry over), same output."""
    (x,) = randn(2, (2, 8, 8, 3))
    ours = Conv4x4(5, strides=stride, bias_init=nn.initializers.normal(1.0))
    flax_conv = nn.Conv(
        5,
        (4, 4),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        kernel_init=normal_init(0.02),
        bias_init=nn.initializers.normal(1.0),
    )
    v, v_flax = init(ours, 3, x), init(flax_conv, 3, x)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v_flax)
    assert v["params"]["kernel"].shape == (4, 4, 3, 5) and v["params"]["bias"].shape == (5,)
    jax.tree.map(np.testing.assert_array_equal, v, v_flax)
    np.testing.assert_allclose(ours.apply(v, x), flax_conv.apply(v, x), rtol=1e-5, atol=1e-5)
    no_bias = init(Conv4x4(5, use_bias=False), 0, x)["params"]
    assert set(no_bias) == {"kernel"}


def test_conv_4x4_rejects_bad_arguments_and_takes_no_formulation() -> None:
    with pytest.raises(ValueError):
        conv_4x4(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2)))
    with pytest.raises(ValueError, match="stride"):
        conv_4x4(jnp.zeros((1, 4, 4, 3)), jnp.zeros((4, 4, 3, 2)), 3)
    x, k = jnp.zeros((1, 5, 4, 3)), jnp.zeros((4, 4, 3, 2))
    for strategy in ("input_grad", "kernel_grad"):
        with pytest.raises(TypeError, match=strategy):
            conv_4x4(x, k, 2, **{strategy: "auto"})


# ---------------------------------------------------------------- dropout and BatchNorm


@pytest.fixture(scope="module")
def dropout_net() -> tuple[UNetGenerator, dict, jax.Array]:
    g = UNetGenerator(depth=6, ngf=2)  # dropout on level 4 only (depth - 5 = 1 block)
    (x,) = randn(3, (2, 64, 64, 1))
    return g, init(g, 0, x, train=False), x


def test_dropout_only_in_train_mode(dropout_net) -> None:
    g, v, x = dropout_net

    (a, _), (a_again, _), (b, _) = (forward(g, v, x, train=True, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, a_again)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(forward(g, v, x, train=False), forward(g, v, x, train=False))


def test_dropout_levels() -> None:
    def dropout_names(depth: int) -> list[str]:
        g = UNetGenerator(depth=depth, ngf=1, use_dropout=True)
        x = jnp.zeros((1, 2**depth, 2**depth, 1))
        _, state = jax.eval_shape(
            lambda: g.init_with_output(
                {"params": jax.random.key(0), "dropout": jax.random.key(1)},
                x,
                train=True,
                capture_intermediates=True,
                mutable=True,
            )
        )
        return sorted(n for n in state["intermediates"] if "dropout" in n)

    assert dropout_names(8) == ["up4_dropout", "up5_dropout", "up6_dropout"]
    assert dropout_names(7) == ["up4_dropout", "up5_dropout"]
    assert dropout_names(5) == []


def test_batchnorm_running_stats_update_and_eval_use(small) -> None:
    v, x = small
    g = SMALL_G
    _, s1 = forward(g, v, x, train=True)
    _, s2 = forward(g, {**v, **s1}, x, train=True)
    for m1, m0 in zip(jax.tree.leaves(s1), jax.tree.leaves(v["batch_stats"]), strict=True):
        assert not np.allclose(m1, m0)
    # PyTorch momentum 0.1 from mean 0, var 1: m1 = 0.1 mu, m2 = 0.9 m1 + 0.1 mu = 1.9 m1, and
    # likewise for var (train mode normalises with batch statistics, so both steps see the same
    # activations).
    for name, layer in s1["batch_stats"].items():
        layer2 = s2["batch_stats"][name]
        np.testing.assert_allclose(layer2["mean"], 1.9 * layer["mean"], rtol=1e-4, atol=1e-6)
        var_batch = (layer["var"] - 0.9) / 0.1
        np.testing.assert_allclose(layer2["var"], 0.81 + 0.19 * var_batch, rtol=1e-4, atol=1e-6)

    # Eval mode uses the running statistics: it depends on them, and a sample's output does not
    # depend on the rest of its batch (in train mode it does).
    updated = {**v, **s1}
    eval_both = forward(g, updated, x, train=False)
    assert not np.allclose(eval_both, forward(g, v, x, train=False))
    np.testing.assert_allclose(eval_both[:1], forward(g, updated, x[:1], train=False), atol=1e-6)
    train_both, _ = forward(g, updated, x, train=True)
    train_one, _ = forward(g, updated, x[:1], train=True)
    assert not np.allclose(train_both[:1], train_one)


class TorchBatchNorm2dNumpy:
    """PyTorch `BatchNorm2d` (eps 1e-5, momentum 0.1, affine) in NumPy float64, on NHWC arrays."""

    def __init__(self, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray):
        self.scale, self.bias = scale.astype(np.float64), bias.astype(np.float64)
        self.mean, self.var = mean.astype(np.float64), var.astype(np.float64)

    def _normalise(self, x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        return (x - mean) / np.sqrt(var + 1e-5) * self.scale + self.bias

    def train(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        flat = x.reshape(-1, x.shape[-1])  # (N*H*W, C)
        n = flat.shape[0]
        mean = flat.sum(0) / n
        biased = ((flat - mean) ** 2).sum(0) / n
        unbiased = ((flat - mean) ** 2).sum(0) / (n - 1)
        self.mean = 0.9 * self.mean + 0.1 * mean
        self.var = 0.9 * self.var + 0.1 * unbiased
        return self._normalise(x, mean, biased)

    def eval(self, x: np.ndarray) -> np.ndarray:
        return self._normalise(x.astype(np.float64), self.mean, self.var)


BN_SHAPES = [(2, 3, 5, 4), (2, 1, 1, 3), (1, 2, 2, 5), (4, 2, 2, 2)]


@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_matches_pytorch_batchnorm2d(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    c = shape[-1]
    # Inputs with a non-zero mean and non-unit spread per channel, three different batches.
    xs = [rng.normal(rng.normal(0, 3, c), rng.uniform(0.2, 4, c), shape) for _ in range(3)]
    xs = [x.astype(np.float32) for x in xs]
    params = {
        "scale": rng.normal(1, 0.5, c).astype(np.float32),
        "bias": rng.normal(0, 1, c).astype(np.float32),
    }
    stats = {
        "mean": rng.normal(0, 1, c).astype(np.float32),
        "var": rng.uniform(0.5, 2, c).astype(np.float32),
    }
    ref = TorchBatchNorm2dNumpy(params["scale"], params["bias"], stats["mean"], stats["var"])
    variables = {"params": params, "batch_stats": stats}

    train_fn = jax.jit(lambda v, x: BatchNorm().apply(v, x, mutable=["batch_stats"]))
    for x in xs[:2]:  # two train-mode updates
        y, upd = train_fn(variables, x)
        variables = {"params": params, **upd}
        np.testing.assert_allclose(y, ref.train(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(variables["batch_stats"]["mean"], ref.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(variables["batch_stats"]["var"], ref.var, rtol=1e-5, atol=1e-6)
    y = BatchNorm(use_running_average=True).apply(variables, xs[2])
    np.testing.assert_allclose(y, ref.eval(xs[2]), rtol=1e-5, atol=1e-5)
    assert y.dtype == jnp.float32


def test_batchnorm_running_var_is_unbiased_unlike_flax() -> None:
    (x,) = randn(5, (2, 2, 2, 3))  # n = 8 values per channel: factor 8/7 on the variance
    ours = make_norm("batch", train=True, dtype=jnp.float32, name="bn")
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    v = flax_bn.init(jax.random.key(0), x)
    y_ours, s_ours = ours.apply(v, x, mutable=["batch_stats"])
    y_flax, s_flax = flax_bn.apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)  # same normalisation
    np.testing.assert_allclose(s_ours["batch_stats"]["mean"], s_flax["batch_stats"]["mean"])
    var_biased = (s_flax["batch_stats"]["var"] - 0.9) / 0.1
    np.testing.assert_allclose(
        s_ours["batch_stats"]["var"], 0.9 + 0.1 * var_biased * 8 / 7, rtol=1e-5
    )


def test_batchnorm_variables_match_flax_layout_and_init_keeps_stats() -> None:
    (x,) = randn(6, (2, 4, 4, 3))
    ours = init(BatchNorm(), 0, x)  # train mode: init must not update the statistics
    theirs = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(
        lambda a: (a.shape, a.dtype), theirs
    )
    np.testing.assert_array_equal(ours["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(ours["batch_stats"]["var"], np.ones(3))
    np.testing.assert_array_equal(ours["params"]["bias"], np.zeros(3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm().apply(ours, x[:1, :1, :1], mutable=["batch_stats"])
    BatchNorm(use_running_average=True).apply(ours, x[:1, :1, :1])  # eval mode is fine


def test_batchnorm_bfloat16_computes_stats_in_float32() -> None:
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(100.0, 0.5, (2, 4, 4, 3)), jnp.bfloat16)  # large mean, small sd
    v = init(BatchNorm(), 0, x)
    y, s = jax.jit(lambda v, x: BatchNorm(dtype=jnp.bfloat16).apply(v, x, mutable=["batch_stats"]))(
        v, x
    )
    assert y.dtype == jnp.bfloat16 and s["batch_stats"]["var"].dtype == jnp.float32
    ref = TorchBatchNorm2dNumpy(
        np.asarray(v["params"]["scale"]), np.zeros(3), np.zeros(3), np.ones(3)
    )
    np.testing.assert_allclose(
        y.astype(jnp.float32), ref.train(np.asarray(x, np.float32)), atol=0.03
    )
    np.testing.assert_allclose(s["batch_stats"]["mean"], ref.mean, rtol=1e-5)
    np.testing.assert_allclose(s["batch_stats"]["var"], ref.var, rtol=1e-5)


# ---------------------------------------------------------------- initialisation


def test_init_distributions(small, small_d) -> None:
    params = small[0]["params"]  # depth 4, ngf 8
    for name in ("down3", "up3"):
        k = np.asarray(params[name]["kernel"])
        assert k.size == 4 * 4 * 32 * 64
        assert abs(k.mean()) < 0.001, name  # sd of the mean: 0.02 / 181
        assert abs(k.std() - 0.02) < 0.02 * 0.02, name  # relative sd of the sd: 1/sqrt(2n) = 0.4%
    scales = np.concatenate(
        [np.asarray(layer["scale"]) for n, layer in params.items() if n.endswith("_norm")]
    )
    assert scales.size == 16 + 32 + 32 + 16 + 8
    assert abs(scales.mean() - 1.0) < 0.008  # 4 sd of the mean, 0.02 / sqrt(104)
    assert 0.014 < scales.std() < 0.026
    for n, layer in params.items():
        if n.endswith("_norm"):
            assert not np.any(layer["bias"]), n
    assert not np.any(params["up0"]["bias"])

    dp = small_d[0]["params"]  # ndf 8
    assert abs(float(dp["conv3"]["kernel"].std()) - 0.02) < 0.02 * 0.02
    assert not np.any(dp["conv0"]["bias"]) and not np.any(dp["conv4"]["bias"])
    assert abs(float(dp["norm3"]["scale"].mean()) - 1.0) < 0.02


def test_normal_init_values_equal_a_direct_draw() -> None:
    key = jax.random.key(7)
    np.testing.assert_array_equal(
        normal_init(0.02)(key, (4, 4, 3, 5)), 0.02 * jax.random.normal(key, (4, 4, 3, 5))
    )
    np.testing.assert_allclose(
        bn_scale_init()(key, (6,)), 1.0 + 0.02 * jax.random.normal(key, (6,)), rtol=1e-7
    )


def test_head_init_is_pytorch_linear_default() -> None:
    params = init(ProjectionHead(), 0, jnp.zeros((1, 900)))["params"]
    for name, fan_in in (("fc1", 900), ("fc2", 900)):
        k = np.asarray(params[name]["kernel"])
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(k).max() <= bound
        assert np.abs(k).max() > 0.99 * bound
        assert abs(k.std() - bound / np.sqrt(3)) < 0.01 * bound
    assert params["fc2"]["kernel"].shape == (900, 128)
