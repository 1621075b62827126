"""Config skeleton shared by the presets in configs/, the ablation variants, and config checks."""

from __future__ import annotations

import ml_collections

# The five ablations of the paper's Table I, as loss weights on top of a preset.
# "baseline" is plain pix2pix (GAN + L1); the others add TV, SSIM, the contrastive
# D regulariser, or all three.
# "pixel" (not in the paper) drops the GAN too: the generator trained on its pixel losses
# alone (the preset's L1 and L2 weights).
VARIANTS: dict[str, dict[str, float]] = {
    "baseline": dict(gan=1.0, ssim=0.0, tv=0.0, contrastive=0.0),
    "tv": dict(gan=1.0, ssim=0.0, tv=1e-4, contrastive=0.0),
    "ssim": dict(gan=1.0, ssim=10.0, tv=0.0, contrastive=0.0),
    "cl": dict(gan=1.0, ssim=0.0, tv=0.0, contrastive=1.0),
    "cl_tv_ssim": dict(gan=1.0, ssim=10.0, tv=1e-4, contrastive=1.0),
    "pixel": dict(gan=0.0, ssim=0.0, tv=0.0, contrastive=0.0),
}


def parse_arg(arg: str | None) -> dict[str, str]:
    """Parses a big_vision style config argument `key=value,key2=value2`, where a bare item is
    the variant, or `tiny` (big_vision's `runlocal`: see `apply_tiny`)."""
    out: dict[str, str] = {}
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = v.strip()
        elif item == "tiny":
            out["tiny"] = "true"
        else:
            out["variant"] = item
    return out


