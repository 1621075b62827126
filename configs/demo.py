"""The demo: CLIDiM (CL + TV + SSIM) on the bundled ACsN TIRF stack, sized for a 2-core CPU.

Trains on the right half of the field (20 noisy frames, ground truth = mean of the 20) and evaluates
every noisy frame of the held-out left half. A smaller U-Net (6 levels, ngf 32) and 64x64 crops
keep it within a few minutes; the method (losses, contrastive D step, optimizers) is unchanged.
"""

import ml_collections

from clidim_jax.config_lib import apply_args, base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "demo"
    c.data.source = "demo"
    c.data.test_fraction = 0.5
    c.data.patch_size = 64
    c.model.depth = 6
    c.model.ngf = 32
    c.model.ndf = 32
    c.train.batch_size = 8
    # An "epoch" of 10 steps (80 crops, 4 passes over the 20 frames); 50 constant + 50 decaying
    # epochs = 1000 steps, about 5 minutes on 2 CPU cores.
    c.train.steps_per_epoch = 10
    c.train.n_epochs = 50
    c.train.n_epochs_decay = 50
    c.train.log_every = 100
    apply_args(c, arg, allowed=("seed",))
    return c
