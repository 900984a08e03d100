"""The run dashboard: a run's state, loss, progress, GPUs, log and checkpoints, updated by two samplers.

The run is a separate process; this screen only reads its directory and, when asked and confirmed, sends it the
graceful-stop signal. Leaving the screen never touches the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import NamedTuple

from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from engine.hardware import HardwareState
from engine.rundir.jobs import load_job, reward_method, stop_job
from tuner_tui.confirm import ConfirmScreen
from tuner_tui.dashboard.sampler import GpuSampler, GpuSnapshot, RunSampler, RunSnapshot
from tuner_tui.dashboard.widgets import (CheckpointList, ConfigView, GpuPanel, LearningRate, LogView, LossChart,
                                         ProgressPanel, StateBanner)
from tuner_tui.errors import failure_text

RUN_SAMPLER, GPU_SAMPLER, STOP = "run-sampler", "gpu-sampler", "stop"


class RunSampled(Message):
    def __init__(self, snapshot: RunSnapshot):
        super().__init__()
        self.snapshot = snapshot


class GpusSampled(Message):
    def __init__(self, snapshot: GpuSnapshot):
        super().__init__()
        self.snapshot = snapshot


class Sampling(NamedTuple):
    """One sampler and how the screen runs it: every ``interval_s`` after the previous sample ended."""

    name: str
    interval_s: float
    sampler: RunSampler | GpuSampler
    message: type[RunSampled] | type[GpusSampled]


def goes_on_line(run: RunSnapshot | None) -> str | None:
    """What to tell the shell about a run left running: its id and how to reattach; None once it has ended."""
    if run is None or not run.active:
        return None
    return f"run {run.run_id} goes on: tuner monitor {run.run_id}"


class DashboardScreen(Screen):
    CSS_PATH = "dashboard.tcss"
    # Short descriptions: the footer holds all seven and the palette key at 80 columns.
    BINDINGS = [
        Binding("s", "stop", "Stop", tooltip="Ask the run to finish its step, save a checkpoint and stop"),
        Binding("l", "toggle_log_scale", "Log scale", tooltip="Show the loss on a log or a linear scale"),
        Binding("m", "next_metric", "Metric",
                tooltip="Chart the stage's next metric (DPO: rewards/margins, rewards/accuracies, ...), then the loss"),
        Binding("c", "chat", "Chat", tooltip="Chat with what the run trained (once it has ended)"),
        Binding("p", "predict", "Predict", tooltip="Generate for a dataset and score it (once the run has ended)"),
        Binding("e", "export", "Export",
                tooltip="Write what the run trained as a standalone model (once it has ended)"),
        Binding("r", "runs", "Runs", tooltip="Every run on this host; this one goes on"),
        Binding("q", "quit", "Quit", tooltip="Close the dashboard; the run goes on (the shell gets how to return)"),
    ]

    log_scale: reactive[bool] = reactive(False)

    class LogScaleChanged(Message):
        """The user switched the loss chart's scale: the app keeps it for the next dashboard it opens."""

        def __init__(self, log_scale: bool):
            super().__init__()
            self.log_scale = log_scale

    def __init__(self, run_dir: Path, probe: Callable[[], HardwareState], interval_s: float = 1.0,
                 gpu_interval_s: float = 2.0, log_scale: bool = False):
        super().__init__()
        self.set_reactive(DashboardScreen.log_scale, log_scale)
        self.run_dir = Path(run_dir)
        self.run: RunSnapshot | None = None
        self._samplers = {
            RUN_SAMPLER: Sampling("reading the run", interval_s, RunSampler(self.run_dir), RunSampled),
            GPU_SAMPLER: Sampling("reading the GPUs", gpu_interval_s, GpuSampler(probe, run_pid=self._run_pid),
                                  GpusSampled),
        }
        self._last_failure: dict[str, str] = {}
        self.charted = "loss"  # the series the chart shows: the loss, or one of the stage's metrics
        self._gpu_sampling_started = False  # the GPU sampler's first round has started

    def compose(self) -> ComposeResult:
        yield StateBanner(id="banner")
        yield ProgressPanel(id="progress")
        with Horizontal(id="main"):
            with Vertical(id="charts"):
                yield LossChart(id="loss").data_bind(DashboardScreen.log_scale)
                yield LearningRate(id="lr")
            with VerticalScroll(id="gpus"):
                yield GpuPanel()
        with TabbedContent(id="details"):
            with TabPane("Log", id="log-tab"), VerticalScroll(id="log"):
                yield LogView()
            with TabPane("Checkpoints", id="checkpoints-tab"), VerticalScroll():
                yield CheckpointList()
            with TabPane("Config", id="config-tab"), VerticalScroll():
                yield ConfigView()
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#gpus").border_title = "GPUs"
        self._sample(RUN_SAMPLER)  # the GPU sampler starts once the run is read: it reads the run's process too

    def _sample(self, group: str) -> None:
        sampling = self._samplers[group]
        self.run_worker(lambda: self.post_message(sampling.message(sampling.sampler.sample())), name=sampling.name,
                        group=group, thread=True, exit_on_error=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place worker failures become messages; a sampler's next round starts when its last one ended."""
        worker, group = event.worker, event.worker.group
        if event.state == WorkerState.ERROR:
            text = failure_text(worker.error)
            if self._last_failure.get(group) != text:
                self.notify(text, title=f"{worker.name} failed", severity="error", timeout=8, markup=False)
            self._last_failure[group] = text
        elif event.state == WorkerState.SUCCESS:
            self._last_failure.pop(group, None)
            if group == STOP:
                self.notify(worker.result, title="stop requested", markup=False)
        if group in self._samplers and event.state in (WorkerState.SUCCESS, WorkerState.ERROR):
            self.set_timer(self._samplers[group].interval_s, partial(self._sample, group))
            if group == RUN_SAMPLER and not self._gpu_sampling_started:
                self._gpu_sampling_started = True
                self._sample(GPU_SAMPLER)

    def on_run_sampled(self, message: RunSampled) -> None:
        had_metrics = bool(self.run and self.run.metrics)
        run = self.run = message.snapshot
        self.query_one(StateBanner).run = run
        progress = self.query_one(ProgressPanel)
        progress.progress, progress.download = run.progress, run.download
        chart = self.query_one(LossChart)
        chart.series, chart.ended = run.metrics.get(self.charted, run.loss), run.ended
        if had_metrics != bool(run.metrics):
            self.refresh_bindings()
        self.query_one(LearningRate).rates = run.learning_rates
        panel = self.query_one(GpuPanel)
        panel.estimate_gib, panel.run_pid = run.estimate_gib, run.pid if run.active else None
        self._follow(self.query_one("#log", VerticalScroll), self.query_one(LogView), run.log_tail)
        self.query_one(CheckpointList).checkpoints = run.checkpoints
        self.query_one(ConfigView).text = run.config_text

    def _run_pid(self) -> int | None:
        """The run's process while it is alive, whose CPU and memory the GPU sampler reads on a machine without GPUs."""
        run = self.run
        return run.pid if run is not None and run.active else None

    def on_gpus_sampled(self, message: GpusSampled) -> None:
        self.query_one(GpuPanel).gpus = message.snapshot
        self.query_one("#gpus").border_title = "GPUs" if message.snapshot.gpus else "CPU and memory"

    @staticmethod
    def _follow(scroll: VerticalScroll, view: LogView, lines: tuple[str, ...]) -> None:
        """New log lines keep the view at the end, unless the user scrolled up to read."""
        at_end = scroll.scroll_y >= scroll.max_scroll_y
        view.lines = lines
        if at_end:
            scroll.call_after_refresh(scroll.scroll_end, animate=False)

    def action_quit(self) -> None:
        """Close the app; its result is the line the shell gets when the run goes on (printed once the app is gone)."""
        self.app.exit(goes_on_line(self.run))

    def action_next_metric(self) -> None:
        names = ["loss", *(self.run.metrics if self.run else ())]
        self.charted = names[(names.index(self.charted) + 1) % len(names)] if self.charted in names else "loss"
        if self.run is not None:
            self.query_one(LossChart).series = self.run.metrics.get(self.charted, self.run.loss)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "next_metric":
            return bool(self.run and self.run.metrics)  # shown only for a stage that logs metrics of its own
        return super().check_action(action, parameters)

    def action_toggle_log_scale(self) -> None:
        self.log_scale = not self.log_scale
        self.post_message(self.LogScaleChanged(self.log_scale))

    def _follow_up_refused(self) -> bool:
        """Chat, predict and export use what a run trained, so they wait for it to end: say so when it has not."""
        run = self.run
        if run is not None and run.ended:
            return False
        if run is None:
            why = "the run is not read yet"
        elif run.active:
            why = (f"run {run.run_id} is still {run.state}: chat, predict and export open once it ends "
                   "(s stops it with a checkpoint they can use)")
        elif run.state == "external":
            why = ("this run was written by another tool: give its output to `tuner chat|predict|export` with "
                   "--adapter_name_or_path or --model_name_or_path")
        else:
            why = f"run {run.run_id} is {run.state}: there is nothing it trained to chat, predict or export with"
        self.notify(why, severity="warning", markup=False)
        return True

    def action_chat(self) -> None:
        from tuner_tui.followup.chat import ChatScreen

        if self.run is not None and reward_method(self.run.method):
            self.notify(f"run {self.run.run_id} is a reward model (stage rm): it scores replies and writes none; "
                        "p scores ranking pairs with it", severity="warning", markup=False)
        elif not self._follow_up_refused():
            self.app.push_screen(ChatScreen(self.run_dir))

    def action_predict(self) -> None:
        from tuner_tui.followup.tasks import PredictScreen

        if not self._follow_up_refused():
            self.app.push_screen(PredictScreen(self.run_dir))

    def action_export(self) -> None:
        from tuner_tui.followup.tasks import ExportScreen

        if not self._follow_up_refused():
            self.app.push_screen(ExportScreen(self.run_dir))

    def action_runs(self) -> None:
        from tuner_tui.runs.screen import ShowRuns

        self.post_message(ShowRuns(self.run_dir))

    def action_stop(self) -> None:
        run = self.run
        if run is None or not run.active or run.pid is None:
            why = "not read yet" if run is None else f"{run.state}" if not run.active else "queued, without a process"
            self.notify(f"the run is {why}: there is nothing to stop", severity="warning", markup=False)
            return
        self.app.push_screen(
            ConfirmScreen(f"Stop run {run.run_id}?",
                          "It finishes the current step, saves a checkpoint and stops; `tuner resume` continues it.",
                          yes="Stop run", no="Keep running"),
            partial(self._stop_answered, run.run_id))

    def _stop_answered(self, run_id: str, yes: bool | None) -> None:
        if yes:
            self.run_worker(partial(self._send_stop, run_id), name="stopping the run", group=STOP, thread=True,
                            exit_on_error=False)

    def _send_stop(self, run_id: str) -> str:
        job = load_job(run_id, self.run_dir)
        stop_job(job)
        return f"run {run_id} (pid {job.status.pid}) is finishing its step and saving a checkpoint"

    def system_commands(self) -> Iterable[SystemCommand]:
        """The screen's actions for the command palette (the app adds them to its own)."""
        yield SystemCommand("Stop run", "Ask the run to finish its step, save a checkpoint and stop",
                            self.action_stop)
        yield SystemCommand("Toggle log scale", "Show the loss chart on a log or a linear scale",
                            self.action_toggle_log_scale)
        yield SystemCommand("Runs", "Every run on this host", self.action_runs)
        yield SystemCommand("Chat with this run", "Load what it trained and chat (once it has ended)",
                            self.action_chat)
        yield SystemCommand("Predict with this run", "Generate for a dataset and score it (once it has ended)",
                            self.action_predict)
        yield SystemCommand("Export this run", "Write it as a standalone safetensors model, a LoRA adapter merged "
                            "into its base (once it has ended)", self.action_export)
