"""The dashboard's widgets. Each renders the snapshot (or the part of one) it is handed through a reactive attribute
and reads nothing itself; equal snapshots do not re-render."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from textual.app import ComposeResult
from textual.color import Color
from textual.containers import Horizontal
from textual.content import Content
from textual.markup import escape
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import ProgressBar, Static
from textual_plotext import PlotextPlot

from engine.models.download import progress_line
from engine.rundir.events import DownloadProgress
from engine.rundir.jobs import clock
from tuner_tui.dashboard.sampler import (Checkpoint, GpuReading, GpuSnapshot, HostSnapshot, LossSeries, Progress,
                                         RunSnapshot)

BARS = "▁▂▃▄▅▆▇█"
STATE_MARKS = {"running": "●", "queued": "◌", "completed": "✔", "stopped": "■", "failed": "✖", "external": "◇",
               "missing": "?", "unreadable": "?"}


def resample(values: Sequence[float], width: int) -> list[float]:
    """At most ``width`` values: each column the largest of its bucket, so a spike stays visible."""
    if width <= 0:
        return []
    if len(values) <= width:
        return list(values)
    size = len(values) / width
    return [max(values[int(i * size):max(int((i + 1) * size), int(i * size) + 1)]) for i in range(width)]


def spark(values: Sequence[float], width: int, low: float | None = None, high: float | None = None) -> str:
    """A one-line sparkline of the last values that fit, scaled to [low, high] (the data's range when None)."""
    values = resample(values, width)
    if not values:
        return ""
    low = min(values) if low is None else low
    high = max(values) if high is None else high
    span = high - low
    if span <= 0:
        return BARS[0] * len(values)
    top = len(BARS) - 1
    return "".join(BARS[min(top, max(0, round((v - low) / span * top)))] for v in values)


def thin(xs: Sequence[float], ys: Sequence[float], limit: int) -> tuple[list[float], list[float]]:
    """Evenly spaced points, the last always kept: a chart never needs more points than it has dots."""
    if len(xs) <= limit:
        return list(xs), list(ys)
    stride = len(xs) / limit
    picks = sorted({int(i * stride) for i in range(limit)} | {len(xs) - 1})
    return [xs[i] for i in picks], [ys[i] for i in picks]


def axis(low: float, high: float, count: int, log: bool = False, whole: bool = False
         ) -> tuple[tuple[float, float], list[float], list[str]]:
    """An axis over the data's [low, high]: its limits as plotext draws them (log10 on a log scale), up to ``count``
    round ticks (1, 2 or 5 times a power of ten) and their exact labels. One value (a single point, a flat series)
    gets a range around it and one tick."""
    scaled = math.log10 if log else float
    a, b = scaled(low), scaled(high)
    if b - a <= 1e-9 * max(abs(a), 1.0):
        pad = 1.0 if whole else 0.02 if log else max(abs(a) * 0.05, 1e-3)
        return (a - pad, a + pad), [low], [str(round(low)) if whole else f"{low:.4g}"]
    ticks, step = round_ticks(low, high, max(count, 2), whole)
    if log:
        decades = [m * 10.0 ** k for k in range(math.floor(a), math.ceil(b) + 1) for m in (1, 2, 5)]
        within = [t for t in decades if low <= t <= high]
        if len(within) >= 2:
            ticks = within[::math.ceil(len(within) / max(count, 2))]
            return (a, b), ticks, [f"{t:g}" for t in ticks]
    decimals = max(0, -math.floor(math.log10(step)))
    if decimals <= 6:
        return (a, b), ticks, [f"{t:.{decimals}f}" for t in ticks]
    digits = math.floor(math.log10(max(abs(low), abs(high)))) - math.floor(math.log10(step)) + 1
    return (a, b), ticks, [f"{t:.{max(digits, 1)}g}" for t in ticks]


def round_ticks(low: float, high: float, count: int, whole: bool = False) -> tuple[list[float], float]:
    """At least two and about ``count`` multiples of a round step within [low, high], and the step."""
    raw = (high - low) / (count - 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    while True:
        step = max(step, 1.0) if whole else step
        first = math.ceil(low / step - 1e-9)
        ticks = [i * step for i in range(first, math.floor(high / step + 1e-9) + 1)]
        if len(ticks) >= 2 or (whole and step == 1.0):
            return ticks or [low], step
        step /= 2


def duration(seconds: float | None) -> str:
    """H:MM:SS as `tuner runs` writes it; "—" when not known."""
    return clock(seconds) or "—"


def number(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


class StateBanner(Widget):
    """The run's state first; when it failed, its error."""

    run: reactive[RunSnapshot | None] = reactive(None, layout=True)

    def watch_run(self, run: RunSnapshot | None) -> None:
        for state in STATE_MARKS:
            self.set_class(run is not None and run.state == state, f"-{state}")

    def render(self) -> Content:
        run = self.run
        if run is None:
            return Content("reading the run directory…")
        details = " · ".join(part for part in (
            run.name if run.name != run.run_id else None, run.model, run.method, run.device,
            f"pid {run.pid}" if run.pid and run.active else None) if part)
        head = Content.assemble((f"{STATE_MARKS.get(run.state, '?')} {run.state.upper()}", "bold"), "  ",
                                (run.run_id, "bold"), f"  {details}" if details else "")
        lines = [head]
        if run.error:
            lines.append(Content.assemble(("error: ", "bold"), run.error))
        elif run.state == "external":
            lines.append(Content(f"written by another tool ({run.method}): shown read-only, progress as of its last "
                                 "log"))
        elif run.state == "stopped":
            lines.append(Content(f"stopped at step {run.progress.step} with a checkpoint: "
                                 f"`tuner resume {run.run_id}` continues it"))
        return Content("\n").join(lines)


class ProgressPanel(Horizontal):
    """Step / total as a bar, then epoch, loss, elapsed, ETA and tokens/s; while the model downloads before the first
    step, bytes done / total as the bar, then the file, speed and ETA."""

    progress: reactive[Progress | None] = reactive(None)
    download: reactive[DownloadProgress | None] = reactive(None)

    def compose(self) -> ComposeResult:
        yield ProgressBar(show_eta=False, id="bar")
        yield Static("", id="stats", markup=False)

    def watch_progress(self) -> None:
        self._show()

    def watch_download(self) -> None:
        self._show()

    def _show(self) -> None:
        p, d = self.progress, self.download
        bar, stats = self.query_one(ProgressBar), self.query_one("#stats", Static)
        if d is not None:  # before the first step, or a resumed run fetching its model again
            bar.update(total=d.total_bytes, progress=d.done_bytes)
            stats.update(f"downloading the model: {progress_line(d)}")
            return
        if p is None:
            return
        bar.update(total=p.total_steps, progress=p.step)
        total = p.total_steps if p.total_steps is not None else "?"
        fields = [f"step {p.step}/{total}", f"epoch {number(p.epoch, '.2f')}", f"loss {number(p.loss, '.4f')}",
                  f"{duration(p.elapsed_s)} elapsed", number(p.tokens_per_s, ",.0f", " tok/s")]
        if p.remaining_s is not None:
            fields.insert(4, f"ETA {duration(p.remaining_s)}")
        stats.update("  ".join(f.replace(" ", "\u00a0") for f in fields))


class LossChart(PlotextPlot):
    """Raw training loss (or one of a stage's metrics: the series' name), its EMA and eval points against the step;
    linear or log scale."""

    series: reactive[LossSeries] = reactive(LossSeries)
    log_scale: reactive[bool] = reactive(False)
    ended: reactive[bool] = reactive(False)  # the run is over: no loss to wait for

    def watch_log_scale(self, log_scale: bool) -> None:
        self._title()

    def watch_series(self, old: LossSeries, new: LossSeries) -> None:
        if old.name != new.name:
            self._title()

    def _title(self) -> None:
        scale = " · log scale" if self.log_scale else ""
        self.border_title = (f"{escape(self.series.name)}{scale}  [$foreground-muted]raw[/] [$primary]EMA[/] "
                             "[$warning]• eval[/]")

    def render(self):
        s, plt = self.series, self.plt
        plt.clear_data()
        if not s.steps:
            return Content.styled("the run ended before it logged a loss (every logging_steps steps)" if self.ended
                                  else "waiting for the first logged step…", "$text-muted")
        keep = (lambda y: y > 0 and math.isfinite(y)) if self.log_scale else math.isfinite
        limit = max(self.size.width, 2)
        drawn: list[tuple[float, float]] = []
        for ys, label, colour in ((s.losses, "loss", "foreground-muted"), (s.smoothed, "EMA", "primary"),
                                  (s.eval_losses, "eval", "warning")):
            xs = s.eval_steps if label == "eval" else s.steps
            points = [(x, y) for x, y in zip(*thin(xs, ys, limit)) if keep(y)]
            if not points:
                continue
            drawn += points
            px, py = zip(*points)
            draw = plt.plot if label == "EMA" else plt.scatter
            draw(px, py, marker="dot" if label == "eval" else "braille", color=self._colour(colour))
        if not drawn:
            return Content.styled("no loss above zero to show on a log scale (l: linear)", "$text-muted")
        plt.yscale("log" if self.log_scale else "linear")
        xs, ys = [x for x, _ in drawn], [y for _, y in drawn]
        limits, ticks, labels = axis(min(xs), max(xs), max(2, min(6, self.size.width // 12)), whole=True)
        plt.xlim(*limits)
        plt.xticks(ticks, labels)
        limits, ticks, labels = axis(min(ys), max(ys), max(2, min(5, (self.size.height - 2) // 2)),
                                     log=self.log_scale)
        plt.ylim(*limits)
        plt.yticks(ticks, labels)
        plt.xlabel("step")
        plt.frame(False)
        return super().render()

    def _colour(self, variable: str) -> tuple[int, int, int]:
        return Color.parse(self.app.theme_variables.get(variable, "white")).rgb


class LearningRate(Widget):
    """The learning-rate schedule so far as a sparkline, with the current value."""

    rates: reactive[tuple[float, ...]] = reactive(tuple)

    def render(self) -> Content:
        if not self.rates:
            return Content.styled("lr —", "$text-muted")
        label = f"lr {self.rates[-1]:.2e} "
        return Content.assemble((label, "$text-muted"),
                                (spark(self.rates, self.size.width - len(label), low=0.0), "$accent"))


class GpuPanel(Widget):
    """Per GPU: utilisation, memory against the total (and the run's estimate), temperature and power, with history.
    Without a GPU: the CPU and memory the run's processes use and the machine's memory, then why there is no GPU."""

    gpus: reactive[GpuSnapshot | None] = reactive(None)
    estimate_gib: reactive[float | None] = reactive(None)
    run_pid: reactive[int | None] = reactive(None)

    def watch_gpus(self, old: GpuSnapshot | None, new: GpuSnapshot | None) -> None:
        """Readings change every sample, the panel's height only when the GPUs do: lay out only then."""
        if _shape(old) != _shape(new):
            self.refresh(layout=True)

    def watch_estimate_gib(self, old: float | None, new: float | None) -> None:
        if (old is None) != (new is None):
            self.refresh(layout=True)

    def render(self) -> Content:
        snapshot = self.gpus
        if snapshot is None:
            return Content.styled("reading the GPUs…", "$text-muted")
        if not snapshot.gpus:
            why = Content.styled(snapshot.message or "no NVIDIA GPU found", "$text-muted")
            return Content("\n").join([*self._host(snapshot.host), why] if snapshot.host else [why])
        return Content("\n").join(self._gpu(g) for g in snapshot.gpus)

    def _host(self, h: HostSnapshot) -> list[Content]:
        width = max(self.size.width - 18, 4)
        cores = f"{h.cpu_count} core" + ("" if h.cpu_count == 1 else "s")
        machine = [Content.styled(f"machine · {cores}", "bold"),
                   self._row("mem  ", h.memory_history, h.memory_total_gib,
                             f"{h.memory_used_gib:.1f}/{h.memory_total_gib:.0f} GiB", width)]
        if not h.processes:
            return [Content.styled("no process of the run", "$text-muted"), *machine]
        processes = f"{h.processes} process" + ("" if h.processes == 1 else "es")
        return [Content.styled(f"this run · {processes}", "bold"),
                self._row("cpu  ", h.cpu_history, h.cpu_count * 100.0, number(h.cpu_pct, ".0f", " %"), width),
                self._row("rss  ", h.rss_history, h.memory_total_gib,
                          f"{h.rss_gib:.1f} GiB" if h.rss_gib >= 1 else f"{h.rss_gib * 1024:.0f} MiB", width),
                *machine]

    def _gpu(self, g: GpuReading) -> Content:
        width = max(self.size.width - 18, 4)
        name = (g.name or "unknown GPU").removeprefix("NVIDIA ")
        ours = self.run_pid is not None and self.run_pid in g.pids
        memory = f"{number(g.memory_used_gib, '.1f')}/{number(g.memory_total_gib, '.0f')} GiB"
        rows = [
            Content.assemble((f"{g.index} {name}", "bold"), ("  ◀ this run" if ours else "", "$text-accent")),
            self._row("util ", g.utilization_history, 100.0, number(g.utilization_pct, "d", " %"), width),
            self._row("mem  ", g.memory_history, g.memory_total_gib, memory, width),
            self._row("power", g.power_history, g.power_limit_w,
                      f"{number(g.power_w, '.0f')}/{number(g.power_limit_w, '.0f')} W", width),
            Content(f"      {number(g.temperature_c, 'd', ' °C')}"),
        ]
        if self.estimate_gib is not None:
            rows.insert(3, Content.styled(f"      estimate {self.estimate_gib:.1f} GiB", "$text-muted"))
        return Content("\n").join(rows)

    @staticmethod
    def _row(label: str, history: Sequence[float], high: float | None, value: str, width: int) -> Content:
        return Content.assemble((label, "$text-muted"), " ", (spark(history, width, 0.0, high), "$accent"),
                                f" {value}")


def _shape(snapshot: GpuSnapshot | None) -> tuple:
    if snapshot is None:
        return (None,)
    running = None if snapshot.host is None else bool(snapshot.host.processes)  # five lines, or three
    return snapshot.message, len(snapshot.gpus), running


class LogView(Widget):
    """The end of train.log, warnings and errors highlighted."""

    lines: reactive[tuple[str, ...]] = reactive(tuple, layout=True)

    def render(self) -> Content:
        if not self.lines:
            return Content.styled("train.log is empty so far", "$text-muted")
        return Content("\n").join(Content.styled(line, _line_style(line)) for line in self.lines)


def _line_style(line: str) -> str:
    upper = line.upper()
    if " ERROR " in upper or " CRITICAL " in upper or line.startswith("Traceback") or "Error:" in line:
        return "$text-error"
    if " WARNING " in upper or "Warning:" in line:
        return "$text-warning"
    return ""


class CheckpointList(Widget):
    """The checkpoints the run saved, newest last; ones removed since (save_total_limit) dimmed."""

    checkpoints: reactive[tuple[Checkpoint, ...]] = reactive(tuple, layout=True)

    def render(self) -> Content:
        if not self.checkpoints:
            return Content.styled("no checkpoint yet", "$text-muted")
        rows = []
        for c in self.checkpoints:
            name = c.path.rstrip("/").rsplit("/", 1)[-1] or f"checkpoint-{c.step}"
            when = datetime.fromtimestamp(c.time).strftime("%H:%M:%S") if c.time else ""
            row = f"{name:<18} step {c.step:<8} {when}  {c.path}" + ("" if c.exists else "  (removed)")
            rows.append(Content.styled(row, "" if c.exists else "$text-muted"))
        return Content("\n").join(rows)


class ConfigView(Widget):
    """The run's config.yaml as it was resolved."""

    text: reactive[str | None] = reactive(None, layout=True)

    def render(self) -> Content:
        return Content(self.text) if self.text else Content.styled("no config.yaml", "$text-muted")
