"""A run's process, known by pid *and* start time: a pid alone may by now belong to anything else (it is reused),
so nothing is signalled or called alive on a pid alone."""

from __future__ import annotations

import os
import signal
import socket

from engine.errors import UserError
from engine.runs.status import RunStatus, pid_start_time

START_TIME_TOLERANCE_S = 1.0


def is_run_process(status: RunStatus) -> bool:
    """Whether the process that status.json names is alive and is that run's (same pid, same start time, this host)."""
    pid = status.pid
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or status.host != socket.gethostname():
        return False
    started = pid_start_time(pid)
    if started is None:
        return False
    if status.pid_started_at is None:  # a status written before start times were recorded: its process is unknown
        return False
    return abs(started - status.pid_started_at) <= START_TIME_TOLERANCE_S


def signal_run(status: RunStatus, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the run's own process; UserError (nothing sent) when the pid is not that process."""
    if not is_run_process(status):
        raise UserError(f"run {status.id}'s process (pid {status.pid}) is not running: nothing was signalled")
    try:
        os.kill(status.pid, sig)
    except ProcessLookupError:
        raise UserError(f"run {status.id}'s process (pid {status.pid}) has just ended") from None
