"""Files of a run directory as a careful writer and reader treat them: appends that never follow a planted symlink,
reads only of regular files (a device or FIFO planted in a file's place is unreadable, never a read that blocks or
never ends), lines longer than a limit skipped, atomic JSON, text made safe for a terminal, and the end of a log read
without reading all of it."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from engine.errors import UserError

# Escape sequences (CSI, OSC, DCS/PM/APC and two-byte ones) and every other control character but newline and tab.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?|\x9b[0-?]*[ -/]*[@-~]")
# Bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069, the marks U+200E, U+200F, U+061C) reorder what
# follows them on screen: "run-\u202eexe.txt" shows as "run-txt.exe".
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: Any) -> str:
    """``text`` with terminal escape sequences, control characters and bidirectional overrides removed: what came
    from a file or a run is shown, never obeyed (a crafted run name cannot retitle the terminal, move the cursor or
    turn the text after it around)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", str(text)))


def printable_line(text: Any) -> str:
    """One line of shown text: like ``printable`` with newlines and tabs turned into spaces."""
    return printable(str(text).replace("\n", " ").replace("\t", " "))


def open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading bytes when it is a regular file; an OSError when it is a FIFO, a device
    (``/dev/urandom``, ``/dev/zero``), a socket or a directory. A link is followed (a user's files may be links), and
    what it points at is checked; the open itself never waits for a FIFO's writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    _regular_or_closed(fd, path)
    return os.fdopen(fd, "rb")


def _regular_or_closed(fd: int, path: Path) -> None:
    """Keep ``fd`` when it is a regular file, made blocking again; else close it and raise OSError saying what it is."""
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a directory" if stat.S_ISDIR(mode) else "a socket"
            raise OSError(errno.EINVAL, f"not a regular file but {kind}", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise


def lines_of(file: IO[bytes], max_line_bytes: int, chunk: int = 1 << 16) -> Iterator[bytes]:
    """The lines of ``file`` without their newline, read a chunk at a time; a line longer than ``max_line_bytes`` is
    skipped without being held whole, and so is a last line without its newline (a writer may be mid-line)."""
    partial, skipping = b"", False
    while data := file.read(chunk):
        *lines, rest = (partial + data).split(b"\n")
        for line in lines:
            if skipping:
                skipping = False
            elif len(line) <= max_line_bytes:
                yield line
        if len(rest) > max_line_bytes:
            rest, skipping = b"", True
        partial = b"" if skipping else rest


def open_append(path: Path):
    """``path`` opened for appending text, refusing to write through a symbolic link planted in its place or into
    anything but a regular file (a FIFO planted there would block the open until something read it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                     0o644)
        _regular_or_closed(fd, path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link: tuner does not write through links in a run directory",
                            "remove the link") from None
        if exc.errno in (errno.EINVAL, errno.ENXIO, errno.EISDIR):  # ENXIO: a FIFO nothing reads
            raise UserError(f"{path} is not a regular file: tuner writes only to files it can append to",
                            "remove it") from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so a reader never sees half a file; the
    temporary file is removed when the write fails (a full disk), and a planted link is replaced, not followed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path, max_bytes: int = 1 << 20, nan: bool = False) -> Any:
    """The JSON in ``path``; ValueError when it is not JSON, too big or not UTF-8, OSError when it cannot be read or
    is not a regular file. Our files hold no NaN; ``nan=True`` reads what transformers writes (trainer_state.json
    logs an fp16 overflow's grad_norm as NaN or Infinity)."""
    with open_regular(path) as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=None if nan else _no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_user_text(path: str | Path, what: str, max_bytes: int = 64 << 20) -> str:
    """The text of a file the user named or a run directory holds (a config, dataset_info.json, a DeepSpeed config,
    a model's config.json), a leading byte-order mark dropped; one UserError line when it is missing, not a regular
    file, larger than ``max_bytes`` or not UTF-8."""
    path = Path(path)
    shown = printable_line(path)
    try:
        with open_regular(path) as file:
            data = file.read(max_bytes + 1)
    except FileNotFoundError:
        raise UserError(f"{what} {shown} does not exist") from None
    except OSError as exc:
        raise UserError(f"{what} {shown} cannot be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise UserError(f"{what} {shown} is larger than {max_bytes >> 20} MiB: it is not the file it should be")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {shown} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                        "save it as UTF-8") from None


def read_text(path: Path, max_bytes: int = 1 << 20) -> str | None:
    """A text file to show, its first ``max_bytes`` at most, made printable; None when it cannot be read."""
    try:
        with open_regular(path) as file:
            data = file.read(max_bytes)
    except OSError:
        return None
    return printable(data.decode("utf-8", errors="replace"))


class LogTail:
    """The last ``lines`` lines of a text log as a terminal would show them (carriage-return redraws collapsed, escape
    codes and control characters removed), reading at most ``max_bytes`` from its end and nothing when it did not
    change."""

    def __init__(self, path: Path, lines: int = 50, max_bytes: int = 64 * 1024):
        self.path = Path(path)
        self.lines = lines
        self.max_bytes = max_bytes
        self._seen: tuple[int, int] | None = None
        self._tail: tuple[str, ...] = ()

    def read(self) -> tuple[str, ...]:
        try:
            with open_regular(self.path) as file:
                stat = os.fstat(file.fileno())
                if self._seen == (stat.st_size, stat.st_mtime_ns):
                    return self._tail
                start = max(0, stat.st_size - self.max_bytes)
                file.seek(start)
                data = file.read(stat.st_size - start)
        except OSError:
            return ()
        rows = data.decode("utf-8", errors="replace").split("\n")
        if start > 0:
            rows = rows[1:]  # the first row was cut by the seek
        if rows and rows[-1] == "":
            rows.pop()
        self._tail = tuple(_as_shown(row) for row in rows[-self.lines:])
        self._seen = (stat.st_size, stat.st_mtime_ns)
        return self._tail


def _as_shown(row: str) -> str:
    redraws = [part for part in _ESCAPES.sub("", row).rstrip("\r").split("\r") if part]
    return printable_line(redraws[-1]) if redraws else ""


def tail_lines(path: Path, lines: int, max_bytes: int = 16 * 1024) -> list[str]:
    """The last non-empty lines of a log, as shown; [] when there is none."""
    return [row for row in LogTail(path, 10 * lines, max_bytes).read() if row.strip()][-lines:]
