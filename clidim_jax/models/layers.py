"""pix2pix 4x4 convolutions (down, and transposed up) with CPU-friendly gradients; inits, norms."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any
Initializer = nn.initializers.Initializer

_DN = ("NHWC", "HWIO", "NHWC")


# Formulations by static shape (measured on the 2-core CPU, `benchmarks/conv_grads.py` and the
# reference train step). One private selector picks each: `_conv_transpose_value`,
# `_conv_transpose_grads` and `_conv_grads`; the public functions and modules take no choice.
# The transposed convolution's alternatives that lost (four phase convolutions; autodiff of
# the forward forms) are in `tests/test_models.py`, which proves every formulation equal.
# "Dot" forms keep the kernel in its stored (4, 4, Cin, Cout) layout: XLA on CPU copies a
# kernel whose Cin and Cout axes must be swapped at a few ns per element, which for the 1-8
# Mi-float inner kernels of unet_256 cost more than their convolutions. At small spatial sizes
# the dots are as fast as the convolutions; at large ones their 4x4 footprints (4x the output)
# cost memory traffic, so the convolution forms stay.
#
# Transposed convolution: "dot" up to this many input pixels per image (H * W), else "fused".
# "fused" computes an (H+1) x (W+1) output (phases shifted by one pixel): its overhead is
# (H+1)(W+1)/(HW), negligible from 32x32 on, where one wide convolution beats the dots. (Four
# 2x2 convolutions, one per output phase, lost to both.) `conv_transpose_breakpoints()` is the
# public statement of this choice (model export needs it).
_DOT_MAX_PIXELS = 256
# Input gradients as dots up to this many pixels on the small side (the output of a strided
# convolution, the input of a transposed one), else as the adjoint convolution (the transposed
# convolution's stride-2 convolution, the strided convolution's phase-decomposed transposed
# one). The strided convolution's input gradient is a dot at any size for at most
# `_DOT_MAX_CHANNELS` input channels (PatchGAN's first layer: 2x faster).
_DOT_MAX_CHANNELS = 4
_DX_DOT_MAX_PIXELS = 64
# Weight gradients. XLA's CPU convolutions compute a stride-1 weight gradient (a convolution
# whose window is the whole image) near matmul speed, but a strided one (a window dilated by 2)
# at about half of it. So: the strided convolution's as the weight gradient of the stride-1
# 2x2 convolution of the space-to-depth input ("s2d"; also for PatchGAN's 2-channel first
# layer, 2x faster than im2col there), or one im2col dot up to `_IM2COL_MAX_PIXELS` output
# pixels; the transposed convolution's as the weight gradient of its "fused" stride-1 form,
# or per-tap dots ("im2col") up to `_T_IM2COL_MAX_PIXELS` input pixels (or few output
# channels); a stride-1 convolution with few output channels (PatchGAN's last layer, where the
# convolution form runs at a few GFLOP/s) as one dot over shifted rows ("shift"). The
# thresholds are read when a function is traced (`benchmarks/ab_step.py` varies them).
_IM2COL_MAX_PIXELS = 16
_T_IM2COL_MAX_PIXELS = 64


def _small(pixels: int, limit: int, channels: int) -> bool:
    return pixels <= limit or channels <= _DOT_MAX_CHANNELS


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


def _conv_transpose_dot(x: Array, kernel: Array) -> Array:
    """y_pad[2i + t] += x[i] . kernel[3 - t]: one 2-D dot per tap with the tap's (Cin, Cout)
    block of the kernel (a contiguous slice: no copy), the footprints summed into place."""
    n, h, w, _ = x.shape
    x2 = _rows(x)
    return _col2im_s2(_tap_grid(lambda ty, tx: (x2 @ kernel[3 - ty, 3 - tx]).reshape(n, h, w, -1)))


def _conv_transpose_value(x: Array, kernel: Array) -> Array:
    """The transposed convolution's value: "dot" up to `_DOT_MAX_PIXELS` input pixels per image,
    else "fused" (see `conv_transpose_breakpoints`)."""
    if x.shape[1] * x.shape[2] <= _DOT_MAX_PIXELS:
        return _conv_transpose_dot(x, kernel)
    return _conv_transpose_fused(x, kernel)


def conv_transpose_breakpoints() -> tuple[int, ...]:
    """The input sizes, in pixels per image (H * W), after which `conv_transpose_4x4_s2` (and
    `ConvTranspose4x4`) change the formulation of their value, in increasing order.

    The value is computed by one exact formulation or another chosen from the static input
    shape; within each range [1, b0], [b0 + 1, b1], ..., [b_last + 1, inf) the program is the
    same. A shape-polymorphic export (`clidim_jax.export`) needs one program per range. The
    formulations give the same values up to float rounding, not bit for bit.
    """
    return (_DOT_MAX_PIXELS,)


def _tap_grid(fn) -> list[list[Array]]:
    return [[fn(ty, tx) for tx in range(4)] for ty in range(4)]


def _window_taps(xp: Array, stride: int, ho: int, wo: int) -> list[list[Array]]:
    """taps[ty][tx] = xp[:, stride*i + ty, stride*j + tx] for i < ho, j < wo: the 4x4 windows
    of a padded NHWC input, one (N, ho, wo, C) strided slice per tap."""
    s = stride
    return _tap_grid(
        lambda ty, tx: xp[:, ty : ty + s * (ho - 1) + 1 : s, tx : tx + s * (wo - 1) + 1 : s]
    )


def _patches(xp: Array, stride: int, ho: int, wo: int) -> Array:
    """im2col of a padded NHWC input for a 4x4 window: (N, Ho, Wo, 16 * C), the last axis ordered
    (ty, tx, c) like a flattened (4, 4, C, ...) kernel."""
    return jnp.concatenate([t for row in _window_taps(xp, stride, ho, wo) for t in row], axis=-1)


def _col2im_s2(taps: list[list[Array]]) -> Array:
    """The adjoint of stride-2 4x4 patches: taps[ty][tx] (N, h, w, C) -> (N, 2h, 2w, C) with
    out_pad[2i + ty, 2j + tx] += taps[ty][tx][i, j] (out_pad = the output padded by 1 per side).

    Computed per output phase (a, b): tap ty = 2u + a reaches padded row 2(i + u) + a, so phase
    row m sums taps[2u + a][..][m - u] over u in {0, 1} (and likewise for columns): four shifted
    adds per phase, then an interleave; no scatter.
    """
    n, h, w, c = taps[0][0].shape
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    rows = []
    for a in (0, 1):
        phases = []
        for b in (0, 1):
            terms = [
                jnp.pad(taps[2 * u + a][2 * v + b], pad)[:, 1 - u : h + 2 - u, 1 - v : w + 2 - v]
                for u in (0, 1)
                for v in (0, 1)
            ]
            phases.append(sum(terms[1:], terms[0]))  # (N, h+1, w+1, C)
        rows.append(jnp.stack(phases, axis=3))  # (N, h+1, w+1, b, C)
    full = jnp.stack(rows, axis=2).reshape(n, 2 * h + 2, 2 * w + 2, c)  # (N, h+1, a, w+1, b, C)
    return full[:, 1 : 2 * h + 1, 1 : 2 * w + 1]


def _rows(a: Array) -> Array:
    """(..., C) -> (prod(...), C): the 2-D operand XLA's dot takes without a transposed copy."""
    return a.reshape(-1, a.shape[-1])


