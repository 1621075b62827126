"""The trained U-Net generator as an ONNX graph (opset 17 by default), and a JAX-free runner of it.

Why by hand: the BioImage Model Zoo takes ONNX weights, and deepImageJ (Fiji) runs them with an
onnxruntime of at most 1.13, so the graph must use opset <= 17 and an IR version that runtime
reads (8 for opset 17). The maintained converter, jax2onnx, pins an orbax older than the one
clidim-jax installs. Eval-mode G is a plain chain of standard operators, so `generator_onnx`
writes it with the `onnx` package's helper API straight from the Flax variables, layer by layer
as `models.unet.UNetGenerator` builds it; `tests/test_onnx.py` checks it against the Flax module.

The graph (NCHW, the zoo's b, c, y, x axes; batch, height and width symbolic):
  input (N, C, H, W) float32, normalised intensities
  down i: [LeakyRelu 0.2 unless i == 0] -> Conv 4x4 s2 p1 (eval BatchNorm folded in)
          [-> InstanceNormalization]; the input of each down level i > 0 is kept as a skip
  up i:   Relu -> ConvTranspose 4x4 s2 p1 (BatchNorm folded in) [-> InstanceNormalization]
          -> Concat(skip, up) on the channel axis (Dropout is the identity in eval mode)
  up 0:   Relu -> ConvTranspose 4x4 s2 p1 [-> Tanh] [-> Add(base)], base = the input, or its
          Gaussian low-pass: Pad (reflect) -> depthwise Conv (column taps) -> depthwise Conv (rows)
  output (N, out_channels, H, W) float32, normalised intensities
The intensity normalisation stays outside the graph (the zoo package applies it as scale_linear
pre- and post-processing), so the graph computes exactly `G.apply(variables, x, train=False)`
(up to float32 rounding, and the NHWC <-> NCHW transposes).

Weights: a Flax `Conv4x4` kernel (4, 4, Cin, Cout) is a cross-correlation kernel in HWIO, so the
ONNX Conv weight (Cout, Cin, 4, 4) is its transpose. A `ConvTranspose4x4` kernel is stored in
`flax.linen.ConvTranspose` orientation, the spatial flip of PyTorch's `ConvTranspose2d` weight
(see `models.layers.conv_transpose_4x4_s2`); ONNX ConvTranspose computes PyTorch's (a scatter
y[2i - 1 + t] += x[i] w[t], pads 1), so its weight (Cin, Cout, 4, 4) is the kernel flipped in
both spatial axes, then transposed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

OPSET = 17  # deepImageJ's onnxruntime (<= 1.13) reads opsets up to 17
# Every operator in the graph has its present form from opset 11 on (Pad's pads as an input).
MIN_OPSET = 11
INSTALL_HINT = "pip install 'clidim-jax[onnx]'"
META_PREFIX = "clidim_jax."


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError(
            f"writing an ONNX model needs the onnx package ({INSTALL_HINT})"
        ) from None
    return onnx


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            f"running an ONNX model needs the onnxruntime package ({INSTALL_HINT})"
        ) from None
    return onnxruntime


def gaussian_taps(sigma: float) -> np.ndarray:
    """The float32 taps of `models.unet.gaussian_blur` (out to 3 sigma, normalised to sum 1),
    computed as it does so that the graph's blur is its blur (the tests compare the two)."""
    r = max(1, math.ceil(3 * sigma))
    t = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (t / t.sum()).astype(np.float32)


