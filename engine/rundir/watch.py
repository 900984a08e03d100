"""Watching a run directory: ``RunWatcher.sample()`` reads what was appended since the last call and returns an
immutable ``RunSnapshot`` (status, progress, series, checkpoints, log tail, config), text made safe to show."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.rundir.events import EVENTS_FILE, EventReader
from engine.rundir.files import LogTail, printable_line, read_text
from engine.rundir.foreign import foreign_run
from engine.rundir.jobs import effective_state, elapsed_s, why_failed
from engine.rundir.events import DownloadProgress
from engine.rundir.series import Checkpoint, History, LossSeries, Progress, number
from engine.rundir.status import UNREADABLE, RunStatus, read_status
from engine.rundir.layout import CONFIG, TRAIN_LOG

LOG_LINES = 50


@dataclass(frozen=True)
class RunSnapshot:
    run_dir: str
    run_id: str
    name: str = ""
    state: str = "missing"  # effective (a dead run's process shows failed); "external": another tool's, read-only
    error: str | None = None
    pid: int | None = None
    host: str | None = None
    model: str | None = None
    method: str | None = None
    device: str | None = None
    progress: Progress = field(default_factory=Progress)
    loss: LossSeries = field(default_factory=LossSeries)
    metrics: dict[str, LossSeries] = field(default_factory=dict)  # a stage's own (DPO: rewards/margins, ...), by name
    learning_rates: tuple[float, ...] = ()
    checkpoints: tuple[Checkpoint, ...] = ()
    estimate_gib: float | None = None  # the start event's VRAM estimate per GPU, as nvidia-smi would show it
    log_tail: tuple[str, ...] = ()
    config_text: str | None = None
    download: DownloadProgress | None = None  # the model coming from the hub, before the first step

    @property
    def active(self) -> bool:
        return self.state in ("running", "queued")

    @property
    def ended(self) -> bool:
        """Over, and ours: what it trained can be chatted with, predicted with, exported (another tool's is only
        read)."""
        return self.state in ("completed", "stopped", "failed")


class RunWatcher:
    """Reads a run directory: the whole ``events.jsonl`` on the first sample, then only what was appended; many
    megabytes at once are skimmed (``EventReader``), and the series keep a few thousand points (``Thinned``), so a run
    with a million log lines opens in a second or two and holds little memory.

    Called by one thread at a time (a watcher starts the next sample only after the previous one ended).
    """

    def __init__(self, run_dir: Path, log_lines: int = LOG_LINES, clock: Callable[[], float] = time.time):
        self.run_dir = Path(run_dir)
        self._events = EventReader(self.run_dir / EVENTS_FILE, skim=True)
        self._log = LogTail(self.run_dir / TRAIN_LOG, log_lines)
        self._clock = clock
        self._history = History()
        self._series: tuple[int, LossSeries, tuple[float, ...], dict[str, LossSeries]] | None = None

    def sample(self) -> RunSnapshot:
        events, restarted = self._events.read()
        if restarted:
            self._history, self._series = History(), None
        for event in events:
            self._history.add(event)
        status = read_status(self.run_dir)
        if status is None:
            status = self._read_foreign()
        if status is None:
            return RunSnapshot(run_dir=str(self.run_dir), run_id=printable_line(self.run_dir.name),
                               error=f"no status.json in {printable_line(self.run_dir)}", log_tail=self._log.read())
        if status.state == UNREADABLE:
            return RunSnapshot(run_dir=str(self.run_dir), run_id=printable_line(status.id), state=UNREADABLE,
                               error=printable_line(status.error), log_tail=self._log.read())
        h, now = self._history, self._clock()
        state = effective_state(status)
        start = h.start or {}
        estimate = start.get("estimate") if isinstance(start.get("estimate"), dict) else {}
        loss, learning_rates, metrics = self._loss_series()
        return RunSnapshot(
            run_dir=str(self.run_dir), run_id=printable_line(status.id), name=printable_line(status.name),
            state=state, error=why_failed(status, state, h.error), pid=status.pid, host=printable_line(status.host),
            model=_text(status.model or start.get("model")), method=_text(status.method or start.get("method")),
            device=_text(_device(start)),
            progress=h.progress(status.step, status.total_steps, state in ("running", "queued"), now,
                                elapsed_s(status, state, h.last_seen, now)),
            loss=loss, learning_rates=learning_rates, metrics=metrics, checkpoints=self._checkpoints(),
            estimate_gib=number(estimate.get("total_gib"), 0.0, 1e6), log_tail=self._log.read(),
            config_text=read_text(self.run_dir / CONFIG),
            download=h.download_progress() if state in ("running", "queued") else None,
        )

    def _read_foreign(self) -> RunStatus | None:
        """A directory another tool wrote (read-only): its files are rewritten, not appended, so read them whole."""
        foreign = foreign_run(self.run_dir)
        if foreign is None:
            return None
        status, events = foreign
        self._history, self._series = History(), None
        for event in events:
            self._history.add(event)
        return status

    def _loss_series(self) -> tuple[LossSeries, tuple[float, ...], dict[str, LossSeries]]:
        """Tuples are rebuilt only when an event changed them, so an idle run costs no copying."""
        h = self._history
        if self._series is None or self._series[0] != h.version:
            self._series = (h.version, *h.series(), h.metric_series())
        return self._series[1], self._series[2], self._series[3]

    def _checkpoints(self) -> tuple[Checkpoint, ...]:
        return tuple(Checkpoint(step, printable_line(path), when, os.path.isdir(path))
                     for step, (path, when) in sorted(self._history.checkpoints.items()))


def _text(value) -> str | None:
    return printable_line(value) if isinstance(value, str) else None


def _device(start: dict) -> str | None:
    """The device a run trains on, and how many processes share the run when more than one."""
    size = start.get("world_size")
    many = isinstance(size, int) and not isinstance(size, bool) and size > 1
    device = start.get("device")
    return f"{device or 'devices'}, {size} processes" if many else device
