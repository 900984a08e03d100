"""``events.jsonl``: the run's event stream, one JSON object a line, each with ``time`` and ``type``.

The writer keeps the file strict JSON (no NaN or infinity) and never writes through a planted link; the reader takes
only what was appended since its last read and survives torn, hostile and huge input (such lines are skipped).

A run that logged every step for weeks has a million log lines (~300 MB). Nobody who only needs its end reads all of
it: ``newest_events`` reads from the end backwards (``tuner runs``: the last log), and a watcher that has many
megabytes to catch up on skims them (``EventReader(skim=True)``): every event that is not a log is read, and of the
log events an even sample (LOG_SAMPLES a chunk), the chunk's last one always among them, which is what a chart of
the loss can draw anyway.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from engine.rundir.files import open_append, open_regular
from engine.rundir.status import finite
from engine.rundir.layout import EVENTS

EVENTS_FILE = EVENTS
MAX_LINE_BYTES = 1 << 20
CHUNK_BYTES = 8 << 20  # what a reader holds at once; a watcher skims a whole chunk (more is waiting)
LOG_SAMPLES = 64  # log events read of a skimmed chunk: ~3,000 points for a million steps
NEWEST_BYTES = 16 << 20  # how far back from the end newest_events looks

# How the writer (json.dumps) writes an event type other than "log": found at C speed in a chunk being skimmed.
_NOT_A_LOG = re.compile(rb'"type": "(?!log")')


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


@dataclass(frozen=True)
class DownloadProgress:
    """What a ``download`` event says: a hub model's files coming down before training (engine.models.download
    makes these; a watcher reads them back)."""

    done_bytes: int
    total_bytes: int
    speed_bytes_s: float | None  # over the last few seconds; None before any byte moved
    eta_s: float | None
    file: str


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

    def __init__(self, path: Path, max_line_bytes: int = MAX_LINE_BYTES, skim: bool = False):
        self.path = Path(path)
        self.max_line_bytes = max_line_bytes
        self.skim = skim
        self._offset = 0  # where the first line not yet read starts (a torn last line is read again next time)
        self._skipping = False  # inside an over-long line: drop bytes up to its newline
        self._inode: int | None = None

    def read(self, max_bytes: int = -1) -> tuple[list[dict[str, Any]], bool]:
        """The new events (up to ``max_bytes`` of the file; -1: all), and whether the file started over (the caller
        drops what it built from the old one). The file is read a chunk at a time into one buffer; with ``skim``, a
        whole chunk has its log events sampled."""
        events: list[dict[str, Any]] = []
        try:
            with open_regular(self.path) as file:
                stat = os.fstat(file.fileno())
                restarted = self._inode is not None and (stat.st_ino != self._inode or stat.st_size < self._offset)
                if restarted:
                    self._offset, self._skipping = 0, False
                self._inode = stat.st_ino
                whole_line = self.max_line_bytes + 1  # a read never stops short of a line that may still end
                remaining = stat.st_size - self._offset
                left = remaining if max_bytes < 0 else min(max(max_bytes, whole_line), remaining)
                buffer = bytearray(min(CHUNK_BYTES, max(left, 0)))
                while left > 0:
                    file.seek(self._offset)
                    size = file.readinto(memoryview(buffer)[:min(len(buffer), left)])
                    chunk = buffer if size == len(buffer) else bytes(buffer[:size])
                    found, used = self._parse(chunk, skim=self.skim and size == CHUNK_BYTES)
                    events += found
                    self._offset += used
                    left -= used
                    if used == 0 and size == len(buffer) < min(whole_line, left):
                        buffer = bytearray(min(whole_line, left))  # one line longer than the buffer: read it whole
                    elif used == 0 or size < len(buffer):
                        break
        except OSError:
            return events, False
        return events, restarted

    def _parse(self, data: bytes | bytearray, skim: bool) -> tuple[list[dict[str, Any]], int]:
        """The events of the complete lines in ``data``, and how many bytes of it they (or a skipped line) took."""
        start = 0
        if self._skipping:  # the rest of an over-long line, up to its newline
            end = data.find(b"\n")
            if end == -1:
                return [], len(data)
            start, self._skipping = end + 1, False
        cut = data.rfind(b"\n") + 1
        if cut <= start:  # no whole line: a line being written, or one already longer than any event may be
            if len(data) - start > self.max_line_bytes:
                self._skipping = True
                return [], len(data)
            return [], start
        lines = skimmed(data, start, cut) if skim else data[start:cut].split(b"\n")[:-1]
        return [event for line in lines if (event := parse_event(line, self.max_line_bytes)) is not None], cut


def skimmed(data: bytes | bytearray, start: int, end: int) -> Iterator[bytes]:
    """Of the complete lines in ``data[start:end]`` (which ends with a newline): those that hold an event other than
    a log, and LOG_SAMPLES lines evenly spaced through them, the last line and the last log among them; in file
    order."""
    size = end - start
    last_log = data.rfind(b'"type": "log"', start, end)  # as the writer writes it: its line is the run's latest log
    starts = {max(start, data.rfind(b"\n", start, at) + 1) for at in (end - 1, last_log) if at >= start}
    starts.update(data.find(b"\n", start + k * size // LOG_SAMPLES, end) + 1 if k else start
                  for k in range(LOG_SAMPLES))
    starts.update(max(start, data.rfind(b"\n", start, found.start()) + 1)
                  for found in _NOT_A_LOG.finditer(data, start, end))
    for line_start in sorted(starts):
        if line_start < end:
            yield bytes(data[line_start:data.find(b"\n", line_start, end)])


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
    return EventReader(Path(run_dir) / EVENTS_FILE).read()[0]


def newest_events(run_dir: Path, types: tuple[str, ...] | None = None,
                  max_bytes: int | None = NEWEST_BYTES) -> Iterator[dict[str, Any]]:
    """The run's complete events, newest first, read backwards from the end of the file: those within its last
    ``max_bytes`` (None: all of it), of ``types`` only when given (other lines the writer wrote are not parsed).
    Nothing when the file cannot be read."""
    try:
        file = open_regular(Path(run_dir) / EVENTS_FILE)
    except OSError:
        return
    with file:
        for line in lines_backward(file, max_bytes):
            if types is not None:
                written = _WRITTEN_TYPE.match(line)
                if written and written.group(1).decode() not in types:
                    continue
            event = parse_event(line)
            if event is not None and (types is None or event["type"] in types):
                yield event


# The writer's own line: {"time": ..., "type": "..."; its type is known before the rest is parsed.
_WRITTEN_TYPE = re.compile(rb'\{"time": [-+.\deE]+, "type": "([a-z_]+)"')


def lines_backward(file, max_bytes: int | None = None, chunk: int = 1 << 16) -> Iterator[bytes]:
    """The complete lines of ``file`` from the last to the first (or to the first that starts within its last
    ``max_bytes``), without their newline. A last line without its newline (a writer mid-line) is left out, and so
    is a line longer than MAX_LINE_BYTES, without holding it whole."""
    end = os.fstat(file.fileno()).st_size
    low = 0 if max_bytes is None else max(0, end - max_bytes)
    position, carry, dropping = end, b"", True  # dropping: the piece after the next newline found is not whole
    while position > low:
        size = min(chunk, position - low)
        position -= size
        file.seek(position)
        pieces = (file.read(size) + carry).split(b"\n")
        carry = pieces.pop(0)
        if pieces and dropping:
            pieces.pop()
            dropping = False
        yield from (piece for piece in reversed(pieces) if len(piece) <= MAX_LINE_BYTES)
        if len(carry) > MAX_LINE_BYTES:
            carry, dropping = b"", True
    if low == 0 and not dropping and len(carry) <= MAX_LINE_BYTES:
        yield carry
