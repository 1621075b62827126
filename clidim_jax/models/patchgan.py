"""The conditional pix2pix PatchGAN discriminator (70x70 receptive field for n_layers=3), NHWC."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clidim_jax.models.layers import Conv4x4, check_norm, make_norm, norm_uses_bias, normal_init

Array = jax.Array
Dtype = Any


class PatchGANDiscriminator(nn.Module):
    """pix2pix `NLayerDiscriminator` on the channel concat of (noisy, candidate).

    conv0: Conv 4x4 s2 p1 (bias) -> LeakyReLU(0.2);
    conv1..conv{n-1}: Conv 4x4 s2 p1 -> norm -> LeakyReLU, channels ndf * min(2**k, 8);
    conv{n}: Conv 4x4 s1 p1 -> norm -> LeakyReLU, channels ndf * min(2**n, 8);
    conv{n+1}: Conv 4x4 s1 p1 (bias) -> 1 channel of raw logits (30x30 for 256x256, n=3).
    Inner convs have a bias only with instance norm, as in pix2pix. Parameters are float32, the
    computation runs in `dtype`, the logits are float32.
    """

    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        check_norm(self.norm)
        if x.ndim != 4:
            raise ValueError(f"expected NHWC input, got shape {x.shape}")
        bias = norm_uses_bias(self.norm)

        def conv(k: int, features: int, stride: int, use_bias: bool) -> Conv4x4:
            return Conv4x4(
                features,
                strides=stride,
                use_bias=use_bias,
                kernel_init=normal_init(0.02),
                dtype=self.dtype,
                name=f"conv{k}",
            )

        y = x.astype(self.dtype)
        y = nn.leaky_relu(conv(0, self.ndf, 2, True)(y), 0.2)
        for k in range(1, self.n_layers + 1):
            stride = 2 if k < self.n_layers else 1
            y = conv(k, self.ndf * min(2**k, 8), stride, bias)(y)
            norm = make_norm(self.norm, train=train, dtype=self.dtype, name=f"norm{k}")
            if norm is not None:
                y = norm(y)
            y = nn.leaky_relu(y, 0.2)
        y = conv(self.n_layers + 1, 1, 1, True)(y)
        return y.astype(jnp.float32)
