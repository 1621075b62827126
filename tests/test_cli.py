"""End to end through the command line: train a tiny model on the bundled data, then evaluate."""

import json
import os
import subprocess
import sys

import pytest

TINY = [
    "--config.model.depth=4",
    "--config.model.ngf=8",
    "--config.model.ndf=8",
    "--config.data.patch_size=32",
    "--config.train.batch_size=2",
    "--config.train.n_epochs=2",
    "--config.train.n_epochs_decay=1",
    "--config.train.steps_per_epoch=2",
    "--config.train.log_every=2",
]


def run_cli(*args, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, "-m", "clidim_jax", *args], capture_output=True, text=True, env=env
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    p = run_cli("train", f"--workdir={workdir}", *TINY)
    return workdir, p


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
    run_cli("evaluate", f"--workdir={workdir}")
    after = json.load(open(workdir / "eval.json"))
    assert after["output"]["psnr"] == pytest.approx(before["output"]["psnr"], abs=1e-9)


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
