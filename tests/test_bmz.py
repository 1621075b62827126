"""The BioImage Model Zoo package: its files and description fields, the intensity normalisation
as scale_linear steps, and an exported package whose ONNX path reproduces clidim-jax's output.
(The zoo's own checker, bioimageio.core, runs on an exported package in .ci/run, in its own
environment.)"""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from conftest import run_cli

from clidim_jax import bmz
from clidim_jax.data.normalization import NoiseModel, Normalization
from clidim_jax.data.tiff import DataError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

NORMS = [
    Normalization(85.0, 141.0),  # percentile: low -> -1
    Normalization(100.0, 4100.0, "scale"),  # low -> 0
    Normalization(-0.25, 0.75, "range"),
    Normalization(3.0, 60000.0, "reference"),
]


def standin_onnx(opset: int = 17):
    """A 3x3 box filter with the generator graph's interface ("input" -> "output", float32
    NCHW, symbolic batch, height and width): the package writer does not look inside."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((1, 1, 3, 3), 1 / 9, np.float32), "w")
    node = helper.make_node("Conv", ["input", "w"], ["output"], pads=[1, 1, 1, 1])
    io_ = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 1, "height", "width"])
        for n in ("input", "output")
    ]
    graph = helper.make_graph([node], "standin", io_[:1], io_[1:], initializer=[w])
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def package_prediction(rdf: dict, files: dict, x: np.ndarray) -> np.ndarray:
    """What a zoo consumer computes: the rdf's pre-processing, the ONNX weights (onnxruntime),
    the rdf's post-processing, all in float32 as bioimageio.core does."""
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    (pre,), (post,) = inp["preprocessing"], out["postprocessing"]
    assert pre["id"] == post["id"] == "scale_linear"
    session = ort.InferenceSession(
        files[rdf["weights"]["onnx"]["source"]], providers=["CPUExecutionProvider"]
    )
    xn = bmz.apply_scale_linear(np.asarray(x, np.float32), pre["kwargs"]).astype(np.float32)
    (y,) = session.run(None, {session.get_inputs()[0].name: xn})
    return bmz.apply_scale_linear(y, post["kwargs"]).astype(np.float32)


def npy(files: dict, name: str) -> np.ndarray:
    return np.load(io.BytesIO(files[name]), allow_pickle=False)


# ------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n.mode)
def test_scale_linear_is_the_normalisation_and_its_inverse(norm):
    pre, post = bmz.scale_linear(norm)
    rng = np.random.default_rng(0)
    span = norm.high - norm.low
    x = rng.uniform(norm.low - span, norm.high + span, 10_000)
    np.testing.assert_allclose(bmz.apply_scale_linear(x, pre), norm.apply(x), rtol=0, atol=1e-12)
    y = rng.uniform(-1.5, 1.5, 10_000)
    np.testing.assert_allclose(
        bmz.apply_scale_linear(y, post), norm.invert(y), rtol=0, atol=1e-12 * span
    )
    np.testing.assert_allclose(  # the two steps are inverses
        bmz.apply_scale_linear(bmz.apply_scale_linear(x, pre), post), x, rtol=0, atol=1e-9 * span
    )
    # the closed forms of the module docstring
    assert pre["gain"] == pytest.approx(2 / span, rel=1e-15)
    assert pre["offset"] == pytest.approx(norm.shift - 2 * norm.low / span, rel=1e-12)


def test_a_noise_model_is_refused():
    norm = Normalization(0.0, 100.0, noise=NoiseModel(gain=2.0, offset=1.0))
    with pytest.raises(ValueError, match="scale_linear cannot express it"):
        bmz.scale_linear(norm)


# ---------------------------------------------------------------------------- writing a package


