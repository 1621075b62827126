"""A portable model file: the trained generator as a serialized `jax.export` artifact, with its
weights, intensity normalisation and metadata, in one zip archive.

Contents of the file (a plain zip, no pickles):
  clidim_model.json     format, normalisation, U-Net depth, tiling defaults, provenance
  generator_K.jaxexport `jax.export.Exported.serialize()` of G.apply(variables, x, train=False),
                        eval mode, with symbolic input shape (b, 2**depth * h, 2**depth * w, 1),
                        one per size class K (below)
  variables.npz         the generator's parameters and BatchNorm statistics, as the exported
                        function's flattened argument leaves

Size classes: the U-Net's transposed convolutions choose between two exact formulations by their
static input size (`models.layers.conv_transpose_breakpoints`), so one symbolic-shape export
cannot cover every size. The file holds one export per range of h * w within which every layer's
choice is fixed (symbolic constraints tell jax.export the range), and records the ranges
("size_classes"): 5 or 6 small programs, no weights in them.

The weights are an argument of the exported function, not constants folded into it, so the
compiled program is the one `jax.jit` builds from the checkpoint and the outputs are bit-for-bit
the same on the same machine. Running a model file needs only jax and numpy: no Flax module, no
config, no checkpoint (`load_model`, `clidim-jax denoise --model FILE`).
"""

from __future__ import annotations

import datetime
import io
import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clidim_jax.data.normalization import Normalization
from clidim_jax.data.tiff import DataError
from clidim_jax.inference import Denoiser, inference_settings

FORMAT = "clidim-jax-model"
FORMAT_VERSION = 1
_META, _VARIABLES = "clidim_model.json", "variables.npz"

SizeClass = tuple[int, int | None]  # an inclusive range of h * w, in units of (2**depth)**2


def _exported_name(k: int) -> str:
    return f"generator_{k}.jaxexport"


def size_classes(depth: int) -> list[SizeClass]:
    """Ranges of h * w (image height and width in units of 2**depth) within which every
    transposed convolution of the U-Net picks the same formulation. The one whose input is at
    level j (1..depth) sees h * w * 4**(depth - j) pixels and changes formulation after each of
    `models.layers.conv_transpose_breakpoints()` pixels. The file records the classes it was
    written with, so reading it does not depend on them."""
    from clidim_jax.models.layers import conv_transpose_breakpoints

    breaks = conv_transpose_breakpoints()
    cuts = sorted({b // 4 ** (depth - j) for b in breaks for j in range(1, depth + 1)} - {0})
    out: list[SizeClass] = []
    lo = 1
    for c in cuts:
        out.append((lo, c))
        lo = c + 1
    out.append((lo, None))
    return out


def _check_serialization() -> None:
    try:
        import flatbuffers  # noqa: F401  (jax.export serialization needs it)
    except ImportError:
        raise DataError(
            "writing or reading model files needs the flatbuffers package (pip install flatbuffers)"
        ) from None


def export_generator(
    generator: Any, variables: Any, *, platforms: Sequence[str] | None = None
) -> list[tuple[SizeClass, jax.export.Exported]]:
    """Exports eval-mode G for any batch size and any image size divisible by 2**depth: one
    Exported per size class, each with symbolic shape (b, q*h, q*w, 1), q = 2**depth."""
    q = 2**generator.depth

    def predict(variables, x):
        return generator.apply(variables, x, train=False).astype(jnp.float32)

    var_specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), variables)
    out = []
    for lo, hi in size_classes(generator.depth):
        constraints = [f"h*w >= {lo}"] if lo > 1 else []
        constraints += [f"h*w <= {hi}"] if hi is not None else []
        b, h, w = jax.export.symbolic_shape(f"b, {q}*h, {q}*w", constraints=constraints)
        x_spec = jax.ShapeDtypeStruct((b, h, w, 1), jnp.float32)
        exported = jax.export.export(jax.jit(predict), platforms=platforms)(var_specs, x_spec)
        out.append(((lo, hi), exported))
    return out


