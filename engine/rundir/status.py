"""``status.json``: where a run stands, written atomically; read back typed, or as "unreadable" for that run alone."""

from __future__ import annotations

import dataclasses
import math
import re
import socket
import types
import typing
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from engine.rundir.files import printable_line, read_json, write_json_atomic
from engine.rundir.layout import STATUS

STATES = ("queued", "running", "completed", "failed", "stopped")
UNREADABLE = "unreadable"
STATUS_FILE = STATUS


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunStatus:
    id: str
    name: str
    state: str = "running"
    pid: int | None = None
    pid_started_at: float | None = None  # the process's start time (psutil): a pid alone may be reused
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


def write_status(run_dir: Path, status: RunStatus) -> None:
    write_json_atomic(Path(run_dir) / STATUS_FILE, finite(dataclasses.asdict(status)))


def read_status(run_dir: Path) -> RunStatus | None:
    """The run's status; None when there is no status.json; state "unreadable" (and the reason in ``error``) when
    the file is there but is not a status of ours: malformed, of the wrong types, torn, too big."""
    path = Path(run_dir) / STATUS_FILE
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return unreadable(run_dir, f"{path} cannot be read: {exc.__class__.__name__}: {exc}")
    problem = _type_problem(data)
    if problem:
        return unreadable(run_dir, f"{path} is not a run status: {problem}")
    known = {f.name for f in dataclasses.fields(RunStatus)}
    status = RunStatus(**{k: v for k, v in data.items() if k in known})
    status.name = printable_line(status.name)
    return status


def unreadable(run_dir: Path, reason: str) -> RunStatus:
    name = printable_line(Path(run_dir).name)
    return RunStatus(id=name, name=name, state=UNREADABLE, host="", started_at="", error=printable_line(reason),
                     output_dir=str(run_dir))


_HINTS = typing.get_type_hints(RunStatus)


RUN_ID = re.compile(r"[\w.:+-]{1,128}")


def _type_problem(data) -> str | None:
    if not isinstance(data, dict):
        return f"a {type(data).__name__}, not an object"
    for name in ("id", "name", "state"):
        if not isinstance(data.get(name), str) or not data[name]:
            return f'"{name}" is missing or not text'
    if not RUN_ID.fullmatch(data["id"]):
        return "its id holds characters a run id never has"
    if data["state"] not in STATES:
        return f'unknown state {printable_line(data["state"])[:40]!r}'
    for f in dataclasses.fields(RunStatus):
        if f.name in data and not _fits(data[f.name], _HINTS[f.name]):
            return f'"{f.name}" is {printable_line(repr(data[f.name]))[:80]}'
    for name in ("started_at", "ended_at"):
        if (data.get(name) is not None or name == "started_at") and not _is_zoned_time(data.get(name)):
            return f'"{name}" is not a date and time with its zone'
    return None


def _is_zoned_time(value) -> bool:
    try:
        return isinstance(value, str) and datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def _fits(value, hint) -> bool:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return True
        origin = typing.get_origin(option)
        if origin is list:
            return isinstance(value, list) and all(isinstance(v, str) for v in value)
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return math.isfinite(value)
            except OverflowError:  # an integer too big for a float
                return False
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return abs(value) < 2**53
        if option is str and isinstance(value, str):
            return True
    return False


def finite(value):
    """``value`` with every non-finite float (NaN, infinity) made None, so the JSON written stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
