"""What the dashboard shows, as immutable snapshots built off the UI thread: a run's directory read incrementally
(``RunSampler``) and the GPUs through an injectable probe (``GpuSampler``), each keeping the history it needs.

A sampler is called by one thread at a time (the screen starts the next sample only after the previous ended).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.foreign import foreign_run
from engine.hardware import HardwareState
from engine.jobs import effective_state
from engine.runs import RunStatus, read_status
from tuner_tui.dashboard.tail import EventTail, LogTail, read_text

LOG_LINES = 50
GPU_HISTORY = 60


@dataclass(frozen=True)
class LossSeries:
    """Training loss per logged step (a resumed run's repeated steps replace the old ones), its EMA, eval losses."""

    steps: tuple[int, ...] = ()
    losses: tuple[float, ...] = ()
    smoothed: tuple[float, ...] = ()
    eval_steps: tuple[int, ...] = ()
    eval_losses: tuple[float, ...] = ()


@dataclass(frozen=True)
class Progress:
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float | None = None
    remaining_s: float | None = None  # None: not known yet, or the run is over


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str
    time: float | None
    exists: bool  # False once save_total_limit (or a person) removed it


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
    learning_rates: tuple[float, ...] = ()
    checkpoints: tuple[Checkpoint, ...] = ()
    estimate_gib: float | None = None  # the start event's VRAM estimate per GPU, as nvidia-smi would show it
    log_tail: tuple[str, ...] = ()
    config_text: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ("running", "queued")

    @property
    def ended(self) -> bool:
        """Over, and ours: what it trained can be chatted with, predicted with, exported (another tool's is only
        read)."""
        return self.state in ("completed", "stopped", "failed")


def ema(values: tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """LLaMA-Factory's smoothing: an EMA whose weight grows with the number of points, so short runs stay readable."""
    if not values:
        return ()
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for value in values:
        if math.isfinite(value):
            last = last * weight + (1 - weight) * value if math.isfinite(last) else value
        out.append(last)
    return tuple(out)


class _History:
    """Everything folded from the events so far; ``version`` changes whenever a series does."""

    def __init__(self):
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.learning_rates: list[float] = []
        self.eval_steps: list[int] = []
        self.eval_losses: list[float] = []
        self.checkpoints: dict[int, tuple[str, float | None]] = {}
        self.start: dict[str, Any] | None = None
        self.last_log: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.version = 0

    def add(self, event: dict[str, Any]) -> None:
        kind, step = event.get("type"), event.get("step")
        if kind == "start":
            self.start, self.end, self.error = event, None, None  # a resumed run starts again in the same file
        elif kind == "log" and isinstance(step, int) and isinstance(event.get("loss"), (int, float)):
            while self.steps and self.steps[-1] >= step:
                self.steps.pop(), self.losses.pop(), self.learning_rates.pop()
            self.steps.append(step)
            self.losses.append(float(event["loss"]))
            self.learning_rates.append(float(event.get("learning_rate") or 0.0))
            self.last_log = event
            self.version += 1
        elif kind == "eval" and isinstance(step, int) and isinstance(event.get("eval_loss"), (int, float)):
            self.eval_steps.append(step)
            self.eval_losses.append(float(event["eval_loss"]))
            self.version += 1
        elif kind == "checkpoint" and isinstance(step, int):
            self.checkpoints[step] = (str(event.get("path", "")), event.get("time"))
        elif kind == "end":
            self.end = event
        elif kind == "error":
            self.error = event


class RunSampler:
    """Reads a run directory: the whole ``events.jsonl`` on the first sample, then only what was appended."""

    def __init__(self, run_dir: Path, log_lines: int = LOG_LINES, clock: Callable[[], float] = time.time):
        self.run_dir = Path(run_dir)
        self._events = EventTail(self.run_dir / "events.jsonl")
        self._log = LogTail(self.run_dir / "train.log", log_lines)
        self._clock = clock
        self._history = _History()
        self._series: tuple[int, LossSeries, tuple[float, ...]] | None = None

    def sample(self) -> RunSnapshot:
        events, restarted = self._events.read()
        if restarted:
            self._history, self._series = _History(), None
        for event in events:
            self._history.add(event)
        status = read_status(self.run_dir)
        if status is None:
            status = self._read_foreign()
        h, now = self._history, self._clock()
        if status is None:
            return RunSnapshot(run_dir=str(self.run_dir), run_id=self.run_dir.name,
                               error=f"no status.json in {self.run_dir}", log_tail=self._log.read())
        state = effective_state(status)
        start = h.start or {}
        estimate = start.get("estimate") or {}
        loss, learning_rates = self._loss_series()
        return RunSnapshot(
            run_dir=str(self.run_dir), run_id=status.id, name=status.name, state=state,
            error=_error(status, state, h.error), pid=status.pid, host=status.host,
            model=status.model or start.get("model"), method=status.method or start.get("method"),
            device=start.get("device"), progress=_progress(h, status.step, status.total_steps, state, now),
            loss=loss, learning_rates=learning_rates, checkpoints=self._checkpoints(),
            estimate_gib=estimate.get("total_gib"), log_tail=self._log.read(),
            config_text=read_text(self.run_dir / "config.yaml"),
        )

    def _read_foreign(self) -> RunStatus | None:
        """A directory another tool wrote (read-only): its files are rewritten, not appended, so read them whole."""
        foreign = foreign_run(self.run_dir)
        if foreign is None:
            return None
        status, events = foreign
        self._history, self._series = _History(), None
        for event in events:
            self._history.add(event)
        return status

    def _loss_series(self) -> tuple[LossSeries, tuple[float, ...]]:
        """Tuples are rebuilt only when an event changed them, so an idle run costs no copying."""
        h = self._history
        if self._series is None or self._series[0] != h.version:
            losses = tuple(h.losses)
            series = LossSeries(tuple(h.steps), losses, ema(losses), tuple(h.eval_steps), tuple(h.eval_losses))
            self._series = (h.version, series, tuple(h.learning_rates))
        return self._series[1], self._series[2]

    def _checkpoints(self) -> tuple[Checkpoint, ...]:
        return tuple(Checkpoint(step, path, when, os.path.isdir(path))
                     for step, (path, when) in sorted(self._history.checkpoints.items()))


def _error(status, state: str, error_event: dict[str, Any] | None) -> str | None:
    if state != "failed":
        return None
    if status.error:
        return status.error
    if error_event and error_event.get("message"):
        return str(error_event["message"])
    if status.state in ("running", "queued"):
        return f"the run's process (pid {status.pid}) is gone without writing an end event: killed, or the machine " \
               "restarted"
    return None


def _progress(h: _History, status_step: int, status_total: int | None, state: str, now: float) -> Progress:
    """Elapsed and ETA run on between log events while the run is alive; they stop when it ends."""
    log = h.last_log or {}
    alive = state in ("running", "queued")
    elapsed, remaining = log.get("elapsed_s"), log.get("remaining_s")
    since = now - log["time"] if alive and isinstance(log.get("time"), (int, float)) else 0.0
    if elapsed is not None:
        elapsed += since
    elif alive and h.start and isinstance(h.start.get("time"), (int, float)):
        elapsed = now - h.start["time"]
    if h.end and isinstance(h.end.get("runtime_s"), (int, float)):
        elapsed = h.end["runtime_s"]
    remaining = max(0.0, remaining - since) if alive and remaining is not None else None
    return Progress(
        step=max(log.get("step") or 0, status_step or 0), total_steps=log.get("total_steps") or status_total,
        epoch=log.get("epoch"), loss=log.get("loss"), learning_rate=log.get("learning_rate"),
        tokens_per_s=log.get("tokens_per_s"), elapsed_s=elapsed, remaining_s=remaining,
    )


@dataclass(frozen=True)
class GpuReading:
    """One GPU now, with its recent history (oldest first) for sparklines."""

    index: int
    name: str | None
    memory_used_gib: float | None
    memory_total_gib: float | None
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    pids: tuple[int, ...] = ()
    utilization_history: tuple[float, ...] = ()
    memory_history: tuple[float, ...] = ()
    power_history: tuple[float, ...] = ()


@dataclass(frozen=True)
class GpuSnapshot:
    gpus: tuple[GpuReading, ...] = ()
    message: str | None = None  # why there is no GPU to show


class GpuSampler:
    """Calls the probe (``engine.hardware.probe`` or a test's recorded state) and keeps a short history per GPU."""

    def __init__(self, probe: Callable[[], HardwareState], history: int = GPU_HISTORY):
        self._probe = probe
        self._length = history
        self._history: dict[str, tuple[deque, deque, deque]] = {}

    def sample(self) -> GpuSnapshot:
        state = self._probe()
        if not state.gpus:
            return GpuSnapshot(message=state.message or "no NVIDIA GPU found")
        readings = []
        for gpu in state.gpus:
            key = gpu.uuid or str(gpu.physical_index)
            util, memory, power = self._history.setdefault(
                key, tuple(deque(maxlen=self._length) for _ in range(3)))
            for series, value in ((util, gpu.utilization_pct), (memory, gpu.memory_used_gib), (power, gpu.power_w)):
                series.append(float(value) if value is not None else 0.0)
            readings.append(GpuReading(
                index=gpu.index, name=gpu.name, memory_used_gib=gpu.memory_used_gib,
                memory_total_gib=gpu.memory_total_gib, utilization_pct=gpu.utilization_pct,
                temperature_c=gpu.temperature_c, power_w=gpu.power_w, power_limit_w=gpu.power_limit_w,
                pids=tuple(p.pid for p in gpu.processes or ()), utilization_history=tuple(util),
                memory_history=tuple(memory), power_history=tuple(power)))
        return GpuSnapshot(gpus=tuple(readings))
