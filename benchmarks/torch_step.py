"""PyTorch eager reference of the CLIDiM networks and train step: a benchmark baseline only.

Standalone (torch + numpy): never imported by `clidim_jax`, not part of its install. It builds what
docs/method.md sections 1-5 describe, the way the reference pix2pix fork does it in PyTorch:

- `UnetGenerator`: pix2pix `unet_256` (depth 8, 54,407,809 parameters for 1 -> 1 channels), with
  BatchNorm, dropout 0.5 on the `depth - 5` 512-channel levels next to the innermost one, and
  pix2pix's in-place LeakyReLU (its skips carry LeakyReLU(input); the next ReLU makes that moot).
- `PatchGAN`: the conditional 70x70 PatchGAN, 2 input channels, 2,764,609 parameters, 30x30
  logits at 256x256.
- `ProjectionHead`: Linear(F, F) -> LeakyReLU(0.01) -> Linear(F, 128), no biases, frozen.
- the losses (GAN, L1, SSIM, TV, InfoNCE on two augmented views) and `make_step`, one full train
  step: [contrastive D step] -> GAN D step -> G step against the updated D, Adam(2e-4, 0.5, 0.999).

Run `python benchmarks/torch_step.py --help`; `time_step` is the entry point for comparison
scripts. Eager mode only (no torch.compile): the comparison is against PyTorch eager.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = {
    # variant: (contrastive, ssim + tv)
    "baseline": (False, False),
    "cl_tv_ssim": (True, True),
}
L1_WEIGHT = 100.0
SSIM_WEIGHT = 10.0
TV_WEIGHT = 1e-4
TAU = 0.1
LR, BETAS = 2e-4, (0.5, 0.999)

# Pinned parameter counts (docs/method.md section 1): 1-channel G, 2-channel D.
G_PARAMS = {8: 54_407_809, 7: 41_822_849}
D_PARAMS = 2_764_609

# Memory formats, measured on this project's 2-core x86 CPU with torch 2.13 eager and no other load
# (see benchmarks/README.md): the train step is the same either way (2.26 s NCHW, 2.28 s
# channels_last at batch 4), so it stays NCHW; whole-image inference is faster in channels_last
# (1.28 s against 1.70 s at 1024x1024).
DEFAULT_CHANNELS_LAST = False
DEFAULT_CHANNELS_LAST_DENOISE = True
# torch.optim.Adam implementation: "fused" (one kernel per parameter, available on CPU in eager
# mode) ran G's 54M-parameter update in about 30 ms against 85 ms for "default" (pix2pix's choice:
# torch's for-loop implementation on CPU), a few percent of the step. "foreach" is the third.
ADAM_IMPLS = ("fused", "foreach", "default")
DEFAULT_ADAM = "fused"


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


class UnetSkipConnectionBlock(nn.Module):
    """pix2pix's U-Net level: `x -> cat([x, up(sub(down(x)))])`, or `up(sub(down(x)))` outermost."""

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        input_nc: int | None = None,
        submodule: nn.Module | None = None,
        *,
        outermost: bool = False,
        innermost: bool = False,
        use_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        input_nc = outer_nc if input_nc is None else input_nc
        # BatchNorm follows, so no conv bias (pix2pix: use_bias = norm is InstanceNorm).
        downconv = nn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=False)
        downrelu = nn.LeakyReLU(0.2, True)
        downnorm = nn.BatchNorm2d(inner_nc)
        uprelu = nn.ReLU(True)
        upnorm = nn.BatchNorm2d(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=False)
            model = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=False)
            model = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
            if use_dropout:
                model.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix `UnetGenerator(input_nc, output_nc, num_downs=depth, ngf, BatchNorm2d, dropout)`.

    Level i (0 = outermost) has ngf * min(2**i, 8) channels; dropout on levels 4 .. depth-2.
    Input NCHW, H and W divisible by 2**depth; output in [-1, 1].
    """

    def __init__(
        self,
        depth: int = 8,
        ngf: int = 64,
        input_nc: int = 1,
        output_nc: int = 1,
        use_dropout: bool = True,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        self.depth = depth
        ch = [ngf * min(2**i, 8) for i in range(depth)]
        block = UnetSkipConnectionBlock(ch[depth - 2], ch[depth - 1], innermost=True)
        for i in range(depth - 2, 0, -1):
            block = UnetSkipConnectionBlock(
                ch[i - 1], ch[i], submodule=block, use_dropout=use_dropout and 4 <= i <= depth - 2
            )
        self.model = UnetSkipConnectionBlock(
            output_nc, ch[0], input_nc=input_nc, submodule=block, outermost=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchGAN(nn.Module):
    """pix2pix `NLayerDiscriminator(input_nc=2, ndf, n_layers=3, BatchNorm2d)`: raw logits."""

    def __init__(self, ndf: int = 64, input_nc: int = 2, n_layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            seq += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        seq += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1),
        ]
        self.model = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ProjectionHead(nn.Module):
    """Linear(F, F, no bias) -> LeakyReLU(0.01) -> Linear(F, out, no bias), PyTorch default init."""

    def __init__(self, in_features: int, out_features: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, in_features, bias=False)
        self.fc2 = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.leaky_relu(self.fc1(x), 0.01))


def init_pix2pix(net: nn.Module, std: float = 0.02) -> nn.Module:
    """pix2pix `init_weights(net, 'normal', 0.02)`: conv/linear weights N(0, std), BN weights
    N(1, std), biases 0."""

    def fn(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)

    net.apply(fn)
    return net


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def gaussian_taps(window: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian at integer offsets from the centre (kornia / torchvision)."""
    x = torch.arange(window, dtype=torch.float32) - window // 2
    if window % 2 == 0:
        x = x + 0.5
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def separable_filter(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Every channel of NCHW `x` filtered by taps (x) taps, reflect borders, same size."""
    k, c = taps.numel(), x.shape[1]
    lo, hi = (k - 1) // 2, k // 2
    xp = F.pad(x, (lo, hi, lo, hi), mode="reflect")
    taps = taps.to(x.dtype)
    y = F.conv2d(xp, taps.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(y, taps.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    window: int = 5,
    sigma: float = 1.5,
    c1: float = 0.01**2,
    c2: float = 0.03**2,
) -> torch.Tensor:
    """kornia.metrics.ssim: Gaussian-weighted biased moments, reflect borders; inputs in [0, 1]."""
    c = x.shape[1]
    m = separable_filter(torch.cat([x, y, x * x, y * y, x * y], 1), gaussian_taps(window, sigma))
    mu_x, mu_y, e_xx, e_yy, e_xy = m.split(c, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    num = (2.0 * mu_xy + c1) * (2.0 * (e_xy - mu_xy) + c2)
    den = (mu_xx + mu_yy + c1) * ((e_xx - mu_xx) + (e_yy - mu_yy) + c2)
    return num / (den + 1e-12)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """clip((1 - SSIM) / 2, 0, 1), mean; inputs in [-1, 1] are mapped to [0, 1] first."""
    s = ssim_map((pred + 1.0) / 2.0, (target + 1.0) / 2.0)
    return torch.clamp((1.0 - s) / 2.0, 0.0, 1.0).mean()


def tv_loss(img: torch.Tensor) -> torch.Tensor:
    """Per image: sum of |vertical| + |horizontal| neighbour differences; mean over the batch."""
    dy = (img[:, :, 1:, :] - img[:, :, :-1, :]).abs().flatten(1).sum(1)
    dx = (img[:, :, :, 1:] - img[:, :, :, :-1]).abs().flatten(1).sum(1)
    return (dy + dx).mean()


def gan_loss(logits: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if target_is_real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def infonce_loss(q: torch.Tensor, k: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Raw dot products, minus each row's (detached) max, / tau; CE with the diagonal as labels."""
    logits = q @ k.t()
    logits = (logits - logits.max(dim=1, keepdim=True).values.detach()) / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


# --------------------------------------------------------------------------------------------
# Contrastive views (docs/method.md section 4)
# --------------------------------------------------------------------------------------------


def crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: (top, left, h, w); 10 tries, then centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


_BLUR_TAPS = gaussian_taps(3, 1.5)


def contrastive_view(
    pairs: torch.Tensor, rng: np.random.Generator, blur_p: float = 0.1
) -> torch.Tensor:
    """One augmented view of a (B, 2, H, W) batch: hflip p=0.5 per sample, 3x3 blur (sigma 1.5,
    reflect) of the whole batch with p=blur_p, random resized crop back to (H, W) per sample
    (bilinear, align_corners=True). Both channels of a sample share the transform. No grad."""
    b, _, height, width = pairs.shape
    flip = torch.from_numpy(rng.random(b) < 0.5).view(b, 1, 1, 1)
    x = torch.where(flip, pairs.flip(-1), pairs)
    if rng.random() < blur_p:
        x = separable_filter(x, _BLUR_TAPS)
    out = []
    for i in range(b):
        top, left, h, w = crop_box(rng, height, width)
        out.append(
            F.interpolate(
                x[i : i + 1, :, top : top + h, left : left + w],
                size=(height, width),
                mode="bilinear",
                align_corners=True,
            )
        )
    return torch.cat(out, 0)


# --------------------------------------------------------------------------------------------
# The train step (docs/method.md section 5)
# --------------------------------------------------------------------------------------------


def _set_requires_grad(net: nn.Module, flag: bool) -> None:
    for p in net.parameters():
        p.requires_grad_(flag)


def setup_threads(threads: int | None = None) -> int:
    """`torch.set_num_threads(os.cpu_count())` unless told otherwise; returns the count."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


class TrainStep:
    """One CLIDiM train step in PyTorch eager, on a fixed synthetic batch (or one passed in).

    Calling it runs, as pix2pix's `optimize_parameters` with the CLIDiM additions:
      1. fake = G(noisy) (train mode, dropout on);
      2. [contrastive] one D Adam step on InfoNCE of head(D(view1)) vs head(D(view2)), D run four
         times on B samples each (fake q, fake k, real q, real k), fake detached;
      3. one D Adam step on 0.5 * (BCE(D(noisy, fake.detach()), 0) + BCE(D(noisy, clean), 1)),
         real and fake in separate calls, the same Adam as step 2;
      4. one G Adam step on BCE(D(noisy, fake), 1) + 100 L1 [+ 10 SSIM + 1e-4 TV], D in train
         mode with its parameters frozen.
    Returns the loss values as floats.
    """

    def __init__(
        self,
        variant: str,
        batch_size: int,
        size: int = 256,
        depth: int = 8,
        *,
        ngf: int = 64,
        ndf: int = 64,
        seed: int = 0,
        channels_last: bool = DEFAULT_CHANNELS_LAST,
        adam: str = DEFAULT_ADAM,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        if size % 2**depth:
            raise ValueError(f"size {size} is not divisible by 2**depth = {2**depth}")
        self.variant, self.batch_size, self.size, self.depth = variant, batch_size, size, depth
        self.contrastive, self.ssim_tv = VARIANTS[variant]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        torch.manual_seed(seed)
        self.G = init_pix2pix(UnetGenerator(depth, ngf)).to(memory_format=self.memory_format)
        self.D = init_pix2pix(PatchGAN(ndf)).to(memory_format=self.memory_format)
        if ngf == 64 and depth in G_PARAMS:
            assert count_params(self.G) == G_PARAMS[depth], count_params(self.G)
        if ndf == 64:
            assert count_params(self.D) == D_PARAMS, count_params(self.D)
        feat = (size // 8 - 2) ** 2
        self.head = ProjectionHead(feat)  # built after init_pix2pix: PyTorch's default init
        _set_requires_grad(self.head, False)  # frozen (the reference never trains it)
        self.G.train()
        self.D.train()
        if adam not in ADAM_IMPLS:
            raise ValueError(f"adam must be one of {ADAM_IMPLS}, got {adam!r}")
        kw = {} if adam == "default" else {adam: True}
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=LR, betas=BETAS, **kw)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=LR, betas=BETAS, **kw)
        self.rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        shape = (batch_size, 1, size, size)
        self.clean = (torch.rand(shape, generator=gen) * 2 - 1).contiguous(
            memory_format=self.memory_format
        )
        noisy = (self.clean + 0.3 * torch.randn(shape, generator=gen)).clamp(-1, 1)
        self.noisy = noisy.contiguous(memory_format=self.memory_format)

    def _pair(self, noisy: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        return torch.cat([noisy, cand], 1).contiguous(memory_format=self.memory_format)

    def _features(self, pairs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            view = contrastive_view(pairs, self.rng).contiguous(memory_format=self.memory_format)
        return self.head(self.D(view).flatten(1))

    def __call__(
        self, noisy: torch.Tensor | None = None, clean: torch.Tensor | None = None
    ) -> dict[str, float]:
        noisy = self.noisy if noisy is None else noisy
        clean = self.clean if clean is None else clean
        losses: dict[str, torch.Tensor] = {}

        # 1. Generator forward.
        fake = self.G(noisy)
        fake_pair_sg = self._pair(noisy, fake.detach())
        real_pair = self._pair(noisy, clean)

        # 2. Contrastive D step.
        _set_requires_grad(self.D, True)
        if self.contrastive:
            self.opt_d.zero_grad(set_to_none=True)
            fq, fk = self._features(fake_pair_sg), self._features(fake_pair_sg)
            rq, rk = self._features(real_pair), self._features(real_pair)
            loss_cl = infonce_loss(torch.cat([fq, rq], 0), torch.cat([fk, rk], 0))
            loss_cl.backward()
            self.opt_d.step()
            losses["contrastive"] = loss_cl

        # 3. GAN D step (real and fake in separate D calls).
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = 0.5 * (gan_loss(self.D(fake_pair_sg), False) + gan_loss(self.D(real_pair), True))
        loss_d.backward()
        self.opt_d.step()
        losses["d_gan"] = loss_d

        # 4. G step against the updated D (D in train mode, parameters frozen).
        _set_requires_grad(self.D, False)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g_gan = gan_loss(self.D(self._pair(noisy, fake)), True)
        loss_l1 = (fake - clean).abs().mean()
        loss_g = loss_g_gan + L1_WEIGHT * loss_l1
        losses["g_gan"], losses["l1"] = loss_g_gan, loss_l1
        if self.ssim_tv:
            loss_ssim, loss_tv = ssim_loss(fake, clean), tv_loss(fake)
            loss_g = loss_g + SSIM_WEIGHT * loss_ssim + TV_WEIGHT * loss_tv
            losses["ssim"], losses["tv"] = loss_ssim, loss_tv
        loss_g.backward()
        self.opt_g.step()
        losses["g_total"] = loss_g
        return {k: float(v.detach()) for k, v in losses.items()}


def make_step(
    variant: str,
    batch_size: int,
    size: int = 256,
    depth: int = 8,
    **kwargs: Any,
) -> TrainStep:
    """A callable doing one full train step per call (see `TrainStep`); kwargs: ngf, ndf, seed,
    channels_last, adam."""
    return TrainStep(variant, batch_size, size, depth, **kwargs)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _summary(times: list[float]) -> dict[str, float]:
    return {
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
    }


def _env(threads: int) -> dict[str, Any]:
    return {"torch_version": torch.__version__, "threads": threads, "framework": "pytorch-eager"}


def time_step(
    variant: str,
    batch_size: int = 4,
    size: int = 256,
    steps: int = 3,
    warmup: int = 1,
    *,
    depth: int = 8,
    channels_last: bool = DEFAULT_CHANNELS_LAST,
    adam: str = DEFAULT_ADAM,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Times `steps` train steps after `warmup` ones; median / min / max seconds and images/s."""
    n_threads = setup_threads(threads)
    step = make_step(
        variant, batch_size, size, depth, seed=seed, channels_last=channels_last, adam=adam
    )
    for _ in range(warmup):
        step()
    times, losses = [], {}
    for _ in range(steps):
        t = time.perf_counter()
        losses = step()
        times.append(time.perf_counter() - t)
    s = _summary(times)
    return {
        "mode": "train",
        "variant": variant,
        "batch_size": batch_size,
        "size": size,
        "depth": depth,
        "steps": steps,
        "warmup": warmup,
        **s,
        "images_per_s": batch_size / s["step_s"],
        "times_s": times,
        "losses": losses,
        "channels_last": channels_last,
        "adam": adam,
        "params_g": count_params(step.G),
        "params_d": count_params(step.D),
        "peak_rss_bytes": _peak_rss_bytes(),
        **_env(n_threads),
    }


def time_denoise(
    size: int = 1024,
    steps: int = 3,
    warmup: int = 1,
    *,
    depth: int = 8,
    channels_last: bool = DEFAULT_CHANNELS_LAST_DENOISE,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Whole-image inference of G (eval mode: BN running stats, no dropout) on 1x1xSxS."""
    if size % 2**depth:
        raise ValueError(f"size {size} is not divisible by 2**depth = {2**depth}")
    n_threads = setup_threads(threads)
    torch.manual_seed(seed)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    g = init_pix2pix(UnetGenerator(depth)).to(memory_format=mf).eval()
    x = (torch.rand(1, 1, size, size) * 2 - 1).contiguous(memory_format=mf)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            g(x)
        for _ in range(steps):
            t = time.perf_counter()
            y = g(x)
            times.append(time.perf_counter() - t)
    assert y.shape == x.shape
    s = _summary(times)
    return {
        "mode": "denoise",
        "image_size": size,
        "depth": depth,
        "steps": steps,
        "warmup": warmup,
        **s,
        "megapixels_per_s": size * size / 1e6 / s["step_s"],
        "times_s": times,
        "channels_last": channels_last,
        "params_g": count_params(g),
        "peak_rss_bytes": _peak_rss_bytes(),
        **_env(n_threads),
    }


def self_check() -> dict[str, Any]:
    """Parameter counts and output shapes of docs/method.md sections 1-2 (cheap: no 256 forward)."""
    g8, g7, d = UnetGenerator(8), UnetGenerator(7), PatchGAN()
    assert count_params(g8) == G_PARAMS[8], count_params(g8)
    assert count_params(g7) == G_PARAMS[7], count_params(g7)
    assert count_params(d) == D_PARAMS, count_params(d)
    n_dropout = sum(isinstance(m, nn.Dropout) for m in g8.modules())
    assert n_dropout == 3, n_dropout
    with torch.no_grad():
        d.eval()
        assert d(torch.zeros(1, 2, 256, 256)).shape == (1, 1, 30, 30)
        assert d(torch.zeros(1, 2, 128, 128)).shape == (1, 1, 14, 14)
        g5 = UnetGenerator(5, ngf=8).eval()
        assert g5(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 64, 64)
    return {
        "params_g_depth8": G_PARAMS[8],
        "params_g_depth7": G_PARAMS[7],
        "params_d": D_PARAMS,
        "ok": True,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["train", "denoise", "check"], default="train")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="baseline")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="train: 256 (default); denoise: 1024")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="default: os.cpu_count()")
    cl = p.add_mutually_exclusive_group()
    cl.add_argument(
        "--channels-last",
        dest="channels_last",
        action="store_true",
        default=None,
        help="default: off for train, on for denoise (the faster of the two here)",
    )
    cl.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--adam", choices=ADAM_IMPLS, default=DEFAULT_ADAM, help="Adam implementation")
    a = p.parse_args(argv)
    if a.channels_last is None:
        a.channels_last = (
            DEFAULT_CHANNELS_LAST_DENOISE if a.mode == "denoise" else DEFAULT_CHANNELS_LAST
        )
    if a.mode == "check":
        result = self_check()
    elif a.mode == "denoise":
        result = time_denoise(
            a.size or 1024,
            a.steps,
            a.warmup,
            depth=a.depth,
            channels_last=a.channels_last,
            threads=a.threads,
        )
    else:
        result = time_step(
            a.variant,
            a.batch_size,
            a.size or 256,
            a.steps,
            a.warmup,
            depth=a.depth,
            channels_last=a.channels_last,
            adam=a.adam,
            threads=a.threads,
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
