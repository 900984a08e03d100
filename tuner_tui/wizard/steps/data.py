"""Step 4, Template and dataset: the chat template compared with the model's own, and a preview of the data with
its learned part highlighted and its token lengths."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from functools import partial
from typing import Any

from rich.text import Text
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.content import Content
from textual.containers import Horizontal
from textual.widgets import Button, Input, Label, Select, Static

from engine.errors import UserError
from tuner_tui.wizard.steps.base import Field, WizardStep, field_row

PREVIEWING = threading.Lock()
LEARNED = "$text-success on $success-muted"
DEMO_DATASET = "demo_alpaca"  # chosen when no dataset is: it trains any model end to end
DEMO_PAIRS = "demo_pairs"  # ... for stages dpo and rm
DEMO_FEEDBACK = "demo_feedback"  # ... and for stage kto
BUSY = {"template": "comparing the template with the model's own…", "preview": "previewing the data…"}


class DataStep(WizardStep):
    TITLE = "Template and dataset"
    STEP = 4
    CHECKED = ("dataset", "dataset_dir", "template")
    BINDINGS = [Binding("ctrl+o", "browse", "Browse", tooltip="Choose a dataset file from a folder tree")]

    def __init__(self) -> None:
        super().__init__()
        self._checked: dict | None = None  # the model and template the template note was made for
        self._previewed: dict | None = None  # the values the preview was built from
        self._busy: set[str] = set()  # the groups of BUSY whose worker is running
        self._names_for: str | None = None  # the stage the dataset names were read for
        self._registered: list[str] = []  # the registered datasets of that stage

    def body(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Label("Template", classes="label")
            yield Select([], id="template-select", allow_blank=True, prompt="the model's own")
        kept = self.app.data_shown
        yield Static(kept.get("template-note", ""), id="template-note",
                     classes="warning" if kept.get("template-warning") else "")
        yield Static("", id="err-template", classes="error")
        yield from field_row("Dataset dir", Field("dataset_dir", self.choices, "optional: a dataset_info.json folder"))
        with Horizontal(classes="row"):
            yield Label("Registered", classes="label")
            yield Select([], id="dataset-select", prompt="a registered dataset")
        with Horizontal(classes="row", id="row-dataset"):
            yield Label("Dataset", classes="label")
            yield Field("dataset", self.choices, "a registered name, a file or folder, or a hub id")
            yield Button("Browse…", id="browse", tooltip="Choose a dataset file from a folder tree (Ctrl+O)")
        yield Static("", id="err-dataset", classes="error")
        yield Static("", id="data-busy", classes="hint")
        yield Static(self.app.data_shown.get("preview", ""), id="preview")

    def on_mount(self) -> None:
        self._names()

    def on_screen_resume(self) -> None:
        """Shown first, or back from step 5 or the file picker: redo what the values changed since have made stale
        (a new cutoff_len redraws the histogram; another stage lists other datasets)."""
        if self._names_for != self.choices.values.get("stage"):
            self._names()
        self.later("preview", self._refresh)

    def _names(self) -> None:
        self._names_for = self.choices.values.get("stage")
        self.work("names", self._read_names, "reading the templates and datasets")

    def _read_names(self) -> tuple[list[str], list[str], str | None]:
        from engine.models.catalog import lookup
        from engine.data.registry import STAGE_KINDS, load_registry
        from engine.templates import template_names

        spec = lookup(str(self.choices.values.get("model_name_or_path", "")))
        directory = self.choices.values.get("dataset_dir") or None
        wanted = STAGE_KINDS[self.choices.values.get("stage") or "sft"]
        names = [name for name, attr in load_registry(directory).items() if attr.kind in wanted]
        return template_names(), names, spec.template if spec else None

    def changed(self, key: str) -> None:
        if key == "dataset_dir":
            self.later("names", self._names)
        if key == "dataset":  # the registered dataset shown is the one typed, or none
            typed = self.choices.values.get("dataset") or ""
            registry = self.query_one("#dataset-select", Select)
            wanted = typed if typed in self._registered else Select.NULL
            if registry.value != wanted:
                registry.value = wanted
        self.later("preview", self._refresh)

    def _refresh(self) -> None:
        """Compare the template with the model's own, and preview the data, each again only when what it reads
        changed since it last ran."""
        values = self.choices.flat()
        template_inputs = {key: values.get(key) for key in ("model_name_or_path", "template")}
        if template_inputs != self._checked:
            self._checked = template_inputs
            self._start("template", partial(self._check_template, values))
        if values != self._previewed:
            self._previewed = values
            if values.get("dataset"):
                self._start("preview", partial(self._preview, values))
            else:
                self.workers.cancel_group(self, "preview")
                self._settled("preview")
                self._show("preview", "")
                self._problem("dataset", "")

    def _start(self, group: str, fn) -> None:
        """A worker of BUSY's, with its sign shown until it ends; what it replaces stays on screen meanwhile."""
        self._busy.add(group)
        self._show_busy()
        self.work(group, fn, BUSY[group].rstrip("…"))

    def _settled(self, group: str) -> None:
        self._busy.discard(group)
        self._show_busy()

    def _show_busy(self) -> None:
        text = " · ".join(f"⟳ {BUSY[group]}" for group in BUSY if group in self._busy)
        busy = self.query_one("#data-busy", Static)
        busy.update(Content(text))
        busy.display = bool(text)

    def _show(self, widget_id: str, content) -> None:
        """Show ``content`` and keep it for the next time this step opens, until something newer replaces it."""
        self.app.data_shown[widget_id] = content
        self.query_one(f"#{widget_id}", Static).update(content)

    @staticmethod
    def _check_template(values: dict):
        from engine.config.schema import build_config
        from engine.data.preview import check_template

        return check_template(build_config(values))  # engine.models.loading imports transformers one thread at a time

    @staticmethod
    def _preview(values: dict):
        from engine.config.schema import build_config
        from engine.data.preview import build_preview

        with PREVIEWING:  # one at a time: a superseded preview may still be reading the same files
            return build_preview(build_config(values), 2)

    def done(self, group: str, result: Any) -> None:
        if group == "names":
            self._problem("dataset_dir", "")
            templates, datasets, default = result
            template = self.query_one("#template-select", Select)
            template.set_options([(name, name) for name in templates])
            chosen = self.choices.values.get("template") or default
            if chosen in templates:
                template.value = chosen
            registry = self.query_one("#dataset-select", Select)
            registry.set_options([(name, name) for name in datasets])
            self._registered = list(datasets)
            demos = {"sft": DEMO_DATASET, "dpo": DEMO_PAIRS, "kto": DEMO_FEEDBACK, "rm": DEMO_PAIRS}
            demo = demos.get(self.choices.values.get("stage") or "sft", "")
            current = self.choices.values.get("dataset") or ""
            if current in ("", *demos.values()) and current != demo:  # none, or another stage's demo
                current = demo if demo in datasets else ""
                self.query_one("#dataset", Input).value = current  # kept in the choices once the input says so
            if current in datasets:
                registry.value = current
        elif group == "template":
            self._settled("template")
            self._problem("template", "")
            self._show_template_note(result)
        elif group == "preview":
            self._settled("preview")
            self._problem("dataset", "")
            self._show("preview", render_preview(result))

    def _show_template_note(self, check) -> None:
        """A warning when the template renders differently from the model's own chat_template, else a muted note."""
        from engine.templates import AUTO

        if check.warning:
            text = f"⚠ {check.warning}"
        elif not check.has_chat_template:
            text = "the model's tokenizer has no chat_template of its own to compare the template with"
        elif check.template == AUTO:
            text = "the model's own chat_template"
        else:
            text = f"✔ {check.template} renders like the model's own chat_template"
        self.app.data_shown["template-warning"] = bool(check.warning)
        self.query_one("#template-note", Static).set_class(bool(check.warning), "warning")
        self._show("template-note", Content(text))

    def failed(self, group: str, text: str) -> bool:
        """Failures show beside the field they concern; a failed comparison or preview runs again on the next change
        or return to this step."""
        if group == "template":
            self._checked = None
            self._settled("template")
            self._show("template-note", "")
            self._problem("template", text)
            return True
        if group in ("preview", "names"):
            self._previewed = None
            self._settled("preview")
            self._show("preview", "")
            self._problem("dataset_dir" if group == "names" else "dataset", text)
            return True
        return super().failed(group, text)

    def _problem(self, key: str, text: str) -> None:
        self.query_one(f"#err-{key}", Static).update(Text(text, style="bold"))

    def on_select_changed(self, event: Select.Changed) -> None:
        value = None if event.value is Select.NULL else str(event.value)
        if event.select.id == "template-select":
            if self.choices.values.get("template") != value:
                self.choices.values["template"] = value or ""
                self.changed("template")
        elif event.select.id == "dataset-select" and value:
            self.query_one("#dataset", Input).value = value

    def action_browse(self) -> None:
        from tuner_tui.wizard.files import DatasetPicker, start_folder

        values = self.choices.values
        self.app.push_screen(DatasetPicker(start_folder(values.get("dataset"), values.get("dataset_dir"))),
                             self._picked)

    def _picked(self, path: str | None) -> None:
        field = self.query_one("#dataset", Input)
        if path:
            field.value = path
        field.focus()

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

    def system_commands(self) -> Iterable[SystemCommand]:
        yield from super().system_commands()
        yield SystemCommand("Browse for a dataset file", "Choose a dataset file from a folder tree",
                            self.action_browse)


