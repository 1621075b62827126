"""The lock of a run directory (`--workdir`): one process writes a run at a time.

No JAX here: the command line checks the lock before it loads JAX, so a refused `evaluate` or
`export` answers at once. In a multi-process run only the first process takes the lock
(`primary`, by default process 0 of the JAX runtime when JAX is loaded, else this process).
"""

from __future__ import annotations

import os
import sys

from clidim_jax.config_lib import ConfigError

try:  # POSIX; elsewhere a workdir is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


def _primary() -> bool:
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


class WorkdirBusy(ConfigError):
    """Another process holds the workdir (`train`, or an `evaluate` writing into it)."""


class WorkdirLock:
    """An exclusive OS lock (`flock`) on `WORKDIR/.lock`, held while a process writes the run.

    The kernel drops the lock when its process exits, however it exits, so a killed run never
    leaves a stale lock behind. The file names the holder (pid and command) for the message the
    next process prints."""

    def __init__(self, workdir: str, command: str, primary: bool | None = None):
        self.workdir, self.command, self.primary = workdir, command, primary
        self._fd: int | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.workdir, ".lock")

    def acquire(self) -> WorkdirLock:
        if fcntl is None or not (_primary() if self.primary is None else self.primary):
            return self
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise _busy(self.workdir, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} clidim-jax {self.command}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (closing drops the flock; the file stays, harmless)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _busy(workdir: str, holder: str) -> WorkdirBusy:
    return WorkdirBusy(
        f"{workdir} is in use by {holder}; wait for it to finish, or use another --workdir "
        "(nothing was changed)"
    )


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        pid, _, command = text.partition(" ")
        return f"process {int(pid)} ({command})"
    except (OSError, ValueError):
        return "another process"


def check_not_busy(workdir: str, command: str, primary: bool | None = None) -> None:
    """Raises WorkdirBusy if a process holds the workdir's lock (a run being written). Writes
    nothing: a workdir without a lock file is not in use. (`command`: who asks, for symmetry
    with WorkdirLock; the message names the holder.)"""
    path = os.path.join(workdir, ".lock")
    if fcntl is None or not os.path.exists(path):
        return
    if not (_primary() if primary is None else primary):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _busy(workdir, _read_holder(fd)) from None
    finally:
        os.close(fd)  # (drops the shared lock taken to look)
