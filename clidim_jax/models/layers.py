"""pix2pix 4x4 convolutions (down, and transposed up) with CPU-friendly gradients; inits, norms."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any
Initializer = nn.initializers.Initializer

_DN = ("NHWC", "HWIO", "NHWC")
# Contract batch and both spatial axes of two NHWC arrays: (N,H,W,A) x (N,H,W,B) -> (A, B).
_NHW = (((0, 1, 2), (0, 1, 2)), ((), ()))


# Below this many input pixels per image (H * W), `method="auto"` uses the four-phase form.
# The fused form computes an (H+1) x (W+1) output (the phases are shifted by one pixel), so its
# overhead is (H+1)(W+1)/(HW): 4x at 1x1, 1.13x at 16x16, negligible from 32x32 on, where its
# single wide convolution beats four narrow ones (7x faster for the 1-channel output layer).
_PHASES_MAX_PIXELS = 256


def normal_init(std: float = 0.02, mean: float = 0.0) -> Initializer:
    """N(mean, std^2) initialiser: pix2pix's `init_type='normal'` for conv weights (std 0.02).

    The draw is flat, then reshaped: the values are those of `jax.random.normal(key, shape)` (a
    test checks it), but with the default partitionable threefry, XLA on CPU compiles a rank-4
    draw about 5 times slower than a flat one (about 1.3 s against 0.3 s per kernel), which
    dominates a jitted `init` of the U-Net.
    """

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        size = math.prod(shape)
        return mean + std * jax.random.normal(key, (size,), dtype).reshape(shape)

    return init


def bn_scale_init(std: float = 0.02) -> Initializer:
    """pix2pix's BatchNorm weight init, N(1, std^2)."""
    return normal_init(std=std, mean=1.0)


def torch_linear_init() -> Initializer:
    """PyTorch's default `nn.Linear` weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (kaiming_uniform with a=sqrt(5): bound = sqrt(6 / ((1 + 5) * fan_in)).) Flax Dense kernels are
    (in, out), so fan_in is the first axis, as variance_scaling assumes.
    """
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _pad1(x: Array) -> Array:
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _conv_valid(x: Array, kernel: Array) -> Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DN)


def _conv_transpose_phases(x: Array, kernel: Array) -> Array:
    """Four stride-1 2x2 convolutions, one per output phase, then an interleave."""
    n, h, w, _ = x.shape
    xp = _pad1(x)
    rows = []
    for py in (0, 1):
        cols = [
            _conv_valid(xp[:, py : py + h + 1, px : px + w + 1], kernel[py::2, px::2])
            for px in (0, 1)
        ]
        rows.append(jnp.stack(cols, axis=3))  # (N, H, W, px, C)
    return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, -1)  # (N, H, py, W, px, C)


def _conv_transpose_fused(x: Array, kernel: Array) -> Array:
    """One stride-1 2x2 convolution with 4*Cout channels, then depth-to-space and a 1-pixel crop.

    Phase p (0 or 1) of output row 2m + p reads padded-input rows m + p and m + p + 1 with kernel
    rows p and p + 2, i.e. it is the 2x2 "valid" convolution's row a = m + p. Ordering the phase
    channels as q = 1 - p makes depth-to-space row 2a + q = 2m + p + 1: a uniform shift by one.
    """
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    # kernel[2u + p, 2v + r] -> fused[u, v, :, (1 - p, 1 - r, :)]
    k = kernel.reshape(2, 2, 2, 2, cin, cout)[:, ::-1, :, ::-1]  # (u, q, v, s, Cin, Cout)
    k = k.transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, cin, 4 * cout)
    out = _conv_valid(_pad1(x), k).reshape(n, h + 1, w + 1, 2, 2, cout)
    out = out.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h + 2, 2 * w + 2, cout)
    return out[:, 1 : 2 * h + 1, 1 : 2 * w + 1]


def _conv_transpose_value(x: Array, kernel: Array, method: str) -> Array:
    if method == "auto":
        method = "phases" if x.shape[1] * x.shape[2] <= _PHASES_MAX_PIXELS else "fused"
    if method == "phases":
        return _conv_transpose_phases(x, kernel)
    if method == "fused":
        return _conv_transpose_fused(x, kernel)
    raise ValueError(f"method must be 'auto', 'phases' or 'fused', got {method!r}")


