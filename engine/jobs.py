"""Runs as jobs: launched detached (their own session, so a closed terminal or a dropped SSH never reaches them),
listed from any directory through a per-user index, stopped gracefully, resumed, their logs followed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from engine.errors import UserError
from engine.foreign import foreign_run
from engine.paths import state_dir
from engine.runs import RunStatus, new_run_id, read_events, read_status, write_status


def index_path() -> Path:
    return state_dir() / "runs.jsonl"


def register(run_dir: Path, run_id: str) -> None:
    """Add a run to the index (one line per run: id and directory), so `tuner runs` finds it from anywhere."""
    path = index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(entry["id"] == run_id for entry in _index()):
        return
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps({"id": run_id, "dir": str(Path(run_dir).resolve())}) + "\n")


def _index() -> list[dict]:
    try:
        lines = index_path().read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Job:
    """A run as `tuner runs` shows it: its status, corrected for a process that died without saying so."""

    id: str
    dir: Path
    status: RunStatus | None
    state: str
    last_log: dict | None
    foreign: bool = False  # written by another tool (HF Trainer, LLaMA-Factory): read-only

    @property
    def missing(self) -> bool:
        return self.status is None


def effective_state(status: RunStatus) -> str:
    """A queued or running run whose process is gone from this host ended without writing "end": it failed."""
    if status.state in ("running", "queued") and status.host == socket.gethostname() \
            and not process_alive(status.pid):
        return "failed"
    return status.state


def load_job(run_id: str, run_dir: Path) -> Job:
    status = read_status(run_dir)
    if status is None:
        return Job(run_id, run_dir, None, "missing", None)
    logs = [e for e in read_events(run_dir) if e["type"] == "log"]
    return Job(run_id, run_dir, status, effective_state(status), logs[-1] if logs else None)


def list_jobs() -> list[Job]:
    """Every indexed run, newest first; runs whose directories were moved or deleted show as missing."""
    jobs = [load_job(entry["id"], Path(entry["dir"])) for entry in _index()]
    return sorted(jobs, key=lambda job: job.status.started_at if job.status else "", reverse=True)


JOB_COLUMNS = ("id", "name", "state", "model", "method", "progress", "loss", "started", "elapsed")
FAILED_LOG_LINES = 3


def job_row(job: Job) -> dict[str, str]:
    """A run as one row of text, JOB_COLUMNS as keys (`tuner runs` and the TUI's runs screen)."""
    s = job.status
    if s is None:
        return dict.fromkeys(JOB_COLUMNS, "") | {"id": job.id, "state": "missing", "model": str(job.dir)}
    return {"id": job.id, "name": s.name or "", "state": job.state, "model": Path(s.model or "").name,
            "method": s.method or "", "progress": f"{s.step}/{s.total_steps}" if s.total_steps else "",
            "loss": f"{s.loss:.4f}" if s.loss is not None else "",
            "started": datetime.fromisoformat(s.started_at).astimezone().strftime("%m-%d %H:%M"),
            "elapsed": elapsed(s.started_at, s.ended_at or _last_seen(job))}


def log_tail(job: Job, lines: int = FAILED_LOG_LINES, max_bytes: int = 16 * 1024) -> list[str]:
    """The last non-empty lines of the run's train.log (what a failed run said last); [] when it has none."""
    try:
        with open(job.dir / "train.log", "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - max_bytes))
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    rows = [row.rsplit("\r", 1)[-1].rstrip() for row in text.splitlines()]
    return [row for row in rows if row.strip()][-lines:]


def elapsed(started_at: str, ended_at: str | None) -> str:
    """H:MM:SS between two ISO times (now when ``ended_at`` is None)."""
    start = datetime.fromisoformat(started_at)
    end = datetime.fromisoformat(ended_at) if ended_at else datetime.now(timezone.utc)
    seconds = int((end - start).total_seconds())
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _last_seen(job: Job) -> str | None:
    """When a run that died without an end was last heard of (its last log event), so its clock stops there."""
    if job.state in ("running", "queued") or not job.last_log or "time" not in job.last_log:
        return None
    return datetime.fromtimestamp(job.last_log["time"], timezone.utc).isoformat()


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
            logs = [e for e in events if e["type"] == "log"]
            return Job(status.id, path, status, status.state, logs[-1] if logs else None, foreign=True)
    jobs = list_jobs()
    if not jobs:
        raise UserError("no runs yet", "start one with `tuner train ... --detach`")
    if ref is None:
        return jobs[0]
    matches = [job for job in jobs if job.id == ref or (job.status and job.status.name == ref)] or \
              [job for job in jobs if job.id.startswith(ref)]
    if not matches:
        raise UserError(f"no run '{ref}'", "`tuner runs` lists them")
    if len(matches) > 1:
        raise UserError(f"'{ref}' matches {len(matches)} runs: {', '.join(j.id for j in matches[:5])}",
                        "give more of the id")
    return matches[0]


def gpus_in_use() -> list[str]:
    """The GPUs a run started now would use (after CUDA_VISIBLE_DEVICES), by UUID."""
    from engine.hardware import probe

    return [gpu.uuid or f"gpu-{gpu.physical_index}" for gpu in probe().gpus]


def gpu_holders(gpus: list[str], except_id: str) -> list[Job]:
    """Other running runs on this host that hold any of these GPUs."""
    wanted = set(gpus)
    return [job for job in list_jobs() if job.id != except_id and job.state == "running"
            and job.status.host == socket.gethostname() and wanted & set(job.status.gpus)]


def job_events(job: Job) -> list[dict]:
    """The run's events: its own events.jsonl, or what another tool's files say."""
    if job.foreign:
        return foreign_run(job.dir)[1]
    return read_events(job.dir)


def launch_detached(argv: list[str], output_dir: Path, name: str, model: str | None, method: str) -> RunStatus:
    """Start `tuner train` as its own process in its own session, output appended to the run's train.log.

    The status is written before the process starts, so the run is listed (queued) from the first moment.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    previous = read_status(output_dir)
    status = RunStatus(id=previous.id if previous else new_run_id(), name=name, state="queued",
                       output_dir=str(output_dir.resolve()), model=model, method=method)
    write_status(output_dir, status)
    register(output_dir, status.id)
    log = open(output_dir / "train.log", "a", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "train", *argv, "--output_dir", str(output_dir.resolve()),
         "--detached"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    status.pid = process.pid
    current = read_status(output_dir)
    if current and current.state == "queued":
        write_status(output_dir, status)
    return status


def launch_command(command: str, argv: list[str], log_path: Path) -> subprocess.Popen:
    """Start another `tuner` command (predict, export) in its own session, like a run: closing the terminal or the
    TUI that started it does not stop it. Its output is appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        return subprocess.Popen([sys.executable, "-m", "engine.cli", command, *argv], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_job(job: Job, wait_s: float = 0.0) -> str:
    """Ask the run's process to finish its step, save a checkpoint and stop (SIGTERM); optionally wait for it."""
    if job.foreign:
        raise UserError(f"{job.dir} was written by another tool: tuner only reads it")
    if job.state not in ("running", "queued"):
        raise UserError(f"run {job.id} is {job.state}, not running")
    os.kill(job.status.pid, signal.SIGTERM)
    deadline = time.time() + wait_s
    while time.time() < deadline and process_alive(job.status.pid):
        time.sleep(0.2)
    return effective_state(read_status(job.dir)) if not process_alive(job.status.pid) else "stopping"


def follow(path: Path, out, follow_on: bool, alive=lambda: True, poll_s: float = 0.5) -> None:
    """Print a log file; with ``follow_on``, keep printing what is appended while ``alive()``."""
    with open(path, encoding="utf-8", errors="replace") as file:
        while True:
            chunk = file.read()
            if chunk:
                out.write(chunk)
                out.flush()
            elif not follow_on or not alive():
                return
            else:
                time.sleep(poll_s)
