"""CPU-friendly 4x4 stride-2 transposed convolution (phase decomposition), pix2pix initialisers."""

from __future__ import annotations

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


def conv_transpose_4x4_s2(
    x: Array, kernel: Array, *, method: Literal["auto", "phases", "fused"] = "auto"
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

    Both formulations are exact rearrangements of the same products: "phases" (four 2x2
    convolutions) is faster for small spatial inputs, "fused" (one 2x2 convolution with 4*Cout
    outputs) for large ones; "auto" picks by the (static) input size.
    """
    if x.ndim != 4 or kernel.shape[:2] != (4, 4) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(
            f"expected x (N,H,W,Cin) and kernel (4,4,Cin,Cout), got {x.shape} and {kernel.shape}"
        )
    if method == "auto":
        method = "phases" if x.shape[1] * x.shape[2] <= _PHASES_MAX_PIXELS else "fused"
    if method == "phases":
        return _conv_transpose_phases(x, kernel)
    if method == "fused":
        return _conv_transpose_fused(x, kernel)
    raise ValueError(f"method must be 'auto', 'phases' or 'fused', got {method!r}")


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
