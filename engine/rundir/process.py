"""A run's process, known by pid *and* start time: a pid alone may by now belong to anything else (it is reused),
so nothing is signalled or called alive on a pid alone."""

from __future__ import annotations

import os
import signal
import socket

from engine.errors import UserError
from engine.rundir.status import RunStatus

START_TIME_TOLERANCE_S = 1.0


def pid_start_time(pid: int) -> float | None:
    """When the process ``pid`` started (psutil), or None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError, OverflowError):
        return None


def own_identity() -> tuple[int, float | None]:
    pid = os.getpid()
    return pid, pid_start_time(pid)


def is_alive(pid, started_at, host: str | None = None) -> bool:
    """Whether the process ``pid`` that started at ``started_at`` (on ``host``, when given) is still there; a
    recorded start time of None means its process cannot be known, so it is not called alive."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or started_at is None:
        return False
    if host is not None and host != socket.gethostname():
        return False
    import psutil

    try:
        process = psutil.Process(pid)
        # A process that has ended but is not reaped yet (a zombie) has ended: a run started from the wizard is the
        # TUI's child, and stays one, unreaped, after it ends until the TUI waits for it.
        return abs(process.create_time() - started_at) <= START_TIME_TOLERANCE_S and \
            process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError, OverflowError):
        return False


def is_run_process(status: RunStatus) -> bool:
    """Whether the process that status.json names is alive and is that run's (same pid, same start time, this host)."""
    return is_alive(status.pid, status.pid_started_at, status.host)


def signal_run(status: RunStatus, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the run's own process; UserError (nothing sent) when the pid is not that process."""
    if not is_run_process(status):
        raise UserError(f"run {status.id}'s process (pid {status.pid}) is not running: nothing was signalled")
    try:
        os.kill(status.pid, sig)
    except ProcessLookupError:
        raise UserError(f"run {status.id}'s process (pid {status.pid}) has just ended") from None
