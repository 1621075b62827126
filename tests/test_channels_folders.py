"""Channels (C axes in training and denoising) and folders (`denoise IN_DIR OUT_DIR`)."""

import io
import json
import os

import numpy as np
import pytest
import tifffile
import zarr
from conftest import run_cli, tiny_config
from test_ome_zarr import NumpyNet, hyperstack, ngff_image

from clidim_jax import cli
from clidim_jax.data import load_datasets, read_tiff
from clidim_jax.data.normalization import Normalization
from clidim_jax.data.tiff import DataError
from clidim_jax.denoise import FolderProgress, denoise_file, denoise_folder
from clidim_jax.inference import Denoiser


def ngff_axes(names: str) -> list[dict]:
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    return [{"name": n, "type": kinds[n]} for n in names]


def model(gain=1.0, tile=64):
    return Denoiser(NumpyNet(gain), None, Normalization(100.0, 3000.0), 2, tile=tile, overlap=32)


def tczyx(tmp_path, name="hs.tif", channels=2):
    return hyperstack(
        tmp_path, name, channels=channels, yx=(30, 40), pixel=0.2, spacing=0.4, finterval=3.0,
        seed=0,
    )  # fmt: skip


# ------------------------------------------------------------------------------- denoise: channels


def test_every_channel_one_model_a_model_per_channel_or_one_channel(tmp_path):
    src, stack = tczyx(tmp_path)
    a, b = model(1.0), model(0.3)
    # one model, every channel: the hyperstack's shape, axes and metadata are kept
    denoise_file(str(src), str(tmp_path / "all.tif"), a, progress=False)
    with tifffile.TiffFile(tmp_path / "all.tif") as t:
        out, ij = t.asarray(), t.imagej_metadata
        assert t.series[0].axes == "TZCYX" and t.is_imagej
        xres = t.pages[0].tags["XResolution"].value
    assert out.shape == stack.shape
    assert ij["unit"] == "um" and ij["spacing"] == 0.4 and ij["finterval"] == 3.0
    assert ij["channels"] == 2 and ij["slices"] == 3 and ij["frames"] == 2
    assert xres[0] / xres[1] == pytest.approx(5.0)
    np.testing.assert_allclose(out[1, 2, 1], a(stack[1, 2, 1]), rtol=1e-6, atol=1e-4)
    # a model per channel: channel 1 through b
    denoise_file(str(src), str(tmp_path / "per.tif"), {0: a, 1: b}, progress=False)
    per = tifffile.imread(tmp_path / "per.tif")
    np.testing.assert_allclose(per[:, :, 0], out[:, :, 0], rtol=0, atol=0)
    np.testing.assert_allclose(per[0, 1, 1], b(stack[0, 1, 1]), rtol=1e-6, atol=1e-4)
    assert not np.allclose(per[:, :, 1], out[:, :, 1])
    # one channel: the output has no C axis, the other axes and metadata stay
    s = denoise_file(str(src), str(tmp_path / "c1.tif"), a, channel=1, progress=False)
    assert s["axes"] == "TZYX" and s["planes"] == 6
    with tifffile.TiffFile(tmp_path / "c1.tif") as t:
        c1 = t.asarray()
        assert t.series[0].axes == "TZYX" and t.imagej_metadata["spacing"] == 0.4
    np.testing.assert_array_equal(c1, out[:, :, 1])
    # and as OME-Zarr: t, z, y, x
    denoise_file(str(src), str(tmp_path / "c1.zarr"), a, channel=1, progress=False)
    root = zarr.open_group(str(tmp_path / "c1.zarr"), mode="r")
    assert [x["name"] for x in root.attrs["ome"]["multiscales"][0]["axes"]] == list("tzyx")
    np.testing.assert_array_equal(root["0"][...], c1)


def test_channel_errors_name_the_problem(tmp_path):
    src, _ = tczyx(tmp_path)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((2, 16, 16), np.uint16))
    a = model()
    cases = [
        (src, dict(model=a, channel=2), r"hs\.tif: --channel 2 is out of range: the image has 2"),
        (plain, dict(model=a, channel=1), r"plain\.tif: --channel 1, but the image has no channel"),
        (src, dict(model={0: a}), r"hs\.tif: no model for channel 1 of its 2 \(give c0=MODEL,c1"),
        (src, dict(model={0: a, 1: a, 3: a}), r"hs\.tif: a model for channel 3 .*2 channel"),
    ]
    for path, kw, msg in cases:
        with pytest.raises(DataError, match=msg):
            denoise_file(str(path), str(tmp_path / "o.tif"), kw.pop("model"), progress=False, **kw)
    assert sorted(os.listdir(tmp_path)) == ["hs.tif", "plain.tif"]
    assert cli.parse_model_spec("c0=a.clidim,c1=b.zip") == {0: "a.clidim", 1: "b.zip"}
    assert cli.parse_model_spec("runs/m.clidim") == "runs/m.clidim"
    with pytest.raises(cli.UsageError, match="not cN=FILE"):
        cli.parse_model_spec("c0=a.clidim,b.clidim")