@pytest.fixture(scope="module")
def standin_package(tmp_path_factory):
    """A package of the stand-in model: its path, the normalisation, the test images."""
    depth, norm = 3, Normalization(100.0, 1100.0)
    halo = bmz.default_halo(depth)
    rng = np.random.default_rng(1)
    x = rng.poisson(300, size=(48, 32)).astype(np.float32)  # 16 + 4 * 8 by 16 + 2 * 8
    path = str(tmp_path_factory.mktemp("bmz") / "standin.zip")
    pre, post = bmz.scale_linear(norm)
    rdf0 = {
        "inputs": [{"preprocessing": [{"id": "scale_linear", "kwargs": pre}]}],
        "outputs": [{"postprocessing": [{"id": "scale_linear", "kwargs": post}]}],
        "weights": {"onnx": {"source": "w"}},
    }
    model = standin_onnx()
    y = package_prediction(rdf0, {"w": model.SerializeToString()}, x[None, None])[0, 0]
    rdf = bmz.write_bmz_package(
        path,
        onnx_model=model,
        normalization=norm,
        depth=depth,
        halo=halo,
        test_input=x,
        test_output=y,
        cover_png=bmz.cover_image(x, y),
        documentation_md="# A stand-in\n\n## Validation\n\nNone.\n",
        name="a stand-in: 3x3 box filter!",
        description="A box filter standing in for the generator.",
        cite=[bmz.CITE_CLIDIM, bmz.CITE_DATA["demo"]],
        config={"clidim_jax": {"depth": depth}},
    )
    return path, rdf, norm, x, y


def test_package_files_and_description(standin_package):
    path, written, *_ = standin_package
    rdf, files = bmz.read_package(path)
    assert rdf == json.loads(json.dumps(written))  # the YAML holds exactly what was returned
    assert sorted(files) == sorted(
        [
            "weights.onnx",
            "test_input.npy",
            "test_output.npy",
            "sample_input.tif",
            "sample_output.tif",
            "cover.png",
            "README.md",
        ]
    )
    assert rdf["format_version"].startswith("0.5.") and rdf["type"] == "model"
    assert rdf["name"] == "a stand-in- 3x3 box filter"  # zoo names: letters, digits, _+-() space
    assert rdf["license"] == "Apache-2.0" and rdf["authors"] == [dict(bmz.AUTHORS[0])]
    assert rdf["cite"][1]["doi"] == "10.1038/s41467-019-13841-8"
    assert {"denoising", "fluorescence-light-microscopy", "2d", "pix2pix", "gan", "onnx"} <= set(
        rdf["tags"]
    )
    assert rdf["config"]["clidim_jax"] == {"depth": 3}
    # every file the description names is in the zip with its sha256
    import hashlib

    named = [
        rdf["documentation"],
        *rdf["covers"],
        rdf["weights"]["onnx"],
        *(t[k] for t in rdf["inputs"] + rdf["outputs"] for k in ("test_tensor", "sample_tensor")),
    ]
    assert len(named) == len(files)
    for f in named:
        assert hashlib.sha256(files[f["source"]]).hexdigest() == f["sha256"]
    assert files["cover.png"].startswith(b"\x89PNG")


def test_axes_sizes_halo_and_opset(standin_package):
    path, *_ = standin_package
    rdf, _ = bmz.read_package(path)
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    q, halo = 2**3, 4
    assert [a["type"] for a in inp["axes"]] == ["batch", "channel", "space", "space"]
    assert [a.get("id") for a in inp["axes"][2:]] == ["y", "x"]
    for a in inp["axes"][2:]:  # the halo included: 2 * halo + 2**depth, then 2**depth steps
        assert a["size"] == {"min": 2 * halo + q, "step": q}
    for a, name in zip(out["axes"][2:], ("y", "x")):
        assert a["size"] == {"tensor_id": "input", "axis_id": name}
        assert a["halo"] == halo
    assert rdf["weights"]["onnx"]["opset_version"] == 17


def test_scale_linear_numbers_are_the_normalisation(standin_package):
    path, _, norm, *_ = standin_package
    rdf, _ = bmz.read_package(path)
    (pre,) = rdf["inputs"][0]["preprocessing"]
    (post,) = rdf["outputs"][0]["postprocessing"]
    x = np.linspace(-500.0, 3000.0, 101)
    np.testing.assert_allclose(bmz.apply_scale_linear(x, pre["kwargs"]), norm.apply(x), atol=1e-12)
    y = np.linspace(-1.2, 1.2, 101)
    np.testing.assert_allclose(bmz.apply_scale_linear(y, post["kwargs"]), norm.invert(y), atol=1e-9)