def _patches(xp: Array, stride: int, ho: int, wo: int) -> Array:
    """im2col of a padded NHWC input for a 4x4 window: (N, Ho, Wo, 16 * C), the last axis ordered
    (ty, tx, c) like a flattened (4, 4, C, ...) kernel."""
    s = stride
    cols = [
        xp[:, ty : ty + s * (ho - 1) + 1 : s, tx : tx + s * (wo - 1) + 1 : s]
        for ty in range(4)
        for tx in range(4)
    ]
    return jnp.concatenate(cols, axis=-1)


def _check_4x4(x: Array, kernel: Array) -> None:
    if x.ndim != 4 or kernel.shape[:2] != (4, 4) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(
            f"expected x (N,H,W,Cin) and kernel (4,4,Cin,Cout), got {x.shape} and {kernel.shape}"
        )


def _swap_flip(kernel: Array) -> Array:
    """The kernel of the adjoint operator: spatially flipped, Cin and Cout swapped."""
    return kernel[::-1, ::-1].transpose(0, 1, 3, 2)


# ------------------------------------------------------------------ transposed convolution (up)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_transpose(x: Array, kernel: Array, method: str, input_grad: str, kernel_grad: str):
    return _conv_transpose_value(x, kernel, method)


def _conv_transpose_fwd(x, kernel, method, input_grad, kernel_grad):
    return _conv_transpose_value(x, kernel, method), (x, kernel)


def _conv_transpose_bwd(method, input_grad, kernel_grad, res, dy):
    x, kernel = res
    if input_grad == "conv":
        # The adjoint of the transposed convolution is the strided convolution.
        dx = _conv_lax(dy, _swap_flip(kernel), 2)
    else:
        dx = jax.vjp(lambda x: _conv_transpose_value(x, kernel, method), x)[1](dy)[0]
    if kernel_grad == "im2col":
        # kernel[3 - t] pairs x[i] with y[2i - 1 + t] = pad1(y)[2i + t] (per spatial axis): one
        # dot of x against the stride-2 patches of the padded output gradient.
        _, h, w, cin = x.shape
        p = _patches(_pad1(dy), 2, h, w)  # (N, H, W, (ty, tx, Cout))
        g = lax.dot_general(x, p, _NHW).reshape(cin, 4, 4, -1).transpose(1, 2, 0, 3)
        dk = g[::-1, ::-1].astype(kernel.dtype)
    else:
        dk = jax.vjp(lambda k: _conv_transpose_value(x, k, method), kernel)[1](dy)[0]
    return dx, dk


_conv_transpose.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


def conv_transpose_4x4_s2(
    x: Array,
    kernel: Array,
    *,
    method: Literal["auto", "phases", "fused"] = "auto",
    input_grad: Literal["lax", "conv"] = "lax",
    kernel_grad: Literal["im2col", "lax"] = "im2col",
) -> Array:
    """PyTorch `ConvTranspose2d(4, stride=2, padding=1)` on NHWC: (N,H,W,Cin) -> (N,2H,2W,Cout).

    `kernel` is (4, 4, Cin, Cout) in the orientation of `flax.linen.ConvTranspose` (transpose_kernel
    False): the result equals

        lax.conv_transpose(x, kernel, strides=(2, 2), padding=((2, 2), (2, 2)),
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))

    (dilate x by 2, pad by 4 - 1 - 1 = 2 on each side, correlate with the unflipped kernel), in
    value and in gradients, without the transposed convolution whose weight gradient XLA on CPU runs
    very slowly. Per spatial axis, as a scatter: y[2i - 1 + t] += x[i] * kernel[3 - t], t = 0..3
    (output indices -1 and 2H fall outside and are dropped: that is PyTorch's padding=1).

    Relation to a PyTorch weight `w` of shape (Cin, Cout, 4, 4): the kernel is spatially FLIPPED,
        kernel = w.transpose(2, 3, 0, 1)[::-1, ::-1]
    since PyTorch scatters y[o] += x[i] * w[o - 2i + 1] while the correlation above reads
    kernel[2i - o + 2] = kernel[3 - (o - 2i + 1)].

    Value: both formulations are exact rearrangements of the same products: "phases" (four 2x2
    convolutions) is faster for small spatial inputs, "fused" (one 2x2 convolution with 4*Cout
    outputs) for large ones; "auto" picks by the (static) input size.

    Gradients (a custom VJP; the same values as autodiff, summed in another order):
    `kernel_grad="im2col"` is one dot of x against the stride-2 patches of the output gradient,
    where autodiff of the stride-1 forms gives a convolution over the whole image with a 2x2
    output, which XLA on CPU runs at a fraction of its matmul speed. `input_grad="lax"` is the
    autodiff of the chosen forward form (stride-1 convolutions), "conv" the equivalent 4x4
    stride-2 convolution of the output gradient (`conv_4x4`).
    """
    _check_4x4(x, kernel)
    if method not in ("auto", "phases", "fused"):
        raise ValueError(f"method must be 'auto', 'phases' or 'fused', got {method!r}")
    return _conv_transpose(x, kernel, method, input_grad, kernel_grad)


