"""Networks of clidim-jax: U-Net generator, PatchGAN discriminator, projection head, layers."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from clidim_jax.models.head import ProjectionHead
from clidim_jax.models.layers import (
    Conv4x4,
    ConvTranspose4x4,
    InstanceNorm,
    bn_scale_init,
    conv_4x4,
    conv_transpose_4x4_s2,
    normal_init,
    torch_linear_init,
)
from clidim_jax.models.patchgan import PatchGANDiscriminator
from clidim_jax.models.unet import UNetGenerator


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays (or of `jax.ShapeDtypeStruct`s from eval_shape)."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)))


__all__ = [
    "Conv4x4",
    "ConvTranspose4x4",
    "InstanceNorm",
    "PatchGANDiscriminator",
    "ProjectionHead",
    "UNetGenerator",
    "bn_scale_init",
    "conv_4x4",
    "conv_transpose_4x4_s2",
    "count_params",
    "normal_init",
    "torch_linear_init",
]
