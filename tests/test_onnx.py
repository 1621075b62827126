"""The ONNX generator (`clidim_jax.onnx_export`) against the Flax module it is written from.

Truth is `nets.generator.apply(variables, x, train=False)`, with trained-looking variables:
every parameter redrawn (kernels at a scale that keeps activations of order one through the
depth, asymmetric, so a flipped or transposed kernel shows; BatchNorm scales, offsets and
running statistics away from their init; the last layer non-zero, which the residual
generators initialise at zero), on batches of 2 at two image sizes, one of them not square.
"""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clidim_jax.configs import demo, own_data, reference
from conftest import tiny_config

from clidim_jax.models.unet import gaussian_blur
from clidim_jax.onnx_export import OPSET, OnnxGenerator, generator_onnx
from clidim_jax.state import build_networks

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4  # of the output's intensity range (max - min): issue 15's acceptance


def trained_looking(config, seed: int = 0) -> dict:
    """G's variable tree (`nets.generator.init`'s structure, from `jax.eval_shape`), every leaf
    drawn anew with numpy."""
    nets = build_networks(config)
    q = 2**config.model.depth
    init = lambda key, x: nets.generator.init(key, x, train=False)
    tree = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, q, q, 1)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        layer, name = path[-2].key, path[-1].key
        shape = leaf.shape
        if name == "kernel":  # (4, 4, Cin, Cout); fan-in 16 Cin (down) or 4 Cin (up)
            fan_in = (16 if layer.startswith("down") else 4) * shape[2]
            v = rng.normal(0.0, math.sqrt(1.0 / fan_in), shape)
        elif name == "scale":
            v = rng.uniform(0.5, 1.5, shape)
        elif name == "var":
            v = rng.uniform(0.3, 2.0, shape)
        else:  # conv and BatchNorm biases, running means
            v = rng.normal(0.0, 0.2, shape)
        return np.asarray(v, np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, tree)
    assert np.abs(variables["params"]["up0"]["kernel"]).min() > 0
    return variables


def images(shape, seed: int = 1) -> np.ndarray:
    """Normalised test images: smooth structure plus noise, in about [-1, 1]."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.sin(7 * yy + 3 * xx * xx) * np.cos(5 * xx)
    x = 0.6 * base[None] + rng.normal(0.0, 0.3, (n, h, w))
    return np.clip(x, -1.0, 1.0).astype(np.float32)[..., None]


def relative_error(config, variables, sizes, model=None) -> list[float]:
    """max |ONNX - JAX| / (max - min of the JAX output) per image size (batches of 2)."""
    nets = build_networks(config)
    model = generator_onnx(config.model, variables) if model is None else model
    onnx_g = OnnxGenerator(model)
    apply = jax.jit(lambda v, x: nets.generator.apply(v, x, train=False))
    errors = []
    for h, w in sizes:
        x = images((2, h, w))
        want = np.asarray(apply(variables, x))
        got = onnx_g(x)
        assert got.shape == want.shape == (2, h, w, 1)
        span = float(want.max() - want.min())
        assert span > 0.1  # a non-trivial output (not saturated, not constant)
        errors.append(float(np.abs(got - want).max()) / span)
    return errors


def tiny_instance():
    c = tiny_config()
    c.model.norm = "instance"
    return c


def tiny_residual_input():
    c = tiny_config()
    c.model.norm, c.model.output, c.model.residual, c.model.bias_free = (
        "none",
        "linear",
        "input",
        True,
    )
    return c


ARCHITECTURES = {
    "demo": (demo.get_config, [(64, 64), (64, 128)]),  # depth 6, batch norm, tanh
    "own_data": (own_data.get_config, [(64, 64), (128, 64)]),  # no norm, linear, smooth
    "tiny_instance": (tiny_instance, [(32, 32), (32, 48)]),
    "tiny_residual_input": (tiny_residual_input, [(16, 16), (48, 32)]),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_onnx_matches_flax(name):
    make, sizes = ARCHITECTURES[name]
    config = make()
    errors = relative_error(config, trained_looking(config), sizes)
    print(f"{name}: max |ONNX - JAX| / range = {max(errors):.2e}")
    assert max(errors) < TOLERANCE, errors


@pytest.mark.slow
def test_onnx_matches_flax_reference_unet_256():
    """The reference's 8-level U-Net (ngf 64, batch norm, dropout, tanh), 256x256 and 256x512."""
    config = reference.get_config()
    assert config.model.depth == 8 and config.model.ngf == 64
    errors = relative_error(config, trained_looking(config), [(256, 256), (256, 512)])
    print(f"reference: max |ONNX - JAX| / range = {max(errors):.2e}")
    assert max(errors) < TOLERANCE, errors