# ------------------------------------------------------------------ convolution (down)


def _conv_lax(x: Array, kernel: Array, stride: int) -> Array:
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=_DN
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, kernel: Array, stride: int, input_grad: str, kernel_grad: str) -> Array:
    return _conv_lax(x, kernel, stride)


def _conv_fwd(x, kernel, stride, input_grad, kernel_grad):
    return _conv_lax(x, kernel, stride), (x, kernel)


def _conv_bwd(stride, input_grad, kernel_grad, res, dy):
    x, kernel = res
    if input_grad == "auto":
        even = x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0
        input_grad = "transposed" if stride == 2 and even else "lax"
    if input_grad == "transposed":
        # The adjoint of the 4x4 stride-2 pad-1 convolution of an even-sized input is the
        # transposed convolution with the flipped, swapped kernel: stride-1 convolutions, where
        # autodiff gives an input-dilated convolution that XLA on CPU runs slowly.
        dx = _conv_transpose_value(dy, _swap_flip(kernel), "auto")
    else:
        dx = jax.vjp(lambda x: _conv_lax(x, kernel, stride), x)[1](dy)[0]
    if kernel_grad == "im2col":
        _, ho, wo, cout = dy.shape
        p = _patches(_pad1(x), stride, ho, wo)  # (N, Ho, Wo, (ty, tx, Cin))
        dk = lax.dot_general(p, dy, _NHW).reshape(4, 4, x.shape[-1], cout).astype(kernel.dtype)
    else:
        dk = jax.vjp(lambda k: _conv_lax(x, k, stride), kernel)[1](dy)[0]
    return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_4x4(
    x: Array,
    kernel: Array,
    stride: int = 2,
    *,
    input_grad: Literal["auto", "transposed", "lax"] = "auto",
    kernel_grad: Literal["lax", "im2col"] = "lax",
) -> Array:
    """PyTorch `Conv2d(Cin, Cout, 4, stride, padding=1)` on NHWC with a (4, 4, Cin, Cout) kernel:

        lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))

    in value and gradients. The value is that convolution; the gradients are a custom VJP (the
    same values, summed in another order): `input_grad="auto"` takes, for stride 2 and an
    even-sized input, the transposed convolution `conv_transpose_4x4_s2` of the output gradient
    (stride-1 convolutions) instead of the input-dilated convolution of autodiff, which XLA on CPU
    runs several times slower; "lax" is autodiff. `kernel_grad="lax"` is autodiff, "im2col" one
    dot of the 4x4 patches of x with the output gradient: in the reference train step it was
    slower than autodiff (the patches cost a copy 16 times the input), so it is not the default.
    """
    _check_4x4(x, kernel)
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    return _conv(x, kernel, stride, input_grad, kernel_grad)


