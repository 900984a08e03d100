"""The run directory (contract in DESIGN.md): ``status.json`` written atomically, ``events.jsonl`` appended a line at a time.

Anything that watches a run (the TUI, ``tuner runs``, a user's script) reads these files; none needs the process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "completed", "failed", "stopped")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunStatus:
    id: str
    name: str
    state: str = "running"
    pid: int | None = None
    host: str = field(default_factory=socket.gethostname)
    started_at: str = field(default_factory=now_iso)
    ended_at: str | None = None
    exit_code: int | None = None
    error: str | None = None
    output_dir: str = ""
    model: str | None = None
    method: str | None = None
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    gpus: list[str] = field(default_factory=list)  # UUIDs of the GPUs the run holds (empty on the CPU)


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_status(run_dir: Path, status: RunStatus) -> None:
    write_json_atomic(Path(run_dir) / "status.json", dataclasses.asdict(status))


def read_status(run_dir: Path) -> RunStatus | None:
    path = Path(run_dir) / "status.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    known = {f.name for f in dataclasses.fields(RunStatus)}
    return RunStatus(**{k: v for k, v in data.items() if k in known})


class EventWriter:
    """Appends one JSON object per line to ``events.jsonl``, each with ``time`` and ``type``, flushed at once."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "events.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")

    def emit(self, type: str, **fields: Any) -> dict[str, Any]:
        event = {"time": time.time(), "type": type, **fields}
        self._file.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")
        self._file.flush()
        return event

    def close(self) -> None:
        self._file.close()


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete event so far; a torn last line (the writer is mid-write) is skipped, not an error."""
    path = Path(run_dir) / "events.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events