class _Graph:
    """Nodes and initializers of a graph under construction, with unique tensor names."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        base, k = name, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def constant(self, name: str, value: np.ndarray) -> str:
        name = self._unique(name)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, output: str | None = None, **attrs):
        output = self._unique(output or name)
        self.nodes.append(
            self.onnx.helper.make_node(
                op, inputs, [output], name=self._unique(f"{name}/{op}"), **attrs
            )
        )
        return output


def _field(m: Any, name: str, default: Any = None) -> Any:
    value = m.get(name, default) if hasattr(m, "get") else getattr(m, name, default)
    if value is None:
        raise ValueError(f"model.{name} is missing from the model config")
    return value


def _leaf(tree: Mapping, collection: str, layer: str, name: str, hint: str) -> np.ndarray:
    try:
        return np.asarray(tree[layer][name], np.float64)
    except (KeyError, TypeError):
        raise ValueError(
            f"the variables have no {collection}[{layer!r}][{name!r}]: they do not belong to a "
            f"generator with {hint}"
        ) from None


def generator_onnx(
    model_config: Any, variables: Mapping, in_channels: int = 1, opset: int = OPSET
) -> Any:
    """The eval-mode generator `UNetGenerator(...).apply(variables, x, train=False)` as an
    `onnx.ModelProto` ("input" -> "output", float32 NCHW, symbolic batch, height and width).

    `model_config` is `config.model` (depth, ngf, norm, output, residual, residual_sigma,
    bias_free, compute_dtype), `variables` the generator's {"params", "batch_stats"}
    (`run.generator_variables`, `RestoredRun.variables`), `in_channels` the input channels.
    Height and width must be multiples of 2**depth, as for the Flax module.

    A `model.compute_dtype` of bfloat16 is written in float32: the graph then computes what the
    float32 generator would with the same weights, not the bfloat16 convolutions of training
    (measured on the demo architecture with random weights: at most 0.4 % of the output range,
    0.07 % on average, bfloat16's rounding). Configurations the graph
    cannot express raise ValueError naming the field. The model passes
    `onnx.checker.check_model(full_check=True)`; its IR version is the lowest that `opset`
    allows (8 for 17), which old runtimes read.
    """
    onnx = _import_onnx()
    from onnx import TensorProto, helper

    import clidim_jax
    from clidim_jax.models.layers import BatchNorm, InstanceNorm
    from clidim_jax.models.unet import level_channels

    m = model_config
    depth, ngf = int(_field(m, "depth")), int(_field(m, "ngf"))
    norm, output = str(_field(m, "norm")), str(_field(m, "output", "tanh"))
    residual = str(_field(m, "residual", "none"))
    sigma = float(_field(m, "residual_sigma", 1.0))
    bias_free = bool(_field(m, "bias_free", False))
    dtype = str(_field(m, "compute_dtype", "float32"))
    if depth < 1:
        raise ValueError(f"model.depth must be >= 1, got {depth}")
    if ngf < 1:
        raise ValueError(f"model.ngf must be >= 1, got {ngf}")
    if norm not in ("batch", "instance", "none"):
        raise ValueError(f"model.norm={norm!r} has no ONNX form (batch, instance or none)")
    if output not in ("tanh", "linear"):
        raise ValueError(f"model.output={output!r} has no ONNX form (tanh or linear)")
    if residual not in ("none", "input", "smooth"):
        raise ValueError(f"model.residual={residual!r} has no ONNX form (none, input or smooth)")
    if residual == "smooth" and not sigma > 0:
        raise ValueError(f"model.residual_sigma must be > 0, got {sigma}")
    if bias_free and (norm != "none" or output != "linear"):
        raise ValueError("model.bias_free needs model.norm='none' and model.output='linear'")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.compute_dtype={dtype!r} cannot be exported (float32, bfloat16)")
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if not MIN_OPSET <= int(opset) <= onnx.defs.onnx_opset_version():
        raise ValueError(
            f"opset={opset} is not supported: {MIN_OPSET} .. {onnx.defs.onnx_opset_version()} "
            f"(the BioImage Model Zoo needs <= {OPSET})"
        )
    in_channels, opset = int(in_channels), int(opset)

    try:
        params, stats = variables["params"], variables.get("batch_stats", {}) or {}
    except (KeyError, TypeError, AttributeError):
        raise ValueError("variables must be a dict with 'params' (and 'batch_stats')") from None
    hint = f"model.depth={depth}, model.ngf={ngf}, model.norm={norm!r}"
    if f"down{depth}" in params or f"up{depth}" in params:
        raise ValueError(f"the variables have more than model.depth={depth} levels")
    level_bias = norm == "instance"  # models.layers.norm_uses_bias

    g = _Graph(onnx)

    def kernel(layer: str, cin: int, cout: int | None) -> np.ndarray:
        k = _leaf(params, "params", layer, "kernel", hint)
        if k.ndim != 4 or k.shape[:3] != (4, 4, cin) or (cout is not None and k.shape[3] != cout):
            want = f"(4, 4, {cin}, {cout if cout is not None else 'C'})"
            field = "in_channels" if layer == "down0" and k.shape[2:3] != (cin,) else "model.ngf"
            raise ValueError(
                f"params[{layer!r}]['kernel'] has shape {k.shape}, expected {want} (check "
                f"{field}; {hint}, in_channels={in_channels})"
            )
        return k

    def bias(layer: str, expected: bool, cout: int) -> np.ndarray:
        has = "bias" in params[layer]
        if has != expected:
            field = "model.bias_free" if layer == "up0" else "model.norm"
            raise ValueError(
                f"params[{layer!r}] {'has' if has else 'has no'} bias, which a generator with "
                f"{field}={bias_free if layer == 'up0' else norm!r} "
                f"{'does not have' if has else 'has'}"
            )
        return _leaf(params, "params", layer, "bias", hint) if has else np.zeros(cout)

    def fold(layer: str, w: np.ndarray, b: np.ndarray, axis: int):
        """Eval-mode BatchNorm folded into the preceding convolution, in float64.

        BatchNorm(z) = (z - mean) * s + beta with s = scale / sqrt(var + eps) is affine per
        channel, so conv(x; w, b) followed by it is conv(x; w * s, (b - mean) * s + beta).
        Folded rather than emitted as BatchNormalization: onnxruntime fuses Conv +
        BatchNormalization itself anyway, in float32, whereas folding here rounds once, from
        float64; and the graph a zoo consumer (deepImageJ) sees is smaller. Both forms agree
        with the Flax module to a few float32 roundings (measured: tests/test_onnx.py).
        """
        name = f"{layer}_norm"
        scale = _leaf(params, "params", name, "scale", hint)
        beta = _leaf(params, "params", name, "bias", hint)
        mean = _leaf(stats, "batch_stats", name, "mean", hint)
        var = _leaf(stats, "batch_stats", name, "var", hint)
        # The module adds the Python-float epsilon to a float32 variance: float32(1e-5).
        s = scale / np.sqrt(var + float(np.float32(BatchNorm.epsilon)))
        shape = [1] * 4
        shape[axis] = -1
        return w * s.reshape(shape), (b - mean) * s + beta

    def conv_layer(op: str, layer: str, y: str, cin: int, cout: int | None, **opts) -> tuple:
        k = kernel(layer, cin, cout)
        cout = k.shape[3]
        if op == "Conv":  # HWIO cross-correlation -> (Cout, Cin, kh, kw)
            w, axis = k.transpose(3, 2, 0, 1), 0
        else:  # flax ConvTranspose orientation -> PyTorch / ONNX (Cin, Cout, kh, kw), flipped
            w, axis = k[::-1, ::-1].transpose(2, 3, 0, 1), 1
        use_bias = opts.get("use_bias", level_bias)
        b = bias(layer, use_bias, cout)
        normed = opts.get("normed", False)
        if normed and norm == "batch":
            w, b = fold(layer, w, b, axis)
        inputs = [y, g.constant(f"{layer}.weight", w.astype(np.float32))]
        if use_bias or (normed and norm == "batch"):
            inputs.append(g.constant(f"{layer}.bias", b.astype(np.float32)))
        attrs = dict(kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1])
        y = g.node(op, inputs, layer, output=opts.get("output"), **attrs)
        if normed and norm == "instance":
            y = g.node(
                "InstanceNormalization",
                [
                    y,
                    g.constant(f"{layer}_norm.scale", np.ones(cout, np.float32)),
                    g.constant(f"{layer}_norm.bias", np.zeros(cout, np.float32)),
                ],
                f"{layer}_norm",
                epsilon=float(InstanceNorm.epsilon),
            )
        return y, cout

    y, channels = "input", in_channels
    inner = depth - 1
    skips: list[tuple[str, int]] = []
    for i in range(depth):
        if i > 0:
            skips.append((y, channels))
            y = g.node("LeakyRelu", [y], f"down{i}_act", alpha=0.2)
        y, channels = conv_layer(
            "Conv", f"down{i}", y, channels, level_channels(ngf, i), normed=0 < i < inner
        )
    for i in reversed(range(1, depth)):
        y = g.node("Relu", [y], f"up{i}_act")
        y, channels = conv_layer(
            "ConvTranspose", f"up{i}", y, channels, level_channels(ngf, i - 1), normed=True
        )
        skip, skip_channels = skips[i - 1]
        y = g.node("Concat", [skip, y], f"up{i}_concat", axis=1)
        channels += skip_channels
    y = g.node("Relu", [y], "up0_act")
    last = "output" if output == "linear" and residual == "none" else None
    y, out_channels = conv_layer(
        "ConvTranspose", "up0", y, channels, None, use_bias=not bias_free, output=last
    )
    if output == "tanh":
        y = g.node("Tanh", [y], "tanh", output="output" if residual == "none" else None)
    if residual != "none":
        if out_channels != in_channels:
            raise ValueError(
                f"model.residual={residual!r} needs as many input as output channels, got "
                f"in_channels={in_channels} and {out_channels}"
            )
        base = "input"
        if residual == "smooth":
            taps = gaussian_taps(sigma)
            r = len(taps) // 2
            pads = np.array([0, 0, r, r, 0, 0, r, r], np.int64)
            base = g.node(
                "Pad", ["input", g.constant("blur.pads", pads)], "blur_pad", mode="reflect"
            )
            columns = np.tile(taps.reshape(1, 1, -1, 1), (in_channels, 1, 1, 1))
            base = g.node(
                "Conv",
                [base, g.constant("blur.columns", columns)],
                "blur_columns",
                group=in_channels,
                kernel_shape=[len(taps), 1],
            )
            rows = np.tile(taps.reshape(1, 1, 1, -1), (in_channels, 1, 1, 1))
            base = g.node(
                "Conv",
                [base, g.constant("blur.rows", rows)],
                "blur_rows",
                group=in_channels,
                kernel_shape=[1, len(taps)],
            )
        y = g.node("Add", [y, base], "residual", output="output")

    float32 = TensorProto.FLOAT
    doc = (
        f"clidim-jax U-Net generator, eval mode: depth {depth}, ngf {ngf}, norm {norm}"
        f"{' (BatchNorm folded into the convolutions)' if norm == 'batch' else ''}, output "
        f"{output}, residual {residual}"
        f"{f' (sigma {sigma})' if residual == 'smooth' else ''}"
        f"{', bias-free' if bias_free else ''}. Input and output are normalised intensities "
        f"(N, C, H, W) float32, H and W multiples of {2**depth}; the intensity normalisation "
        f"is applied outside the graph."
        + (
            " Written in float32 from a model trained with bfloat16 convolutions."
            if dtype != "float32"
            else ""
        )
    )
    graph = helper.make_graph(
        g.nodes,
        "clidim_jax_generator",
        [
            helper.make_tensor_value_info(
                "input", float32, ["batch", in_channels, "height", "width"]
            )
        ],
        [
            helper.make_tensor_value_info(
                "output", float32, ["batch", out_channels, "height", "width"]
            )
        ],
        initializer=g.initializers,
        doc_string=doc,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="clidim-jax",
        producer_version=clidim_jax.__version__,
        doc_string=doc,
    )
    meta = {
        "depth": depth,
        "size_multiple": 2**depth,
        "ngf": ngf,
        "norm": norm,
        "output": output,
        "residual": residual,
        "residual_sigma": sigma,
        "bias_free": bias_free,
        "in_channels": in_channels,
        "out_channels": out_channels,
    }
    helper.set_model_props(model, {META_PREFIX + k: str(v) for k, v in meta.items()})
    onnx.checker.check_model(model, full_check=True)
    return model


class OnnxGenerator:
    """Eval-mode G run by onnxruntime (CPU): NHWC float32 normalised images in and out, like
    `generator.apply(variables, x, train=False)`, with no JAX.

    `model` is an `onnx.ModelProto` (from `generator_onnx`), its serialized bytes, or a path to
    a .onnx file. `threads` sets onnxruntime's intra-op threads (default: its own choice).
    `depth` is the U-Net depth recorded in the model's metadata (None for a model written
    elsewhere); H and W of the input must be multiples of 2**depth.

    Graph optimisation: onnxruntime's full level (its default: activations fused into the
    convolutions, blocked NCHWc layouts). Measured against the Flax module (unet_256, 256x256
    and 256x512, batches of 2), every level agrees to 4-5e-7 of the output range, the same as
    with BatchNormalization nodes instead of folded weights; the full level was the fastest
    (about 10 % on 2 CPU cores), so it is the one used.

    It has the generator interface `inference.Denoiser` needs (`depth`, `norm`,
    `apply(variables, x, train=False)`) and `runs_in_jax = False`: a Denoiser calls it on NumPy
    arrays, with clidim-jax's own tiling and blending, and never imports JAX.
    """

    runs_in_jax = False

    def __init__(self, model: Any, *, threads: int | None = None):
        ort = _import_onnxruntime()
        if hasattr(model, "SerializeToString"):
            data = model.SerializeToString()
        elif isinstance(model, bytes | bytearray):
            data = bytes(model)
        elif isinstance(model, str | os.PathLike):
            with open(model, "rb") as f:
                data = f.read()
        else:
            raise TypeError(
                f"expected an onnx.ModelProto, bytes or a path, got {type(model).__name__}"
            )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(
            data, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {
            k[len(META_PREFIX) :]: v for k, v in props.items() if k.startswith(META_PREFIX)
        }
        self.depth = int(self.metadata["depth"]) if "depth" in self.metadata else None
        (inp,) = self.session.get_inputs()
        self._input, self._output = inp.name, self.session.get_outputs()[0].name
        self.in_channels = inp.shape[1] if isinstance(inp.shape[1], int) else None
        # (instance norm normalises over the image: Denoiser then knows tiles are not exact)
        self.norm = self.metadata.get("norm", "batch")

    def apply(self, variables: Any, x: Any, train: bool = False) -> np.ndarray:
        """The Flax generator's call signature (`variables` unused: the weights are in the
        graph; eval mode only)."""
        if train:
            raise ValueError("an ONNX generator runs in eval mode only")
        return self(x)

    def __call__(self, x: Any) -> np.ndarray:
        """x: (N, H, W, C) float32 normalised -> (N, H, W, C_out) float32."""
        x = np.asarray(x, np.float32)
        if x.ndim != 4:
            raise ValueError(f"expected NHWC input, got shape {x.shape}")
        if self.in_channels is not None and x.shape[3] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got shape {x.shape}")
        if self.depth is not None:
            q = 2**self.depth
            if x.shape[1] % q or x.shape[2] % q:
                raise ValueError(
                    f"input size {x.shape[1]}x{x.shape[2]} is not divisible by 2**depth = {q}"
                )
        nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        (y,) = self.session.run([self._output], {self._input: nchw})
        return np.ascontiguousarray(y.transpose(0, 2, 3, 1))
