"""The trained generator as a BioImage Model Zoo package (model description format 0.5), the
format Fiji (deepImageJ), napari, ilastik and `bioimageio.core` run.

The zoo takes no JAX weights; ONNX is the format every zoo consumer runs, so the package holds
the eval-mode generator as an ONNX graph (`clidim_jax.onnx_export.generator_onnx`, opset 17:
deepImageJ's onnxruntime reads no later opset). The graph computes on normalised intensities;
clidim-jax's intensity normalisation is affine (`Normalization`: x -> 2 (x - low) / (high - low)
- 1, or + 0 in mode "scale"), which is exactly the zoo's `scale_linear` pre-processing, and its
inverse is another `scale_linear` as post-processing. A normalisation with a noise model (a
generalized Anscombe transform first) is not affine: no zoo processing step expresses it, so
such a run is refused rather than exported with a different map.

Package layout (a plain zip; the paths are relative to `rdf.yaml`, as bioimageio.spec reads it):
  rdf.yaml          the model description (format_version 0.5.x, type model)
  weights.onnx      the generator (input "input", output "output": float32 b, c, y, x)
  test_input.npy    a real noisy image (float32, 1 x 1 x H x W, original units)
  test_output.npy   clidim-jax's own denoising of it (`Denoiser`, not the ONNX graph), so the
                    zoo's check (`bioimageio test`) compares the ONNX path against clidim-jax
  sample_input.tif, sample_output.tif
                    the same two images as float32 TIFF, for people and image viewers
  cover.png         noisy | denoised, one intensity scale
  README.md         how the model was trained and evaluated

The description is written as YAML with PyYAML (a dependency of flax, ml-collections and orbax):
bioimageio.spec, which could build it from its own classes, is not a clidim-jax dependency. The
zoo's checker runs in an environment of its own (`.ci/run`), where it validates every field.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import io
import json
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clidim_jax.data.normalization import Normalization
from clidim_jax.data.tiff import DataError

RDF = "rdf.yaml"
WEIGHTS = "weights.onnx"
TEST_INPUT, TEST_OUTPUT = "test_input.npy", "test_output.npy"
SAMPLE_INPUT, SAMPLE_OUTPUT = "sample_input.tif", "sample_output.tif"
COVER = "cover.png"
DOCUMENTATION = "README.md"

# The model description format this writes: the one bioimageio.core 0.11 (bioimageio.spec
# 0.5.12) implements. Later 0.5.x readers convert it; earlier ones read it as 0.5.
FORMAT_VERSION = "0.5.12"
MAX_OPSET = 17  # deepImageJ runs ONNX with onnxruntime <= 1.13: opsets up to 17
LICENSE = "Apache-2.0"  # clidim-jax's licence (pyproject.toml), which the weights inherit
AUTHORS = ({"name": "clidim-jax contributors"},)
GIT_REPO = "https://github.com/clidim-jax/clidim-jax"
CITE_CLIDIM = {
    "text": (
        "F. Fuentes-Hurtado, J.-B. Sibarita and V. Viasnoff, Generalizable Denoising of "
        "Microscopy Images using Generative Adversarial Networks and Contrastive Learning "
        "(CLIDiM); reference code"
    ),
    "url": "https://github.com/ffuhu/clidim-microscopy-image-denoising",
}
CITE_SOFTWARE = {
    "text": "clidim-jax: few-shot microscopy denoising with a contrastive pix2pix GAN in JAX",
    "url": GIT_REPO,
}
# The training data's sources, by `config.data.source` (DOIs: the checker validates them
# without a network request). "stack" and "paired" are the user's own data: no citation.
CITE_DATA = {
    "demo": {
        "text": (
            "Training data (TIRF microscopy of microtubules, BSD-3-Clause): B. Mandracchia et "
            "al., Fast and accurate sCMOS noise correction for fluorescence microscopy, Nature "
            "Communications 11, 94 (2020)"
        ),
        "doi": "10.1038/s41467-019-13841-8",
    },
    **{
        name: {
            "text": (
                f"Training data ({name}): M. Prakash, M. Lalit, P. Tomancak, A. Krull, F. Jug, "
                f"Fully Unsupervised Probabilistic Noise2Void, ISBI 2020; Zenodo record {record}"
            ),
            "doi": f"10.5281/zenodo.{record}",
        }
        for name, record in (("convallaria", 5156913), ("actin", 5156937), ("skull", 5156960))
    },
}
# Zoo tag categories (bioimageio.spec's tag_categories.json): task, modality, dims, network;
# then what the model is.
TAGS = (
    "denoising",
    "image-restoration",
    "fluorescence-light-microscopy",
    "2d",
    "unet",
    "pix2pix",
    "gan",
    "contrastive-learning",
    "few-shot",
    "onnx",
    "clidim",
    "clidim-jax",
)
TEST_SIZE = 256  # the test image's largest side, unless the U-Net needs more
INSTALL_HINT = "pip install 'clidim-jax[onnx]'"


def default_halo(depth: int) -> int:
    """The halo clidim-jax writes: half the U-Net's size unit, 2**(depth - 1) pixels (32 for
    depth 6, the blending margin of clidim-jax's own default tiling). bioimageio.core pads a
    whole image by the halo on each side before the network, so 2 * halo must be a multiple of
    2**depth for an image whose sides are multiples of 2**depth to stay a valid input; the
    smallest nonzero such halo is this one."""
    return 2 ** (int(depth) - 1)


def axis_size(depth: int, halo: int) -> dict[str, int]:
    """The y and x sizes the model takes: multiples of 2**depth (the U-Net halves the image
    depth times) of at least 2 * halo + 2**depth pixels (the spec wants a tile of the smallest
    size to keep at least one pixel after the halo is cropped from both sides)."""
    q = 2 ** int(depth)
    return {"min": 2 * int(halo) + q, "step": q}


# ------------------------------------------------------------------------------- normalisation


def scale_linear(norm: Normalization) -> tuple[dict[str, float], dict[str, float]]:
    """The zoo's `scale_linear` kwargs (x -> gain * x + offset) of `norm.apply` and of its
    inverse `norm.invert`: (pre-processing, post-processing).

    `apply` is (x - low) * 2 / (high - low) + shift, i.e. gain 2 / (high - low) and offset
    shift - low * gain; `invert` is (y - shift) * (high - low) / 2 + low, i.e. gain
    (high - low) / 2 and offset low - shift * (high - low) / 2. Raises ValueError for a
    normalisation with a noise model: its generalized Anscombe transform is not affine."""
    if norm.noise is not None:
        raise ValueError(
            "this run normalises intensities with a noise model (data.vst: a generalized "
            "Anscombe transform before the affine map); the BioImage Model Zoo's scale_linear "
            "cannot express it, so the run cannot be exported as a zoo package (train with "
            "data.vst=none to export one)"
        )
    low, high = float(norm.low), float(norm.high)
    gain = 2.0 / (high - low)
    half = (high - low) / 2.0
    pre = {"gain": gain, "offset": norm.shift - low * gain}
    post = {"gain": half, "offset": low - norm.shift * half}
    return pre, post


def apply_scale_linear(x: np.ndarray, kwargs: Mapping[str, float]) -> np.ndarray:
    """What the zoo's `scale_linear` step computes (bioimageio.core: x * gain + offset)."""
    return x * kwargs["gain"] + kwargs["offset"]


