"""The code-faithful preset: what the authors' PyTorch code runs (docs/method.md sections 1-6).

unet_256 (8 levels), PatchGAN 70x70, L1 weight 100, batch 128, 500 + 300 epochs, InfoNCE with a
frozen random projection head, reference (batch min-max) normalisation.

Arguments (big_vision style): `configs/reference.py:variant=cl,seed=1`, where variant is one of
baseline | tv | ssim | cl | cl_tv_ssim (the paper's Table I rows; default cl_tv_ssim).
"""

import ml_collections

from clidim_jax.config_lib import apply_args, base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "reference"
    c.data.normalization = "reference"
    c.data.ground_truth = "mean_uint16"  # the reference casts the mean to uint16
    apply_args(c, arg, allowed=("seed", "dataset", "n_samples"))
    return c
