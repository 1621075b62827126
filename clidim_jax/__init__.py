"""clidim-jax: few-shot microscopy denoising with a contrastive pix2pix GAN, in JAX/Flax."""

__version__ = "0.1.0"