class ExportedGenerator:
    """The Flax-module interface `Denoiser` needs (`depth`, `apply`), backed by the Exported of
    each size class."""

    def __init__(self, exported: list[tuple[SizeClass, jax.export.Exported]], depth: int):
        self.exported = exported
        self.depth = int(depth)

    def pick(self, shape: Sequence[int]) -> jax.export.Exported:
        q = 2**self.depth
        hw = (shape[1] // q) * (shape[2] // q)
        for (lo, hi), exported in self.exported:
            if lo <= hw and (hi is None or hw <= hi):
                return exported
        raise ValueError(f"no exported program for input shape {tuple(shape)}")

    def apply(self, variables: Any, x: jax.Array, *, train: bool = False) -> jax.Array:
        if train:
            raise ValueError("an exported generator runs in eval mode only")
        return self.pick(x.shape).call(variables, x)


def save_model(
    path: str,
    exported: list[tuple[SizeClass, jax.export.Exported]],
    variables: Any,
    norm: Normalization,
    meta: dict,
    *,
    overwrite: bool = False,
) -> None:
    """Writes the model file atomically (temporary file, then rename)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected an output file name")
    if os.path.exists(path) and not overwrite:
        raise DataError(f"{path}: already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DataError(f"{path}: the folder {parent} does not exist")
    _check_serialization()
    leaves = jax.tree.leaves(variables)
    buf = io.BytesIO()
    np.savez(buf, **{f"{i:06d}": np.asarray(v) for i, v in enumerate(leaves)})
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "normalization": json.loads(norm.to_json()),
        "platforms": list(exported[0][1].platforms),
        "size_classes": [[lo, hi] for (lo, hi), _ in exported],
        "jax_version": jax.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **meta,
    }
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr(_META, json.dumps(header, indent=2))
            for k, (_, e) in enumerate(exported):
                z.writestr(_exported_name(k), bytes(e.serialize()))
            z.writestr(_VARIABLES, buf.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_model(path: str) -> tuple[ExportedGenerator, Any, Normalization, dict]:
    """Reads a model file: (generator, variables, normalisation, metadata)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: model file not found")
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read(_META))
            classes = [
                (int(lo), None if hi is None else int(hi)) for lo, hi in meta["size_classes"]
            ]
            blobs = [z.read(_exported_name(k)) for k in range(len(classes))]
            with np.load(io.BytesIO(z.read(_VARIABLES))) as npz:
                leaves = [npz[k] for k in sorted(npz.files)]
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, OSError) as e:
        raise DataError(f"{path}: not a clidim-jax model file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a clidim-jax model file (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise DataError(
            f"{path}: model format version {meta['format_version']} is newer than this "
            f"clidim-jax understands ({FORMAT_VERSION}); upgrade clidim-jax"
        )
    _check_serialization()
    try:
        programs = [(c, jax.export.deserialize(bytearray(b))) for c, b in zip(classes, blobs)]
    except Exception as e:
        raise DataError(f"{path}: cannot load the exported generator ({e})") from None
    exported = programs[0][1]
    backend = jax.default_backend()
    if backend not in exported.platforms:
        raise DataError(
            f"{path}: exported for {', '.join(exported.platforms)}, this machine runs {backend} "
            "(export again with --platforms including it)"
        )
    n_var = exported.in_tree.num_leaves - 1  # the last leaf is the image batch
    if len(leaves) != n_var:
        raise DataError(f"{path}: {len(leaves)} weight arrays, the generator takes {n_var}")
    (variables, _), _ = jax.tree.unflatten(exported.in_tree, [*leaves, None])
    for leaf, aval in zip(leaves, exported.in_avals):
        if tuple(leaf.shape) != tuple(aval.shape) or leaf.dtype != aval.dtype:
            raise DataError(f"{path}: weights do not match the exported generator")
    generator = ExportedGenerator(programs, meta["depth"])
    return generator, variables, Normalization.from_dict(meta["normalization"]), meta


def denoiser_from_model(
    path: str,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    tta: bool | None = None,
) -> Denoiser:
    """A `Denoiser` running a model file; tiling and test-time-augmentation defaults are those
    stored at export."""
    generator, variables, norm, meta = load_model(path)
    given = dict(tile=tile, overlap=overlap, batch_size=batch_size, tta=tta)
    return Denoiser(generator, jax.device_put(variables), norm, **inference_settings(meta, **given))


def export_run(
    workdir: str,
    out: str,
    *,
    overwrite: bool = False,
    platforms: Sequence[str] | None = None,
) -> dict:
    """Exports the selected checkpoint of a training run (the best by validation PSNR when the
    run has validation data, else the latest) to a model file; returns its metadata."""
    from clidim_jax.denoise import check_output
    from clidim_jax.run import restore_run
    from clidim_jax.workdir_lock import check_not_busy

    check_output(out, overwrite)  # fail before the (slow) restore and export
    check_not_busy(workdir, "export")  # not a run still being written
    restored = restore_run(workdir)
    config, nets, state, norm = restored
    variables = restored.variables
    exported = export_generator(nets.generator, variables, platforms=platforms)
    g = nets.generator
    settings = inference_settings(config.eval)
    meta = {
        "depth": int(g.depth),
        "ngf": int(g.ngf),
        "norm_layer": str(g.norm),
        "tile": settings["tile"],
        "tile_overlap": settings["overlap"],
        "batch_size": settings["batch_size"],
        "tta": settings["tta"],
        "run": {
            "workdir": os.path.abspath(workdir),
            "step": int(state.step),
            "checkpoint_selected_by": restored.selected_by,
            "name": str(config.name),
            "variant": str(config.variant),
            "data_source": str(config.data.source),
            "data_path": str(config.data.path),
        },
    }
    save_model(out, exported, variables, norm, meta, overwrite=overwrite)
    return meta
