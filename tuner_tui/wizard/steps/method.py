"""Step 3, Method: what trains (LoRA, QLoRA, freeze or full), with the memory estimate for each and whether it
fits the chosen GPUs, and the LoRA settings."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.suggester import Suggester
from textual.widgets import DataTable, Label, Select, Static

from engine.errors import ConfigError
from tuner_tui.wizard.state import method_keys
from tuner_tui.wizard.steps.base import WizardStep, setting_row


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
    CHECKED = ("lora_rank", "lora_alpha", "lora_target", "freeze_trainable_layers")

    def __init__(self) -> None:
        super().__init__()
        self.target_names = ListSuggester()

    def body(self) -> ComposeResult:
        table = DataTable(id="methods", cursor_type="row")
        table.add_columns("Method", "Our estimate GiB", "Seed table GB", "Fits")
        yield table
        yield Static("estimating…", id="reason")
        yield from setting_row("lora_rank", "LoRA rank", self.choices)
        yield from setting_row("lora_alpha", "LoRA alpha", self.choices)
        yield from setting_row("lora_target", "LoRA targets", self.choices, suggester=self.target_names)
        yield Static("", id="targets", classes="hint")
        yield from setting_row("freeze_trainable_layers", "Freeze layers", self.choices)
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
        from engine.memory.estimate import linear_names
        from engine.memory.recommend import memory_budget, model_geometry, recommend, shape_from_config

        geometry = model_geometry(self.choices.values["model_name_or_path"])
        problems, layers = self._problems(geometry), linear_names(geometry)
        try:
            cfg = self.choices.config()
        except ConfigError:
            if problems:
                return None, problems, layers  # shown beside the fields; the estimate waits for them
            raise  # another step's value: failed() shows it where the estimate goes
        gpus = self.app.chosen_gpus()
        rec = recommend(shape_from_config(cfg, geometry, max(1, len(gpus))), memory_budget(gpus))
        return rec, problems, layers

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

        return self._problems(model_geometry(self.choices.values["model_name_or_path"]))

    def done(self, group: str, result: Any) -> None:
        rec, problems, layers = result
        self.show_problems(problems)
        self.target_names.names = ["all", *layers]
        targets = self.query_one("#targets", Static)
        if rec is None:
            targets.update(f"{', '.join(layers)} or all")
            self.query_one("#reason", Static).update("the estimate waits for the values marked below")
            return
        lora = next(row.estimate for row in rec.rows if row.method == "lora")
        targets.update(f"{', '.join(layers)} or all · LoRA trains {_count(lora.trainable_params)} parameters")
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
            self.query_one("#reason", Static).update(Text(f"no estimate: {text}", style="bold"))
            return True
        return super().failed(group, text)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_next()

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
        if event.select.id != "qlora-bits":
            return
        current = self.choices.method or "lora"
        method = f"qlora-{event.value}bit" if event.value is not Select.NULL else \
            "lora" if current.startswith("qlora-") else current
        if method != current:
            self.choices.method = method
            for table in self.query("#methods").results(DataTable):
                if table.row_count:
                    table.move_cursor(row=table.get_row_index(method))


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
