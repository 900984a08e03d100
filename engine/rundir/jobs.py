"""Runs as jobs: every indexed run with its state corrected for a process that died without saying so, found by id,
name or directory, shown as a row, stopped gracefully; and its elapsed time, the one every face shows."""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from engine.errors import UserError
from engine.rundir.events import Event, newest_events, read_events
from engine.rundir.files import printable, printable_line, tail_lines
from engine.rundir.foreign import foreign_run
from engine.rundir.index import entries
from engine.rundir.lock import LOCK_FILE, holds_lock
from engine.rundir.process import is_run_process, signal_run
from engine.rundir.series import event_time
from engine.rundir.status import UNREADABLE, RunStatus, read_status
from engine.rundir.layout import TRAIN_LOG


@dataclass
class Job:
    """A run as `tuner runs` shows it: its status, corrected for a process that died without saying so."""

    id: str
    dir: Path
    status: RunStatus | None
    state: str
    last_log: dict | None
    foreign: bool = False  # written by another tool (HF Trainer, LLaMA-Factory): read-only
    last_seen: float | None = None  # the time of its last event: when a run that died was last heard of

    @property
    def missing(self) -> bool:
        return self.status is None

    @property
    def readable(self) -> bool:
        return self.status is not None and self.status.state != UNREADABLE


def effective_state(status: RunStatus) -> str:
    """A queued or running run of this host whose own process is gone ended without writing "end": it failed."""
    if status.state in ("running", "queued") and status.host == socket.gethostname() and not is_run_process(status):
        return "failed"
    return status.state


def load_job(run_id: str, run_dir: Path) -> Job:
    status = read_status(run_dir)
    if status is None:
        return Job(run_id, run_dir, None, "missing", None)
    if status.state == UNREADABLE:
        return Job(run_id, run_dir, status, UNREADABLE, None)
    last_log, last_seen = None, None
    for event in newest_events(run_dir):  # from the end: a run may have logged a million steps
        last_seen = last_seen if last_seen is not None else event_time(event)
        last_log = last_log or (event if event["type"] == Event.LOG else None)
        if last_log is not None and last_seen is not None:
            break
    return Job(run_id, run_dir, status, effective_state(status), last_log, last_seen=last_seen)


def list_jobs() -> list[Job]:
    """Every indexed run, newest first; runs whose directories were moved or deleted show as missing."""
    jobs = [load_job(run_id, run_dir) for run_id, run_dir in entries()]
    return sorted(jobs, key=lambda job: job.status.started_at if job.readable else "", reverse=True)


def adapters_of(model: str) -> list[Job]:
    """The completed runs that trained a LoRA adapter on ``model`` (named as the run was given it), newest first:
    what a run may continue from (adapter_name_or_path), as LLaMA-Factory's DPO after SFT does."""
    return [job for job in list_jobs() if job.readable and job.state == "completed" and job.status.model == model
            and (job.dir / "adapter_config.json").is_file()]


def reward_method(method: str | None) -> bool:
    """Whether a run's method (its status' "rm-lora", ...: engine.runs.launch.method_label) is a reward model's."""
    return (method or "").startswith("rm-")


JOB_COLUMNS = ("id", "name", "state", "model", "method", "progress", "loss", "started", "elapsed")
FAILED_LOG_LINES = 3


def job_row(job: Job) -> dict[str, str]:
    """A run as one row of text, JOB_COLUMNS as keys (`tuner runs` and the TUI's runs screen), safe to print."""
    s = job.status
    if s is None or not job.readable:
        return dict.fromkeys(JOB_COLUMNS, "") | {"id": printable_line(job.id), "state": job.state,
                                                 "model": printable_line(job.dir)}
    row = {"id": job.id, "name": s.name or "", "state": job.state, "model": Path(s.model or "").name,
           "method": s.method or "", "progress": f"{s.step}/{s.total_steps}" if s.total_steps else "",
           "loss": f"{s.loss:.4f}" if s.loss is not None else "",
           "started": datetime.fromisoformat(s.started_at).astimezone().strftime("%m-%d %H:%M"),
           "elapsed": clock(elapsed_s(s, job.state, job.last_seen, time.time()))}
    return {key: printable_line(value) for key, value in row.items()}


def log_tail(job: Job, lines: int = FAILED_LOG_LINES) -> list[str]:
    """The last non-empty lines of the run's train.log (what a failed run said last), safe to print."""
    return tail_lines(job.dir / TRAIN_LOG, lines)


def failure_reason(job: Job) -> str | None:
    """Why a failed or unreadable run ended, in one line."""
    reason = why_failed(job.status, job.state) if job.status is not None else None
    return printable_line(reason) if reason else None


def why_failed(status: RunStatus, state: str, error_event: dict | None = None) -> str | None:
    """Why a run whose effective state is ``state`` failed (or cannot be read): its recorded error, its error event,
    or a process that is gone without a word; None when it did not fail."""
    if state == UNREADABLE:
        return status.error
    if state != "failed":
        return None
    if status.error:
        return printable(status.error)
    if error_event and error_event.get("message"):
        return printable(str(error_event["message"]))
    if status.state in ("running", "queued"):
        return (f"the run's process (pid {status.pid}) is gone without writing an end event: killed, or the "
                "machine restarted")
    return None


