"""The checkpoint module on small pytrees: round trip, preservation policy, integrity checks,
damaged checkpoints, incompatible shapes, and a full disk during a save (a real write failure)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clidim_jax.checkpointing import (
    CheckpointError,
    Checkpoints,
    IncompatibleCheckpoint,
    fingerprint,
    nonfinite_leaves,
)


def make_tree(seed: int, n: int = 300):
    k = jax.random.key(seed)
    return {
        "w": jax.random.normal(k, (n, 7)),
        "b": jnp.arange(5, dtype=jnp.int32) + seed,
        "h": jax.random.normal(jax.random.fold_in(k, 1), (16,)).astype(jnp.bfloat16),
        "step": jnp.int32(seed),
    }


def make_loop(seed: int):
    return {"rng": jax.random.key_data(jax.random.key(seed)), "sum": jnp.float32(seed * 0.5)}


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def same_bits(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb)
    )


def save_steps(workdir, steps, **kw):
    ck = Checkpoints(str(workdir), **kw)
    for s in steps:
        ck.save(s, make_tree(s), make_loop(s), {"config": {"seed": 0}, "step": s})
    ck.close()


def restore(workdir, **kw):
    ck = Checkpoints(str(workdir), async_save=False)
    try:
        return ck.restore_latest(
            abstract(make_tree(0)), lambda meta: abstract(make_loop(0)), say=lambda m: None, **kw
        )
    finally:
        ck.close()


def test_fingerprint_changes_with_any_single_element():
    tree = make_tree(3)
    base = fingerprint(tree)
    assert base == fingerprint(jax.tree.map(jnp.copy, tree))
    for i in (0, 1, 1000, 2099):
        w = tree["w"].reshape(-1)
        changed = dict(tree, w=w.at[i].set(jnp.nextafter(w[i], jnp.inf)).reshape(300, 7))
        fp = fingerprint(changed)
        assert fp["['w']"] != base["['w']"]
        assert {k: v for k, v in fp.items() if k != "['w']"} == {
            k: v for k, v in base.items() if k != "['w']"
        }
    assert fingerprint(dict(tree, h=tree["h"].at[3].set(0))) != base


def test_nonfinite_leaves_names_the_array():
    tree = make_tree(1)
    assert nonfinite_leaves(tree) == []
    bad = dict(tree, w=tree["w"].at[5, 2].set(jnp.inf))
    assert nonfinite_leaves(bad) == ["['w']"]


def test_round_trip_is_bit_identical_and_keeps_latest_plus_best(tmp_path):
    psnr = {1: 10.0, 2: 30.0, 3: 20.0, 4: 15.0, 5: 12.0}
    for steps in ((1, 2, 3), (4, 5)):  # the best must survive a new manager (a resumed run)
        ck = Checkpoints(str(tmp_path), keep=2, keep_best=True)
        for s in steps:
            meta = {"config": {}, "s": s}
            ck.save(s, make_tree(s), make_loop(s), meta, metrics={"val_psnr": psnr[s]})
        ck.close()
    assert Checkpoints(str(tmp_path), read_only=True).all_steps() == [2, 4, 5]  # best 2 + latest 2
    r = restore(tmp_path)
    assert r.step == 5 and r.skipped == [] and r.meta["s"] == 5
    assert same_bits(r.state, make_tree(5)) and same_bits(r.loop, make_loop(5))


def _largest_file(root):
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_file(os.path.join(step_dir, "state"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(step_dir):
    path = _largest_file(os.path.join(step_dir, "state"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = bytearray(f.read(64))
        f.seek(size // 2)
        f.write(bytes(b ^ 0x5A for b in chunk))


def _garble_meta(step_dir):
    meta_dir = os.path.join(step_dir, "meta")
    for name in os.listdir(meta_dir):
        with open(os.path.join(meta_dir, name), "w") as f:
            f.write('{"config": ')


def _delete_state(step_dir):
    path = _largest_file(os.path.join(step_dir, "state"))
    os.remove(path)


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _garble_meta, _delete_state])
def test_damaged_latest_checkpoint_is_reported_and_the_previous_used(tmp_path, damage):
    save_steps(tmp_path, [1, 2])
    damage(str(tmp_path / "checkpoints" / "2"))
    messages = []
    ck = Checkpoints(str(tmp_path), async_save=False)
    r = ck.restore_latest(
        abstract(make_tree(0)), lambda meta: abstract(make_loop(0)), say=messages.append
    )
    assert r.step == 1 and [s for s, _ in r.skipped] == [2]
    assert same_bits(r.state, make_tree(1))
    assert any("checkpoint 2" in m for m in messages), messages
    # The damaged step is kept aside, not deleted, and the resumed run can save step 2 again.
    (moved,) = os.listdir(tmp_path / "corrupt_checkpoints")
    assert moved.startswith("2-")
    assert ck.all_steps() == [1]
    ck.save(2, make_tree(2), make_loop(2), {"config": {}})
    ck.close()
    assert restore(tmp_path).step == 2


def test_no_readable_checkpoint_is_an_error_that_moves_nothing(tmp_path):
    save_steps(tmp_path, [1, 2])
    for s in (1, 2):
        _flip_bytes(str(tmp_path / "checkpoints" / str(s)))
    with pytest.raises(CheckpointError, match=r"no checkpoint .* can be restored"):
        restore(tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    assert not os.path.exists(tmp_path / "corrupt_checkpoints")


def test_other_shapes_are_refused_naming_the_array(tmp_path):
    save_steps(tmp_path, [1])
    ck = Checkpoints(str(tmp_path), async_save=False, read_only=True)
    wider = abstract(make_tree(0, n=301))
    with pytest.raises(IncompatibleCheckpoint, match=r"state/w is float32\[300, 7\] in the che"):
        ck.restore_latest(wider, lambda meta: abstract(make_loop(0)), say=lambda m: None)
    assert ck.all_steps() == [1]


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    import jax, jax.numpy as jnp
    from clidim_jax.checkpointing import CheckpointError, Checkpoints

    def tree(s):  # random values: they do not compress below the file size limit
        w = jax.random.normal(jax.random.key(s), (512, 512)).at[0, 0].set(float(s))
        return {"w": w, "step": jnp.int32(s)}

    loop = {"n": jnp.int32(0)}
    ck = Checkpoints(sys.argv[1], keep=1)
    ck.save(1, tree(1), loop, {"config": {}})
    ck.wait_until_finished()
    # From here on no file may grow past 64 KiB: the writes of the next save fail (EFBIG).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        ck.save(2, tree(2), loop, {"config": {}})
        ck.wait_until_finished()
    except CheckpointError as e:
        print("REPORTED:", e)
        sys.exit(3)
    print("the save did not fail")
    """
)


