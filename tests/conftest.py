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


# `tiny_config` on the command line: the bundled demo with the `tiny` config argument.
TINY_FLAGS = ["--config=demo:tiny"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny demo run trained through the command line, shared by the tests of a session
    (read it, or copy it before changing it): (workdir, the finished `train` process)."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    return workdir, run_cli("train", f"--workdir={workdir}", *TINY_FLAGS)


def run_cli(*args, check=True):
    """`python -m clidim_jax ARGS` on the CPU; with `check`, a non-zero exit fails the test."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, "-m", "clidim_jax", *args], capture_output=True, text=True, env=env
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p