def base_config() -> ml_collections.ConfigDict:
    """Every field any preset may set; presets change values, never add fields."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.variant = "cl_tv_ssim"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.depth = 8  # U-Net levels; unet_256 = 8, unet_128 = 7
    c.model.ngf = 64
    c.model.ndf = 64
    c.model.d_layers = 3  # 70x70 PatchGAN
    c.model.norm = "batch"  # batch | instance | none
    c.model.dropout = True
    c.model.compute_dtype = "float32"  # float32 | bfloat16 (convolutions only)
    c.model.output = "tanh"  # the generator's output layer: tanh (pix2pix) | linear (unbounded)
    # G(x) = base(x) + U-Net(x): none (pix2pix) | input (base = x) | smooth (base = x low-passed
    # by a Gaussian of residual_sigma pixels): the network predicts a correction of the base.
    c.model.residual = "none"
    c.model.residual_sigma = 1.0
    # No additive constant anywhere in G (needs norm none, output linear): G(s x) = s G(x), so
    # with data.normalization=scale predictions scale with the image's brightness.
    c.model.bias_free = False

    c.data = ml_collections.ConfigDict()
    # demo | stack | paired | convallaria | actin | skull (clidim_jax/data/datasets.py)
    c.data.source = "demo"
    c.data.path = ""  # stack: a TIFF of repeated noisy acquisitions (ground truth = their mean)
    c.data.noisy_path = ""  # paired: a noisy TIFF, or a folder of them ...
    c.data.clean_path = ""  # ... and the clean TIFF(s), matched by file name in folders
    c.data.test_noisy_path = ""  # paired: an explicit test set (else a spatial split)
    c.data.test_clean_path = ""
    c.data.val_noisy_path = ""  # validation pair(s) choosing the checkpoint (any source); they
    c.data.val_clean_path = ""  # take precedence over data.val_fraction below
    c.data.root = ""  # benchmarks: where `clidim-jax download` put them ("": $CLIDIM_JAX_DATA
    # or ~/.cache/clidim_jax/datasets)
    c.data.axes = ""  # override the TIFF's axes metadata, e.g. TYX, ZYX, YX ("": the file's)
    # The channel to train on, of images with a C axis (0-based); -1: the images must have one
    # channel (a multi-channel image is refused with a message naming this field).
    c.data.channel = -1
    # Spatial split of stack / paired images: the test region "y0:y1,x0:x1" (numpy bounds, empty
    # = edge), or, when empty, the left `test_fraction` of the columns. Training uses
    # `train_regions` ("y0:y1,x0:x1;..."), or, when empty, the rest of the image. The benchmark
    # sources use the PN2V splits and ignore these.
    c.data.test_fraction = 0.5
    c.data.test_region = ""
    c.data.train_regions = ""
    c.data.ground_truth = "mean"  # of a stack: mean (float) | mean_uint16 (the reference's cast)
    # Few-shot training: use N training images (0: all). N < batch size takes images [50:50+N]
    # (the reference's rule), else a seeded random subset; repeated to the full set's length.
    c.data.n_samples = 0
    c.data.patch_size = 256
    # Intensity mapping to the model's space, from the training images only, stored with the
    # run: percentile (the noisy images' `percentiles` -> -1, +1) | range (the low percentile
    # of the noisy images and the brightest clean pixel, plus `headroom`) | reference (the
    # reference code's per-batch min-max of noisy and clean).
    c.data.normalization = "percentile"
    c.data.percentiles = (0.1, 99.9)  # of the noisy training images; scale: (the low one -> 0,
    # the high one -> 2, so that zero is the dark level and brightness is a multiplication)
    c.data.headroom = 0.5  # range: room above the brightest clean pixel, as a fraction
    # Variance-stabilising transform before the mapping: none | gat (generalized Anscombe, with
    # a Poisson-Gaussian noise model fitted on the training pairs).
    c.data.vst = "none"
    # Intensity augmentation: every training crop pair times a gain drawn log-uniformly from
    # this range (1, 1: off).
    c.data.gain_augment = (1.0, 1.0)
    # Foreground-weighted crops: draw this many positions per crop and keep the brightest (by
    # the clean image): more of the (rare, error-dominating) bright structures. 1: uniform.
    c.data.crop_tries = 1
    # Synthetic pairs: this fraction of each batch gets new noisy images drawn from a
    # Poisson-Gaussian noise model fitted on the training pairs, for the clean crops times a
    # gain log-uniform in synthetic_gain (unseen brightness with the right noise). 0: off.
    c.data.synthetic = 0.0
    c.data.synthetic_gain = (0.7, 1.6)
    # ... with the noise's lag-1 correlation between neighbours fitted on repeated training
    # frames of one scene (the differences of consecutive frames), instead of independent pixels
    # (which it stays, with a message, when no clean image has two noisy ones).
    c.data.synthetic_corr = False
    # What the synthetic noise is drawn from: "poisson" (the fitted Poisson-Gaussian model) or
    # "empirical" (the training pairs' measured residuals at each intensity, by inverse-CDF
    # sampling; the model only extends it above the brightest measured intensity).
    c.data.synthetic_noise = "poisson"
    c.data.augment = True  # random hflip + rot90 of training crops
    # Validation region for choosing the best checkpoint: this fraction of the columns, taken
    # from the right edge of the training region (never the test split). 0: no validation.
    c.data.val_fraction = 0.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128
    c.train.n_epochs = 500  # constant learning rate
    c.train.n_epochs_decay = 300  # then linear decay to lr / (n_epochs_decay + 1)
    c.train.steps_per_epoch = 0  # 0: ceil(n_train_images / batch_size), as the reference
    c.train.lr = 2e-4
    c.train.b1 = 0.5
    c.train.b2 = 0.999
    # Bound each network's gradient to this global norm before Adam (optax.clip_by_global_norm,
    # stateless: may change on resume); 0: off (the reference). The generator's norm, before
    # clipping, is logged as g_grad_norm.
    c.train.clip_grad_norm = 0.0
    c.train.log_every = 50

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # and always at the end and on SIGTERM/SIGINT; 0: only those
    c.checkpoint.keep = 2  # the latest K checkpoints ...
    c.checkpoint.keep_best = True  # ... plus the best by validation PSNR (if data.val_fraction > 0)
    # The best is chosen by the mean validation PSNR of a checkpoint and the select_window - 1
    # validated before it (1: its own alone), so one lucky validation does not choose.
    c.checkpoint.select_window = 1
    c.checkpoint.async_save = True  # write in the background while training continues

    c.loss = ml_collections.ConfigDict()
    c.loss.gan = 1.0
    c.loss.l1 = 100.0
    c.loss.l2 = 0.0  # mean squared error (not in the paper; 0: off)
    c.loss.ssim = 10.0
    c.loss.tv = 1e-4
    c.loss.contrastive = 1.0
    c.loss.contrastive_loss = "infonce"  # infonce (reference code) | ntxent (paper text)
    c.loss.tau = 0.1
    c.loss.head_trainable = False  # the reference never trains its projection head
    c.loss.head_features = 128
    c.loss.blur_p = 0.1
    c.loss.crop_scale = (0.08, 1.0)
    c.loss.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 4  # images per inference call
    c.eval.baseline_sigmas = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
    c.eval.tile = 512  # images larger than this (padded) are predicted as overlapping tiles
    c.eval.tile_overlap = 0  # least overlap of neighbouring tiles; 0: tile // 4
    c.eval.tta = False  # average the predictions of the 8 flips / quarter turns (8x compute)
    return c


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    c.variant = variant
    for k, v in VARIANTS[variant].items():
        c.loss[k] = v
    return c


def apply_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """big_vision's `runlocal`: a 4-level U-Net with 8 base channels, 32x32 crops, batch 2,
    (2 + 1) epochs of 2 steps, for unit tests and a first try on a laptop."""
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


def apply_args(c: ml_collections.ConfigDict, arg: str | None, allowed: tuple[str, ...]) -> None:
    """Applies the `PATH:key=value` arguments a preset accepts (`variant` and `tiny` always)."""
    args = parse_arg(arg)
    variant = args.pop("variant", None)
    if variant is not None:
        apply_variant(c, variant)
    if args.pop("tiny", None):
        apply_tiny(c)
    for k, v in args.items():
        if k not in allowed:
            raise ValueError(
                f"unknown config argument {k!r}; this preset accepts variant, tiny, "
                f"{', '.join(allowed)}"
            )
        if k == "dataset":
            if v not in DATASET_ARGS:
                raise ValueError(f"unknown dataset {v!r}; choose one of {', '.join(DATASET_ARGS)}")
            c.data.source = v
        elif k == "n_samples":
            try:
                c.data.n_samples = 0 if v == "all" else int(v)
            except ValueError:
                raise ValueError(f"n_samples={v!r}: expected all or a whole number") from None
        elif k == "seed":
            c.seed = int(v)


# The `dataset=` argument of the reference and paper presets (Table I's three benchmarks).
DATASET_ARGS = ("convallaria", "actin", "skull", "demo")


class ConfigError(ValueError):
    """An invalid configuration value, reported as one message naming the field."""


# The allowed values of the fields with a fixed set of them: the one list (models and data
# modules take theirs from here).
CHOICES = {
    "model.norm": ("batch", "instance", "none"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.output": ("tanh", "linear"),
    "model.residual": ("none", "input", "smooth"),
    "data.source": ("demo", "stack", "paired", "convallaria", "actin", "skull"),
    "data.ground_truth": ("mean", "mean_uint16"),
    "data.normalization": ("percentile", "scale", "range", "reference"),
    "data.vst": ("none", "gat"),
    "loss.contrastive_loss": ("infonce", "ntxent"),
}


def _get(c: ml_collections.ConfigDict, path: str):
    for part in path.split("."):
        c = c[part]
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks values (names are already checked: configs are locked)."""
    for path, choices in CHOICES.items():
        v = _get(c, path)
        if v not in choices:
            raise ConfigError(f"config.{path}={v!r} is not one of {', '.join(choices)}")
    p, depth = c.data.patch_size, c.model.depth
    if depth < 2:
        raise ConfigError(f"config.model.depth={depth} must be at least 2")
    if p % (2**depth):
        raise ConfigError(
            f"config.data.patch_size={p} must be divisible by 2**model.depth = {2**depth}"
        )
    if p // 2**c.model.d_layers < 3:
        raise ConfigError(
            f"config.data.patch_size={p} is too small for a PatchGAN with {c.model.d_layers} layers"
        )
    for path in ("train.batch_size", "train.log_every", "model.ngf", "model.ndf"):
        if _get(c, path) < 1:
            raise ConfigError(f"config.{path}={_get(c, path)} must be at least 1")
    if c.train.n_epochs < 0 or c.train.n_epochs_decay < 0:
        raise ConfigError("config.train.n_epochs and n_epochs_decay must be >= 0")
    if c.train.n_epochs + c.train.n_epochs_decay < 1:
        raise ConfigError("config.train.n_epochs + n_epochs_decay must be at least 1")
    if c.train.clip_grad_norm < 0:
        raise ConfigError(
            f"config.train.clip_grad_norm={c.train.clip_grad_norm} must be >= 0 (0: no clipping)"
        )
    if c.checkpoint.every_steps < 0:
        raise ConfigError(f"config.checkpoint.every_steps={c.checkpoint.every_steps} must be >= 0")
    if c.checkpoint.select_window < 1:
        raise ConfigError(
            f"config.checkpoint.select_window={c.checkpoint.select_window} must be at least 1"
        )
    if c.checkpoint.keep < 1:
        raise ConfigError(f"config.checkpoint.keep={c.checkpoint.keep} must be at least 1")
    if c.data.n_samples < 0:
        raise ConfigError(f"config.data.n_samples={c.data.n_samples} must be >= 0 (0: all)")
    g = tuple(c.data.gain_augment)
    if len(g) != 2 or not 0 < g[0] <= g[1]:
        raise ConfigError(f"config.data.gain_augment={g} must be (low, high) with 0 < low <= high")
    if c.model.bias_free and (c.model.norm != "none" or c.model.output != "linear"):
        raise ConfigError("config.model.bias_free needs model.norm=none and model.output=linear")
    if c.model.residual_sigma <= 0:
        raise ConfigError(f"config.model.residual_sigma={c.model.residual_sigma} must be > 0")
    if not 0.0 <= c.data.synthetic <= 1.0:
        raise ConfigError(f"config.data.synthetic={c.data.synthetic} must be in [0, 1]")
    if c.data.get("synthetic_noise", "poisson") not in ("poisson", "empirical"):
        raise ConfigError(
            f"config.data.synthetic_noise={c.data.synthetic_noise!r} must be 'poisson' or "
            "'empirical'"
        )
    sg = tuple(c.data.synthetic_gain)
    if len(sg) != 2 or not 0 < sg[0] <= sg[1]:
        raise ConfigError(f"config.data.synthetic_gain={sg} must be (low, high), 0 < low <= high")
    if c.data.crop_tries < 1:
        raise ConfigError(f"config.data.crop_tries={c.data.crop_tries} must be at least 1")
    if c.data.channel < -1:
        raise ConfigError(
            f"config.data.channel={c.data.channel} must be a channel index (0, 1, ...) or -1"
        )
    if c.data.headroom < 0:
        raise ConfigError(f"config.data.headroom={c.data.headroom} must be >= 0")
    if c.data.normalization == "reference" and c.data.vst != "none":
        raise ConfigError("config.data.vst applies to the stored normalisations, not reference")
    if not 0.0 <= c.data.val_fraction < 1.0:
        raise ConfigError(f"config.data.val_fraction={c.data.val_fraction} must be in [0, 1)")
    for path in ("loss.gan", "loss.l1", "loss.l2", "loss.ssim", "loss.tv", "loss.contrastive"):
        if _get(c, path) < 0:
            raise ConfigError(f"config.{path}={_get(c, path)} must be >= 0 (0 switches it off)")
    if not 0.0 <= c.loss.blur_p <= 1.0:
        raise ConfigError(f"config.loss.blur_p={c.loss.blur_p} must be in [0, 1]")