def intensity_range(output: np.ndarray, norm: Normalization) -> float:
    """The range the package's tolerance is a fraction of: the test output's (max - min), or
    the normalisation's (high - low) if larger. A barely trained model's output can be nearly
    constant, and then float32 rounding of its values alone exceeds 1e-4 of their spread."""
    return max(float(np.ptp(output)), float(norm.high - norm.low))


# ------------------------------------------------------------------------------- the package


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _tif(a: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, a)
    return buf.getvalue()


def _as_bcyx(a: Any, what: str, min: int, step: int) -> np.ndarray:
    """A test image as float32 (1, 1, H, W); H and W sizes min + k * step."""
    a = np.asarray(a, np.float32)
    if a.ndim == 2:
        a = a[None, None]
    if a.ndim != 4 or a.shape[:2] != (1, 1):
        raise ValueError(f"{what}: expected an (H, W) or (1, 1, H, W) image, got {a.shape}")
    h, w = a.shape[2:]
    if h < min or w < min or (h - min) % step or (w - min) % step:
        raise ValueError(f"{what}: {h}x{w} is not a valid input size ({min} + k * {step})")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: holds NaN or infinite values")
    return a


def onnx_opset(model: Any) -> int:
    """The default-domain opset a `onnx.ModelProto` imports."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ValueError("the ONNX model imports no default-domain opset")
    return int(max(versions))


def safe_name(text: str) -> str:
    """A zoo model name: letters, digits, `_+- ()` only, 5 to 64 characters."""
    name = re.sub(r"[^A-Za-z0-9_+\- ()]+", "-", text).strip(" -")
    return (name + " model")[:64] if len(name) < 5 else name[:64]


def rdf_dict(
    *,
    name: str,
    description: str,
    depth: int,
    halo: int,
    pre: Mapping[str, float],
    post: Mapping[str, float],
    opset: int,
    sha256: Mapping[str, str],
    tolerance: float,
    cite: Sequence[Mapping[str, str]] = (),
    tags: Sequence[str] = TAGS,
    authors: Sequence[Mapping[str, str]] = AUTHORS,
    config: Mapping[str, Any] | None = None,
    timestamp: str | None = None,
) -> dict:
    """The model description (what `rdf.yaml` holds) as plain data."""
    space_in = [{"type": "space", "id": a, "size": axis_size(depth, halo)} for a in ("y", "x")]
    space_out = [
        {"type": "space", "id": a, "size": {"tensor_id": "input", "axis_id": a}}
        | ({"halo": int(halo)} if halo else {})
        for a in ("y", "x")
    ]
    channel = {"type": "channel", "channel_names": ["intensity"]}
    extra = dict(config or {})
    return {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": name,
        "description": description,
        "authors": [dict(a) for a in authors],
        "cite": [dict(c) for c in cite],
        "license": LICENSE,
        "git_repo": GIT_REPO,
        "documentation": {"source": DOCUMENTATION, "sha256": sha256[DOCUMENTATION]},
        "covers": [{"source": COVER, "sha256": sha256[COVER]}],
        "tags": list(tags),
        "timestamp": timestamp or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "inputs": [
            {
                "id": "input",
                "description": "noisy image, original intensity units",
                "axes": [{"type": "batch"}, channel, *space_in],
                "test_tensor": {"source": TEST_INPUT, "sha256": sha256[TEST_INPUT]},
                "sample_tensor": {"source": SAMPLE_INPUT, "sha256": sha256[SAMPLE_INPUT]},
                "data": {"type": "float32"},
                "preprocessing": [{"id": "scale_linear", "kwargs": dict(pre)}],
            }
        ],
        "outputs": [
            {
                "id": "output",
                "description": "denoised image, original intensity units",
                "axes": [{"type": "batch"}, channel, *space_out],
                "test_tensor": {"source": TEST_OUTPUT, "sha256": sha256[TEST_OUTPUT]},
                "sample_tensor": {"source": SAMPLE_OUTPUT, "sha256": sha256[SAMPLE_OUTPUT]},
                "data": {"type": "float32"},
                "postprocessing": [{"id": "scale_linear", "kwargs": dict(post)}],
            }
        ],
        "weights": {
            "onnx": {
                "source": WEIGHTS,
                "sha256": sha256[WEIGHTS],
                "opset_version": int(opset),
                "comment": "eval-mode generator written by clidim_jax.onnx_export",
            }
        },
        "config": {
            **extra,
            "bioimageio": {
                # The claim the tests make: the ONNX path reproduces clidim-jax's own output to
                # 1e-4 of the intensity range (`intensity_range`), at every pixel.
                "reproducibility_tolerance": [
                    {
                        "relative_tolerance": 0.0,
                        "absolute_tolerance": float(tolerance),
                        "mismatched_elements_per_million": 0,
                        "output_ids": ["output"],
                        "weights_formats": ["onnx"],
                    }
                ],
                "architecture_type": "U-Net (pix2pix)",
                **extra.get("bioimageio", {}),
            },
        },
    }


def write_bmz_package(
    out_zip: str,
    *,
    onnx_model: Any,
    normalization: Normalization,
    depth: int,
    halo: int,
    test_input: np.ndarray,
    test_output: np.ndarray,
    cover_png: bytes,
    documentation_md: str,
    name: str,
    description: str,
    cite: Sequence[Mapping[str, str]] = (CITE_CLIDIM, CITE_SOFTWARE),
    tags: Sequence[str] = TAGS,
    authors: Sequence[Mapping[str, str]] = AUTHORS,
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict:
    """Writes a zoo package (the layout in the module docstring) atomically: a temporary file,
    then a rename, so an error leaves nothing behind. Returns the description written.

    `onnx_model`: an `onnx.ModelProto` at opset <= 17 (input b, c, y, x normalised intensities);
    `halo`: pixels to crop from each side of an output tile, 2 * halo a multiple of 2**depth
    (`default_halo`); `test_input`, `test_output`: (H, W) or (1, 1, H, W) images in original
    units, valid model inputs as they are (`axis_size`: the zoo's check runs them without
    padding); `config`: extra `config` entries of the description (e.g. provenance under
    "clidim_jax")."""
    import yaml

    from clidim_jax.denoise import check_output

    pre, post = scale_linear(normalization)  # (refuses a noise model first)
    q = 2 ** int(depth)
    if int(halo) < 0 or (2 * int(halo)) % q:
        raise ValueError(
            f"halo {halo}: 2 * halo must be a multiple of 2**depth = {q} (bioimageio.core pads "
            "whole images by the halo before the network)"
        )
    size = axis_size(depth, halo)
    opset = onnx_opset(onnx_model)
    if opset > MAX_OPSET:
        raise ValueError(f"the ONNX model uses opset {opset}; the zoo's consumers read <= 17")
    x = _as_bcyx(test_input, "test input", **size)
    y = _as_bcyx(test_output, "test output", **size)
    if x.shape != y.shape:
        raise ValueError(f"test input {x.shape} and test output {y.shape} differ in shape")
    check_output(out_zip, overwrite)
    files = {
        WEIGHTS: onnx_model.SerializeToString(),
        TEST_INPUT: _npy(x),
        TEST_OUTPUT: _npy(y),
        SAMPLE_INPUT: _tif(x[0, 0]),
        SAMPLE_OUTPUT: _tif(y[0, 0]),
        COVER: bytes(cover_png),
        DOCUMENTATION: documentation_md.encode("utf-8"),
    }
    rdf = rdf_dict(
        name=safe_name(name),
        description=description,
        depth=depth,
        halo=halo,
        pre=pre,
        post=post,
        opset=opset,
        sha256={k: _sha256(v) for k, v in files.items()},
        tolerance=1e-4 * intensity_range(y, normalization),
        cite=cite,
        tags=tags,
        authors=authors,
        config=config,
    )

    class Dumper(yaml.SafeDumper):  # repeated nodes written out, not as &anchors / *aliases
        def ignore_aliases(self, data: Any) -> bool:
            return True

    text = yaml.dump(rdf, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)
    path = os.fspath(out_zip)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(RDF, text)
            for fname, data in files.items():
                z.writestr(fname, data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return rdf


def read_package(path: str) -> tuple[dict, dict[str, bytes]]:
    """(description, {file name: bytes}) of a package zip."""
    import yaml

    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    return yaml.safe_load(files.pop(RDF)), files


def is_package(path: str) -> bool:
    """Whether `path` is a zip holding a zoo model description (`rdf.yaml`)."""
    try:
        with zipfile.ZipFile(path) as z:
            return RDF in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def denoiser_from_package(
    path: str,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    tta: bool | None = None,
) -> Any:
    """A `Denoiser` running a zoo package's ONNX weights with onnxruntime: clidim-jax's own
    tiling, blending and optional test-time augmentation, no JAX. The intensity map is the
    package's `scale_linear` pre-processing (a package clidim-jax exported also records its
    `Normalization`, which is the same map); a package whose pre-processing is anything else is
    refused with a clear error rather than run with a different normalisation."""
    from clidim_jax.inference import Denoiser, inference_settings
    from clidim_jax.onnx_export import OnnxGenerator

    try:
        rdf, files = read_package(path)
        (inp,) = rdf["inputs"]
        pre = inp.get("preprocessing") or []
        weights = files[rdf["weights"]["onnx"]["source"]]
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise DataError(
            f"{path}: not a BioImage Model Zoo package with ONNX weights ({type(e).__name__}: {e})"
        ) from None
    stored = ((rdf.get("config") or {}).get("clidim_jax") or {}).get("normalization")
    if stored is not None:
        norm = Normalization.from_dict(stored)
    elif len(pre) == 1 and pre[0].get("id") == "scale_linear":
        gain, offset = (float(pre[0]["kwargs"][k]) for k in ("gain", "offset"))
        # x -> gain x + offset is Normalization(low, high) with gain = 2 / (high - low) and
        # offset = -1 - gain low
        norm = Normalization(low=(-1.0 - offset) / gain, high=(1.0 - offset) / gain)
    else:
        raise DataError(
            f"{path}: its pre-processing {[p.get('id') for p in pre]} is not one scale_linear; "
            "clidim-jax runs only packages whose intensity map it can reproduce"
        )
    given = dict(tile=tile, overlap=overlap, batch_size=batch_size, tta=tta)
    return Denoiser(OnnxGenerator(weights), None, norm, **inference_settings(None, **given))


# ------------------------------------------------------------------------- from a training run


def cover_image(noisy: np.ndarray, denoised: np.ndarray) -> bytes:
    """noisy | denoised as an 8-bit grey PNG, one intensity scale (the denoised image's 0.5
    and 99.5 percentiles), with a 4-pixel white gap."""
    from PIL import Image  # (Pillow: a dependency of matplotlib)

    lo, hi = np.percentile(denoised, (0.5, 99.5))
    hi = hi if hi > lo else lo + 1.0

    def grey(a: np.ndarray) -> np.ndarray:
        return np.round(np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)

    gap = np.full((noisy.shape[0], 4), 255, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.hstack([grey(noisy), gap, grey(denoised)])).save(buf, format="PNG")
    return buf.getvalue()


def center_crop(image: np.ndarray, least: int, q: int) -> np.ndarray | None:
    """The central crop of sides min(side, max(TEST_SIZE, least)) rounded down to multiples of
    q, or None when a side would be shorter than `least`."""
    h, w = image.shape
    ch, cw = (min(s, max(TEST_SIZE, least)) // q * q for s in (h, w))
    if ch < least or cw < least:
        return None
    y, x = (h - ch) // 2, (w - cw) // 2
    return image[y : y + ch, x : x + cw]


def example_image() -> tuple[np.ndarray, str]:
    """The bundled example input (frame 0 of the Convallaria stack) and its description."""
    import importlib.resources

    import tifffile

    path = importlib.resources.files("clidim_jax.data") / "examples" / "convallaria_frame0.tif"
    with importlib.resources.as_file(path) as p:
        image = tifffile.imread(p)
    return np.asarray(image), "the bundled example clidim_jax/data/examples/convallaria_frame0.tif"


def package_test_image(config: Any, least: int, q: int) -> tuple[np.ndarray, str]:
    """A real noisy image for the package's test tensors, a central crop of sides multiples of
    q, at least `least`: from the first image of the run's test split when its data can be
    read and is large enough, else from the bundled example. Returns (image, its origin)."""
    from clidim_jax.data import load_datasets

    try:
        _, test = load_datasets(config.data, 1, int(config.seed))
        image = test.noisy_image(0)
    except (DataError, OSError, ValueError):  # the run's data is not on this machine
        image = None
    if image is not None and (crop := center_crop(np.asarray(image), least, q)) is not None:
        return crop, f"the first image of the run's test split ({test.name}), central crop"
    image, where = example_image()
    crop = center_crop(image, least, q)
    if crop is None:
        raise DataError(f"no test image of at least {least}x{least} pixels for this U-Net")
    return crop, f"{where}, central crop"


def _losses(config: Any) -> str:
    weights = {k: float(config.loss.get(k, 0.0)) for k in ("gan", "l1", "l2", "ssim", "tv")}
    weights["contrastive"] = float(config.loss.get("contrastive", 0.0))
    return ", ".join(f"{k} {v:g}" for k, v in weights.items() if v > 0) or "none"


def _eval_section(workdir: str, step: int) -> str:
    path = os.path.join(workdir, "eval.json")
    try:
        with open(path, encoding="utf-8") as f:
            ev = json.load(f)
        rows = [("noisy input", ev["input"]), (ev["baseline"]["name"], ev["baseline"])]
        rows.append((f"this model ({ev.get('model', 'denoised')})", ev["output"]))
    except (OSError, ValueError, KeyError, TypeError):
        return (
            "The run holds no evaluation (`eval.json`); evaluate it with `clidim-jax evaluate`.\n"
        )
    ck = ev.get("checkpoint") or {}
    lines = [
        f"`clidim-jax evaluate` on the run's {ev.get('split', 'test')} split "
        f"({ev.get('region', '')}, {ev.get('n_images', '?')} images of {ev.get('dataset', '?')})"
        f", checkpoint {ck.get('step', '?')}"
        + (", with test-time augmentation" if ev.get("tta") else "")
        + "; mean ± standard deviation over images, PSNR in dB against the ground truth:",
        "",
        "| method | PSNR (dB) | SSIM | NRMSE |",
        "|---|---:|---:|---:|",
    ]
    for label, m in rows:
        lines.append(
            f"| {label} | {m['psnr']:.2f} ± {m.get('psnr_std', 0):.2f} | {m['ssim']:.4f} | "
            f"{m['nrmse']:.4f} |"
        )
    if ck.get("step") not in (None, step):
        lines += ["", f"(The evaluated checkpoint {ck['step']} is not the exported one, {step}.)"]
    if ev.get("tta"):
        lines += ["", "This package runs the model once per image, without the augmentation."]
    return "\n".join(lines) + "\n"


def documentation(
    restored: Any, workdir: str, *, halo: int, test_from: str, max_error: float
) -> str:
    """The package's README.md: what the model is, how it was trained and evaluated, how to use
    and validate it."""
    from clidim_jax.run import dataset_name

    c, norm = restored.config, restored.norm
    g = restored.nets.generator
    q = 2**g.depth
    data = c.data
    where = data.path or data.noisy_path or "(bundled)"
    return f"""# clidim-jax denoiser: {c.name} ({c.variant})

