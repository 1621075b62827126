"""`denoise` on TIFF files: stacks plane by plane, dtypes, metadata, progress, user errors."""

import io
import os

import numpy as np
import pytest
import tifffile
from test_inference import random_generator

from clidim_jax import cli
from clidim_jax.data.normalization import Normalization
from clidim_jax.data.tiff import DataError
from clidim_jax.denoise import TiffPlanes, denoise_tiff, example_image_path
from clidim_jax.inference import Denoiser


@pytest.fixture(scope="module")
def denoiser():
    g, variables = random_generator(depth=3, ngf=4, seed=5)
    return Denoiser(g, variables, Normalization(100.0, 3000.0), 2, tile=64, overlap=32)


def test_imagej_stack_keeps_shape_axes_and_pixel_size(tmp_path, denoiser):
    rng = np.random.default_rng(0)
    stack = rng.integers(100, 3000, size=(2, 3, 40, 50)).astype(np.uint16)
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(
        src,
        stack,
        imagej=True,
        resolution=(1 / 0.065, 1 / 0.065),
        metadata={"axes": "TZYX", "unit": "um", "spacing": 0.5, "finterval": 2.0},
    )
    summary = denoise_tiff(str(src), str(dst), denoiser, progress=False)
    assert summary["planes"] == 6 and summary["axes"] == "TZYX"
    with tifffile.TiffFile(dst) as t:
        out = t.asarray()
        ij = t.imagej_metadata
        xres = t.pages[0].tags["XResolution"].value
        assert t.series[0].axes == "TZYX"
    assert out.shape == stack.shape and out.dtype == np.float32 and np.all(np.isfinite(out))
    assert ij["unit"] == "um" and ij["spacing"] == 0.5 and ij["finterval"] == 2.0
    assert xres[0] / xres[1] == pytest.approx(1 / 0.065, rel=1e-6)
    # every plane is the plane denoised on its own
    np.testing.assert_allclose(out[1, 2], denoiser(stack[1, 2]), rtol=1e-6, atol=1e-3)


def test_large_plane_is_tiled_with_progress_and_input_dtype(tmp_path, denoiser, monkeypatch):
    import clidim_jax.denoise as dn

    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, size=(150, 130)).astype(np.uint8)
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, img, resolution=(2.0, 2.0), resolutionunit="CENTIMETER")
    err = io.StringIO()
    bar = dn.ProgressLine
    monkeypatch.setattr(dn, "ProgressLine", lambda name, n: bar(name, n, stream=err))
    denoise_tiff(str(src), str(dst), denoiser, dtype="input")
    n_tiles = len(denoiser.tiling.positions(152)) * len(denoiser.tiling.positions(136))
    assert f"in.tif: plane 1/1 done ({n_tiles} tiles" in err.getvalue()
    out = tifffile.imread(dst)
    assert out.shape == img.shape and out.dtype == np.uint8
    expected = np.clip(np.rint(denoiser(img)), 0, 255).astype(np.uint8)
    assert np.max(np.abs(out.astype(int) - expected.astype(int))) <= 1
    with tifffile.TiffFile(dst) as t:
        assert t.pages[0].tags["ResolutionUnit"].value == 3


def test_example_image_is_bundled():
    with TiffPlanes(example_image_path()) as src:
        assert src.shape == (1024, 1024) and src.dtype == np.uint16 and src.n_planes == 1


def run_main(capsys, *args):
    code = cli.main(["denoise", *map(str, args)])
    err = capsys.readouterr().err
    return code, err


def test_user_errors_are_one_line_and_never_overwrite(tmp_path, capsys):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.zeros((16, 16), np.uint16))
    existing = tmp_path / "existing.tif"
    existing.write_bytes(b"keep me")
    cases = [
        ((tmp_path / "missing.tif", tmp_path / "o1.tif"), "missing.tif: file not found"),
        ((good, existing), "existing.tif: already exists (pass --overwrite"),
        ((good, tmp_path / "nodir" / "o.tif"), "does not exist"),
    ]
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    cases.append(((rgb, tmp_path / "o2.tif"), "rgb.tif: a colour (RGB) image, axes YXS"))
    i32 = tmp_path / "int32.tif"
    tifffile.imwrite(i32, np.zeros((16, 16), np.int32))
    cases.append(((i32, tmp_path / "o3.tif"), "int32.tif: unsupported pixel type int32"))
    text = tmp_path / "text.tif"
    text.write_text("hello")
    cases.append(((text, tmp_path / "o4.tif"), "text.tif: not a readable TIFF"))
    for (src, dst), msg in cases:
        code, err = run_main(capsys, src, dst, "--workdir", tmp_path / "no_run")
        assert code == 2 and msg in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert existing.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["good.tif", "existing.tif", "rgb.tif", "int32.tif", "text.tif"]
    )
    # a good input with a missing model: named too
    code, err = run_main(capsys, good, tmp_path / "o5.tif", "--model", tmp_path / "m.clidim")
    assert code == 2 and "m.clidim: model file not found" in err
    code, err = run_main(capsys, good, tmp_path / "o5.tif", "--workdir", tmp_path / "no_run")
    assert code == 2 and "no checkpoint" in err
    code, err = run_main(capsys, good, tmp_path / "o5.tif")
    assert code == 2 and "exactly one of --workdir" in err
    assert not os.path.exists(tmp_path / "o5.tif")


def test_bad_float_planes_are_reported(tmp_path, denoiser):
    src = tmp_path / "nan.tif"
    img = np.ones((2, 16, 16), np.float32)
    img[1, 3, 3] = np.nan
    tifffile.imwrite(src, img)
    with pytest.raises(DataError, match=r"nan\.tif: plane 1 contains NaN"):
        denoise_tiff(str(src), str(tmp_path / "o.tif"), denoiser, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["nan.tif"]


def test_warns_when_the_input_is_far_outside_the_models_intensity_range(capsys):
    import types

    from clidim_jax.data.normalization import Normalization
    from clidim_jax.denoise import _warn_out_of_range

    model = types.SimpleNamespace(norm=Normalization(100.0, 200.0))
    _warn_out_of_range("in.tif", np.full((8, 8), 150.0), model)
    assert capsys.readouterr().err == ""
    _warn_out_of_range("in.tif", np.full((8, 8), 5000.0), model)
    err = capsys.readouterr().err
    assert "100% of the pixels of in.tif" in err and "100 to 200" in err
