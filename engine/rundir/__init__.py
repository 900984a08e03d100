"""The run directory, its format and its readers (the contract in docs/design.md): imports nothing above it.

layout (the files' names), status (``status.json``), events (``events.jsonl``: typed events, writer, incremental
and backward readers), files (safe appends, atomic JSON, text safe for a terminal), checkpoints (the newest *whole*
one), lock (a run owns its directory), process (pid plus start time), run (a directory as a run holds it), index
(every run of this user), jobs (listing, finding and stopping runs), series (events folded into what a watcher
shows), watch (a run's snapshot for a dashboard), foreign (directories another tool wrote, read-only).
"""

from engine.rundir.events import Event, EventReader, EventWriter, read_events
from engine.rundir.status import RunStatus, now_iso, read_status, write_status

__all__ = ["Event", "EventReader", "EventWriter", "RunStatus", "now_iso", "read_events", "read_status",
           "write_status"]
