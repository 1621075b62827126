"""The pix2pix U-Net generator (`unet_256` for depth 8, `unet_128` for depth 7) in NHWC."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clidim_jax.config_lib import CHOICES
from clidim_jax.models.layers import (
    Conv4x4,
    ConvTranspose4x4,
    check_norm,
    make_norm,
    norm_uses_bias,
    normal_init,
)

Array = jax.Array
Dtype = Any


OUTPUTS = CHOICES["model.output"]
RESIDUALS = CHOICES["model.residual"]


def gaussian_blur(x: Array, sigma: float) -> Array:
    """Separable Gaussian filter of NHWC images, taps out to 3 sigma, reflect borders (the taps
    are constants: the U-Net's fixed low-pass, not a learned layer)."""
    r = max(1, math.ceil(3 * sigma))
    t = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    t = (t / t.sum()).astype(np.float32)
    h, w = x.shape[1], x.shape[2]
    if min(h, w) <= r:
        raise ValueError(f"images of {h}x{w} are too small for a blur of radius {r}")
    x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    x = sum(float(t[i]) * x[:, i : i + h] for i in range(2 * r + 1))
    return sum(float(t[i]) * x[:, :, i : i + w] for i in range(2 * r + 1))


def level_channels(ngf: int, level: int) -> int:
    """Channels of U-Net level `level` (0 = outermost): ngf * min(2**level, 8)."""
    return ngf * min(2**level, 8)


class UNetGenerator(nn.Module):
    """pix2pix `UnetGenerator`: `depth` levels of 4x4 stride-2 convs with skip connections.

    Level i (0 = outermost) maps C_{i-1} -> C_i = ngf * min(2**i, 8) channels (C_{-1} = input):
      down: [LeakyReLU(0.2) unless i == 0] -> Conv 4x4 s2 p1 -> [norm unless i is 0 or innermost]
      up:   ReLU -> ConvTranspose 4x4 s2 p1 -> norm [-> Dropout(0.5)], then concat(skip, up) for
            i > 0; the outermost up is ReLU -> ConvTranspose (bias) -> tanh, with no concat.
    Dropout is on levels 4 .. depth-2, pix2pix's `num_downs - 5` blocks next to the innermost.

    pix2pix's in-place `nn.LeakyReLU(0.2, True)` overwrites a block's input before
    `torch.cat([x, model(x)])` reads it, so its skips carry LeakyReLU(input), not the input. The
    concat is always followed by the parent level's up-path ReLU and relu(leaky_relu(z)) ==
    relu(z) (derivative included), so passing the raw input, as here, computes the same function.

    Output layer (`output`): "tanh" as pix2pix (the output is bounded to [-1, 1], so nothing
    brighter than the normalisation's upper point can be predicted), or "linear" (unbounded).
    `residual` adds a fixed image to the output, so the network predicts a correction of it:
    "input" the input itself (identity as the starting point), "smooth" the input low-passed
    by a Gaussian of `residual_sigma` pixels (reflect borders), a classical denoiser as the
    starting point; either way structures brighter than anything in training pass through.
    Needs out_channels == input channels. "none": pix2pix.

    `bias_free=True` (Mohan et al., ICLR 2020) drops the one additive constant left without
    normalisation layers, the last layer's bias: with norm="none" and a linear output G is then
    positively homogeneous, G(s x) = s G(x) for s > 0, so a brighter image gets a
    proportionally brighter prediction instead of the extrapolation of a network that has
    never seen such intensities.

    Parameters are float32; the computation runs in `dtype`; the output is float32.
    Input: NHWC with any channel count; H and W must be divisible by 2**depth.
    """

    depth: int = 8
    ngf: int = 64
    out_channels: int = 1
    norm: str = "batch"
    use_dropout: bool = True
    dtype: Dtype = jnp.float32
    output: str = "tanh"
    residual: str = "none"
    residual_sigma: float = 1.0
    bias_free: bool = False

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        check_norm(self.norm)
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if x.ndim != 4:
            raise ValueError(f"expected NHWC input, got shape {x.shape}")
        factor = 2**self.depth
        h, w = x.shape[1], x.shape[2]
        if h % factor or w % factor:
            raise ValueError(
                f"input size {h}x{w} is not divisible by 2**depth = {factor} (depth {self.depth});"
                " pad the image or choose a smaller depth"
            )
        inner = self.depth - 1
        bias = norm_uses_bias(self.norm)
        if self.bias_free and (self.norm != "none" or self.output != "linear"):
            raise ValueError("a bias-free generator needs norm='none' and output='linear'")

        def conv(i: int) -> Conv4x4:
            return Conv4x4(
                level_channels(self.ngf, i),
                strides=2,
                use_bias=bias,
                kernel_init=normal_init(0.02),
                dtype=self.dtype,
                name=f"down{i}",
            )

        y = x.astype(self.dtype)
        skips: list[Array] = []
        for i in range(self.depth):
            if i > 0:
                skips.append(y)
                y = nn.leaky_relu(y, 0.2)
            y = conv(i)(y)
            if 0 < i < inner:
                norm = make_norm(self.norm, train=train, dtype=self.dtype, name=f"down{i}_norm")
                if norm is not None:
                    y = norm(y)

        for i in reversed(range(1, self.depth)):
            y = nn.relu(y)
            y = ConvTranspose4x4(
                level_channels(self.ngf, i - 1), use_bias=bias, dtype=self.dtype, name=f"up{i}"
            )(y)
            norm = make_norm(self.norm, train=train, dtype=self.dtype, name=f"up{i}_norm")
            if norm is not None:
                y = norm(y)
            if self.use_dropout and 4 <= i <= self.depth - 2:
                y = nn.Dropout(0.5, deterministic=not train, name=f"up{i}_dropout")(y)
            y = jnp.concatenate([skips[i - 1], y], axis=-1)

        y = nn.relu(y)
        # With a residual base the last layer starts at zero, so an untrained G is its base
        # (a random correction of a few tenths would first undo what the base gives).
        last_init = nn.initializers.zeros_init() if self.residual != "none" else normal_init(0.02)
        y = ConvTranspose4x4(
            self.out_channels,
            use_bias=not self.bias_free,
            kernel_init=last_init,
            dtype=self.dtype,
            name="up0",
        )(y)
        if self.output == "tanh":
            y = jnp.tanh(y)
        y = y.astype(jnp.float32)
        if self.residual not in RESIDUALS:
            raise ValueError(
                f"residual must be one of {', '.join(RESIDUALS)}, got {self.residual!r}"
            )
        if self.residual != "none":
            if x.shape[-1] != self.out_channels:
                raise ValueError(
                    f"a residual generator needs as many input as output channels, got "
                    f"{x.shape[-1]} and {self.out_channels}"
                )
            base = x.astype(jnp.float32)
            if self.residual == "smooth":
                base = gaussian_blur(base, self.residual_sigma)
            y = y + base
        return y
