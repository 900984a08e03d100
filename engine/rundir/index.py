"""The per-user index of runs (``$XDG_STATE_HOME/tuner-tui/runs.jsonl``, a line per run: id and directory), so
`tuner runs` finds every run from any directory. A line that is not an entry (torn, hostile, longer than an entry
can be) is skipped; an index that is not a regular file (a FIFO, a device) lists nothing."""

from __future__ import annotations

import json
from pathlib import Path

from engine.paths import state_dir
from engine.rundir.files import lines_of, open_append, open_regular
from engine.rundir.status import RUN_ID


MAX_ENTRY_BYTES = 64 << 10  # an id and a directory: a path is at most 4 KiB on Linux, 24 KiB as escaped JSON


def index_path() -> Path:
    return state_dir() / "runs.jsonl"


def entries() -> list[tuple[str, Path]]:
    """(id, directory) of every indexed run, oldest first, each id once."""
    found: dict[str, Path] = {}
    try:
        with open_regular(index_path()) as file:
            lines = list(lines_of(file, MAX_ENTRY_BYTES))
    except OSError:
        return []
    for line in lines:
        try:
            entry = json.loads(line.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("dir"), str) \
                and RUN_ID.fullmatch(entry["id"]) and entry["dir"] and "\x00" not in entry["dir"]:
            found.setdefault(entry["id"], Path(entry["dir"]))
    return list(found.items())


def register(run_dir: Path, run_id: str) -> None:
    """Add a run to the index (once)."""
    if any(known == run_id for known, _ in entries()):
        return
    path = index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_append(path) as file:
        file.write(json.dumps({"id": run_id, "dir": str(Path(run_dir).resolve())}) + "\n")
