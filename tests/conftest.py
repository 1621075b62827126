"""Test setup: small CPU-only JAX, deterministic, and helpers shared by the tests."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_collections
import pytest

from clidim_jax.config_lib import base_config


def tiny_config(variant: str = "cl_tv_ssim") -> ml_collections.ConfigDict:
    """A model small enough for a unit test: 4-level U-Net, ngf 8, 32x32 crops."""
    from clidim_jax.config_lib import apply_variant

    c = base_config()
    c.name = "tiny"
    apply_variant(c, variant)
    c.model.depth = 4
    c.model.ngf = 8
    c.model.ndf = 8
    c.data.patch_size = 32
    c.train.batch_size = 2
    c.train.n_epochs = 2
    c.train.n_epochs_decay = 1
    c.train.steps_per_epoch = 2
    c.train.log_every = 2
    c.eval.baseline_sigmas = (1.0, 2.0)
    return c


@pytest.fixture
def tiny():
    return tiny_config
