"""The wizard's six steps. Each lays out widgets and calls the engine in thread workers; one handler per screen
turns a worker's result or failure into what the screen shows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
import threading
from functools import partial
from typing import Any

from rich.text import Text
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.content import Content
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Button, DataTable, Footer, Input, Label, OptionList, Select, SelectionList, Static
from textual.widgets.option_list import Option
from textual.worker import Worker, WorkerState

from engine.errors import ConfigError, UserError
from tuner_tui.wizard.state import Choices, method_keys, save_config, start_run

NEXT = "next"
PREVIEWING = threading.Lock()
LEARNED = "$text-success on $success-muted"
DEBOUNCE_S = 0.3


def failure_text(error: BaseException | None) -> str:
    if isinstance(error, ConfigError):
        return "; ".join(error.problems)
    if isinstance(error, UserError):
        return str(error)
    return f"{type(error).__name__}: {error}"


class Field(Input):
    """An input bound to one config key: what is typed is kept in the wizard's choices at once."""

    def __init__(self, key: str, choices: Choices, placeholder: str = "", **kwargs: Any):
        super().__init__(value=str(choices.values.get(key, "")), placeholder=placeholder, id=key, **kwargs)
        self.key = key


def field_row(label: str, field: Input) -> ComposeResult:
    with Horizontal(classes="row"):
        yield Label(label, classes="label")
        yield field
    yield Static("", id=f"err-{field.id}", classes="error")


class WizardStep(Screen):
    """A step: title, body, Back/Next, footer. Subclasses say what Next checks (in a worker) and what to do with
    workers' results."""

    CSS_PATH = "wizard.tcss"
    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="The previous step; what was entered is kept"),
        Binding("ctrl+n", "next", "Next", tooltip="Check this step and go on"),
    ]
    TITLE = ""
    STEP = 0
    CHECKED: tuple[str, ...] = ()  # config keys whose engine complaints block Next

    def __init__(self) -> None:
        super().__init__()
        self._debounce: dict[str, Timer] = {}

    @property
    def choices(self) -> Choices:
        return self.app.choices

    def compose(self) -> ComposeResult:
        yield Static(f"Step {self.STEP}/6 · {self.TITLE}", id="title")
        with VerticalScroll(id="body"):
            yield from self.body()
        with Horizontal(id="nav"):
            yield Button("Back", id="back")
            yield from self.nav_buttons()
        yield Footer()

    def body(self) -> ComposeResult:
        yield from ()

    def nav_buttons(self) -> ComposeResult:
        yield Button("Next", id="next", variant="primary")

    # workers and their one handler
    def work(self, group: str, fn: Callable[[], Any], name: str) -> None:
        self.run_worker(fn, name=name, group=group, thread=True, exclusive=True, exit_on_error=False)

    def later(self, group: str, start: Callable[[], None]) -> None:
        """Run ``start`` once typing has paused (a debounce per group)."""
        if group in self._debounce:
            self._debounce[group].stop()
        self._debounce[group] = self.set_timer(DEBOUNCE_S, start)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state == WorkerState.SUCCESS:
            if worker.group == NEXT:
                problems = worker.result or {}
                self.show_problems(problems)
                if not problems:
                    self.app.advance(self)
            else:
                self.done(worker.group, worker.result)
        elif event.state == WorkerState.ERROR:
            text = failure_text(worker.error)
            if not self.failed(worker.group, text):
                self.notify(text, title=f"{worker.name} failed", severity="error", timeout=8, markup=False)

    def done(self, group: str, result: Any) -> None:
        """A worker's result."""

    def failed(self, group: str, text: str) -> bool:
        """A worker's failure; True when shown beside a field, else it becomes a notification."""
        if group == NEXT and self.CHECKED:
            self.show_problems({self.CHECKED[0]: text})
            return True
        return False

    def show_problems(self, problems: dict[str, str]) -> None:
        for key in self.CHECKED:
            for error in self.query(f"#err-{key}"):
                error.update(Text(problems.get(key, ""), style="bold"))

    def check(self) -> dict[str, str]:
        """What Next checks (runs in a worker): the problems per key, empty to go on."""
        return self.choices.problems(self.CHECKED)

    # actions
    def action_next(self) -> None:
        self.work(NEXT, self.check, "checking this step")

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        action = getattr(self, f"action_{event.button.id}", None)
        if action:
            event.stop()
            action()

    def on_input_changed(self, event: Input.Changed) -> None:
        if isinstance(event.input, Field):
            self.choices.values[event.input.key] = event.value
            self.changed(event.input.key)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_next()

    def changed(self, key: str) -> None:
        """A field changed (its value is already in the choices)."""

    def system_commands(self) -> Iterable[SystemCommand]:
        yield SystemCommand("Next step", "Check this step and go on", self.action_next)
        yield SystemCommand("Previous step", "Go back a step, keeping what was entered", self.action_back)