def test_test_tensors_reproduce_through_the_rdf(standin_package):
    path, _, _, x, y = standin_package
    rdf, files = bmz.read_package(path)
    tin, tout = npy(files, "test_input.npy"), npy(files, "test_output.npy")
    assert tin.dtype == tout.dtype == np.float32
    assert tin.shape == tout.shape == (1, 1, 48, 32)
    np.testing.assert_array_equal(tin[0, 0], x)
    np.testing.assert_array_equal(tout[0, 0], y)
    np.testing.assert_array_equal(package_prediction(rdf, files, tin), tout)
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(files["sample_input.tif"])), x)
    tol = rdf["config"]["bioimageio"]["reproducibility_tolerance"][0]
    assert tol["absolute_tolerance"] == pytest.approx(1e-4 * max(np.ptp(y), 1000.0))


def _write(path, **overrides):
    x = np.ones((32, 32), np.float32)
    kwargs = dict(
        onnx_model=standin_onnx(),
        normalization=Normalization(0.0, 10.0),
        depth=3,
        halo=4,
        test_input=x,
        test_output=x,
        cover_png=b"",
        documentation_md="",
        name="stand-in",
        description="",
    )
    kwargs.update(overrides)
    return bmz.write_bmz_package(str(path), **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(halo=3), "2 \\* halo must be a multiple of 2\\*\\*depth"),
        (dict(test_input=np.ones((20, 32))), "20x32 is not a valid input size \\(16 \\+ k"),
        (dict(test_output=np.ones((48, 32))), "differ in shape"),
        (dict(test_input=np.full((32, 32), np.nan)), "NaN"),
        (dict(onnx_model=standin_onnx(opset=18)), "opset 18"),
        (dict(normalization=Normalization(0.0, 1.0, noise=NoiseModel(1.0, 0.0))), "noise model"),
    ],
)
def test_refusals_leave_nothing_behind(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _write(tmp_path / "out.zip", **overrides)
    assert os.listdir(tmp_path) == []


def test_an_existing_output_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "out.zip"
    out.write_bytes(b"mine")
    with pytest.raises(DataError, match="already exists"):
        _write(out)
    assert out.read_bytes() == b"mine" and os.listdir(tmp_path) == ["out.zip"]
    _write(out, overwrite=True)
    assert zipfile.is_zipfile(out) and os.listdir(tmp_path) == ["out.zip"]


# ------------------------------------------------------------------ exported from a tiny run


@pytest.fixture(scope="module")
def exported(tiny_run, tiny_exports):
    """The shared tiny demo run exported through the command line (once per session)."""
    return str(tiny_run[0]), tiny_exports["bmz"], tiny_exports["bmz_stdout"]


@pytest.mark.slow
def test_export_writes_a_package_the_onnx_path_reproduces(exported):
    from clidim_jax.run import restore_run

    workdir, out, stdout = exported
    assert "BioImage Model Zoo package" in stdout
    rdf, files = bmz.read_package(out)
    restored = restore_run(workdir)
    depth = restored.nets.generator.depth  # 4: 16-pixel units, halo 8
    assert rdf["inputs"][0]["axes"][2]["size"] == {"min": 32, "step": 16}
    assert rdf["outputs"][0]["axes"][3]["halo"] == 8 == bmz.default_halo(depth)
    assert rdf["weights"]["onnx"]["opset_version"] == 17
    assert onnx.load_from_string(files["weights.onnx"]).opset_import[0].version == 17
    pre, post = bmz.scale_linear(restored.norm)
    assert rdf["inputs"][0]["preprocessing"][0]["kwargs"] == pre
    assert rdf["outputs"][0]["postprocessing"][0]["kwargs"] == post
    assert rdf["config"]["clidim_jax"]["normalization"] == restored.norm.to_dict()
    # the test input: the demo's test split (left half, 256 x 128), whole
    from clidim_jax.data import load_datasets

    _, test = load_datasets(restored.config.data, 1, restored.config.seed)
    tin, tout = npy(files, "test_input.npy"), npy(files, "test_output.npy")
    assert tin.shape == tout.shape == (1, 1, 256, 128)
    np.testing.assert_array_equal(tin[0, 0], test.noisy_image(0).astype(np.float32))
    # the test output is clidim-jax's own denoising of it ...
    ours = restored.denoiser(tile=256, batch_size=1, tta=False)(tin[0, 0])
    ulp = np.spacing(np.abs(ours).max())
    np.testing.assert_allclose(tout[0, 0], ours, rtol=0, atol=4 * ulp)
    # ... which the rdf's pre-processing, the ONNX weights and post-processing reproduce
    err = np.abs(package_prediction(rdf, files, tin) - tout).max()
    assert err <= 1e-4 * np.ptp(tout), (err, np.ptp(tout))
    tol = rdf["config"]["bioimageio"]["reproducibility_tolerance"][0]
    assert err <= tol["absolute_tolerance"]


@pytest.mark.slow
def test_export_documents_training_and_evaluation(exported):
    workdir, out, _ = exported
    rdf, files = bmz.read_package(out)
    doc = files["README.md"].decode()
    with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
        ev = json.load(f)
    assert "## Validation" in doc and "## Training" in doc
    assert f"{ev['output']['psnr']:.2f}" in doc and f"{ev['baseline']['psnr']:.2f}" in doc
    assert "config `demo`" in doc
    assert any(c.get("doi") == bmz.CITE_DATA["demo"]["doi"] for c in rdf["cite"])
    from PIL import Image

    assert Image.open(io.BytesIO(files["cover.png"])).size == (2 * 128 + 4, 256)


@pytest.mark.slow
def test_export_errors_are_one_line_and_write_nothing(exported, tmp_path):
    workdir, _, _ = exported
    out = tmp_path / "x.zip"
    cases = [
        (["--format=onnx"], "flag --format=onnx"),
        (["--format=bmz", "--platforms=cpu"], "--platforms applies to --format clidim"),
    ]
    for args, message in cases:
        p = run_cli("export", f"--workdir={workdir}", *args, str(out), check=False)
        assert p.returncode == 2 and message in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    p = run_cli("export", f"--workdir={tmp_path / 'empty'}", "--format=bmz", str(out), check=False)
    assert p.returncode == 2 and "no checkpoint" in p.stderr, p.stderr
    out.write_bytes(b"mine")
    p = run_cli("export", f"--workdir={workdir}", "--format=bmz", str(out), check=False)
    assert p.returncode == 2 and "already exists" in p.stderr
    assert out.read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["empty", "x.zip"]


def test_export_refuses_a_run_with_a_noise_model(monkeypatch, tmp_path):
    """A run normalising with a GAT: one error (DataError, exit 2 in the CLI), nothing written."""
    import types

    import clidim_jax.run

    norm = Normalization(0.0, 100.0, noise=NoiseModel(2.0, 1.0))
    monkeypatch.setattr(clidim_jax.run, "restore_run", lambda w: types.SimpleNamespace(
        config=None, norm=norm))  # fmt: skip
    with pytest.raises(DataError, match="cannot be exported as a zoo package"):
        bmz.export_bmz(str(tmp_path), str(tmp_path / "out.zip"))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_denoise_with_the_package_needs_no_jax_and_matches_the_run(exported, tmp_path):
    """`clidim-jax denoise IN OUT --model PKG.zip` runs the ONNX weights with onnxruntime
    (JAX made unimportable in that process), tiled, and gives the run's own denoising within
    1e-4 of the intensity range."""
    import subprocess
    import sys

    import tifffile

    from clidim_jax.denoise import example_image_path

    workdir, out, _ = exported
    ours, theirs = tmp_path / "run.tif", tmp_path / "pkg.tif"
    tile = ["--tile=64", "--overlap=32", "--dtype=float32"]
    run_cli("denoise", example_image_path(), str(ours), f"--workdir={workdir}", *tile)
    no_jax = "import sys; sys.modules['jax'] = None; from clidim_jax.cli import entry; entry()"
    p = subprocess.run(
        [sys.executable, "-c", no_jax, "denoise", example_image_path(), str(theirs),
         f"--model={out}", *tile],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    a, b = tifffile.imread(ours), tifffile.imread(theirs)
    assert a.shape == b.shape and a.shape[-1] > 64  # tiled
    assert np.abs(a - b).max() <= 1e-4 * np.ptp(a), (np.abs(a - b).max(), np.ptp(a))
    # a zip that is not a package, and a package without ONNX weights: one line, exit 2
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    p = run_cli("denoise", example_image_path(), str(tmp_path / "o.tif"),
                f"--model={tmp_path / 'bad.zip'}", check=False)  # fmt: skip
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) >= 1, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "o.tif").exists()
