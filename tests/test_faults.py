"""Real faults on the `clidim-jax train` process: SIGTERM (save, exit 0, resume exactly) and
SIGKILL in the middle of a checkpoint save (the previous checkpoint is used, and the resumed
run still ends bit-identical to an uninterrupted one)."""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import read_until, tiny_config

from clidim_jax.checkpointing import Checkpoints
from clidim_jax.train import train

pytestmark = pytest.mark.slow  # every test here trains or runs the CLI end to end

N = 12


def config(n_steps: int, *, every: int = 1, log_every: int = 3):
    c = tiny_config()
    c.train.steps_per_epoch = 1
    c.train.n_epochs = n_steps  # constant learning rate: any run is a prefix of a longer one
    c.train.n_epochs_decay = 0
    c.train.log_every = log_every
    c.checkpoint.every_steps = every
    c.checkpoint.keep = 100
    return c


def same_bits(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb)
    )


def start_cli(tmp_path, cfg, workdir, hold_save=None):
    """`python -m clidim_jax train` on exactly `cfg` (through a config file that loads its JSON);
    with `hold_save` ("STEP:SECONDS"), through tests/held_save_cli.py."""
    cfg_json = tmp_path / "cfg.json"
    cfg_json.write_text(cfg.to_json_best_effort())
    cfg_py = tmp_path / "cfg.py"
    cfg_py.write_text(
        "import json\nfrom clidim_jax.run import config_from_metadata\n"
        "def get_config():\n"
        f"    return config_from_metadata({{'config': json.load(open({str(cfg_json)!r}))}})\n"
    )
    program = ["-m", "clidim_jax"]
    if hold_save:
        program = [os.path.join(os.path.dirname(__file__), "held_save_cli.py"), hold_save]
    return subprocess.Popen(
        [sys.executable, *program, "train", f"--workdir={workdir}", f"--config={cfg_py}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"),
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train(config(N), str(workdir))


def test_sigterm_saves_exits_zero_and_resumes_exactly(uninterrupted, tmp_path):
    _, a = uninterrupted
    workdir = tmp_path / "run"
    # A long run, checkpointing only at the end or on a signal; SIGTERM once step 2 is logged.
    proc = start_cli(tmp_path, config(1000, every=0, log_every=1), workdir)
    read_until(proc, r"^step 2/1000 ")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    m = re.search(r"stopped by SIGTERM at step (\d+)/1000: checkpoint \1 saved", out)
    assert m, out
    stopped = int(m.group(1))
    assert 2 <= stopped < N and "Traceback" not in out
    assert Checkpoints(str(workdir), read_only=True).all_steps() == [stopped]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, stopped + 1))
    assert not (workdir / "eval.json").exists()  # stopped: no evaluation
    # `train` again (now the 12-step config) continues from the signal's checkpoint.
    resumed = train(config(N, log_every=1), str(workdir))
    assert same_bits(resumed.state, a.state)


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(uninterrupted, tmp_path, capsys):
    a_dir, a = uninterrupted
    workdir = tmp_path / "run"
    # Checkpoints at 4, 8, 12; the save of step 8 is held open (data written, not committed)
    # and the process is killed then.
    proc = start_cli(tmp_path, config(N, every=4), workdir, hold_save="8:300")
    read_until(proc, r"holding the save of step 8 open")
    names = os.listdir(workdir / "checkpoints")
    assert any(n.startswith("8.") and "tmp" in n for n in names), names
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert "8" not in os.listdir(workdir / "checkpoints")

    resumed = train(config(N), str(workdir))
    out = capsys.readouterr().out
    assert "resumed from checkpoint 4" in out
    assert same_bits(resumed.state, a.state)
    assert open(workdir / "metrics.jsonl").read() == open(a_dir / "metrics.jsonl").read()
