"""Reading files another process is still writing: only the bytes appended since the last read, a torn last line kept
for the next read, the end of a log without reading all of it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class EventTail:
    """The complete JSON lines appended to ``events.jsonl`` since the previous ``read``.

    A last line without its newline (the writer is mid-write) waits for the next read; a complete line that is not JSON
    is skipped. A file that shrank or was replaced (a run started over in the same directory) sets ``restarted``.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self._inode: int | None = None

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """The new events, and whether the file started over (the caller drops what it built from the old one)."""
        try:
            with open(self.path, "rb") as file:
                stat = os.fstat(file.fileno())
                restarted = self._inode is not None and (stat.st_ino != self._inode or stat.st_size < self._offset)
                if restarted:
                    self._offset, self._partial = 0, b""
                self._inode = stat.st_ino
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return [], False
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events, restarted


class LogTail:
    """The last ``lines`` lines of a text log as a terminal would show them (carriage-return redraws collapsed, ANSI
    codes removed), reading at most ``max_bytes`` from its end and nothing when the file did not change."""

    def __init__(self, path: Path, lines: int = 50, max_bytes: int = 64 * 1024):
        self.path = Path(path)
        self.lines = lines
        self.max_bytes = max_bytes
        self._seen: tuple[int, int] | None = None
        self._tail: tuple[str, ...] = ()

    def read(self) -> tuple[str, ...]:
        try:
            with open(self.path, "rb") as file:
                stat = os.fstat(file.fileno())
                if self._seen == (stat.st_size, stat.st_mtime_ns):
                    return self._tail
                start = max(0, stat.st_size - self.max_bytes)
                file.seek(start)
                data = file.read(stat.st_size - start)
        except FileNotFoundError:
            return ()
        text = data.decode("utf-8", errors="replace")
        rows = text.split("\n")
        if start > 0:
            rows = rows[1:]  # the first row was cut by the seek
        if rows and rows[-1] == "":
            rows.pop()
        self._tail = tuple(_as_shown(row) for row in rows[-self.lines:])
        self._seen = (stat.st_size, stat.st_mtime_ns)
        return self._tail


def _as_shown(row: str) -> str:
    redraws = [part for part in ANSI.sub("", row).rstrip("\r").split("\r") if part]
    return redraws[-1] if redraws else ""


def read_text(path: Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
