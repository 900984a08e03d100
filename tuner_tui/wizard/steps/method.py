"""Step 3, Method: the stage (supervised fine-tuning, DPO on preference pairs, KTO on replies marked desirable or
not, a reward model on preference pairs, pre-training on raw text), what trains (LoRA, QLoRA, freeze or full) with
the memory estimate for each and whether it fits the chosen GPUs, the method recommended and why, and the settings
of the method and stage chosen."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.suggester import Suggester
from textual.widgets import DataTable, Label, Select, Static

from engine.errors import ConfigError
from tuner_tui.wizard.state import method_keys
from tuner_tui.wizard.steps.base import WizardStep, field_row, setting_row


LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_target")
# The settings each preference stage shows (the others are hidden while it is chosen).
STAGE_FIELDS = {"dpo": ("pref_beta", "pref_loss", "pref_ftx"),
                "kto": ("pref_beta", "kto_chosen_weight", "kto_rejected_weight")}
PREFERENCE_FIELDS = ("pref_beta", "pref_loss", "pref_ftx", "kto_chosen_weight", "kto_rejected_weight")
# The stages that may start from a finished LoRA run (a preference stage trains its adapter on; a reward model merges
# it and trains a new adapter with its score head).
START_FROM_RUN = ("dpo", "kto", "rm")
# The settings that act for each method (row ids of the body); the others are hidden while it is chosen.
METHOD_FIELDS = {"full": (), "freeze": ("freeze_trainable_layers",), "lora": LORA_FIELDS,
                 "qlora-8bit": (*LORA_FIELDS, "qlora-bits"), "qlora-4bit": (*LORA_FIELDS, "qlora-bits")}


FROM_SCRATCH = "the model itself (a new adapter)"


def _runs_to_start_from(model: str, stage: str) -> list[tuple[str, str]]:
    """(label, adapters) of each finished LoRA run of ``model`` that ``stage`` can start from, newest first (a
    reward model's adapter only for another reward model): the run's directory after the adapters it merged into
    its base (engine.infer.followup.adapter_chain), so its model is the one the new stage starts from."""
    from engine.errors import UserError
    from engine.infer.followup import adapter_chain, run_config_values
    from engine.rundir.jobs import adapters_of, job_row, reward_method

    runs = []
    for job in adapters_of(model):
        row = job_row(job)
        if reward_method(job.status.method) and stage != "rm":
            continue
        try:
            chain = adapter_chain(run_config_values(job), str(job.dir))
        except UserError:  # its config.yaml gone: not a run to start from
            continue
        runs.append((f"{row['name'] or row['id']} · {row['method']} · loss {row['loss'] or '?'} · {row['started']}",
                     chain))
    return runs


class ListSuggester(Suggester):
    """Completes the last name of a comma list from the names given (set once they are known)."""

    def __init__(self) -> None:
        super().__init__(use_cache=False)
        self.names: list[str] = []

    async def get_suggestion(self, value: str) -> str | None:
        last = value.rpartition(",")[2].lstrip()
        if not last:
            return None
        return next((value + name[len(last):] for name in self.names if name.startswith(last) and name != last),
                    None)


class MethodStep(WizardStep):
    TITLE = "Method: what trains, and the memory it needs"
    STEP = 3
    CHECKED = ("stage", "lora_rank", "lora_alpha", "lora_target", "freeze_trainable_layers", "strategy",
               *PREFERENCE_FIELDS, "adapter_name_or_path")
    BINDINGS = [Binding("ctrl+t", "strategy", "Strategy", tooltip="Choose how the GPUs share the model")]
    AUTO_FOCUS = "#methods"  # the table of methods; the stage (sft preselected) sits above it, a Shift+Tab away

    def __init__(self) -> None:
        super().__init__()
        self.target_names = ListSuggester()
        self.troubled: set[str] = set()  # fields with a problem shown: they stay in sight whatever the method

    def body(self) -> ComposeResult:
        yield from setting_row("stage", "Stage", self.choices)
        yield DataTable(id="methods", cursor_type="row")
        yield Static("estimating…", id="reason")
        yield from setting_row("strategy", "Strategy", self.choices)
        yield Static("", id="strategy-note", classes="hint")
        yield from setting_row("lora_rank", "LoRA rank", self.choices)
        yield from setting_row("lora_alpha", "LoRA alpha", self.choices)
        yield from setting_row("lora_target", "LoRA targets", self.choices, suggester=self.target_names)
        yield Static("", id="targets", classes="hint")
        yield from setting_row("freeze_trainable_layers", "Freeze layers", self.choices)
        with Horizontal(classes="row", id="row-qlora-bits"):
            yield Label("QLoRA bits", classes="label")
            yield Select([("4-bit", 4), ("8-bit", 8)], id="qlora-bits", prompt="none: 16-bit weights")
        yield Static("", classes="error")
        yield from setting_row("pref_beta", "Beta", self.choices)
        yield from setting_row("pref_loss", "Preference loss", self.choices)
        yield from setting_row("pref_ftx", "SFT loss weight", self.choices)
        yield from setting_row("kto_chosen_weight", "Desirable weight", self.choices)
        yield from setting_row("kto_rejected_weight", "Undesirable weight", self.choices)
        start = Select([], id="adapter_name_or_path", prompt=FROM_SCRATCH)
        start.tooltip = ("Continue from a finished LoRA run of this model (adapter_name_or_path): DPO and KTO train "
                         "its adapter on, against it as the reference; a reward model merges it and trains a new "
                         "adapter with its score head")
        yield from field_row("Start from", start)

    def on_mount(self) -> None:
        self._show_strategy(False)
        self._show_method_fields()
        self._estimate()
        self._list_runs()

    def _list_runs(self) -> None:
        """The finished LoRA runs of the model chosen, to start a preference stage or reward model from (a worker:
        it reads every indexed run)."""
        if self.choices.values.get("stage") in START_FROM_RUN:
            model, stage = str(self.choices.values.get("model_name_or_path", "")), self.choices.values["stage"]
            self.work("runs", lambda: _runs_to_start_from(model, stage), "listing the runs to start from")
        else:
            self.workers.cancel_group(self, "runs")

    def _show_method_fields(self) -> None:
        """Only the settings that act for the method chosen (LoRA's for LoRA and QLoRA, the bits for QLoRA, the
        layers for freeze); one with a problem stays, so that it can be mended."""
        wanted = METHOD_FIELDS[self.choices.method or "lora"]
        wanted += STAGE_FIELDS.get(self.choices.values.get("stage"), ())
        wanted += ("adapter_name_or_path",) if self.choices.values.get("stage") in START_FROM_RUN else ()
        for key in (*LORA_FIELDS, "freeze_trainable_layers", "qlora-bits", *PREFERENCE_FIELDS, "adapter_name_or_path"):
            shown = key in wanted or key in self.troubled
            for widget in self.query(f"#row-{key}, #err-{key}" + (", #targets" if key == "lora_target" else "")):
                widget.display = shown
        focused = self.focused
        if focused is not None and not all(node.display for node in (focused, *focused.ancestors)):
            self.query_one("#methods", DataTable).focus()  # its row was hidden: back to the table of methods

    def show_problems(self, problems: dict[str, str]) -> None:
        super().show_problems(problems)
        self.troubled = set(problems)
        self._show_method_fields()

    def _show_strategy(self, shown: bool) -> None:
        """The strategy row, only for a run of several processes."""
        for widget in self.query("#row-strategy, #err-strategy, #strategy-note"):
            widget.display = shown
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "strategy":
            return self.query_one("#row-strategy").display
        return super().check_action(action, parameters)

    def action_strategy(self) -> None:
        self.query_one("#strategy", Select).focus()

    def changed(self, key: str) -> None:
        if key == "strategy" and self.choices.values.get("strategy") != self.choices.values.get("_strategy_auto"):
            self.choices.values.pop("_strategy_auto", None)  # the user's choice from now on
        if key == "stage":
            start = self.query_one("#adapter_name_or_path", Select)
            cannot_start = self.choices.values.get("stage") not in START_FROM_RUN or self._reward_start_left()
            if cannot_start and start.value is not Select.NULL:  # a supervised run, or a reward model's for dpo
                start.clear()
                self.choices.values.pop("adapter_name_or_path", None)
            self._show_method_fields()
            self._list_runs()
        self.later("estimate", self._estimate)

    def _reward_start_left(self) -> bool:
        """A reward model's run chosen to start from, and the stage no longer rm: it cannot start another stage."""
        from engine.models.loading import reward_adapter

        chosen = str(self.choices.values.get("adapter_name_or_path") or "").split(",")[-1].strip()
        return bool(chosen) and self.choices.values.get("stage") != "rm" and reward_adapter(chosen)

    def _estimate(self) -> None:
        self.work("estimate", self._recommend, "estimating memory")

    def _recommend(self):
        from engine.memory.estimate import linear_names
        from engine.memory.recommend import (llamafactory_size, memory_budget, model_geometry, recommend,
                                             shape_from_config)

        geometry = model_geometry(self.choices.values["model_name_or_path"], self.choices.model_section())
        problems, layers = self._problems(geometry), linear_names(geometry)
        try:
            cfg = self.choices.config()
        except ConfigError:
            if problems:
                return None, problems, layers, None, None  # shown beside the fields; the estimate waits for them
            raise  # another step's value: failed() shows it where the estimate goes
        gpus = self.app.chosen_gpus()
        world = self.choices.world_size(len(gpus))
        rec = recommend(shape_from_config(cfg, geometry, world), memory_budget(gpus))
        return rec, problems, layers, llamafactory_size(geometry), world

    def _problems(self, geometry) -> dict[str, str]:
        """The engine's complaints, and LoRA targets this model does not have (they would fail once it loads)."""
        from engine.memory.estimate import lora_target_problem

        problems = self.choices.problems(self.CHECKED)
        target = lora_target_problem(geometry, str(self.choices.values.get("lora_target") or "all"))
        if target:
            problems.setdefault("lora_target", target)
        return problems

    def check(self) -> dict[str, str]:
        from engine.memory.recommend import model_geometry

        return self._problems(model_geometry(self.choices.values["model_name_or_path"], self.choices.model_section()))

    def done(self, group: str, result: Any) -> None:
        if group == "runs":
            self._fill_runs(result)
            return
        rec, problems, layers, size, world = result
        self.show_problems(problems)
        self._strategy(rec, world)
        self.target_names.names = ["all", *layers]
        targets = self.query_one("#targets", Static)
        if rec is None:
            targets.update(f"{', '.join(layers)} or all")
            self.query_one("#reason", Static).update("the estimate waits for the values marked below")
            return
        lora = next(row.estimate for row in rec.rows if row.method == "lora")
        targets.update(f"{', '.join(layers)} or all · LoRA trains {_count(lora.trainable_params)} parameters")
        model = str(self.choices.values.get("model_name_or_path", ""))
        if self.choices.method is None or self.choices.preselected_for not in (None, model):
            self.choices.method = None  # the recipe of the model now chosen decides, not the last one's method
            self.choices.method = self.choices.recipe_method() or rec.method or "lora"
            self.choices.preselected_for = model
        from engine.memory.recommend import llamafactory_caption

        self._fill_table(rec, "LLaMA-Factory GB" if size[1] else None)
        self._show_method_fields()
        notes = [f"{row.label}: {row.note}" for row in rec.rows if row.note]
        lines = [*(f"  · {idea}" for idea in rec.suggestions), *notes, llamafactory_caption(*size)]
        recipe = self.choices.recipe()
        if recipe.model:
            lines.append(recipe.describe())
        why = Text(f"\n{rec.why}", style="bold") if rec.why else ""  # beside the recommendation, in sight
        self.query_one("#reason", Static).update(Text.assemble(rec.reason, why, "\n", "\n".join(lines)))

    def _strategy(self, rec, world: int | None) -> None:
        """Several processes: the strategy row, preselected to the recommended one until the user chooses; one: none."""
        values = self.choices.values
        if world is None:
            return  # the estimate waits for the values marked; so does the strategy
        self._show_strategy(world > 1)
        if world <= 1:
            values.pop("strategy", None)
            values.pop("_strategy_auto", None)
            return
        if rec is None:
            return
        from engine.memory.recommend import STRATEGY_LABELS

        note = self.query_one("#strategy-note", Static)
        if rec.strategy is None:
            note.update(f"no strategy fits a method on {world} GPUs")
            return
        note.update(f"recommended for {world} GPUs: {STRATEGY_LABELS[rec.strategy]} (strategy {rec.strategy}); "
                    "estimates are per GPU with the strategy chosen")
        current = values.get("strategy") or ""
        if current in ("", values.get("_strategy_auto")) and current != rec.strategy:
            values["_strategy_auto"] = rec.strategy
            self.query_one("#strategy", Select).value = rec.strategy

    def _fill_table(self, rec, seed_label: str | None) -> None:
        """The rows of ``rec``; a re-estimate changes the cells in place, so the cursor (the method chosen) stays."""
        table = self.query_one("#methods", DataTable)
        columns = {"method": "Method", "estimate": "Our estimate GiB", "fits": "Fits"}
        if seed_label:
            columns["seed"] = seed_label
        cells = {}
        for row in rec.rows:
            fits = "—" if row.fits is None else "✔ yes" if row.fits else "✘ no"
            star = " ★" if row.method == rec.method else ""
            cells[row.method] = [row.label + star, f"{row.estimate.total_gib:g}", fits, str(row.llamafactory_gb)]
        if [key.value for key in table.columns] == list(columns) and table.row_count == len(cells):
            for method, values in cells.items():
                for key, value in zip(columns, values):
                    table.update_cell(method, key, value)
            return
        table.clear(columns=True)
        for key, label in columns.items():
            table.add_column(label, key=key)
        for method, values in cells.items():
            table.add_row(*values[:len(columns)], key=method)
        table.move_cursor(row=table.get_row_index(self.choices.method))

    def failed(self, group: str, text: str) -> bool:
        if group == "estimate":
            self.query_one("#reason", Static).update(Text(f"no estimate: {text}", style="bold"))
            return True
        return super().failed(group, text)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_next()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        method = event.row_key.value
        table = event.data_table
        if not 0 <= table.cursor_row < table.row_count or table.ordered_rows[table.cursor_row].key != event.row_key:
            return  # stale: the table was refilled and its cursor moved to the chosen method since
        # The chosen method's row again (a refill's late echo) changes nothing: the bits may be changing under the
        # user's hand right now, and resetting them from this row would undo that.
        if method and method != self.choices.method:
            self._choose(method)
            bits = self.query_one("#qlora-bits", Select)
            wanted = method_keys(method)["quantization_bit"] or Select.NULL
            if bits.value != wanted:
                bits.value = wanted

    def _fill_runs(self, runs: list[tuple[str, str]]) -> None:
        """The runs listed, and an adapter given otherwise (a config file, an earlier session) shown as given, so
        that what the run starts from is always in sight. A list that arrives after the stage went back to sft is
        not used."""
        if self.choices.values.get("stage") not in START_FROM_RUN:
            return
        start = self.query_one("#adapter_name_or_path", Select)
        chosen = self.choices.values.get("adapter_name_or_path") or ""
        if chosen and chosen not in {path for _, path in runs}:
            runs = [(f"{chosen} (given)", chosen), *runs]
        start.set_options(runs)
        start.prompt = FROM_SCRATCH if runs else f"{FROM_SCRATCH}: no finished LoRA run of this model"
        if chosen:
            start.value = chosen

    def on_select_changed(self, event: Select.Changed) -> None:
        """QLoRA bits pick the QLoRA row; clearing them goes back to LoRA. A run to start from is its adapter."""
        if event.select.id == "adapter_name_or_path":
            self.choices.values["adapter_name_or_path"] = "" if event.value is Select.NULL else str(event.value)
            if event.value is not Select.NULL and self.choices.method in ("full", "freeze"):
                self._choose("lora")  # a LoRA run's adapter trains on as LoRA
                for table in self.query("#methods").results(DataTable):
                    if table.row_count:
                        table.move_cursor(row=table.get_row_index("lora"))
            self.changed("adapter_name_or_path")
            return
        if event.select.id != "qlora-bits":
            return
        current = self.choices.method or "lora"
        method = f"qlora-{event.value}bit" if event.value is not Select.NULL else \
            "lora" if current.startswith("qlora-") else current
        if method != current:
            self._choose(method)
            for table in self.query("#methods").results(DataTable):
                if table.row_count:
                    table.move_cursor(row=table.get_row_index(method))

    def _choose(self, method: str) -> None:
        """Choose ``method``; one that switches the model's recipe on or off changes the settings: estimate again."""
        recipe_before = bool(self.choices.recipe().applied)
        if method != self.choices.method:
            self.choices.preselected_for = None  # the user's choice from now on
        self.choices.method = method
        self._show_method_fields()
        if bool(self.choices.recipe().applied) != recipe_before:
            self.later("estimate", self._estimate)


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
