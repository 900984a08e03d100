"""``events.jsonl``: the run's event stream, one JSON object a line, each with ``time`` and ``type``.

The writer keeps the file strict JSON (no NaN or infinity) and never writes through a planted link; the reader takes
only what was appended since its last read and survives torn, hostile and huge input (such lines are skipped).
"""

from __future__ import annotations

import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Any

from engine.runs.files import open_append, open_regular
from engine.runs.status import finite

EVENTS_FILE = "events.jsonl"
MAX_LINE_BYTES = 1 << 20


class Event(str, Enum):
    START = "start"
    LOG = "log"
    EVAL = "eval"
    CHECKPOINT = "checkpoint"
    MEMORY = "memory"
    PREDICT = "predict"
    DOWNLOAD = "download"  # the model from the hub, before training: file, done, total (bytes), speed, eta_s
    END = "end"
    ERROR = "error"


class EventWriter:
    """Appends events, flushed at once; non-finite numbers are written as null."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / EVENTS_FILE
        self._file = open_append(self.path)

    def emit(self, type: Event, **fields: Any) -> dict[str, Any]:
        event = finite({"time": time.time(), "type": Event(type).value, **fields})
        self._file.write(json.dumps(event, ensure_ascii=False, default=str, allow_nan=False) + "\n")
        self._file.flush()
        return event

    def close(self) -> None:
        self._file.close()


class EventReader:
    """The complete events appended since the previous ``read``.

    A last line without its newline (the writer is mid-write) waits for the next read; a line that is not a JSON
    object, holds NaN, or is longer than MAX_LINE_BYTES is skipped. A file that shrank or was replaced (a run started
    over in the same directory) sets ``restarted``.
    """

    def __init__(self, path: Path, max_line_bytes: int = MAX_LINE_BYTES):
        self.path = Path(path)
        self.max_line_bytes = max_line_bytes
        self._offset = 0
        self._partial = b""
        self._skipping = False  # inside an over-long line: drop bytes up to its newline
        self._inode: int | None = None

    def read(self, max_bytes: int = 64 << 20) -> tuple[list[dict[str, Any]], bool]:
        """The new events, and whether the file started over (the caller drops what it built from the old one)."""
        try:
            with open_regular(self.path) as file:
                stat = os.fstat(file.fileno())
                restarted = self._inode is not None and (stat.st_ino != self._inode or stat.st_size < self._offset)
                if restarted:
                    self._offset, self._partial, self._skipping = 0, b"", False
                self._inode = stat.st_ino
                file.seek(self._offset)
                data = file.read(max_bytes)
        except OSError:
            return [], False
        self._offset += len(data)
        return self._parse(data), restarted

    def _parse(self, data: bytes) -> list[dict[str, Any]]:
        events = []
        *lines, rest = (self._partial + data).split(b"\n")
        for line in lines:
            if self._skipping:
                self._skipping = False
                continue
            event = parse_event(line, self.max_line_bytes)
            if event is not None:
                events.append(event)
        if len(rest) > self.max_line_bytes:
            rest, self._skipping = b"", True
        self._partial = b"" if self._skipping else rest
        return events


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_event(line: bytes, max_bytes: int = MAX_LINE_BYTES) -> dict[str, Any] | None:
    """One event line as a dict with a text ``type``, or None when it is anything else."""
    if len(line) > max_bytes:
        return None
    try:
        event = json.loads(line.decode("utf-8"), parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    return event


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete event so far."""
    return EventReader(Path(run_dir) / EVENTS_FILE).read(max_bytes=-1)[0]