class HardwareStep(WizardStep):
    TITLE = "Hardware: the GPUs to train on"
    STEP = 1
    CHECKED = ("gpus",)

    def body(self) -> ComposeResult:
        yield Static("probing the GPUs…", id="gpu-info")
        yield SelectionList[int](id="gpu-list")
        yield Static("", id="err-gpus", classes="error")

    def on_mount(self) -> None:
        self.work("probe", self.app.probe, "probing the GPUs")

    def done(self, group: str, state: Any) -> None:
        self.app.hardware = state
        info = self.query_one("#gpu-info", Static)
        chosen = self.query_one(SelectionList)
        chosen.clear_options()
        if not state.gpus:
            info.update(Text(f"{state.message or 'no NVIDIA GPU found'}.\nOnly small models such as the demo "
                             "models (tiny-llama, tiny-mistral, tiny-mixtral) train in reasonable time there.",
                             style="bold"))
            chosen.display = False
            return
        lines = [f"driver {state.driver_version or '?'} · CUDA {state.cuda_version or '?'}"]
        for gpu in state.gpus:
            lines.append(f"GPU {gpu.index}: {gpu.name} · {_gib(gpu.memory_free_gib)}/{_gib(gpu.memory_total_gib)} "
                         f"GiB free · util {_n(gpu.utilization_pct, '%')} · {_n(gpu.temperature_c, ' °C')}")
        info.update("\n".join(lines))
        picked = self.choices.gpus
        for gpu in state.gpus:
            chosen.add_option((f"GPU {gpu.index}: {gpu.name} ({_gib(gpu.memory_total_gib)} GiB)", gpu.index,
                               picked is None or gpu.index in picked))

    def check(self) -> dict[str, str]:
        return {}

    def action_next(self) -> None:
        state = self.app.hardware
        if state is None:
            self.show_problems({"gpus": "the GPUs are still being probed"})
            return
        if state.gpus:
            selected = sorted(self.query_one(SelectionList).selected)
            if not selected:
                self.show_problems({"gpus": "choose at least one GPU to train on"})
                return
            self.choices.gpus = None if len(selected) == len(state.gpus) else selected
        self.show_problems({})
        self.app.advance(self)


class ModelStep(WizardStep):
    TITLE = "Model: a catalog name, a hub id or a local directory"
    STEP = 2
    CHECKED = ("model_name_or_path",)

    def body(self) -> ComposeResult:
        yield Input(placeholder="filter the catalog", id="filter")
        yield OptionList(id="catalog")
        yield from field_row("Model", Field("model_name_or_path", self.choices, "name, hub id or path"))
        yield Static("", id="resolved")

    def on_mount(self) -> None:
        self.rows: list[tuple[str, str]] = []
        self.work("catalog", self._catalog, "reading the catalog")
        if self.choices.values.get("model_name_or_path"):
            self.changed("model_name_or_path")

    @staticmethod
    def _catalog() -> list[tuple[str, str]]:
        from engine.catalog import list_models, param_count

        rows = []
        for spec in list_models():
            count = param_count(spec)
            size = f"{count / 1e9:.1f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"
            rows.append((spec.name, f"{spec.name:<24} {size:>7}  {spec.template}"))
        return rows

    def _show_catalog(self) -> None:
        words = self.query_one("#filter", Input).value.lower().split()
        catalog = self.query_one("#catalog", OptionList)
        catalog.clear_options()
        catalog.add_options([Option(text, id=name) for name, text in self.rows
                             if all(word in text.lower() for word in words)])

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self._show_catalog()
        else:
            super().on_input_changed(event)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.query_one("#model_name_or_path", Input).value = event.option.id

    def changed(self, key: str) -> None:
        self.later("resolve", lambda: self.work("resolve", self.check, "resolving the model"))

    def check(self) -> dict[str, str]:
        from engine.catalog import resolve_model

        name = str(self.choices.values.get("model_name_or_path", "")).strip()
        if not name:
            return {"model_name_or_path": "type a model: a catalog name, a hub id or a local directory"}
        try:
            resolved = resolve_model(name)
        except UserError as exc:
            return {"model_name_or_path": str(exc)}
        self.app.call_from_thread(self._resolved, f"✔ {resolved.source}: {resolved.path}")
        return {}

    def _resolved(self, text: str) -> None:
        self.query_one("#resolved", Static).update(text)

    def done(self, group: str, result: Any) -> None:
        if group == "catalog":
            self.rows = result
            self._show_catalog()
        elif group == "resolve":
            self.show_problems(result)
            if result:
                self._resolved("")


