"""The huge-page malloc re-execution of the `clidim-jax` command (clidim_jax.malloc_env)."""

import os
import subprocess
import sys

import pytest

from clidim_jax import malloc_env

GLIBC = ("glibc", "2.36")


@pytest.fixture
def thp(tmp_path):
    def write(mode: str) -> str:
        path = tmp_path / "enabled"
        path.write_text(mode + "\n")
        return str(path)

    return write


def test_adds_the_tunable_and_keeps_the_rest(thp) -> None:
    path = thp("always [madvise] never")
    env = malloc_env.hugepage_environment({"A": "1"}, libc=GLIBC, thp_mode_path=path)
    assert env == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = malloc_env.hugepage_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, libc=GLIBC, thp_mode_path=path
    )
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert malloc_env.hugepages_enabled(env)
    assert not malloc_env.hugepages_enabled({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})


@pytest.mark.parametrize(
    "environ, libc, mode",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "[always] madvise never"),  # set
        ({"CLIDIM_JAX_DEFAULT_MALLOC": "1"}, GLIBC, "[always] madvise never"),  # opt-out
        ({}, ("glibc", "2.31"), "[always] madvise never"),  # no hugetlb tunable before 2.35
        ({}, ("", ""), "[always] madvise never"),  # not glibc (musl, macOS, Windows)
        ({}, GLIBC, "always madvise [never]"),  # THP disabled by the system
    ],
)
def test_nothing_to_do(thp, environ, libc, mode) -> None:
    path = thp(mode)
    assert malloc_env.hugepage_environment(environ, libc=libc, thp_mode_path=path) is None


def test_unreadable_thp_mode_means_nothing_to_do(tmp_path) -> None:
    missing = str(tmp_path / "missing")
    assert malloc_env.hugepage_environment({}, libc=GLIBC, thp_mode_path=missing) is None


def test_command_reexecutes_once_and_runs() -> None:
    # `python -m clidim_jax help` goes through the re-execution (where this machine supports
    # it) and still prints the usage; a child that re-executed sees the tunable exactly once.
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", malloc_env.OPT_OUT)}
    code = (
        "import os, sys; from clidim_jax import cli; cli.main = lambda: "
        "print(os.environ.get('GLIBC_TUNABLES', '')) or 0; sys.exit(cli.entry())"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    expected = malloc_env.hugepage_environment(env)
    want = "" if expected is None else expected["GLIBC_TUNABLES"]
    assert p.stdout.strip() == want
    p = subprocess.run(
        [sys.executable, "-m", "clidim_jax", "help"], env=env, capture_output=True, text=True
    )
    assert p.returncode == 0 and "usage: clidim-jax" in p.stdout