# --------------------------------------------------------------------------------- train: channels


def test_training_data_picks_data_channel(tmp_path):
    arr = np.random.default_rng(1).integers(0, 4000, (6, 3, 40, 80)).astype(np.uint16)
    path = tmp_path / "tcyx.tif"
    tifffile.imwrite(path, arr, photometric="minisblack", metadata={"axes": "TCYX"})
    with pytest.raises(DataError, match=r"tcyx\.tif: has 3 channels .*--config\.data\.channel=N"):
        read_tiff(path)
    np.testing.assert_array_equal(read_tiff(path, channel=2), arr[:, 2])
    with pytest.raises(DataError, match=r"data\.channel=3 is out of range: the image has 3"):
        read_tiff(path, channel=3)
    c = tiny_config()
    c.data.source, c.data.path, c.data.channel = "stack", str(path), 1
    train, _ = load_datasets(c.data)
    assert len(train) == 6
    np.testing.assert_array_equal(train.pair(4)[0], arr[4, 1, :, 40:])
    np.testing.assert_allclose(train.pair(0)[1], arr[:, 1, :, 40:].mean(0), rtol=1e-6)
    # an OME-Zarr stack trains the same way
    zpath = tmp_path / "stack.zarr"
    ngff_image(zpath, arr, "0.5", ngff_axes("tcyx"), [1.0] * 4)
    c.data.path = str(zpath)
    ztrain, _ = load_datasets(c.data)
    np.testing.assert_array_equal(ztrain.pair(4)[0], train.pair(4)[0])


def test_runs_saved_before_data_channel_restore_and_resume():
    """An older run's config.json has no data.channel: it restores with the default (-1) and
    the field is never reported as changed on resume; a changed channel is refused."""
    from clidim_jax.checkpointing import IncompatibleCheckpoint
    from clidim_jax.run import check_resumable, config_fields, config_from_metadata

    c = tiny_config()
    stored = json.loads(c.to_json_best_effort())
    del stored["data"]["channel"]
    meta = {"config": stored, "metric_names": []}
    restored = config_from_metadata(meta)
    assert restored.data.channel == -1
    assert config_fields(restored) == config_fields(c)
    check_resumable(c, "old_run", meta)  # no change reported for a field the run lacks
    new = {"config": json.loads(c.to_json_best_effort()), "metric_names": []}
    c.data.channel = 1
    with pytest.raises(IncompatibleCheckpoint, match=r"config\.data\.channel is -1 in the"):
        check_resumable(c, "run", new)


# ------------------------------------------------------------------------------------------ folders