class Conv4x4(nn.Module):
    """pix2pix `Conv2d(Cin, features, 4, stride, padding=1)` for NHWC input (`conv_4x4`).

    The variables are those of `flax.linen.Conv(features, (4, 4), strides, ((1, 1), (1, 1)))`:
    float32 'kernel' (4, 4, Cin, features) and 'bias' (features,) when `use_bias`, with the same
    names, shapes and initialisation, so checkpoints carry over; the computation runs in `dtype`.
    """

    features: int
    strides: int = 2
    use_bias: bool = True
    kernel_init: Initializer = normal_init(0.02)
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", self.kernel_init, (4, 4, x.shape[-1], self.features), jnp.float32
        )
        y = conv_4x4(x.astype(self.dtype), kernel.astype(self.dtype), self.strides)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class ConvTranspose4x4(nn.Module):
    """pix2pix up-sampling `ConvTranspose2d(Cin, features, 4, stride=2, padding=1)`, NHWC input.

    Parameters are float32 'kernel' (4, 4, Cin, features), in `flax.linen.ConvTranspose`
    orientation (see `conv_transpose_4x4_s2` for the flip from a PyTorch weight), and 'bias'
    (features,) when `use_bias`; the computation runs in `dtype`.
    """

    features: int
    use_bias: bool = False
    kernel_init: Initializer = normal_init(0.02)
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Dtype = jnp.float32
    method: Literal["auto", "phases", "fused"] = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", self.kernel_init, (4, 4, x.shape[-1], self.features), jnp.float32
        )
        y = conv_transpose_4x4_s2(
            x.astype(self.dtype), kernel.astype(self.dtype), method=self.method
        )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class InstanceNorm(nn.Module):
    """PyTorch's `InstanceNorm2d` default (affine=False, no running statistics) for NHWC input."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 2), keepdims=True)  # biased, as PyTorch
        return ((xf - mean) * lax.rsqrt(var + self.epsilon)).astype(self.dtype)


class BatchNorm(nn.Module):
    """PyTorch's `BatchNorm2d` (affine, track_running_stats) for NHWC input.

    Train mode normalises with the batch mean and the biased batch variance over (N, H, W) and
    updates the running statistics with PyTorch's rule, `momentum` in PyTorch's convention:
        mean <- (1 - momentum) * mean + momentum * batch_mean
        var  <- (1 - momentum) * var  + momentum * batch_var * n / (n - 1),   n = N * H * W,
    i.e. the running variance takes the UNBIASED batch variance, where `flax.linen.BatchNorm`
    takes the biased one (a difference of a factor n / (n - 1) that matters at the inner,
    small-spatial levels). Eval mode (`use_running_average`) normalises with the running
    statistics. As in flax, the statistics are not updated while the module is initialising.

    Variables are those of `flax.linen.BatchNorm`: float32 'params' 'scale' (init N(1, 0.02^2),
    pix2pix) and 'bias' (zeros), float32 'batch_stats' 'mean' (zeros) and 'var' (ones). The
    statistics and the normalisation are computed in float32 whatever `dtype` is (the compute
    dtype of the output). They are plain means over the whole (global) batch, so under `jax.jit`
    with a batch sharded over devices they are global without an `axis_name`. The variance is
    the two-pass mean((x - mean)^2), as PyTorch, not the cancellation-prone E[x^2] - E[x]^2.
    Like PyTorch, train mode rejects a batch of one value per channel (the unbiased variance
    would be 0/0).
    """

    use_running_average: bool = False
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    scale_init: Initializer = bn_scale_init()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)

        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            n = math.prod(x.shape[:-1])
            if n < 2:
                raise ValueError(
                    f"BatchNorm in train mode needs more than 1 value per channel, got input "
                    f"shape {x.shape}"
                )
            mean = xf.mean(axis=axes)
            var = jnp.square(xf - mean).mean(axis=axes)  # biased: used to normalise
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / (n - 1))

        return ((xf - mean) * (scale * lax.rsqrt(var + self.epsilon)) + bias).astype(self.dtype)


NORMS = ("batch", "instance", "none")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def norm_uses_bias(norm: str) -> bool:
    """pix2pix's `use_bias = norm_layer == nn.InstanceNorm2d`: convs before a norm get a bias only
    with instance norm (so with norm='none' they have none either, as in pix2pix)."""
    check_norm(norm)
    return norm == "instance"


def make_norm(norm: str, *, train: bool, dtype: Dtype, name: str) -> nn.Module | None:
    """The normalisation layer pix2pix builds for `--norm` (None for 'none')."""
    check_norm(norm)
    if norm == "batch":
        return BatchNorm(use_running_average=not train, momentum=0.1, dtype=dtype, name=name)
    if norm == "instance":
        return InstanceNorm(dtype=dtype, name=name)
    return None