A few-shot denoiser for 2-D fluorescence microscopy images, trained with
[clidim-jax]({GIT_REPO}), a JAX reimplementation of CLIDiM (a pix2pix conditional GAN:
U-Net generator, PatchGAN discriminator, L1 / SSIM / total-variation losses and a contrastive
regulariser on the discriminator). This package holds the generator only, as ONNX (opset 17).

## Model

- U-Net generator: depth {g.depth}, {g.ngf} base channels, normalisation layers: {g.norm};
  eval mode (BatchNorm running statistics folded into the convolutions, no dropout).
- Input and output: one channel; the network takes any height and width that are multiples of
  {q}. Pad other sizes (e.g. by reflection) and crop the output.
- Intensities: the pre-processing maps the stored training range [{norm.low:g}, {norm.high:g}]
  (mode "{norm.mode}") affinely onto the generator's range, the post-processing maps the output
  back to the input's units (both `scale_linear`, exactly clidim-jax's normalisation).
- Halo: {halo} pixels. Blockwise prediction (bioimageio.core, deepImageJ) crops them from each
  side of a tile, and a whole image is padded by them (symmetric) and cropped back, so the
  model description's sizes ({axis_size(g.depth, halo)["min"]} + k * {q}) include the halo: an
  image of sides multiples of {q} is valid as it is. The exact receptive field is larger than
  the halo, so tile seams are small but not zero (clidim-jax's own tiling blends overlapping
  tiles instead: `clidim-jax denoise`).

