"""Step 2, Model: a catalog name (the catalog filtered as typed), a hub id or a local directory, resolved as it
is typed."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from engine.errors import UserError
from tuner_tui.wizard.steps.base import Field, WizardStep, field_row


WHERE = {"local": "local directory", "demo": "demo model, built on this machine",
         "hub-cache": "in the Hugging Face cache, no download needed", "hub": "on the hub, downloaded when the run starts"}


def describe(name: str) -> str:
    """The architecture and size in one line (from config.json; the hub's config only, never the weights)."""
    from engine.models.catalog import param_count
    from engine.memory.recommend import model_geometry

    try:
        g = model_geometry(name)
    except UserError as exc:
        return f"architecture unknown to the memory estimate: {exc}"
    count = param_count(g)
    size = f"{count / 1e9:.1f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"
    experts = f", {g.num_local_experts} experts ({g.num_experts_per_tok} active)" if g.num_local_experts else ""
    return (f"{g.model_type} · {size} parameters · {g.num_hidden_layers} layers, hidden {g.hidden_size}, "
            f"{g.num_attention_heads} heads ({g.num_key_value_heads} key/value){experts}")


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
            self.query_one("#model_name_or_path", Input).focus()
            self.changed("model_name_or_path")

    @staticmethod
    def _catalog() -> list[tuple[str, str]]:
        from engine.models.catalog import list_models, param_count

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

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter in the filter takes the highlighted (or first) model shown; elsewhere, or unfiltered, it goes on."""
        if event.input.id != "filter" or not event.value.strip():
            return
        event.prevent_default()
        catalog = self.query_one("#catalog", OptionList)
        if catalog.option_count:
            self._choose(catalog.get_option_at_index(catalog.highlighted or 0).id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self._choose(event.option.id)

    def _choose(self, name: str) -> None:
        field = self.query_one("#model_name_or_path", Input)
        field.value = name
        field.focus()

    def changed(self, key: str) -> None:
        self.later("resolve", lambda: self.work("resolve", self.check, "resolving the model"))

    def check(self) -> dict[str, str]:
        from engine.models.resolve import resolve_model

        name = str(self.choices.values.get("model_name_or_path", "")).strip()
        if not name:
            return {"model_name_or_path": "type a model: a catalog name, a hub id or a local directory"}
        try:
            resolved = resolve_model(name)
        except UserError as exc:
            return {"model_name_or_path": str(exc)}
        self.app.call_from_thread(self._resolved, f"✔ {WHERE[resolved.source]}: {resolved.path}\n{describe(name)}")
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
