"""The error paths the `clidim-jax` command promises, through the real command: a diverged run,
a checkpoint that cannot be written, a workdir in use by another process, an interrupted
`denoise`. Each prints one line (no traceback), exits with its documented status and leaves
what was saved intact."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from conftest import TINY_FLAGS, read_until, run_cli

from clidim_jax.checkpointing import Checkpoints, nonfinite_leaves
from clidim_jax.run import restore_run

pytestmark = pytest.mark.slow  # every test here trains or runs the CLI end to end


def copy_run(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir)
    return workdir


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("clidim-jax ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def assert_intact(workdir, step: int) -> None:
    restored = restore_run(str(workdir), select="latest")
    assert restored.step == step and nonfinite_leaves(restored.state) == []


def test_a_diverging_run_names_step_and_term_and_keeps_its_checkpoint(tiny_run, tmp_path):
    workdir = copy_run(tiny_run, tmp_path)  # trained to step 6, checkpoint 6
    p = run_cli(
        "train", f"--workdir={workdir}", *TINY_FLAGS, "--config.train.n_epochs=20",
        "--config.train.lr=1e6", check=False,
    )  # fmt: skip
    line = one_line(p.stderr)
    assert p.returncode == 1, p.stderr
    m = re.search(r"training diverged: non-finite loss at step (\d+): ([a-z_, ]+)\.", line)
    assert m and int(m.group(1)) > 6, line
    logged = json.loads((tiny_run[0] / "metrics.jsonl").read_text().splitlines()[0])
    assert set(m.group(2).split(", ")) <= set(logged) - {"step", "lr"}, line
    assert "the last checkpoint (step 6) is intact" in line
    assert Checkpoints(str(workdir), read_only=True).all_steps() == [6]
    assert_intact(workdir, 6)


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_last_one_stays(tiny_run, tmp_path):
    workdir = copy_run(tiny_run, tmp_path)
    # The session's compilation cache holds this run's programs (the tiny run compiled them; the
    # learning-rate policy is an input, so n_epochs=4 is the same program): reading them writes
    # nothing. A copy, so that a write that fails under the limit cannot leave a truncated entry
    # in the cache the other tests read.
    cache = tmp_path / "xla-cache"
    shutil.copytree(os.environ["JAX_COMPILATION_CACHE_DIR"], cache)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache))
    # Files over 100 kB cannot be written: the state's data files are larger (a full disk).
    # (`ulimit -f` in 1 kB blocks; Python ignores SIGXFSZ: a longer write fails with EFBIG)
    p = subprocess.run(
        ["bash", "-c", 'ulimit -f 97 && exec "$@"', "-", sys.executable, "-m", "clidim_jax",
         "train", f"--workdir={workdir}", *TINY_FLAGS, "--config.train.n_epochs=4"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    line = one_line(p.stderr)
    assert p.returncode == 1, p.stderr
    assert "checkpoint error: saving checkpoint 10" in line and "checkpoint 6 is intact" in line
    assert "over a file-size limit" in line and f"details: {workdir}/errors.log" in line
    assert "Traceback" in (workdir / "errors.log").read_text()  # Orbax's threads' reports
    assert Checkpoints(str(workdir), read_only=True).all_steps() == [6]
    assert_intact(workdir, 6)
    # Without the limit, the same command resumes from checkpoint 6 and finishes.
    run_cli("train", f"--workdir={workdir}", *TINY_FLAGS, "--config.train.n_epochs=4")
    assert Checkpoints(str(workdir), read_only=True).latest_step() == 10
    assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]  # cleaned up


def start_train(workdir, *flags):
    return subprocess.Popen(
        [sys.executable, "-m", "clidim_jax", "train", f"--workdir={workdir}", *TINY_FLAGS, *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"),
    )  # fmt: skip


def test_a_workdir_in_use_is_refused_and_the_first_run_goes_on(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    first = start_train(workdir, "--config.train.n_epochs=1000", "--config.train.log_every=1")
    try:
        read_until(first, r"^step 2/")
        # Paused (it still holds the lock), so that it does not train on the CPU the
        # refused commands need.
        first.send_signal(signal.SIGSTOP)
        for args in (
            ("train", f"--workdir={workdir}", *TINY_FLAGS),
            ("evaluate", f"--workdir={workdir}"),
            ("export", f"--workdir={workdir}", str(tmp_path / "m.clidim")),
        ):
            p = run_cli(*args, check=False)
            line = one_line(p.stderr)
            assert p.returncode == 2, p.stderr
            assert f"is in use by process {first.pid} (clidim-jax train)" in line, line
        assert not (tmp_path / "m.clidim").exists()
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=120)[0]
    finally:
        first.kill()
    assert first.returncode == 0 and "stopped by SIGTERM" in out, out
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines, once each
    # The lock died with its process: the workdir is free again.
    run_cli("evaluate", f"--workdir={workdir}")


def test_an_interrupted_denoise_removes_its_partial_output(tiny_run, tmp_path):
    stack = np.random.default_rng(0).integers(0, 4000, (40, 512, 512), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", stack)
    out = tmp_path / "out.tif"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clidim_jax", "denoise", str(tmp_path / "in.tif"), str(out),
         f"--workdir={tiny_run[0]}", "--batch_size=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not any(n.endswith(".partial") for n in os.listdir(tmp_path)):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert one_line(err).endswith("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["in.tif"]


def test_a_failed_download_is_one_line_with_exit_1(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = run_cli(
        "download", "convallaria", f"--root={tmp_path}", f"--base_url=http://127.0.0.1:{port}",
        "--noprogress", check=False,
    )  # fmt: skip
    line = one_line(p.stderr)
    assert p.returncode == 1 and line.startswith("clidim-jax download: error: cannot reach"), line
    assert "by hand" in line