## Training

- clidim-jax config `{c.name}`, variant `{c.variant}`, seed {c.seed}; checkpoint at step
  {restored.step} ({restored.selected_by}).
- Data: {dataset_name(c)} (source `{data.source}`, {where}), patches {data.patch_size} px,
  batch {c.train.batch_size}; normalisation `{data.normalization}`.
- Loss weights: {_losses(c)}; Adam, learning rate {c.train.lr:g}.

## Evaluation

{_eval_section(workdir, restored.step)}
## Validation

The test input (`test_input.npy`: {test_from}) and test output (`test_output.npy`) come with the
package. The test output is clidim-jax's own denoising of the test input (JAX, the trained
Flax module), not the ONNX graph's: `bioimageio test` runs the ONNX weights with their pre- and
post-processing on the test input and compares. At export the ONNX path reproduced it to
{max_error:.3g} of the intensity range (the larger of the test output's max - min and the
normalisation's high - low); the package's tolerance is 1e-4 of it, at every pixel.

Validate the model on your own data before relying on it: it was trained on very few images of
one kind of sample and microscope. `clidim-jax train` reports PSNR / SSIM against a tuned
Gaussian filter on held-out data; do the same comparison on yours.

## Citation

Cite the CLIDiM paper (F. Fuentes-Hurtado, J.-B. Sibarita and V. Viasnoff, *Generalizable
Denoising of Microscopy Images using Generative Adversarial Networks and Contrastive
Learning*), clidim-jax, and the training data's source (see `cite` in rdf.yaml).
"""


def export_bmz(workdir: str, out: str, *, overwrite: bool = False) -> dict:
    """Exports the selected checkpoint of a training run (as `export_run`) to a zoo package;
    returns a summary (depth, halo, step, test image, the ONNX path's agreement, size)."""
    from clidim_jax.denoise import check_output
    from clidim_jax.run import dataset_name, restore_run
    from clidim_jax.workdir_lock import check_not_busy

    check_output(out, overwrite)  # fail before the (slow) restore
    for package in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            raise DataError(f"--format bmz needs the {package} package ({INSTALL_HINT})")
    check_not_busy(workdir, "export")
    restored = restore_run(workdir)
    config, norm = restored.config, restored.norm
    try:
        scale_linear(norm)
    except ValueError as e:
        raise DataError(f"{workdir}: {e}") from None
    from clidim_jax.onnx_export import OnnxGenerator, generator_onnx

    g = restored.nets.generator
    depth = int(g.depth)
    q = 2**depth
    try:
        model = generator_onnx(config.model, restored.variables, in_channels=1)
    except ValueError as e:  # a configuration the graph cannot express (names the field)
        raise DataError(f"{workdir}: {e}") from None

    halo = default_halo(depth)
    noisy, test_from = package_test_image(config, axis_size(depth, halo)["min"], q)
    noisy = np.asarray(noisy, np.float32)
    # clidim-jax's own prediction: the whole crop in one piece, without test-time augmentation
    # (the graph runs the model once).
    denoiser = restored.denoiser(tile=max(noisy.shape), batch_size=1, tta=False)
    denoised = np.asarray(denoiser(noisy), np.float32)

    pre, post = scale_linear(norm)
    x = apply_scale_linear(noisy, pre).astype(np.float32)
    y = OnnxGenerator(model)(x[None, ..., None])[0, ..., 0]
    onnx_out = apply_scale_linear(y, post).astype(np.float32)
    max_error = float(np.max(np.abs(onnx_out - denoised)) / intensity_range(denoised, norm))
    if not max_error <= 1e-4:  # a package the zoo's check would fail: a bug of the ONNX writer
        raise RuntimeError(
            f"the ONNX graph disagrees with clidim-jax on the test image by {max_error:.3g} of "
            "the intensity range (more than 1e-4); nothing was written"
        )

    meta = {
        "clidim_jax": {
            "normalization": norm.to_dict(),
            "depth": depth,
            "ngf": int(g.ngf),
            "norm_layer": str(g.norm),
            "run": {
                "step": int(restored.step),
                "checkpoint_selected_by": restored.selected_by,
                "name": str(config.name),
                "variant": str(config.variant),
                "data_source": str(config.data.source),
            },
            "test_input": test_from,
            "onnx_max_error_of_range": max_error,
        },
        "bioimageio": {
            "training": {
                "training_batch_size": float(config.train.batch_size),
                "initial_learning_rate": float(config.train.lr),
                "optimizer": "Adam",
                "loss_function": _losses(config),
            }
        },
    }
    cite = [CITE_CLIDIM, CITE_SOFTWARE]
    if str(config.data.source) in CITE_DATA:
        cite.append(CITE_DATA[str(config.data.source)])
    name = f"clidim-jax {config.name} {config.variant} denoiser"
    description = (
        f"Few-shot denoiser of 2-D fluorescence microscopy images: the U-Net generator (depth "
        f"{depth}) of a CLIDiM / pix2pix model trained with clidim-jax on {dataset_name(config)} "
        f"(loss weights: {_losses(config)}); image sides multiples of {q}."
    )
    rdf = write_bmz_package(
        out,
        onnx_model=model,
        normalization=norm,
        depth=depth,
        halo=halo,
        test_input=noisy,
        test_output=denoised,
        cover_png=cover_image(noisy, denoised),
        documentation_md=documentation(
            restored, workdir, halo=halo, test_from=test_from, max_error=max_error
        ),
        name=name,
        description=description,
        cite=cite,
        config=meta,
        overwrite=overwrite,
    )
    return {
        "depth": depth,
        "halo": halo,
        "step": int(restored.step),
        "test_shape": tuple(noisy.shape),
        "test_input": test_from,
        "onnx_max_error_of_range": max_error,
        "bytes": os.path.getsize(out),
        "name": rdf["name"],
    }
