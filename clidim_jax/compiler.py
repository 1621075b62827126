"""XLA compiler options for the compiled programs (train step, inference), per platform."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

# XLA's CPU compiler hands convolutions to YNNPACK by default in jaxlib 0.10; its own (Eigen)
# convolutions ran the reference train step 7-10 % faster and 1024x1024 inference about 10 %
# faster on the 2-core x86 CPU (in-process A/B, alternating rounds; BENCHMARKS.md), e.g.
# PatchGAN's 256 -> 512 stride-1 convolution in about 77 instead of 97 ms. Dots and reductions
# stay with YNNPACK, as by default.
CPU_LIBRARY_FUSIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def accepts(options: dict[str, Any]) -> bool:
    """Whether this jaxlib's XLA compiles a trivial program with these options (an unknown or
    malformed option is an error at compile time, not at `jax.jit`)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except Exception:  # XLA reports an unknown option as a plain error
        return False
    return True


@functools.cache
def _cpu_options() -> tuple[tuple[str, Any], ...]:
    # Copy insertion with region analysis: without it XLA's CPU compiler copies most parameter
    # and Adam first-moment buffers of the donated train state before the step (about 114M
    # floats in the reference preset: the fused Adam update of a parameter reads the old first
    # moment that its in-place update overwrites); with it, none. Bitwise the same values,
    # 0-3 % faster. No effect on programs without donated buffers.
    options: dict[str, Any] = {"xla_cpu_copy_insertion_use_region_analysis": True}
    library = {"xla_cpu_experimental_ynn_fusion_type": CPU_LIBRARY_FUSIONS}
    if accepts({**options, **library}):  # an experimental flag: only where XLA knows it
        options.update(library)
    return tuple(options.items())


def compiler_options(device: Any = None) -> dict[str, Any]:
    """Options for `jax.jit(..., compiler_options=...)` of a program that runs on `device`
    (default: the first device). CPU: see `_cpu_options`; other platforms: none."""
    device = device if device is not None else jax.devices()[0]
    return dict(_cpu_options()) if device.platform == "cpu" else {}