def test_model_is_standard_opset_17():
    config = demo.get_config()
    model = generator_onnx(config.model, trained_looking(config))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    assert OPSET <= 17
    assert model.ir_version <= 8  # onnxruntime 1.13 (deepImageJ) reads IR <= 8
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert all(n.domain == "" for n in model.graph.node)
    assert ops <= {"Conv", "ConvTranspose", "LeakyRelu", "Relu", "Concat", "Tanh"}
    assert "BatchNormalization" not in ops  # folded
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    assert dims(inp) == ["batch", 1, "height", "width"] == dims(out)
    assert model.producer_name == "clidim-jax" and model.doc_string
    g = OnnxGenerator(model.SerializeToString())
    assert g.depth == 6 and g.metadata["norm"] == "batch"


def test_smooth_residual_and_instance_norm_ops():
    config = own_data.get_config()
    model = generator_onnx(config.model, trained_looking(config))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Pad") == 1 and ops[-1] == "Add"
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    assert onnx.helper.get_attribute_value(pad.attribute[0]) == b"reflect"
    config = tiny_instance()
    model = generator_onnx(config.model, trained_looking(config))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("InstanceNormalization") == 2 * config.model.depth - 3


def test_gaussian_base_alone():
    """The graph's blur is `unet.gaussian_blur`: with the U-Net's last layer at zero, the
    residual generator is its base (sigma 2.0: radius 6 of a 32-pixel image)."""
    config = tiny_config()
    config.model.norm, config.model.output, config.model.residual = "none", "linear", "smooth"
    config.model.residual_sigma = 2.0
    variables = trained_looking(config)
    for k in ("kernel", "bias"):
        variables["params"]["up0"][k] = np.zeros_like(variables["params"]["up0"][k])
    x = images((2, 32, 48))
    got = OnnxGenerator(generator_onnx(config.model, variables))(x)
    want = np.asarray(gaussian_blur(jnp.asarray(x), 2.0))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_model_from_path_and_other_opset(tmp_path):
    config = tiny_config()
    variables = trained_looking(config)
    path = tmp_path / "g.onnx"
    path.write_bytes(generator_onnx(config.model, variables).SerializeToString())
    x = images((2, 16, 32))
    y = OnnxGenerator(path)(x)
    model_13 = generator_onnx(config.model, variables, opset=13)
    assert model_13.opset_import[0].version == 13
    np.testing.assert_array_equal(OnnxGenerator(model_13)(x), y)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 16"):
        OnnxGenerator(path)(images((1, 16, 24)))
    with pytest.raises(ValueError, match="input channels"):
        OnnxGenerator(path)(np.zeros((1, 16, 16, 2), np.float32))


def test_bfloat16_model_written_in_float32():
    """A model trained with bfloat16 convolutions is written in float32: the graph computes
    what the float32 generator computes with the same weights."""
    config = tiny_config()
    variables = trained_looking(config)
    config.model.compute_dtype = "bfloat16"
    model = generator_onnx(config.model, variables)
    assert "bfloat16" in model.doc_string
    config.model.compute_dtype = "float32"
    assert max(relative_error(config, variables, [(32, 32)], model=model)) < TOLERANCE


