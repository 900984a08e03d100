"""A run owns its directory: an exclusive lock on ``.tuner.lock`` held for the run's life.

The kernel drops the lock when the holding process ends however it ends (kill -9 included), so a stale lock never
blocks a directory. A launcher takes it and hands the open file to the run's process, which keeps it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from engine.errors import UserError
from engine.rundir.layout import LOCK

LOCK_FILE = LOCK
LOCK_FD_ENV = "TUNER_RUN_LOCK_FD"
# A killed run's process is gone (a zombie, or reaped) a moment before the kernel releases its lock, and the workers it
# forked (data loaders) may take seconds more to notice: so long, at most, is a lock whose run has ended waited for.
RELEASE_WAIT_S = 10.0


class RunLock:
    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """The directory's lock, or UserError naming the run that holds it."""
        path = Path(run_dir) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"cannot lock {path}: {exc.strerror}",
                            "remove it if it is a link; tuner creates it itself") from None
        deadline = time.monotonic() + RELEASE_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return cls(fd, path)
            except BlockingIOError:
                if _holder_alive(run_dir):
                    os.close(fd)
                    raise UserError(f"{run_dir} is in use by a run that is still alive ({_holder(run_dir)})",
                                    "choose another output_dir, or `tuner stop` that run first") from None
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise UserError(f"{run_dir} is still locked though its run has ended ({_holder(run_dir)}): a "
                                    "process it started is still ending", "try again in a moment") from None
                time.sleep(0.05)

    @classmethod
    def inherited(cls, run_dir: Path) -> RunLock | None:
        """The lock a launcher passed down to this process (its fd in TUNER_RUN_LOCK_FD), if any."""
        fd = os.environ.pop(LOCK_FD_ENV, None)
        if fd is None or not fd.isdigit():
            return None
        os.set_inheritable(int(fd), False)
        return cls(int(fd), Path(run_dir) / LOCK_FILE)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_alive(run_dir: Path) -> bool:
    """Whether the process status.json names is alive; a lock held with none named (a launcher at work) counts as
    alive."""
    from engine.rundir.process import is_run_process
    from engine.rundir.status import read_status

    status = read_status(run_dir)
    return status is None or not status.pid or is_run_process(status)


def _holder(run_dir: Path) -> str:
    from engine.rundir.status import read_status

    status = read_status(run_dir)
    return f"run {status.id}, pid {status.pid}" if status and status.pid else "another tuner process"


def holds_lock(pid: int, run_dir: Path) -> bool:
    """Whether the process ``pid`` has this run directory's lock file open, as the run's own process does for its
    life (a crafted status.json may name any process, with its true start time). Where /proc cannot tell (another
    system), True: the pid and start time checked before are all there is."""
    if not os.path.isdir("/proc/self/fd"):
        return True
    try:
        lock = os.lstat(Path(run_dir) / LOCK_FILE)
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in descriptors:
        try:
            opened = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (opened.st_dev, opened.st_ino) == (lock.st_dev, lock.st_ino):
            return True
    return False
