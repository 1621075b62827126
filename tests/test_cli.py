"""End to end through the command line: train a tiny model on the bundled data, then evaluate."""

import csv
import json
import os
import shutil

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow  # every test here trains or runs the CLI end to end


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """The session's tiny run, copied: `evaluate` below writes into its workdir."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(tiny_run[0], workdir)
    return workdir, tiny_run[1]


def test_train_writes_every_artifact(trained):
    workdir, p = trained
    assert "steps/s" in p.stdout and "left" in p.stdout and "parameters" in p.stdout
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows][:3] == [2, 4, 6]
    for name in ("g_gan", "g_l1", "g_ssim", "g_tv", "d_gan", "d_contrastive"):
        assert name in rows[0]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    ev = json.load(open(workdir / "eval.json"))
    assert ev["dataset"] == "acsn_tirf" and ev["split"] == "test" and ev["n_images"] == 20
    for part in ("input", "output", "baseline"):
        assert {"psnr", "ssim"} <= set(ev[part])
    assert ev["baseline"]["name"].startswith("gaussian")
    # noisy input PSNR of the held-out left half against the mean of all 20 frames
    assert ev["input"]["psnr"] == pytest.approx(21.98, abs=0.05)
    png = (workdir / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.isdir(workdir / "checkpoints")


def test_evaluate_reproduces_the_trained_models_metrics(trained):
    workdir, _ = trained
    before = json.load(open(workdir / "eval.json"))
    p = run_cli("evaluate", f"--workdir={workdir}", "--metrics=both")
    after = json.load(open(workdir / "eval.json"))
    assert after["output"]["psnr"] == pytest.approx(before["output"]["psnr"], abs=1e-9)
    # the reference code's metrics side by side, per image and as a Table-I style table
    assert "reference-code PSNR" in p.stdout
    for part in ("input", "output", "baseline"):
        assert {"psnr", "ssim", "nrmse"} <= set(after["reference"][part])
    rows = list(csv.DictReader(open(workdir / "eval.csv")))
    assert len(rows) == 20 and float(rows[0]["input_psnr"]) > 0
    assert {"output_ssim", "baseline_nrmse", "ref_output_psnr"} <= set(rows[0])
    mean = sum(float(r["output_psnr"]) for r in rows) / len(rows)
    assert mean == pytest.approx(after["output"]["psnr"], rel=1e-9)
    table = (workdir / "eval.md").read_text()
    assert "| noisy input |" in table and "PSNR ref." in table and "gaussian_filter" in table
    assert (workdir / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_denoise_the_example_and_export_a_model_file(trained, tiny_exports, tmp_path):
    """`denoise` on the bundled 1024x1024 Convallaria frame (tiled at the default 512), from the
    checkpoint and from the model file `clidim-jax export` wrote of the same run (once per
    session, `tiny_exports`): same shape, finite, bit-for-bit equal."""
    import numpy as np
    import tifffile

    from clidim_jax.denoise import example_image_path

    workdir, _ = trained
    example = example_image_path()
    out_ckpt, out_file = tmp_path / "from_ckpt.tif", tmp_path / "from_model.tif"
    p = run_cli("denoise", example, str(out_ckpt), f"--workdir={workdir}")
    assert "plane 1/1 done" in p.stderr
    model = tmp_path / "model.clidim"
    shutil.copyfile(tiny_exports["clidim"], model)
    run_cli("denoise", example, str(out_file), f"--model={model}")
    a, b = tifffile.imread(out_ckpt), tifffile.imread(out_file)
    assert a.shape == (1024, 1024) and a.dtype == np.float32 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    with tifffile.TiffFile(out_ckpt) as t:  # ImageJ metadata and pixel size carried over
        assert t.imagej_metadata["unit"] == "cm"
        assert "XResolution" in t.pages[0].tags
    before = model.read_bytes()
    p = run_cli("export", f"--workdir={workdir}", str(model), check=False)
    assert p.returncode == 2 and "model.clidim: already exists" in p.stderr
    assert model.read_bytes() == before


def test_user_errors_are_one_line_without_traceback(tmp_path):
    p = run_cli("train", f"--workdir={tmp_path}/w", "--config.train.batch_sise=3", check=False)
    assert p.returncode == 2 and "batch_sise" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(
        "train",
        f"--workdir={tmp_path}/w",
        "--config.data.source=stack",
        f"--config.data.path={tmp_path}/none.tif",
        check=False,
    )
    assert p.returncode == 2 and "none.tif" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "w")
    p = run_cli("evaluate", f"--workdir={tmp_path}/empty", check=False)
    assert p.returncode == 2 and "no checkpoint" in p.stderr