def _bad(field, value):
    def change(c):
        c.model[field] = value

    return change


@pytest.mark.parametrize(
    "change, field",
    [
        (_bad("norm", "group"), "model.norm"),
        (_bad("output", "sigmoid"), "model.output"),
        (_bad("residual", "median"), "model.residual"),
        (_bad("compute_dtype", "float16"), "model.compute_dtype"),
        (_bad("bias_free", True), "model.bias_free"),  # with batch norm and tanh
        (_bad("depth", 3), "model.depth"),  # variables of depth 4
        (_bad("ngf", 16), "model.ngf"),  # variables of ngf 8
        (_bad("norm", "instance"), "model.norm"),  # variables without biases
    ],
)
def test_unsupported_configuration_names_the_field(change, field):
    config = tiny_config()
    variables = trained_looking(config)
    change(config)
    with pytest.raises(ValueError, match=field.replace(".", "\\.")):
        generator_onnx(config.model, variables)


def test_bad_arguments_name_them():
    config = tiny_config()
    variables = trained_looking(config)
    with pytest.raises(ValueError, match="opset"):
        generator_onnx(config.model, variables, opset=10)
    with pytest.raises(ValueError, match="in_channels"):
        generator_onnx(config.model, variables, in_channels=2)
    config.model.residual = "input"
    variables["params"]["down0"]["kernel"] = np.zeros((4, 4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="in_channels=2"):
        generator_onnx(config.model, variables, in_channels=2)


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="clidim-jax\\[onnx\\]"):
        OnnxGenerator(b"")


def test_denoiser_runs_the_onnx_generator_like_the_flax_one_tiled_and_with_tta():
    """`inference.Denoiser` with an `OnnxGenerator`: the same tiling, blending, TTA and
    intensity normalisation as with the Flax module, so the same denoised image (original
    units) within the tolerance of its range."""
    from clidim_jax.data.normalization import Normalization
    from clidim_jax.inference import Denoiser

    config = own_data.get_config()
    variables = trained_looking(config)
    nets = build_networks(config)
    onnx_g = OnnxGenerator(generator_onnx(config.model, variables))
    norm = Normalization(low=100.0, high=900.0)
    rng = np.random.default_rng(3)
    image = 500 + 300 * images((1, 200, 150))[0, ..., 0] + rng.normal(0, 20, (200, 150))
    for tta in (False, True):
        opts = dict(tile=128, overlap=64, batch_size=2, tta=tta)
        want = Denoiser(nets.generator, variables, norm, **opts).denoise(image)
        got = Denoiser(onnx_g, None, norm, **opts).denoise(image)
        assert not Denoiser(onnx_g, None, norm, **opts).fits_whole(image.shape)  # tiled
        span = float(want.max() - want.min())
        assert got.shape == want.shape == image.shape and span > 10
        assert float(np.abs(got - want).max()) / span < TOLERANCE, tta


def test_onnx_denoising_needs_no_jax(tmp_path):
    """With JAX unimportable, an ONNX file still denoises through `Denoiser`."""
    import subprocess

    config = tiny_config()
    path = tmp_path / "g.onnx"
    path.write_bytes(generator_onnx(config.model, trained_looking(config)).SerializeToString())
    code = (
        "import sys; sys.modules['jax'] = None\n"  # any `import jax` now fails
        "import numpy as np\n"
        "from clidim_jax.data.normalization import Normalization\n"
        "from clidim_jax.inference import Denoiser\n"
        "from clidim_jax.onnx_export import OnnxGenerator\n"
        f"g = OnnxGenerator({str(path)!r})\n"
        "d = Denoiser(g, None, Normalization(low=0.0, high=1.0), tile=64, tta=True)\n"
        "y = d.denoise(np.random.default_rng(0).random((100, 70)))\n"
        "assert y.shape == (100, 70) and np.isfinite(y).all()\n"
        "assert 'jax' not in [m.split('.')[0] for m, v in sys.modules.items() if v]\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