def elapsed_s(status: RunStatus, state: str, last_seen: float | None, now: float) -> float | None:
    """How long a run has taken: the one figure `tuner runs`, the runs screen and the dashboard show.

    Wall-clock seconds of its current session, from status.json's ``started_at`` (written when it was launched or
    resumed, so waiting for GPUs, loading the model and saving count, not only the training steps) to its
    ``ended_at``; while it is running or queued (``state``, the effective one), to ``now``; for a run that died
    without an end, to ``last_seen`` (its last event). None when that is not known.
    """
    try:
        start = datetime.fromisoformat(status.started_at).timestamp()
        end = datetime.fromisoformat(status.ended_at).timestamp() if status.ended_at else \
            now if state in ("running", "queued") else last_seen
    except (TypeError, ValueError):
        return None
    return None if end is None else max(end - start, 0.0)


def clock(seconds: float | None) -> str:
    """H:MM:SS, hours running past 24 ("" when not known)."""
    if seconds is None:
        return ""
    total = int(seconds)
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


def find_job(ref: str | None) -> Job:
    """A run by id, id prefix, name or directory; the newest when ``ref`` is None."""
    if ref and Path(ref).is_dir():
        path = Path(ref).absolute()
        status = read_status(path)
        if status:
            return load_job(status.id, path)
        other = foreign_run(path)
        if other:
            status, events = other
            logs = [e for e in events if e["type"] == Event.LOG]
            return Job(status.id, path, status, status.state, logs[-1] if logs else None, foreign=True)
    jobs = list_jobs()
    if not jobs:
        raise UserError("no runs yet", "start one with `tuner train ... --detach`")
    if ref is None:
        return jobs[0]
    matches = [job for job in jobs if job.id == ref or (job.readable and job.status.name == ref)] or \
              [job for job in jobs if job.id.startswith(ref)]
    if not matches:
        raise UserError(f"no run '{printable_line(ref)}'", "`tuner runs` lists them")
    if len(matches) > 1:
        raise UserError(f"'{printable_line(ref)}' matches {len(matches)} runs: "
                        f"{', '.join(j.id for j in matches[:5])}", "give more of the id")
    return matches[0]


def gpus_in_use() -> list[str]:
    """The GPUs a run started now would use (after CUDA_VISIBLE_DEVICES), by UUID."""
    from engine.hardware import probe

    return [gpu.uuid or f"gpu-{gpu.physical_index}" for gpu in probe().gpus]


def gpu_claims(gpus: list[str], except_id: str) -> list[Job]:
    """Other runs of this host, running or queued with their process alive, that name any of these GPUs; read
    from status.json alone (no events), so it is quick enough to look under the host's GPU lock."""
    wanted, host = set(gpus), socket.gethostname()
    claims = []
    for run_id, run_dir in entries():
        status = read_status(run_dir) if run_id != except_id else None
        if status is None or status.state == UNREADABLE or status.id == except_id or status.host != host \
                or not wanted & set(status.gpus):
            continue
        state = effective_state(status)
        if state in ("running", "queued"):
            claims.append(Job(run_id, run_dir, status, state, None))
    return claims


def job_events(job: Job) -> list[dict]:
    """All the run's events: its own events.jsonl, or what another tool's files say."""
    if job.foreign:
        return foreign_run(job.dir)[1]
    return read_events(job.dir)


def stop_job(job: Job, wait_s: float = 0.0) -> str:
    """Ask the run's own process (checked by pid and start time) to finish its step, save a checkpoint and stop."""
    if job.foreign:
        raise UserError(f"{job.dir} was written by another tool: tuner only reads it")
    if not job.readable:
        raise UserError(f"run {job.id} cannot be stopped: {failure_reason(job) or 'its status.json is missing'}")
    if job.state not in ("running", "queued"):
        raise UserError(f"run {job.id} is {job.state}, not running")
    if not holds_lock(job.status.pid, job.dir):  # pid and start time can be read off any process
        raise UserError(f"process {job.status.pid}, which run {job.id}'s status.json names, does not hold the run's "
                        f"lock ({printable_line(job.dir / LOCK_FILE)}): it is not the run's, and nothing was "
                        "signalled")
    signal_run(job.status, signal.SIGTERM)
    deadline = time.time() + wait_s
    while time.time() < deadline and is_run_process(job.status):
        time.sleep(0.2)
    if is_run_process(job.status):
        return "stopping"
    status = read_status(job.dir)
    return effective_state(status) if status else "missing"


def follow(path: Path, out, follow_on: bool, alive=lambda: True, poll_s: float = 0.5) -> None:
    """Print a log file, escape codes and control characters removed; with ``follow_on``, keep printing what is
    appended while ``alive()``."""
    import codecs

    from engine.rundir.files import open_regular, printable

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open_regular(path) as file:
        while True:
            chunk = file.read(1 << 16)
            if chunk:
                out.write(printable(decoder.decode(chunk)))
                out.flush()
            elif not follow_on or not alive():
                return
            else:
                time.sleep(poll_s)
