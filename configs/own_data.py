"""Your own data on a laptop CPU: the recipe the quality benchmark measured best (QUALITY.md).

What differs from the paper's pix2pix setting, each chosen on validation data in
`benchmarks/quality.py`'s protocol (real confocal data):
- every training input is a fresh noisy image for the clean crop brightened or dimmed by a
  random gain in [0.7, 1.6] (`data.synthetic`), its noise drawn from the distribution measured
  on the training pairs at each intensity (`data.synthetic_noise=empirical`; above the
  brightest measured intensity, a Poisson-Gaussian model fitted on them): new noise every step,
  and structures brighter than the training field's with the noise they would really have;
- the generator predicts a correction of the Gaussian-low-passed input (`model.residual=smooth`,
  last layer starting at zero, so an untrained model is a Gaussian filter) through an unbounded
  linear output (no tanh: nothing brighter than the training data is clipped);
- the mean squared error alone (the loss PSNR rewards; GAN, SSIM, TV and contrastive off:
  `variant=pixel`), no BatchNorm, learning rate 1e-3, 3000 steps, each gradient bounded to a
  global norm of 2 (`train.clip_grad_norm`: about 7 times the usual norm, so only a runaway
  gradient is cut, which would otherwise stall Adam for the rest of the run).
A 6-level U-Net with 32 base channels on 64x64 crops trains in 4 to 6 minutes on 2 CPU cores.
Validation data (`data.val_noisy_path` / `val_clean_path`, else the right 10 % of the training
region's columns) chooses the checkpoint that evaluate, denoise and export use: the best mean
validation PSNR over 3 consecutive saves (`checkpoint.select_window`), so one lucky
validation does not choose.

Arguments: `own_data:variant=cl_tv_ssim,seed=1` (any variant of config_lib.VARIANTS) and `tiny`
(a model and schedule small enough for a unit test).

    clidim-jax train --workdir runs/cells --config own_data \\
        --config.data.source=stack --config.data.path=cells.tif
"""

import ml_collections

from clidim_jax.config_lib import apply_args, apply_variant, base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "own_data"
    apply_variant(c, "pixel")
    c.data.source = "stack"
    c.data.test_fraction = 0.5
    c.data.val_fraction = 0.1  # unless data.val_noisy_path / val_clean_path are given
    c.data.patch_size = 64
    c.data.normalization = "percentile"
    c.data.synthetic = 1.0  # noisy inputs drawn from the fitted noise model, random brightness
    c.data.synthetic_gain = (0.7, 1.6)
    c.data.synthetic_noise = "empirical"  # the training pairs' measured noise, not a lattice
    c.model.depth = 6
    c.model.ngf = 32
    c.model.ndf = 32
    c.model.norm = "none"
    c.model.output = "linear"
    c.model.residual = "smooth"
    c.model.residual_sigma = 1.0
    c.loss.l1 = 0.0
    c.loss.l2 = 100.0
    c.train.batch_size = 8
    c.train.lr = 1e-3
    c.train.b1 = 0.9
    c.train.steps_per_epoch = 10
    c.train.n_epochs = 150  # 3000 steps: 4 to 6 minutes on 2 CPU cores
    c.train.n_epochs_decay = 150
    c.train.log_every = 100
    c.train.clip_grad_norm = 2.0  # about 7 times the usual norm: only a runaway step is cut
    c.checkpoint.every_steps = 250  # each save validates: the candidates for the best
    c.checkpoint.keep = 2
    c.checkpoint.select_window = 3  # best by the mean validation PSNR of 3 consecutive saves
    apply_args(c, arg, allowed=("seed",))
    if parse_arg(arg).get("tiny"):
        c.checkpoint.every_steps = 2  # validate (and keep the best) during those 6 steps
    return c
