"""The paper's stated values (Section IV-A), where they differ from the code.

7-level U-Net ("Unet-256 consisting of 7 downsampling and 7 upsampling blocks"), batch 32,
500 + 500 epochs, L1 weight 1, SimCLR NT-Xent (cosine similarity, symmetric), tau 0.1.

Arguments: `configs/paper.py:variant=cl_tv_ssim,seed=0` (variants as in reference.py).
"""

import ml_collections

from clidim_jax.config_lib import apply_args, base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "paper"
    c.model.depth = 7
    c.train.batch_size = 32
    c.train.n_epochs = 500
    c.train.n_epochs_decay = 500
    c.loss.l1 = 1.0
    c.loss.contrastive_loss = "ntxent"
    c.data.normalization = "reference"
    apply_args(c, arg, allowed=("seed", "dataset", "n_samples"))
    return c
