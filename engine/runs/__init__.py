"""The run directory (the contract in docs/design.md), owned here and nowhere else.

status (``status.json``), events (``events.jsonl``: typed events, writer, incremental reader), series (events folded
into what a watcher shows), watch (a run's snapshot), checkpoints (the newest *whole* one), lock (a run owns its
directory), process (pid plus start time), stop (graceful stops), index (every run of this user), jobs (listing,
finding, stopping), launch (the one way to start a run) and worker (the run's own process), tasks (predict and
export started like a run), files (safe appends, atomic JSON, text safe for a terminal), foreign (directories
another tool wrote, read-only).
"""

from engine.runs.events import Event, EventReader, EventWriter, read_events
from engine.runs.status import RunStatus, now_iso, read_status, write_status

__all__ = ["Event", "EventReader", "EventWriter", "RunStatus", "now_iso", "read_events", "read_status",
           "write_status"]