def _dot_nt(a: Array, b: Array) -> Array:
    """a (M, K) . b (N, K)^T -> (M, N)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())))


def _dot_tn(a: Array, b: Array) -> Array:
    """a (M, K)^T . b (M, N) -> (K, N)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())))


def _check_4x4(x: Array, kernel: Array) -> None:
    if x.ndim != 4 or kernel.shape[:2] != (4, 4) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(
            f"expected x (N,H,W,Cin) and kernel (4,4,Cin,Cout), got {x.shape} and {kernel.shape}"
        )


def _swap_flip(kernel: Array) -> Array:
    """The kernel of the adjoint operator: spatially flipped, Cin and Cout swapped."""
    return kernel[::-1, ::-1].transpose(0, 1, 3, 2)


# ------------------------------------------------------------------ transposed convolution (up)


def _conv_transpose_grad_taps(dy: Array) -> list[list[Array]]:
    """The padded output gradient's stride-2 windows, shared by both dot forms of the gradients."""
    return _window_taps(_pad1(dy), 2, dy.shape[1] // 2, dy.shape[2] // 2)


def _conv_transpose_input_grad_dot(taps: list[list[Array]], kernel: Array) -> Array:
    """dx[i] = sum_t pad1(dy)[2i + t] . kernel[3 - t]^T: per tap, a dot contracting Cout, the
    kernel block's minor axis (no transposed copy of the kernel)."""
    n, h, w, _ = taps[0][0].shape
    terms = [
        _dot_nt(_rows(taps[ty][tx]), kernel[3 - ty, 3 - tx]) for ty in range(4) for tx in range(4)
    ]
    return sum(terms[1:], terms[0]).reshape(n, h, w, kernel.shape[2])


def _conv_transpose_input_grad_conv(kernel: Array, dy: Array) -> Array:
    """The adjoint of the transposed convolution: the 4x4 stride-2 convolution with the flipped,
    swapped kernel."""
    return _conv_lax(dy, _swap_flip(kernel), 2)


def _conv_transpose_kernel_grad_im2col(x: Array, taps: list[list[Array]]) -> Array:
    """kernel[3 - t] pairs x[i] with y[2i - 1 + t] = pad1(y)[2i + t] (per spatial axis): per
    tap, x^T against the stride-2 slice of the padded output gradient, stacked in place."""
    x2 = _rows(x)
    return jnp.stack(
        [jnp.stack([_dot_tn(x2, _rows(taps[3 - u][3 - v])) for v in range(4)]) for u in range(4)]
    )


def _conv_transpose_kernel_grad_fused(x: Array, kernel: Array, dy: Array) -> Array:
    """The weight gradient of the "fused" form: one stride-1 convolution over the whole image
    with a 2x2 output, near matmul speed on XLA's CPU convolutions."""
    return jax.vjp(lambda k: _conv_transpose_fused(x, k), kernel)[1](dy)[0]


def _conv_transpose_grads(x: Array, kernel: Array, dy: Array) -> tuple[Array, Array]:
    """The transposed convolution's (input, weight) gradients: the input gradient as per-tap
    dots up to `_DX_DOT_MAX_PIXELS` input pixels, else as the adjoint convolution; the weight
    gradient as per-tap dots ("im2col") up to `_T_IM2COL_MAX_PIXELS` input pixels or
    `_DOT_MAX_CHANNELS` output channels, else as that of the "fused" form."""
    pixels = x.shape[1] * x.shape[2]
    dx_dot = pixels <= _DX_DOT_MAX_PIXELS
    dk_im2col = _small(pixels, _T_IM2COL_MAX_PIXELS, kernel.shape[-1])
    if dx_dot or dk_im2col:
        taps = _conv_transpose_grad_taps(dy)
    if dx_dot:
        dx = _conv_transpose_input_grad_dot(taps, kernel)
    else:
        dx = _conv_transpose_input_grad_conv(kernel, dy)
    if dk_im2col:
        dk = _conv_transpose_kernel_grad_im2col(x, taps).astype(kernel.dtype)
    else:
        dk = _conv_transpose_kernel_grad_fused(x, kernel, dy)
    return dx, dk


@jax.custom_vjp
def _conv_transpose(x: Array, kernel: Array) -> Array:
    return _conv_transpose_value(x, kernel)


def _conv_transpose_fwd(x, kernel):
    return _conv_transpose_value(x, kernel), (x, kernel)


def _conv_transpose_bwd(res, dy):
    x, kernel = res
    return _conv_transpose_grads(x, kernel, dy)


_conv_transpose.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


def conv_transpose_4x4_s2(x: Array, kernel: Array) -> Array:
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

    Value: exact rearrangements of the same products, chosen by the static input size: up to
    `_DOT_MAX_PIXELS` input pixels per image, one dot per kernel tap with its (Cin, Cout) block
    (the 4x4 footprints summed into place), where the kernel is large and must not be copied;
    above, one 2x2 convolution with 4*Cout outputs (`conv_transpose_breakpoints` publishes the
    switch). Gradients: a custom VJP, the same values as autodiff summed in another order. The
    input gradient is per tap the output gradient's stride-2 slice against the kernel block,
    contracting Cout, up to `_DX_DOT_MAX_PIXELS` input pixels, else the equivalent 4x4 stride-2
    convolution with the flipped, swapped kernel. The weight gradient is per tap a dot of x
    against the stride-2 slice of the padded output gradient up to `_T_IM2COL_MAX_PIXELS` input
    pixels or `_DOT_MAX_CHANNELS` output channels, else the weight gradient of the 2x2 form (one
    stride-1 convolution over the whole image with a 2x2 output, near matmul speed on XLA's CPU
    convolutions).
    """
    _check_4x4(x, kernel)
    return _conv_transpose(x, kernel)


# ------------------------------------------------------------------ convolution (down)


def _conv_lax(x: Array, kernel: Array, stride: int) -> Array:
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=_DN
    )


def _space_to_depth(xp: Array) -> Array:
    """(N, 2H, 2W, C) -> (N, H, W, 4C), channels ordered (row phase, column phase, C)."""
    n, h2, w2, c = xp.shape
    xs = xp.reshape(n, h2 // 2, 2, w2 // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return xs.reshape(n, h2 // 2, w2 // 2, 4 * c)


def _conv_s2d(x: Array, kernel: Array) -> Array:
    """The 4x4 stride-2 pad-1 convolution of an even-sized input as a 2x2 stride-1 convolution
    of its space-to-depth rearrangement: kernel tap (2u + a, 2v + b) reads padded pixel
    (2(i + u) + a, 2(j + v) + b), i.e. phase (a, b) of space-to-depth pixel (i + u, j + v)."""
    cin, cout = kernel.shape[2:]
    k2 = kernel.reshape(2, 2, 2, 2, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    return _conv_valid(_space_to_depth(_pad1(x)), k2.reshape(2, 2, 4 * cin, cout))


def _conv_kernel_grad_shift(x: Array, dy: Array) -> Array:
    """Weight gradient of the 4x4 stride-1 pad-1 convolution as one dot over flattened pixels.

    With xp = pad1(x) flattened to rows p = (n, r, c) of width W' = W + 2, and dy zero-padded
    to the same (H + 2, W + 2) grid, tap (ty, tx) pairs row p of xp with row p - (ty W' + tx)
    of dy (rows that fall in the zero padding contribute nothing; no window crosses a row or
    an image). So dk = xp^T . [dy shifted by each tap's offset], one (Cin, 16 Cout) dot: for a
    few output channels (PatchGAN's last layer) where XLA's weight-gradient convolution, with a
    (Ho, Wo) window and a 4x4x1 output, runs at a few GFLOP/s.
    """
    n, h, w, cin = x.shape
    _, ho, wo, cout = dy.shape
    m = n * (h + 2) * (w + 2)
    xp = _pad1(x).reshape(m, cin)
    dyz = jnp.pad(dy, ((0, 0), (0, h + 2 - ho), (0, w + 2 - wo), (0, 0))).reshape(m, cout)
    shifted = [
        jnp.pad(dyz, ((ty * (w + 2) + tx, 0), (0, 0)))[:m] for ty in range(4) for tx in range(4)
    ]
    dk = _dot_tn(xp, jnp.concatenate(shifted, axis=1)).reshape(cin, 16, cout)
    return dk.transpose(1, 0, 2).reshape(4, 4, cin, cout)


def _phase_decomposable(x: Array, stride: int) -> bool:
    """Stride 2 and an even-sized input: the forms built on the 2x2 phases apply."""
    return stride == 2 and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0


def _conv_input_grad_dot(kernel: Array, dy: Array) -> Array:
    """Stride 2, even sizes: dx_pad[2o + t] += dy[o] . kernel[t]^T, one dot contracting Cout (the
    kernel's minor axis: no transposed copy of the kernel), then the footprints summed into
    place."""
    n, ho, wo, cout = dy.shape
    cin = kernel.shape[2]
    cols = _dot_nt(_rows(dy), kernel.reshape(16 * cin, cout)).reshape(n, ho, wo, 4, 4, cin)
    return _col2im_s2(_tap_grid(lambda ty, tx: cols[:, :, :, ty, tx]))


def _conv_input_grad_transposed(kernel: Array, dy: Array) -> Array:
    """Stride 2, even sizes: the adjoint of the 4x4 stride-2 pad-1 convolution is the transposed
    convolution with the flipped, swapped kernel, in its stride-1 forms, where autodiff gives an
    input-dilated convolution that XLA on CPU runs several times slower."""
    return _conv_transpose_value(dy, _swap_flip(kernel))


def _conv_input_grad_lax(x: Array, kernel: Array, dy: Array, stride: int) -> Array:
    """Autodiff's input gradient (an input-dilated convolution)."""
    return jax.vjp(lambda x: _conv_lax(x, kernel, stride), x)[1](dy)[0]


def _conv_kernel_grad_im2col(x: Array, dy: Array, stride: int) -> Array:
    """One dot of the 4x4 patches of x with the output gradient."""
    _, ho, wo, cout = dy.shape
    p = _patches(_pad1(x), stride, ho, wo)  # (N, Ho, Wo, (ty, tx, Cin))
    return _dot_tn(_rows(p), _rows(dy)).reshape(4, 4, x.shape[-1], cout)


def _conv_kernel_grad_s2d(x: Array, kernel: Array, dy: Array) -> Array:
    """Stride 2, even sizes: the weight gradient of the equal stride-1 2x2 convolution of the
    space-to-depth input, which XLA's CPU convolutions run 1.3-1.5x faster than the strided
    one."""
    return jax.vjp(lambda k: _conv_s2d(x, k), kernel)[1](dy)[0]


def _conv_kernel_grad_lax(x: Array, kernel: Array, dy: Array, stride: int) -> Array:
    """Autodiff's weight gradient."""
    return jax.vjp(lambda k: _conv_lax(x, k, stride), kernel)[1](dy)[0]


def _conv_grads(x: Array, kernel: Array, stride: int, dy: Array) -> tuple[Array, Array]:
    """The 4x4 convolution's (input, weight) gradients. Input: for stride 2 and an even-sized
    input, the dot form up to `_DX_DOT_MAX_PIXELS` output pixels or `_DOT_MAX_CHANNELS` input
    channels, else the transposed convolution; autodiff otherwise. Weight: im2col up to
    `_IM2COL_MAX_PIXELS` output pixels (above, the patches, 4 times the input at stride 2, cost
    more), else "s2d" for stride 2 and even sizes, "shift" for stride 1 and at most
    `_DOT_MAX_CHANNELS` output channels, autodiff otherwise."""
    _, ho, wo, cout = dy.shape
    phases = _phase_decomposable(x, stride)
    if not phases:
        dx = _conv_input_grad_lax(x, kernel, dy, stride)
    elif _small(ho * wo, _DX_DOT_MAX_PIXELS, x.shape[-1]):
        dx = _conv_input_grad_dot(kernel, dy)
    else:
        dx = _conv_input_grad_transposed(kernel, dy)
    if ho * wo <= _IM2COL_MAX_PIXELS:
        dk = _conv_kernel_grad_im2col(x, dy, stride).astype(kernel.dtype)
    elif phases:
        dk = _conv_kernel_grad_s2d(x, kernel, dy)
    elif stride == 1 and cout <= _DOT_MAX_CHANNELS:
        dk = _conv_kernel_grad_shift(x, dy)
    else:
        dk = _conv_kernel_grad_lax(x, kernel, dy, stride)
    return dx, dk


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: Array, kernel: Array, stride: int) -> Array:
    return _conv_lax(x, kernel, stride)


def _conv_fwd(x, kernel, stride):
    return _conv_lax(x, kernel, stride), (x, kernel)


def _conv_bwd(stride, res, dy):
    x, kernel = res
    return _conv_grads(x, kernel, stride, dy)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_4x4(x: Array, kernel: Array, stride: int = 2) -> Array:
    """PyTorch `Conv2d(Cin, Cout, 4, stride, padding=1)` on NHWC with a (4, 4, Cin, Cout) kernel:

        lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))

    in value and gradients. The value is that convolution; the gradients are a custom VJP (the
    same values, summed in another order), formulated by static shape. Input gradient, for
    stride 2 and an even-sized input: one dot of the output gradient with the kernel as stored,
    contracting Cout, the 4x4 footprints summed into place (up to `_DX_DOT_MAX_PIXELS` output
    pixels or `_DOT_MAX_CHANNELS` input channels), else the phase-decomposed transposed
    convolution of the output gradient with the flipped, swapped kernel, both in place of the
    input-dilated convolution of autodiff, which XLA on CPU runs several times slower (and
    which stays for stride 1 or odd sizes). Weight gradient: one dot of the 4x4 patches of x
    with the output gradient up to `_IM2COL_MAX_PIXELS` output pixels (above, the patches, 4
    times the input at stride 2, cost more); else, for stride 2 and even sizes, the weight
    gradient of the equal stride-1 2x2 convolution of the space-to-depth input (which XLA's
    CPU convolutions run 1.3-1.5x faster than the strided one); for stride 1 and at most
    `_DOT_MAX_CHANNELS` output channels, one dot of the padded input's rows with the output
    gradient shifted per tap; autodiff otherwise.
    """
    _check_4x4(x, kernel)
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    return _conv(x, kernel, stride)


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

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", self.kernel_init, (4, 4, x.shape[-1], self.features), jnp.float32
        )
        y = conv_transpose_4x4_s2(x.astype(self.dtype), kernel.astype(self.dtype))
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
