"""Predict with a run or export it as a standalone model: a short form prefilled from the run, then the command
started as its own process (`tuner predict|export --run RUN ...`, in its own session like a run, so leaving the app
or losing SSH does not stop it), its log followed and its result shown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.reactive import reactive
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Button, Footer, Input, Label, Static
from textual.worker import Worker, WorkerState

from engine.rundir.files import LogTail, printable_line
from engine.runs.tasks import TaskResult, read_task, result_path_for, start_task
from tuner_tui.errors import failure_text

PREPARE, CHECK, POLL = "prepare", "check", "poll"
POLL_S = 1.0


@dataclass(frozen=True)
class TaskState:
    """What the screen shows while the command runs and after: read off the UI thread."""

    running: bool
    exit_code: int | None
    log: tuple[str, ...]
    task: TaskResult
    result: str | None = None
    error: str | None = None


def short_duration(seconds: float) -> str:
    """"1h 5m", "1m 12s", "8s": the two largest units, for an ETA or how long a task took."""
    total = max(round(seconds), 0)
    hours, minutes, secs = total // 3600, total // 60 % 60, total % 60
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def progress_text(task: TaskResult) -> str:
    """"8 of 40 done · ETA 1m 12s" once the task counts its work, "" for one that does not."""
    if task.total is None:
        return ""
    if not task.done:
        return f"0 of {task.total} done"
    eta = f" · ETA {short_duration(task.remaining_s)}" if task.remaining_s is not None and task.done < task.total \
        else ""
    return f"{task.done} of {task.total} done{eta}"


def took(task: TaskResult) -> str:
    """How long a task that ended ran, as " in 47s" ("" when its times are not known)."""
    if not task.started_at or not task.ended_at:
        return ""
    seconds = (datetime.fromisoformat(task.ended_at) - datetime.fromisoformat(task.started_at)).total_seconds()
    return f" in {short_duration(seconds)}"


def path_lines(path: str, width: int) -> list[str]:
    """``path`` in lines of at most ``width`` characters, each broken after a '/' (inside a name only where the name
    alone is wider than a line)."""
    width = max(width, 1)
    lines = [""]
    for part in re.findall(r"[^/]*/|[^/]+", path):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
        while len(lines[-1]) > width:
            lines[-1:] = [lines[-1][:width], lines[-1][width:]]
    return lines


class WholePath(Widget):
    """A path field's value, whole, under the field when the field is too narrow to show all of it."""

    path = reactive("", layout=True)

    def get_content_height(self, container, viewport, width: int) -> int:
        return 0 if len(self.path) < width else len(path_lines(self.path, width))  # the field's cursor takes a cell

    def render(self) -> Content:
        width = self.content_size.width
        return Content("" if len(self.path) < width else "\n".join(path_lines(self.path, width)))


