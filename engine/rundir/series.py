"""Events folded into what a watcher shows: the loss and learning-rate series, progress with its ETA, and the
checkpoints; and the ETA's estimate itself, which the training process writes into each log event. Every number is
checked on the way in, so a hostile or corrupt event (a string step, 1e308 seconds) is left out instead of reaching a
chart or a clock."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.rundir.events import DownloadProgress
from engine.rundir.events import Event

MAX_SECONDS = 1e10  # ~300 years: anything longer is not a duration of a run
MAX_STEP = 2**53
MAX_VALUE = 1e9  # a loss or learning rate beyond this is corrupt, and charts cannot scale to it
MAX_TIME = 1e11  # seconds since 1970 (the year 5138): an event time beyond is corrupt
PACE_LOGS = 10  # the ETA's step time: the mean over this many of the latest intervals between logged steps
MAX_POINTS = 4096  # a series keeps between this many and twice as many points, however long the run
MAX_METRICS = 32  # a stage's metrics kept (its log events' "metrics": rewards/chosen, ...), the first seen
METRIC_NAME = re.compile(r"[A-Za-z0-9_./-]{1,64}")  # TRL's names; anything else in an event is not charted


def number(value: Any, low: float = -math.inf, high: float = math.inf) -> float | None:
    """``value`` as a float when it is a finite number within [low, high], else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer too big for a float
        return None
    return value if math.isfinite(value) and low <= value <= high else None