def make_folder(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "in"
    (root / "sub" / "deeper").mkdir(parents=True)
    planes = {
        "a.tif": rng.integers(0, 4000, (50, 40)).astype(np.uint16),
        "sub/b.tiff": rng.integers(0, 4000, (2, 30, 30)).astype(np.uint16),
        "sub/deeper/c.tif": rng.integers(0, 4000, (90, 70)).astype(np.uint16),
    }
    for rel, data in planes.items():
        tifffile.imwrite(root / rel, data)
    ngff_image(root / "sub" / "d.zarr", planes["a.tif"], "0.5", ngff_axes("yx"), [1.0, 1.0])
    (root / "sub" / "bad.tif").write_text("not a tiff")
    (root / "notes.txt").write_text("not an image")
    return root, planes


def test_a_folder_mirrors_skips_existing_and_reports_every_failure(tmp_path):
    root, planes = make_folder(tmp_path)
    out = tmp_path / "out"
    a = model()
    r = denoise_folder(str(root), str(out), a, progress=False)
    assert r == {"denoised": ["a.tif"], "skipped": [], "failed": []}  # not recursive
    (out / "sub").mkdir()
    (out / "sub" / "b.tiff").write_bytes(b"an earlier output")
    err = io.StringIO()
    r = denoise_folder(str(root), str(out), a, recursive=True, progress=False)
    assert r["denoised"] == ["sub/d.zarr", "sub/deeper/c.tif"]
    assert r["skipped"] == ["a.tif", "sub/b.tiff"]
    assert [rel for rel, _ in r["failed"]] == ["sub/bad.tif"]
    assert r["failed"][0][1].startswith(f"{root}/sub/bad.tif: not a readable TIFF")
    assert (out / "sub" / "b.tiff").read_bytes() == b"an earlier output"
    np.testing.assert_allclose(
        tifffile.imread(out / "sub" / "deeper" / "c.tif"), a(planes["sub/deeper/c.tif"]),
        rtol=1e-6, atol=1e-4,
    )  # fmt: skip
    z = zarr.open_group(str(out / "sub" / "d.zarr"), mode="r")["0"][...]
    np.testing.assert_allclose(z, tifffile.imread(out / "a.tif"), rtol=0, atol=0)
    # --overwrite replaces what exists; the bad file still fails, the rest is denoised
    r = denoise_folder(str(root), str(out), a, recursive=True, overwrite=True, progress=False)
    assert len(r["denoised"]) == 4 and not r["skipped"] and len(r["failed"]) == 1
    np.testing.assert_allclose(tifffile.imread(out / "sub" / "b.tiff")[1],
                               a(planes["sub/b.tiff"][1]), rtol=1e-6, atol=1e-4)  # fmt: skip
    assert not [n for _, _, fs in os.walk(out) for n in fs if n.startswith(".")]
    with pytest.raises(DataError, match="the output folder is the input folder"):
        denoise_folder(str(root), str(root) + "/", a)
    # the progress line: files done / total, skipped, failed, time left
    bar = FolderProgress("in", 3, stream=err)
    bar.update("denoised")
    bar.update("skipped")
    assert err.getvalue().splitlines() == [
        "in: 1/3 files (0 skipped, 0 failed), 0 s, about 0 s left",
        "in: 2/3 files (1 skipped, 0 failed), 0 s, about 0 s left",
    ]


def test_folder_command_exit_status_and_one_line_per_failure(tmp_path, capsys, monkeypatch):
    root, _ = make_folder(tmp_path)
    monkeypatch.setattr(cli, "_load_denoiser", lambda fv, path: model())
    args = ["denoise", str(root), str(tmp_path / "out"), "--model=m.clidim", "--recursive"]
    assert cli.main(args) == 1
    cap = capsys.readouterr()
    (failed,) = [ln for ln in cap.err.splitlines() if "failed:" in ln]
    assert failed.startswith(f"clidim-jax denoise: failed: {root}/sub/bad.tif: not a readable TIFF")
    assert "in: 5/5 files (0 skipped, 1 failed)" in cap.err
    assert "4 denoised, 0 skipped" in cap.out
    assert cli.main(args) == 1  # again: everything skipped but the bad file
    assert "0 denoised, 4 skipped" in capsys.readouterr().out
    assert cli.main(["denoise", str(root / "a.tif"), str(tmp_path / "x.tif"), "--model=m",
                     "--recursive"]) == 2  # fmt: skip
    assert "--recursive applies when INPUT is a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["denoise", str(empty), str(tmp_path / "o"), "--model=m"]) == 2
    assert "empty: no TIFF or OME-Zarr images in it" in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_denoises_a_folder_of_tiff_and_ome_zarr_with_a_trained_run(tiny_run, tmp_path):
    """Through the real `clidim-jax` command with a trained model: a folder of a multi-channel
    TIFF and an OME-Zarr image, a bad file among them; then one channel to OME-Zarr."""
    workdir, _ = tiny_run
    root = tmp_path / "in"
    root.mkdir()
    src, stack = tczyx(root, "hs.tif")
    ngff_image(root / "z.zarr", stack[0, 0], "0.4", ngff_axes("cyx"), [1.0] * 3)
    (root / "broken.tif").write_bytes(b"II*\x00garbage")
    p = run_cli("denoise", str(root), str(tmp_path / "out"), f"--workdir={workdir}", check=False)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("failed:") == 1 and "broken.tif" in p.stderr
    hs = tifffile.imread(tmp_path / "out" / "hs.tif")
    z = zarr.open_group(str(tmp_path / "out" / "z.zarr"), mode="r")["0"][...]
    assert hs.shape == stack.shape and z.shape == stack[0, 0].shape
    np.testing.assert_allclose(z, hs[0, 0], rtol=1e-5, atol=1e-3)  # same model, same planes
    out = tmp_path / "c1.ome.zarr"
    assert cli.main(["denoise", str(src), str(out), f"--workdir={workdir}", "--channel=1"]) == 0
    root_out = zarr.open_group(str(out), mode="r")
    np.testing.assert_allclose(root_out["0"][...], hs[:, :, 1], rtol=1e-5, atol=1e-3)