class MethodStep(WizardStep):
    TITLE = "Method: what trains, and the memory it needs"
    STEP = 3
    CHECKED = ("lora_rank", "lora_alpha", "freeze_trainable_layers")

    def body(self) -> ComposeResult:
        table = DataTable(id="methods", cursor_type="row")
        table.add_columns("Method", "Our estimate GiB", "Seed table GB", "Fits")
        yield table
        yield Static("estimating…", id="reason")
        yield from field_row("LoRA rank", Field("lora_rank", self.choices, "8"))
        yield from field_row("LoRA alpha", Field("lora_alpha", self.choices, "2 x rank"))
        yield from field_row("Freeze layers", Field("freeze_trainable_layers", self.choices, "2"))
        with Horizontal(classes="row"):
            yield Label("QLoRA bits", classes="label")
            yield Select([("4-bit", 4), ("8-bit", 8)], id="qlora-bits", prompt="none: 16-bit weights")
        yield Static("", classes="error")

    def on_mount(self) -> None:
        self._estimate()

    def changed(self, key: str) -> None:
        self.later("estimate", self._estimate)

    def _estimate(self) -> None:
        self.work("estimate", self._recommend, "estimating memory")

    def _recommend(self):
        from engine.recommend import memory_budget, model_geometry, recommend, shape_from_config

        values = dict(self.choices.values)
        geometry = model_geometry(values["model_name_or_path"])
        gpus = self.app.chosen_gpus()
        cfg = self.choices.config()
        rec = recommend(shape_from_config(cfg, geometry, max(1, len(gpus))), memory_budget(gpus))
        return rec, self.choices.problems(self.CHECKED)

    def done(self, group: str, result: Any) -> None:
        rec, problems = result
        self.show_problems(problems)
        if self.choices.method is None:
            self.choices.method = rec.method or "lora"
        table = self.query_one("#methods", DataTable)
        table.clear()
        for row in rec.rows:
            fits = "—" if row.fits is None else "✔ yes" if row.fits else "✘ no"
            star = " ★" if row.method == rec.method else ""
            table.add_row(row.label + star, f"{row.estimate.total_gib:g}", str(row.seed_gb), fits, key=row.method)
        table.move_cursor(row=table.get_row_index(self.choices.method))
        reason = rec.reason + "".join(f"\n  · {idea}" for idea in rec.suggestions)
        self.query_one("#reason", Static).update(Text(reason))

    def failed(self, group: str, text: str) -> bool:
        if group == "estimate":
            problems = self.choices.problems(self.CHECKED)
            self.show_problems(problems or {self.CHECKED[0]: text})
            return True
        return super().failed(group, text)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        method = event.row_key.value
        if method:
            self.choices.method = method
            bits = self.query_one("#qlora-bits", Select)
            wanted = method_keys(method)["quantization_bit"] or Select.NULL
            if bits.value != wanted:
                bits.value = wanted

    def on_select_changed(self, event: Select.Changed) -> None:
        """QLoRA bits pick the QLoRA row; clearing them goes back to LoRA."""
        current = self.choices.method or "lora"
        method = f"qlora-{event.value}bit" if event.value is not Select.NULL else \
            "lora" if current.startswith("qlora-") else current
        if method != current:
            self.choices.method = method
            for table in self.query("#methods").results(DataTable):
                if table.row_count:
                    table.move_cursor(row=table.get_row_index(method))


