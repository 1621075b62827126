"""Test setup: small CPU-only JAX, deterministic, and helpers shared by the tests."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess
import sys

import ml_collections
import pytest

from clidim_jax.config_lib import base_config


def tiny_config(variant: str = "cl_tv_ssim") -> ml_collections.ConfigDict:
    """A model small enough for a unit test: 4-level U-Net, ngf 8, 32x32 crops."""
    from clidim_jax.config_lib import apply_tiny, apply_variant

    c = base_config()
    c.name = "tiny"
    apply_variant(c, variant)
    return apply_tiny(c)


@pytest.fixture
def tiny():
    return tiny_config


# The tiny model of `tiny_config` as command-line overrides ...
TINY_MODEL_FLAGS = [
    "--config.model.depth=4",
    "--config.model.ngf=8",
    "--config.model.ndf=8",
    "--config.data.patch_size=32",
    "--config.train.batch_size=2",
]


def tiny_train_flags(n_epochs: int = 2) -> list[str]:
    """... plus a training of (n_epochs + 1) epochs of 2 steps."""
    return [
        *TINY_MODEL_FLAGS,
        f"--config.train.n_epochs={n_epochs}",
        "--config.train.n_epochs_decay=1",
        "--config.train.steps_per_epoch=2",
        "--config.train.log_every=2",
    ]


def run_cli(*args, check=True):
    """`python -m clidim_jax ARGS` on the CPU; with `check`, a non-zero exit fails the test."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, "-m", "clidim_jax", *args], capture_output=True, text=True, env=env
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p