def test_full_disk_during_a_save_is_reported_and_keeps_the_previous_checkpoint(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 3, p.stdout + p.stderr
    assert "saving checkpoint 2" in p.stdout and "checkpoint 1 is intact" in p.stdout
    assert "Out of disk space or over a file-size limit" in p.stdout
    ck = Checkpoints(str(tmp_path), async_save=False)
    assert ck.all_steps() == [1]  # keep=1, yet step 1 survived the failed save of step 2
    r = ck.restore_latest(
        {
            "w": jax.ShapeDtypeStruct((512, 512), jnp.float32),
            "step": jax.ShapeDtypeStruct((), jnp.int32),
        },
        lambda meta: {"n": jax.ShapeDtypeStruct((), jnp.int32)},
        say=lambda m: None,
    )
    ck.close()
    assert r.step == 1 and float(r.state["w"][0, 0]) == 1.0
    assert json.dumps(r.meta["config"]) == "{}"


def test_stop_request_turns_sigterm_and_sigint_into_a_flag():
    import signal

    from clidim_jax.checkpointing import StopRequest

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        with StopRequest() as stop:
            assert not stop.should_stop(1, boundary=False)
            os.kill(os.getpid(), sig)
            assert stop.should_stop(2, boundary=False)
            assert stop.signal_name == signal.Signals(sig).name
            if sig == signal.SIGINT:  # a second Ctrl-C aborts at once
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), sig)
        assert signal.getsignal(sig) is previous


def test_validation_region_is_carved_from_training_columns_only():
    from conftest import tiny_config

    from clidim_jax.data.datasets import load_datasets, load_splits

    c = tiny_config()
    c.data.val_fraction = 0.25
    train, val, test = load_splits(c.data)
    assert test.name == "acsn_tirf[0:256, 0:128]"
    assert train.name == "acsn_tirf[0:256, 128:192]" and val.name == "acsn_tirf[0:256, 192:256]"
    assert train.shape == (256, 64) and val.shape == (256, 64) and len(val) == 20
    c.data.val_fraction = 0.0
    full_train, full_test = load_datasets(c.data)
    assert full_train.shape == (256, 128) and val is not None
    for i in range(20):
        np.testing.assert_array_equal(full_test.pair(i)[0], test.pair(i)[0])
        np.testing.assert_array_equal(full_train.pair(i)[0][:, 64:], val.pair(i)[0])
        np.testing.assert_array_equal(full_train.pair(i)[1][:, :64], train.pair(i)[1])
    assert train.device_data()["noisy"].shape == (20, 256, 64)  # validation never on the device
