"""A run's turn on its GPUs: it waits, state queued, while another run on this host holds any of them or queued for
them earlier; a host-wide lock makes looking and claiming one step, so two waiting runs never both start."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from engine.paths import state_dir
from engine.rundir.run import RunDir
from engine.rundir.status import RunStatus, write_status
from engine.runs.stop import StopRequest

log = logging.getLogger("tuner")

QUEUE_POLL_S = 10.0


def lock_path() -> Path:
    return state_dir() / "gpus.lock"


def take_turn(run: RunDir, stop: StopRequest, force: bool = False) -> None:
    """A run's turn on its GPUs before it trains: wait for it (state queued, ``wait_for_gpus``), or, forced, hold
    them at once, so later runs wait for this one."""
    from engine.rundir.jobs import gpus_in_use

    if not force and not stop.requested:
        wait_for_gpus(run, stop)
    elif not run.status.gpus:
        run.status.gpus = gpus_in_use()


def turn(force: bool):
    """``take_turn`` as a run's trainer is handed it (engine.train.runner's ``gpu_turn``)."""
    return lambda run, stop: take_turn(run, stop, force)


def wait_for_gpus(run: RunDir, stop: StopRequest, poll_s: float | None = None) -> None:
    """Wait, state queued, while another live run on this host holds one of this run's GPUs or queued for one
    earlier (first come, first served), or until stopped. Returning without a stop, the run has claimed its GPUs:
    its status.json already says "running" with ``gpus`` written, under the host's GPU lock."""
    from filelock import FileLock, Timeout

    from engine.rundir.jobs import gpus_in_use

    poll = QUEUE_POLL_S if poll_s is None else poll_s
    run.status.gpus = gpus_in_use()
    if not run.status.gpus:
        _claim(run)
        return
    lock_path().parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path())
    announced = None
    while not stop.requested:
        try:
            with lock.acquire(timeout=poll):
                ahead = blocker(run.status)
                if ahead is None:
                    _claim(run)
                    return
                if announced != ahead.id:
                    announced = ahead.id
                    _announce(ahead)
                    run.status.state = "queued"
                    write_status(run.path, run.status)
        except Timeout:
            continue
        stop.wait(poll)


def blocker(status: RunStatus) -> RunStatus | None:
    """The other live run of this host that ``status``'s run must wait for: one that holds one of its GPUs, else
    the first that queued for one before it did; None when its turn has come."""
    from engine.rundir.jobs import gpu_claims

    claims = gpu_claims(status.gpus, status.id)
    holders = [job.status for job in claims if job.state == "running"]
    if holders:
        return holders[0]
    earlier = [job.status for job in claims if _queue_place(job.status) < _queue_place(status)]
    return min(earlier, key=_queue_place, default=None)


def _queue_place(status: RunStatus) -> tuple[datetime, str]:
    """A run's place in the queue: when it was started (each start, a resume included, stamps it anew); the id
    breaks a tie, so every run orders the queue the same way."""
    return datetime.fromisoformat(status.started_at), status.id


def _claim(run: RunDir) -> None:
    run.status.state = "running"
    write_status(run.path, run.status)


def _announce(ahead: RunStatus) -> None:
    if ahead.state == "running":
        log.info("queued: run %s holds this run's GPUs; starting when it ends (--force starts at once)", ahead.id)
    else:
        log.info("queued: behind run %s, which queued first for these GPUs; starting after it (--force starts at "
                 "once)", ahead.id)
