"""Whole-image prediction with the generator in eval mode (BN running statistics, no dropout)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clidim_jax.data.normalization import Normalization


def pad_to_multiple(img: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pads (H, W) up to multiples of `multiple` (U-Net input sizes)."""
    h, w = img.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if (ph < h and pw < w) else "symmetric"
        img = np.pad(img, ((0, ph), (0, pw)), mode=mode)
    return img, (h, w)


class Denoiser:
    """Runs G (eval mode) on whole images in original units; one compilation per input shape."""

    def __init__(self, generator: Any, variables: dict, norm: Normalization, batch_size: int = 4):
        self.generator = generator
        self.variables = variables
        self.norm = norm
        self.batch_size = batch_size
        self.multiple = 2**generator.depth

        def predict(variables, x):
            y = generator.apply(variables, x, train=False)
            return y.astype(jnp.float32)

        self._predict = jax.jit(predict)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """images: (N, H, W) or (H, W) in original units -> float32 denoised, same shape."""
        single = images.ndim == 2
        images = images[None] if single else images
        outs = []
        for i in range(0, images.shape[0], self.batch_size):
            chunk = images[i : i + self.batch_size]
            padded = [pad_to_multiple(im.astype(np.float32), self.multiple)[0] for im in chunk]
            h, w = chunk.shape[1:]
            n = len(padded)
            # A full batch every call keeps one compiled shape per image size.
            while len(padded) < self.batch_size:
                padded.append(padded[-1])
            x = self.norm.apply(np.stack(padded)[..., None]).astype(np.float32)
            y = np.asarray(self._predict(self.variables, x))[:n, :h, :w, 0]
            outs.append(self.norm.invert(y.astype(np.float64)).astype(np.float32))
        out = np.concatenate(outs, 0)
        return out[0] if single else out
