"""Determinism and exact resume of whole training runs (tiny model, CPU), the NaN stop, the
refusal of a workdir whose checkpoints another config made, and real faults on the `clidim-jax
train` process: SIGTERM (save, exit 0, resume exactly) and SIGKILL in the middle of a checkpoint
save (the previous checkpoint is used, and the resumed run still ends bit-identical to an
uninterrupted one). Every test compares with one uninterrupted 12-step run."""

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_until, tiny_config

from clidim_jax import cli
from clidim_jax import train as train_lib
from clidim_jax.checkpointing import Checkpoints, nonfinite_leaves
from clidim_jax.train import train

pytestmark = pytest.mark.slow  # every test here trains or runs the CLI end to end

N = 12  # steps of the reference run


def config(n_steps: int, *, every: int = 1, log_every: int = 3, seed: int = 0):
    """Constant learning rate, so a run of n steps is a prefix of any longer run; a validation
    region of 64 columns carved from the training half."""
    c = tiny_config()
    c.seed = seed
    c.train.steps_per_epoch = 1
    c.train.n_epochs = n_steps
    c.train.n_epochs_decay = 0
    c.train.log_every = log_every
    c.checkpoint.every_steps = every
    c.checkpoint.keep = 100
    c.data.val_fraction = 0.25
    return c


def same_bits(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb)
    )


def lines(workdir) -> list[str]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return f.read().splitlines()


def steps_logged(workdir) -> list[int]:
    """Steps of the training lines (validation lines, at each save, hold only val/psnr)."""
    rows = [json.loads(line) for line in lines(workdir)]
    return [r["step"] for r in rows if "val/psnr" not in r]


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


def test_same_seed_is_bit_identical_and_another_seed_is_not(uninterrupted, tmp_path):
    workdir, a = uninterrupted
    assert a.step == N and steps_logged(workdir) == [3, 6, 9, 12]
    b = train(config(N), str(tmp_path / "b"))
    assert same_bits(a.state, b.state)
    assert lines(tmp_path / "b") == lines(workdir)

    # Another seed (checkpointed once, at the end: its training is what is compared).
    c = train(config(N, every=N, seed=1), str(tmp_path / "c"))
    for x, y in zip(jax.tree.leaves(a.state.g_params), jax.tree.leaves(c.state.g_params)):
        assert not np.array_equal(x, y)
    rows_a = [r for r in map(json.loads, lines(workdir)) if "val/psnr" not in r]
    rows_c = [r for r in map(json.loads, lines(tmp_path / "c")) if "val/psnr" not in r]
    assert len(rows_a) == len(rows_c)
    for ra, rc in zip(rows_a, rows_c):
        assert ra["step"] == rc["step"] and ra != rc


def test_best_checkpoint_metric_is_validation_psnr(uninterrupted):
    workdir, _ = uninterrupted
    ck = Checkpoints(str(workdir), read_only=True)
    assert ck.all_steps() == list(range(1, N + 1))
    psnr = ck.manager.metrics(N)["val_psnr"]
    assert 10 < psnr < 60
    meta = ck.read_meta(N)
    assert meta["config"]["data"]["val_fraction"] == 0.25
    assert meta["train_region"] == "acsn_tirf[0:256, 128:192]"  # validation: columns 192:256


def test_resume_after_sigterm_is_bit_identical(uninterrupted, monkeypatch, tmp_path, capsys):
    """A SIGTERM at step 5 (inside a logging interval) saves and stops; `train` again in the same
    workdir ends with the parameters and the metrics.jsonl of the uninterrupted run."""
    workdir, a = uninterrupted

    class SigtermAtStep5(train_lib.StopRequest):
        def should_stop(self, step, *, boundary):
            if step == 5:
                signal.raise_signal(signal.SIGTERM)
                while self.signal_name is None:  # let the handler run
                    time.sleep(0.001)
            return super().should_stop(step, boundary=boundary)

    monkeypatch.setattr(train_lib, "StopRequest", SigtermAtStep5)
    stopped = train(config(N), str(tmp_path))
    assert (stopped.stopped_by, stopped.step) == ("SIGTERM", 5)
    assert steps_logged(tmp_path) == [3, 5]  # 5: the partial interval, dropped on resume
    assert Checkpoints(str(tmp_path), read_only=True).all_steps() == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    resumed = train(config(N), str(tmp_path))
    out = capsys.readouterr().out
    assert "stopped by SIGTERM at step 5/12: checkpoint 5 saved" in out
    assert "resumed from checkpoint 5 (dropped 1 metrics.jsonl lines" in out
    assert same_bits(resumed.state, a.state)
    assert lines(tmp_path) == lines(workdir)


def test_nan_stops_training_naming_step_and_term(monkeypatch, tmp_path):
    real = train_lib.make_sampled_train_step

    def poisoned(config, nets, spe, norm, mesh=None, **kwargs):
        step_fn = real(config, nets, spe, norm, mesh=mesh, **kwargs)

        def step(state, data, key):  # at step 5: g_l1 is NaN and G's parameters turn NaN
            new, m = step_fn(state, data, key)
            hit = new.step == 5
            m = dict(m, g_l1=jnp.where(hit, jnp.nan, m["g_l1"]))
            g = jax.tree.map(lambda x: jnp.where(hit, jnp.nan, x), new.g_params)
            return new.replace(g_params=g), m

        return step

    monkeypatch.setattr(train_lib, "make_sampled_train_step", poisoned)
    # (a compiled loop step cached by an earlier test would bypass the poisoned factory)
    monkeypatch.setattr(train_lib, "_compiled_steps", collections.OrderedDict())
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 5: g_l1\. "):
        train(config(N, every=2), str(tmp_path))
    ck = Checkpoints(str(tmp_path), read_only=True)
    assert ck.all_steps() == [2, 4]  # nothing saved from the diverged state
    abstract = jax.eval_shape(
        lambda: train_lib.init_state(train_lib.build_networks(config(N)), jax.random.key(0))
    )
    state, _, _ = ck.restore_step(4, abstract)
    assert nonfinite_leaves(state) == []


def _snapshot(root) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_incompatible_config_is_refused_and_the_workdir_untouched(uninterrupted, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps(json.loads(config(N).to_json_best_effort())))
    cfg_py = tmp_path / "cfg.py"
    cfg_py.write_text(
        "import json\nfrom clidim_jax.run import config_from_metadata\n"
        "def get_config():\n"
        f"    return config_from_metadata({{'config': json.load(open({str(cfg_json)!r}))}})\n"
    )
    before = _snapshot(workdir)
    for flag, named in (
        ("--config.model.ngf=16", "config.model.ngf is 8 in the checkpoint, 16 now"),
        ("--config.seed=3", "config.seed is 0 in the checkpoint, 3 now"),
    ):
        rc = cli.main(["train", f"--workdir={workdir}", f"--config={cfg_py}", flag])
        err = capsys.readouterr().err
        assert rc == 2 and named in err and "Traceback" not in err, err
        assert _snapshot(workdir) == before


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
    # The same lines, but for the uninterrupted run's validations at steps 1-3 (saved every step;
    # this run saved first at 4).
    early_val = [ln for ln in lines(a_dir) if json.loads(ln)["step"] < 4 and "val/psnr" in ln]
    assert len(early_val) == 3
    assert lines(workdir) == [ln for ln in lines(a_dir) if ln not in early_val]
