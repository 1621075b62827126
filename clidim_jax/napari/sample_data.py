"""napari sample data (File > Open Sample > clidim-jax): the images bundled with the package."""

from __future__ import annotations

from typing import Any

import tifffile

LayerData = tuple[Any, dict[str, Any], str]


def tirf_stack() -> list[LayerData]:
    """The ACsN TIRF demo stack: 20 noisy frames (256 x 256 uint16) of one static field, the
    demo's training data (their mean is the ground truth; BSD-3-Clause, Mandracchia et al.)."""
    from clidim_jax.data.datasets import demo_stack_path

    stack = tifffile.imread(demo_stack_path())
    return [(stack, {"name": "TIRF demo stack"}, "image")]


def convallaria() -> list[LayerData]:
    """One noisy Convallaria frame (1024 x 1024 uint16; CC-BY-4.0, Prakash et al., ISBI 2020),
    `clidim-jax denoise`'s example input."""
    from clidim_jax.denoise import example_image_path

    return [(tifffile.imread(example_image_path()), {"name": "Convallaria"}, "image")]