class TaskScreen(Screen):
    """A follow-up command on a run. Subclasses name the command, the fields and how the outcome reads."""

    CSS_PATH = "followup.tcss"
    BINDINGS = [Binding("escape", "back", "Back", tooltip="Back to the dashboard; a started command goes on"),
                Binding("ctrl+r", "start", "Start", tooltip="Check the values and start")]
    COMMAND = ""
    TITLE = ""
    FIELDS: tuple[tuple[str, str], ...] = ()  # (config key, label)
    DEFAULTS: dict[str, str] = {}  # prefilled values that do not come from the run
    TARGET = ""  # the field naming where the output goes

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.started: TaskResult | None = None  # the started command
        self.target: Path | None = None  # where the output goes, fixed at Start
        self._tail: LogTail | None = None
        self.job = None  # the run, once the form is prepared
        self.prefilled: dict[str, str] = {}  # the fields as the run filled them

    def compose(self) -> ComposeResult:
        yield Static(f"{self.TITLE} · run {printable_line(self.run_dir.name)}", id="title", markup=False)
        with VerticalScroll(id="form"):
            for key, label in self.FIELDS:
                with Horizontal(classes="row"):
                    yield Label(label, classes="label")
                    yield Input(id=key, disabled=True, compact=True)
                if key == self.TARGET:
                    yield WholePath(id="whole-path")
            yield Static("", id="note", markup=False)
            yield Button("Start", id="start", variant="primary", disabled=True, compact=True)
            yield Static("reading the run…", id="status", markup=False)
            yield Static("", id="result", markup=False)
            yield Static("", id="log", markup=False)
        yield Footer()

    # the form
    def on_mount(self) -> None:
        self.run_worker(self.prepare, name="reading the run", group=PREPARE, thread=True, exit_on_error=False)

    def prepare(self) -> tuple[dict[str, str], str]:
        """The fields' starting values (the run's, then DEFAULTS) and a note for the user."""
        from engine.infer.followup import followup_values
        from engine.rundir.jobs import find_job

        job = self.job = find_job(str(self.run_dir))
        values = {key: printable_line(value) for key, value in followup_values(job, self.COMMAND).items()}
        fields = self.prefilled = {key: values.get(key, self.DEFAULTS.get(key, "")) for key, _ in self.FIELDS}
        return fields, self.note(job, fields)

    def note(self, job, fields: dict[str, str]) -> str:
        return ""

    def flags(self) -> list[str]:
        flags = ["--run", str(self.run_dir)]
        for key, _ in self.FIELDS:
            value = self.query_one(f"#{key}", Input).value.strip()
            if value:
                flags += [f"--{key}", value]
        return flags

    def check(self, flags: list[str]) -> list[str]:
        """The command's config from these flags as the command itself will build it; ConfigError/UserError if bad."""
        from engine.infer.followup import load_followup_config

        load_followup_config(list(flags), self.COMMAND)
        return flags

    # running it
    def action_start(self) -> None:
        if self.started is not None or self.query_one("#start", Button).disabled:
            return
        flags = self.flags()
        self.run_worker(lambda: self.check(flags), name="checking the values", group=CHECK, thread=True,
                        exit_on_error=False)

    def launch(self, flags: list[str]) -> None:
        self.target = Path(self.query_one(f"#{self.TARGET}", Input).value).expanduser().absolute()
        log_path = self.log_path()
        self._tail = LogTail(log_path, lines=12)
        self.started = start_task(self.COMMAND, flags, log_path)
        for widget in self.query(Input):
            widget.disabled = True
        self.query_one("#start", Button).disabled = True
        self.query_one("#status", Static).update(f"started (pid {self.started.pid}) · log: {log_path}")
        self.query_one("#status").scroll_visible(animate=False)
        self.set_timer(POLL_S, self._poll)

    def log_path(self) -> Path:
        raise NotImplementedError

    def _poll(self) -> None:
        self.run_worker(self.read_state, name="following the command", group=POLL, thread=True, exit_on_error=False)

    def read_state(self) -> TaskState:
        """The task's own result file says how it stands; a task that died without writing its end failed."""
        log = self._tail.read()
        result = read_task(result_path_for(self._tail.path)) or self.started
        if result.state == "running" and result.alive:
            return TaskState(True, None, log, result)
        if result.state == "running":
            return TaskState(False, None, log, result,
                             error=f"its process (pid {result.pid}) ended without writing a result")
        return TaskState(False, result.exit_code, log, result,
                         "\n".join(result.summary) if result.state == "completed" else None, result.error)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place this screen's workers end."""
        worker = event.worker
        if event.state == WorkerState.ERROR:
            text = failure_text(worker.error)
            self.query_one("#status", Static).update(
                f"cannot {self.COMMAND} this run: {text}" if worker.group == PREPARE else text)
            self.query_one("#status").add_class("error")
            if worker.group == POLL:
                self.set_timer(POLL_S, self._poll)
            return
        if event.state != WorkerState.SUCCESS:
            return
        if worker.group == PREPARE:
            values, note = worker.result
            for key, value in values.items():
                field = self.query_one(f"#{key}", Input)
                field.value, field.disabled = value, False
            self.query_one("#note", Static).update(note)
            self.query_one("#start", Button).disabled = False
            self.query_one("#status", Static).update("Start (Ctrl-R) runs it in the background")
            self.query_one(Input).focus()
        elif worker.group == CHECK:
            self.query_one("#status").remove_class("error")
            self.launch(worker.result)
        elif worker.group == POLL:
            self.show(worker.result)

    def show(self, state: TaskState) -> None:
        """While it runs: its progress and the end of its log; once done: the result alone (the log ends with it)."""
        log = self.query_one("#log", Static)
        log.update("\n".join(state.log))
        status = self.query_one("#status", Static)
        if state.running:
            progress = progress_text(state.task)
            status.update(f"running (pid {self.started.pid})" + (f" · {progress}" if progress else "")
                          + f" · log: {self._tail.path}")
            self.set_timer(POLL_S, self._poll)
        elif state.exit_code == 0:
            status.update(f"finished{took(state.task)} · log: {self._tail.path}")
            status.add_class("done")
            log.display = False
            self.query_one("#result", Static).update(state.result or "")
        else:
            code = f" (exit {state.exit_code})" if state.exit_code is not None else ""
            status.update(f"failed{code}" + (f": {state.error}" if state.error else ""))
            status.add_class("error")

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == self.TARGET:
            self.query_one(WholePath).path = event.value

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_start()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            event.stop()
            self.action_start()

    def action_back(self) -> None:
        self.dismiss()

    def system_commands(self):
        yield SystemCommand(f"Start {self.COMMAND}", "Check the values and start", self.action_start)
        yield SystemCommand("Back", "Back to the dashboard; a started command goes on", self.action_back)


class PredictScreen(TaskScreen):
    COMMAND = "predict"
    TITLE = "Predict: generate for a dataset and score it (BLEU-4, ROUGE)"
    FIELDS = (("dataset", "Dataset"), ("max_samples", "Max samples"), ("max_new_tokens", "Max new tokens"),
              ("output_dir", "Output dir"))
    DEFAULTS = {"max_samples": "100", "max_new_tokens": "256"}
    TARGET = "output_dir"

    def note(self, job, fields: dict[str, str]) -> str:
        from engine.infer.followup import training_data_warning
        from engine.rundir.jobs import reward_method

        scores = ("a reward model: it scores both replies of each ranking pair and reports how often the chosen one "
                  "scores higher (predict_accuracy)") if job.status and reward_method(job.status.method) else ""
        warning = training_data_warning(job, fields["dataset"])
        if warning or fields["dataset"] != self.prefilled["dataset"]:
            return " · ".join(filter(None, (scores, warning)))
        return " · ".join(filter(None, (scores, "the dataset is the run's eval_dataset")))

    def on_input_changed(self, event: Input.Changed) -> None:
        super().on_input_changed(event)
        if event.input.id == "dataset" and self.job is not None:
            self.query_one("#note", Static).update(self.note(self.job, {"dataset": event.value.strip()}))

    def log_path(self) -> Path:
        return self.target / "predict.log"


class ExportScreen(TaskScreen):
    COMMAND = "export"
    TITLE = "Export: a standalone model, written as checked safetensors"
    FIELDS = (("export_dir", "Export dir"), ("export_size", "Shard size GB"))
    DEFAULTS = {"export_size": "5"}
    TARGET = "export_dir"

    def note(self, job, fields: dict[str, str]) -> str:
        from engine.infer.export import export_note

        return export_note(job)

    def log_path(self) -> Path:
        return self.run_dir / f"export-{datetime.now():%Y%m%d-%H%M%S}.log"