def render_preview(preview) -> Content:
    """The first samples, the learned part highlighted, then the token-length stats, their histogram with cutoff_len
    marked, and the loading report."""
    from engine.data.preview import histogram_lines

    bars = {"within": "$text-primary", "over": "$text-warning", "cutoff": "bold $text-error"}
    parts: list = [(f"template {preview.template} · the learned part highlighted\n", "bold")]
    for n, pair in enumerate(preview.pairs, 1):
        parts.append((f"── pair {n} (prompt {pair.tokens['prompt']} tokens)\n", "$text-muted"))
        parts += [pair.prompt, "\n", ("chosen   ", "bold"), (pair.chosen, LEARNED), "\n", ("rejected ", "bold"),
                  (pair.rejected, "$text-error"), "\n"]
    for n, sample in enumerate(preview.samples, 1):
        judged = "" if sample.label is None else ", desirable" if sample.label else ", undesirable"
        parts.append((f"── sample {n} ({len(sample.input_ids)} tokens{judged})\n", "$text-muted"))
        reply = "$text-error" if sample.label is False else LEARNED
        parts += [(segment.text, reply) if segment.learned else segment.text for segment in sample.segments]
        parts.append("\n")
    s = preview.stats
    parts.append((f"tokens: {s['count']} samples · mean {s['mean']:.0f} · p50 {s['p50']} · p95 {s['p95']} · "
                  f"max {s['max']} · {s['over_cutoff']} over cutoff_len\n", "bold"))
    parts += [(f"{line}\n", bars[kind]) for line, kind in histogram_lines(preview)]
    parts += [(f"{line}\n", "$text-muted") for line in preview.report]
    return Content.assemble(*parts)
