"""The portable model file: jax.export of eval-mode G, its weights, normalisation and metadata."""

import json
import os
import zipfile

import numpy as np
import pytest
from test_inference import random_generator

from clidim_jax.data.normalization import Normalization
from clidim_jax.data.tiff import DataError
from clidim_jax.export import (
    denoiser_from_model,
    export_generator,
    load_model,
    save_model,
)
from clidim_jax.inference import Denoiser


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    g, variables = random_generator(depth=3, ngf=4, seed=3)
    norm = Normalization(50.0, 1500.0)
    path = str(tmp_path_factory.mktemp("export") / "model.clidim")
    exported = export_generator(g, variables)
    meta = {"depth": 3, "tile": 64, "tile_overlap": 32, "batch_size": 2}
    save_model(path, exported, variables, norm, meta)
    return path, g, variables, norm


def test_file_is_a_plain_zip_with_metadata(model_file):
    path, *_ = model_file
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read("clidim_model.json"))
        n = len(meta["size_classes"])
        assert sorted(z.namelist()) == sorted(
            ["clidim_model.json", "variables.npz"] + [f"generator_{k}.jaxexport" for k in range(n)]
        )
    assert meta["format"] == "clidim-jax-model" and meta["depth"] == 3
    # depth 3: the transposed convolutions switch formulation at h*w = 16, 64, 256 (8x8 units)
    assert meta["size_classes"] == [[1, 16], [17, 64], [65, 256], [257, None]]
    assert meta["normalization"] == {"low": 50.0, "high": 1500.0, "mode": "percentile"}


def test_model_file_reproduces_the_module_bit_for_bit(model_file):
    path, g, variables, norm = model_file
    rng = np.random.default_rng(0)
    from_module = Denoiser(g, variables, norm, 2, tile=64, overlap=32)
    from_file = denoiser_from_model(path)
    assert from_file.tiling == from_module.tiling and from_file.batch_size == 2
    large = rng.uniform(0, 2000, size=(150, 90)).astype(np.float32)  # tiled (tile 64)
    np.testing.assert_array_equal(from_file(large), from_module(large))
    # whole images of every size class (h*w = 1, 35, 228, 550 in 8x8 units)
    from_module = Denoiser(g, variables, norm, 2, tile=256)
    from_file = denoiser_from_model(path, tile=256)
    for shape in ((2, 8, 8), (2, 37, 50), (1, 150, 90), (1, 200, 170)):
        imgs = rng.uniform(0, 2000, size=shape).astype(np.float32)
        np.testing.assert_array_equal(from_file(imgs), from_module(imgs))


def test_load_errors_name_the_file(tmp_path, model_file):
    with pytest.raises(DataError, match=r"missing\.clidim: model file not found"):
        load_model(str(tmp_path / "missing.clidim"))
    bad = tmp_path / "bad.clidim"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"bad\.clidim: not a clidim-jax model file"):
        load_model(str(bad))
    path, _, variables, norm = model_file
    before = os.path.getmtime(path)
    with pytest.raises(DataError, match="already exists"):
        save_model(path, None, variables, norm, {})
    assert os.path.getmtime(path) == before


def test_denoise_command_with_a_model_file(tmp_path, model_file, capsys):
    import tifffile

    from clidim_jax import cli

    path, g, variables, norm = model_file
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    img = np.random.default_rng(4).integers(0, 2000, size=(70, 90)).astype(np.uint16)
    tifffile.imwrite(src, img)
    args = ["denoise", str(src), str(dst), f"--model={path}"]
    assert cli.main([*args, "--tile=4"]) == 2
    assert "tile size 4 is smaller than the U-Net's size unit 8" in capsys.readouterr().err
    assert cli.main([*args, "--noprogress"]) == 0
    expected = Denoiser(g, variables, norm, 2, tile=64, overlap=32)(img)
    np.testing.assert_array_equal(tifffile.imread(dst), expected)
