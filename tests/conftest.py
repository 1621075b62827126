"""Test setup: small CPU-only JAX, deterministic, and helpers shared by the tests."""

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import ml_collections
import pytest

from clidim_jax.config_lib import base_config  # (no JAX: the settings below come first)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session, shared by the tests and every
# `clidim-jax` process they start: the same tiny programs are compiled once, not in each process
# (results are the same bits: a cached executable is the compiled one). Removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="clidim-jax-tests-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    # Only programs that take a second or more to compile (the train steps, the evaluation):
    # writing an entry costs time too, more than compiling a small program again (a tiny CLI
    # run from an empty cache: 34 s with every program written, 24 s with these two, 19 s with
    # no cache; 14 s from a warm one).
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# The tests' programs are tiny: compiling them dominates, so compile them cheaply. LLVM without
# its optimisations (a tiny train run: first step 29 -> 13 s); XLA's classic loop emitters
# instead of its MLIR fusion emitters, and one LLVM module per program instead of a split for
# parallel codegen (whose per-module overhead costs more CPU than the parallelism saves on 2
# cores shared by 3 workers): the cl_tv_ssim tiny step's compile 11.4 -> 7.4 s, its process
# 26 -> 16 s of CPU. Every comparison a test makes is between programs compiled the same way.
# The newer flags are probed once (an XLA flag this jaxlib does not know aborts the process)
# and the choice is passed to the workers and every process the tests start.
# CLIDIM_JAX_TEST_XLA_OPT=1 keeps XLA's defaults.
_BASIC = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_CHEAPER = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"


def _fast_compile_flags() -> str:
    if os.environ.get("CLIDIM_JAX_TEST_XLA_OPT"):
        return ""
    if "CLIDIM_JAX_TEST_FAST_COMPILE" not in os.environ:
        probe = subprocess.run(
            [sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1).block_until_ready()"],
            env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{_BASIC} {_CHEAPER}"),
            capture_output=True,
        )
        flags = f"{_BASIC} {_CHEAPER}" if probe.returncode == 0 else _BASIC
        os.environ["CLIDIM_JAX_TEST_FAST_COMPILE"] = flags
    return os.environ["CLIDIM_JAX_TEST_FAST_COMPILE"]


FAST_COMPILE = _fast_compile_flags()
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def tiny_config(variant: str = "cl_tv_ssim") -> ml_collections.ConfigDict:
    """A model small enough for a unit test: 4-level U-Net, ngf 8, 32x32 crops."""
    from clidim_jax.config_lib import apply_tiny, apply_variant

    c = base_config()
    c.name = "tiny"
    apply_variant(c, variant)
    return apply_tiny(c)


@pytest.fixture
def tiny():
    return tiny_config


# `tiny_config` on the command line: the bundled demo with the `tiny` config argument.
TINY_FLAGS = ["--config=demo:tiny"]


# A folder shared by every process of the session (the controller sets it before the xdist
# workers start; they inherit it), for what is worth computing once for all of them.
if "CLIDIM_JAX_TEST_SHARED" not in os.environ:
    _shared = tempfile.mkdtemp(prefix="clidim-jax-tests-shared-")
    atexit.register(shutil.rmtree, _shared, ignore_errors=True)
    os.environ["CLIDIM_JAX_TEST_SHARED"] = _shared


@pytest.fixture(scope="session")
def tiny_run():
    """One tiny demo run trained through the command line, shared by every test of the session,
    across the xdist workers: the first to need it trains it under a file lock, the others wait
    and read it. Read it, or copy it before changing it (evaluate writes into its workdir):
    (workdir, the finished `train` process)."""
    import fcntl
    import json
    import pathlib

    root = pathlib.Path(os.environ["CLIDIM_JAX_TEST_SHARED"])
    workdir, record = root / "tiny_run", root / "tiny_run.json"
    with open(root / "tiny_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            p = run_cli("train", f"--workdir={workdir}", *TINY_FLAGS)
            record.write_text(json.dumps([p.returncode, p.stdout, p.stderr]))
    code, out, err = json.loads(record.read_text())
    return workdir, subprocess.CompletedProcess(["clidim-jax", "train"], code, out, err)


@pytest.fixture(scope="session")
def tiny_exports(tiny_run):
    """The shared tiny run exported once per session through the command line, in both formats
    (shared across the xdist workers like `tiny_run`; read them, never write into them):
    {"clidim": path, "bmz": path, "bmz_stdout": what `export --format bmz` printed}."""
    import fcntl
    import json
    import pathlib

    root = pathlib.Path(os.environ["CLIDIM_JAX_TEST_SHARED"])
    record = root / "tiny_exports.json"
    with open(root / "tiny_exports.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            workdir = tiny_run[0]
            clidim, bmz = root / "tiny.clidim", root / "tiny.zip"
            run_cli("export", f"--workdir={workdir}", str(clidim))
            p = run_cli("export", f"--workdir={workdir}", "--format=bmz", str(bmz))
            record.write_text(
                json.dumps({"clidim": str(clidim), "bmz": str(bmz), "bmz_stdout": p.stdout})
            )
    return json.loads(record.read_text())


def read_until(proc, pattern: str, timeout: float = 300) -> list[str]:
    """Lines of a process's (text) stdout up to the first matching `pattern`; kills the process
    and fails if it ends or `timeout` passes first."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return seen
    proc.kill()
    raise AssertionError(f"never saw {pattern!r}:\n{''.join(seen)}")


def run_cli(*args, check=True):
    """`python -m clidim_jax ARGS` on the CPU; with `check`, a non-zero exit fails the test."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, "-m", "clidim_jax", *args], capture_output=True, text=True, env=env
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


# The files whose tests run longest go to the xdist workers first (longest processing time
# first: with `--dist loadfile` a long file started last keeps one worker busy while the others
# idle at the end). Within a file, and among the others, the order stays as collected.
_LONGEST_FIRST = ("test_sharding.py", "test_cli_errors.py", "test_resume.py", "test_datasets.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # (a stable sort)