def step_number(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEP:
        return None
    return value


def seconds(value: Any) -> float | None:
    return number(value, 0.0, MAX_SECONDS)


def loss_or_rate(given: Any) -> float | None:
    """A loss or learning rate: finite and within ±MAX_VALUE."""
    return number(given, -MAX_VALUE, MAX_VALUE)


def event_time(event: dict[str, Any]) -> float | None:
    return number(event.get("time"), 0.0, MAX_TIME)


def remaining_s(logged: Sequence[tuple[int, float]], total_steps: int) -> float | None:
    """Seconds left at the recent pace. ``logged`` is (step, time) of each log of this training session, oldest
    first; the step time is the mean over the last PACE_LOGS intervals between them. What came before the first log
    (the first step's warm-up and compilation) is never counted, so there is no estimate before the second log."""
    window = logged[-(PACE_LOGS + 1):]
    if len(window) < 2:
        return None
    (first_step, first_time), (last_step, last_time) = window[0], window[-1]
    if last_step <= first_step:
        return None
    per_step = max(last_time - first_time, 0.0) / (last_step - first_step)
    return per_step * max(total_steps - last_step, 0)


@dataclass(frozen=True)
class LossSeries:
    """Training loss per logged step (a resumed run's repeated steps replace the old ones), its EMA, eval losses; or,
    named, one of a stage's metrics (``rewards/margins``) and its evaluations, the same way."""

    steps: tuple[int, ...] = ()
    losses: tuple[float, ...] = ()
    smoothed: tuple[float, ...] = ()
    eval_steps: tuple[int, ...] = ()
    eval_losses: tuple[float, ...] = ()
    name: str = "loss"


@dataclass(frozen=True)
class Progress:
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float | None = None  # engine.rundir.jobs.elapsed_s: the run's wall-clock time, as `tuner runs` shows
    remaining_s: float | None = None  # None: not known yet (before the second log), or the run is over


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str
    time: float | None
    exists: bool  # False once save_total_limit (or a person) removed it


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


class Thinned:
    """Points ``(step, *values)`` in step order, at most 2 * ``limit`` of them however long the run: when full, every
    other point goes, and from then on a point is kept only as far from the last kept one as the points left are
    from each other. The latest point is always there. A step at or before the last one (a resumed run's repeated
    steps) replaces the points from that step on."""

    def __init__(self, limit: int = MAX_POINTS):
        self.limit = max(limit, 2)
        self.kept: list[tuple] = []
        self.latest: tuple | None = None  # the newest point, when it was not kept
        self.spacing = 0.0

    def add(self, point: tuple) -> None:
        step = point[0]
        if self.kept and self.kept[-1][0] >= step:  # a run started again, or resumed from an earlier step
            while self.kept and self.kept[-1][0] >= step:
                self.kept.pop()
            self.spacing = self._spacing() if len(self.kept) >= self.limit else 0.0
        if self.kept and step - self.kept[-1][0] < self.spacing:
            self.latest = point
            return
        self.kept.append(point)
        self.latest = None
        if len(self.kept) >= 2 * self.limit:
            self.kept = self.kept[::2]
            self.spacing = self._spacing()
            self.latest = point if self.kept[-1] is not point else None

    def _spacing(self) -> float:
        return (self.kept[-1][0] - self.kept[0][0]) / (len(self.kept) - 1) if len(self.kept) > 1 else 0.0

    def columns(self) -> list[tuple]:
        """The steps, then each value, as tuples."""
        points = self.kept + ([self.latest] if self.latest is not None else [])
        return [tuple(column) for column in zip(*points)] if points else []


class History:
    """Everything folded from a run's events so far; ``version`` changes whenever a series does."""

    def __init__(self, limit: int = MAX_POINTS):
        self.losses = Thinned(limit)  # (step, loss, learning rate)
        self.evals = Thinned(limit)  # (step, eval loss)
        self.limit = limit
        self.metrics: dict[str, Thinned] = {}  # a stage's metric -> (step, value), from the log events' "metrics"
        self.eval_metrics: dict[str, Thinned] = {}  # ... and from the eval events' "eval_<metric>"
        self.checkpoints: dict[int, tuple[str, float | None]] = {}
        self.start: dict[str, Any] | None = None
        self.last_log: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.last_seen: float | None = None  # the time of the last event: when a run that died was last heard of
        self._download: DownloadProgress | None = None
        self.version = 0

    def add(self, event: dict[str, Any]) -> None:
        kind, step, when = event.get("type"), step_number(event.get("step")), event_time(event)
        if when is not None:
            self.last_seen = when
        if kind == Event.START:
            self.start, self.error = event, None  # a resumed run starts again in the same file
            self._download = None
        elif kind == Event.DOWNLOAD:
            self._download = download_progress(event)
            self.version += 1
        elif kind == Event.LOG and step is not None and loss_or_rate(event.get("loss")) is not None:
            self.losses.add((step, loss_or_rate(event["loss"]), loss_or_rate(event.get("learning_rate")) or 0.0))
            metrics = event.get("metrics")
            self._add_metrics(self.metrics, step, metrics.items() if isinstance(metrics, dict) else ())
            self.last_log = event
            self.version += 1
        elif kind == Event.EVAL and step is not None and loss_or_rate(event.get("eval_loss")) is not None:
            self.evals.add((step, loss_or_rate(event["eval_loss"])))
            self._add_metrics(self.eval_metrics, step, ((key.removeprefix("eval_"), value) for key, value in
                                                        event.items() if key.startswith("eval_") and "/" in key))
            self.version += 1
        elif kind == Event.CHECKPOINT and step is not None:
            self.checkpoints[step] = (str(event.get("path", "")), number(event.get("time")))
        elif kind == Event.END:
            self._download = None
        elif kind == Event.ERROR:
            self.error = event

    def _add_metrics(self, kept: dict[str, Thinned], step: int, items) -> None:
        """Untrusted names and values: text of a sane length, finite numbers, at most MAX_METRICS names."""
        for name, value in items:
            value = loss_or_rate(value)
            if not isinstance(name, str) or not METRIC_NAME.fullmatch(name) or value is None:
                continue
            if name in kept or len(kept) < MAX_METRICS:
                kept.setdefault(name, Thinned(self.limit)).add((step, value))

    def metric_series(self) -> dict[str, LossSeries]:
        """Each of the stage's metrics as a chart shows it: raw, its EMA, and its evaluations; DPO's rewards first."""
        out = {}
        for name, thinned in sorted(self.metrics.items(), key=lambda item: (not item[0].startswith("rewards/"),
                                                                            item[0])):
            steps, values = thinned.columns() or ((), ())
            eval_steps, eval_values = self.eval_metrics[name].columns() if name in self.eval_metrics else ((), ())
            out[name] = LossSeries(steps, values, ema(values), eval_steps, eval_values, name)
        return out

    def download_progress(self) -> DownloadProgress | None:
        """The model download under way before training, for a progress bar; None when none is (never, or over)."""
        return self._download

    def series(self) -> tuple[LossSeries, tuple[float, ...]]:
        steps, losses, rates = self.losses.columns() or ((), (), ())
        eval_steps, eval_losses = self.evals.columns() or ((), ())
        return LossSeries(steps, losses, ema(losses), eval_steps, eval_losses), rates

    def progress(self, status_step: int, status_total: int | None, alive: bool, now: float,
                 elapsed_s: float | None) -> Progress:
        """Progress as of the last log; ``elapsed_s`` comes from the run's status (``jobs.elapsed_s``). The ETA the
        log carries counts down while the run is alive and is gone once it ends."""
        log = self.last_log or {}
        remaining = seconds(log.get("remaining_s"))
        logged_at = number(log.get("time"), 0.0)
        since = min(max(now - logged_at, 0.0), MAX_SECONDS) if alive and logged_at is not None else 0.0
        remaining = max(0.0, remaining - since) if alive and remaining is not None else None
        return Progress(
            step=max(step_number(log.get("step")) or 0, step_number(status_step) or 0),
            total_steps=step_number(log.get("total_steps")) or step_number(status_total),
            epoch=number(log.get("epoch"), 0.0, MAX_VALUE), loss=loss_or_rate(log.get("loss")),
            learning_rate=loss_or_rate(log.get("learning_rate")),
            tokens_per_s=number(log.get("tokens_per_s"), 0.0, 1e12),
            elapsed_s=seconds(elapsed_s), remaining_s=remaining,
        )


def download_progress(event: dict[str, Any]) -> DownloadProgress | None:
    """A download event as progress; None when it is corrupt or says the download is complete."""
    done, total = step_number(event.get("done")), step_number(event.get("total"))
    if done is None or total is None or done >= total:
        return None
    file = event.get("file")
    return DownloadProgress(done, total, number(event.get("speed"), 0.0, 1e13), seconds(event.get("eta_s")),
                            file if isinstance(file, str) else "")