class DataStep(WizardStep):
    TITLE = "Template and dataset"
    STEP = 4
    CHECKED = ("dataset", "dataset_dir", "template")

    def body(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Label("Template", classes="label")
            yield Select([], id="template-select", allow_blank=True, prompt="the model's own")
        yield Static("", id="err-template", classes="error")
        yield from field_row("Dataset dir", Field("dataset_dir", self.choices, "optional: a dataset_info.json folder"))
        with Horizontal(classes="row"):
            yield Label("Registered", classes="label")
            yield Select([], id="dataset-select", prompt="a registered dataset")
        yield from field_row("Dataset", Field("dataset", self.choices, "a registered name or a path"))
        yield Static("", id="preview")

    def on_mount(self) -> None:
        self._names()
        if self.choices.values.get("dataset"):
            self.changed("dataset")

    def _names(self) -> None:
        self.work("names", self._read_names, "reading the templates and datasets")

    def _read_names(self) -> tuple[list[str], list[str], str | None]:
        from engine.catalog import lookup
        from engine.data.registry import dataset_names
        from engine.templates import template_names

        spec = lookup(str(self.choices.values.get("model_name_or_path", "")))
        directory = self.choices.values.get("dataset_dir") or None
        return template_names(), dataset_names(directory), spec.template if spec else None

    def done(self, group: str, result: Any) -> None:
        if group == "names":
            templates, datasets, default = result
            template = self.query_one("#template-select", Select)
            template.set_options([(name, name) for name in templates])
            chosen = self.choices.values.get("template") or default
            if chosen in templates:
                template.value = chosen
            registry = self.query_one("#dataset-select", Select)
            registry.set_options([(name, name) for name in datasets])
            if self.choices.values.get("dataset") in datasets:
                registry.value = self.choices.values["dataset"]
        elif group == "preview":
            self.show_problems({})
            self.query_one("#preview", Static).update(render_preview(result))

    def failed(self, group: str, text: str) -> bool:
        if group in ("preview", "names"):
            self.query_one("#preview", Static).update("")
            self.show_problems({"dataset_dir" if group == "names" else "dataset": text})
            return True
        return super().failed(group, text)

    def on_select_changed(self, event: Select.Changed) -> None:
        value = None if event.value is Select.NULL else str(event.value)
        if event.select.id == "template-select":
            if self.choices.values.get("template") != value:
                self.choices.values["template"] = value or ""
                self.changed("template")
        elif event.select.id == "dataset-select" and value:
            self.query_one("#dataset", Input).value = value

    def changed(self, key: str) -> None:
        if key == "dataset_dir":
            self.later("names", self._names)
        self.later("preview", lambda: self.work("preview", self._preview, "previewing the data"))

    def _preview(self):
        from engine.preview import build_preview

        if not self.choices.values.get("dataset"):
            raise UserError("choose a registered dataset or type a path")
        with PREVIEWING:  # one at a time: a superseded preview may still be reading the same files
            return build_preview(self.choices.config(), 2)

    def check(self) -> dict[str, str]:
        from engine.data.registry import resolve_dataset

        problems = self.choices.problems(self.CHECKED)
        if problems:
            return problems
        directory = self.choices.values.get("dataset_dir") or None
        try:
            for name in str(self.choices.values["dataset"]).split(","):
                resolve_dataset(name.strip(), directory)
        except UserError as exc:
            return {"dataset": str(exc)}
        return {}


def render_preview(preview) -> Content:
    """The first samples, the learned part highlighted, then the token-length stats and the loading report."""
    parts: list = [(f"template {preview.template} · the learned part highlighted\n", "bold")]
    for n, sample in enumerate(preview.samples, 1):
        parts.append((f"── sample {n} ({len(sample.input_ids)} tokens)\n", "$text-muted"))
        parts += [(segment.text, LEARNED) if segment.learned else segment.text for segment in sample.segments]
        parts.append("\n")
    s = preview.stats
    parts.append((f"tokens: {s['count']} samples · mean {s['mean']:.0f} · p50 {s['p50']} · p95 {s['p95']} · "
                  f"max {s['max']} · {s['over_cutoff']} over cutoff_len\n", "bold"))
    parts += [(f"{line}\n", "$text-muted") for line in preview.report]
    return Content.assemble(*parts)


HYPERPARAMETERS = (("learning_rate", "Learning rate", "5e-5"), ("num_train_epochs", "Epochs", "3.0"),
                   ("max_steps", "Max steps", "-1: use epochs"),
                   ("per_device_train_batch_size", "Batch per GPU", "8"),
                   ("gradient_accumulation_steps", "Grad accumulation", "1"), ("cutoff_len", "Cutoff len", "1024"),
                   ("output_dir", "Output dir", "default: saves/<model>/<method>/<time>"))


class HyperparametersStep(WizardStep):
    TITLE = "Hyperparameters"
    STEP = 5
    CHECKED = tuple(key for key, _, _ in HYPERPARAMETERS)

    def body(self) -> ComposeResult:
        for key, label, placeholder in HYPERPARAMETERS:
            yield from field_row(label, Field(key, self.choices, placeholder))

    def changed(self, key: str) -> None:
        self.later("validate", lambda: self.work("validate", self.check, "checking the values"))

    def done(self, group: str, result: Any) -> None:
        self.show_problems(result)


class ReviewStep(WizardStep):
    TITLE = "Review: save the config or start the run"
    STEP = 6
    BINDINGS = [
        Binding("ctrl+s", "save", "Save", tooltip="Write the config YAML to the path given"),
        Binding("ctrl+r", "start", "Start", tooltip="Start the run detached and open its dashboard"),
    ]

    def body(self) -> ComposeResult:
        yield Static("", id="command")
        yield Static("", id="yaml")
        yield from field_row("Save to", Input(value=str(self.choices.values.get("_save_path", "run.yaml")),
                                              id="save_path"))
        yield Static("", id="err-start", classes="error")

    def nav_buttons(self) -> ComposeResult:
        yield Button("Save", id="save")
        yield Button("Start", id="start", variant="success")

    def on_mount(self) -> None:
        self.work("render", lambda: (self.choices.command_line(), self.choices.to_yaml()), "writing the config")

    def done(self, group: str, result: Any) -> None:
        if group == "render":
            command, text = result
            self.query_one("#command", Static).update(Text(command, style="bold"))
            self.query_one("#yaml", Static).update(Text(text))
        elif group == "save":
            self.query_one("#err-save_path", Static).update("")
            self.notify(f"saved to {result}", title="config saved", markup=False)
        elif group == "start":
            self.query_one("#err-start", Static).update("")
            self.app.open_dashboard(result)

    def failed(self, group: str, text: str) -> bool:
        target = {"save": "#err-save_path", "start": "#err-start", "render": "#err-start"}.get(group)
        if target:
            self.query_one(target, Static).update(Text(text, style="bold"))
            return True
        return False

    def on_input_changed(self, event: Input.Changed) -> None:
        self.choices.values["_save_path"] = event.value

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_save()

    def action_next(self) -> None:
        self.action_start()

    def action_save(self) -> None:
        path = self.query_one("#save_path", Input).value
        self.work("save", partial(self._save, path), "saving the config")

    def _save(self, path: str):
        saved = save_config(self.choices, path)
        self.app.remember()
        return saved

    def action_start(self) -> None:
        self.query_one("#err-start", Static).update("starting the run…")
        self.work("start", self._start, "starting the run")

    def _start(self):
        self.app.remember()
        return start_run(self.choices, self.app.visible_devices())

    def system_commands(self) -> Iterable[SystemCommand]:
        yield from super().system_commands()
        yield SystemCommand("Save config", "Write the config YAML to the path given", self.action_save)
        yield SystemCommand("Start run", "Start the run detached and open its dashboard", self.action_start)


STEPS = (HardwareStep, ModelStep, MethodStep, DataStep, HyperparametersStep, ReviewStep)


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}".rstrip("0").rstrip(".")


def _n(value: Any, unit: str) -> str:
    return "?" if value is None else f"{value}{unit}"
