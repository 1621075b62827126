"""The contrastive projection head: Linear -> LeakyReLU(0.01) -> Linear, both without bias."""

from __future__ import annotations

import flax.linen as nn
import jax

from clidim_jax.models.layers import torch_linear_init

Array = jax.Array


class ProjectionHead(nn.Module):
    """Maps flat features (N, F) to (N, out_features), with PyTorch's default Linear init.

    `hidden_features=None` keeps the hidden width equal to F (the reference: 900 -> 900 -> 128).
    """

    out_features: int = 128
    hidden_features: int | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim != 2:
            raise ValueError(f"expected flat features (N, F), got shape {x.shape}")
        hidden = x.shape[-1] if self.hidden_features is None else self.hidden_features
        y = nn.Dense(hidden, use_bias=False, kernel_init=torch_linear_init(), name="fc1")(x)
        y = nn.leaky_relu(y, 0.01)
        return nn.Dense(
            self.out_features, use_bias=False, kernel_init=torch_linear_init(), name="fc2"
        )(y)
