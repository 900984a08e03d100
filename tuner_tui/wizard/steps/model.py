"""Step 2, Model: a catalog name (the catalog filtered as typed), a hub id or a local directory, resolved as it
is typed."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from engine.errors import UserError
from tuner_tui.wizard.steps.base import Field, WizardStep, field_row


WHERE = {"local": "local directory", "demo": "demo model, built on this machine",
         "hub-cache": "in the Hugging Face cache, no download needed",
         "hub": "on the hub, downloaded when the run starts, its progress on the dashboard"}


def download_size(plan) -> str:
    """What the run will fetch against the room for it: "13.5 GB to fetch, 812.0 GB free at /root/.cache/..."."""
    from engine.models.download import human_bytes

    return f"{human_bytes(plan.missing_bytes)} to fetch, {human_bytes(plan.free_bytes)} free at {plan.cache_dir}"


def describe(name: str, model=None) -> str:
    """The architecture and size in one line (from config.json; the hub's config only, never the weights, asked with
    ``model``'s token and revision when given)."""
    from engine.models.catalog import param_count
    from engine.memory.recommend import model_geometry

    try:
        g = model_geometry(name, model)
    except UserError as exc:
        return f"architecture unknown to the memory estimate: {exc}"
    count = param_count(g)
    size = f"{count / 1e9:.1f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"
    experts = f", {g.num_local_experts} experts ({g.num_experts_per_tok} active)" if g.num_local_experts else ""
    return (f"{g.model_type} · {size} parameters · {g.num_hidden_layers} layers, hidden {g.hidden_size}, "
            f"{g.num_attention_heads} heads ({g.num_key_value_heads} key/value){experts}")


class CatalogFilter(Input):
    """The catalog's filter: Up and Down move through the models shown while typing goes on filtering them."""

    BINDINGS = [Binding("down", "catalog('down')", "Next model", show=False),
                Binding("up", "catalog('up')", "Previous model", show=False)]

    def action_catalog(self, direction: str) -> None:
        catalog = self.screen.query_one("#catalog", OptionList)
        catalog.action_cursor_down() if direction == "down" else catalog.action_cursor_up()


class ModelStep(WizardStep):
    TITLE = "Model: a catalog name, a hub id or a local directory"
    STEP = 2
    CHECKED = ("model_name_or_path",)

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str, bool]] = []
        self.suggested: str | None = None  # the model preselected, while it is the one chosen

    def body(self) -> ComposeResult:
        yield CatalogFilter(placeholder="filter the catalog (↑↓ move through it, Enter takes one and goes on)",
                            id="filter")
        yield OptionList(id="catalog")
        yield from field_row("Model", Field("model_name_or_path", self.choices, "name, hub id or path"))
        yield Static("", id="resolved")
        yield Static("", id="suggested", classes="hint")

    def on_mount(self) -> None:
        self.work("catalog", self._catalog, "reading the catalog")
        if self.choices.values.get("model_name_or_path"):
            self.query_one("#model_name_or_path", Input).focus()
            self.changed("model_name_or_path")

    @staticmethod
    def _catalog() -> list[tuple[str, str, bool]]:
        from engine.models.catalog import list_models, param_count

        rows = []
        for spec in list_models():
            count = param_count(spec)
            size = f"{count / 1e9:.1f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"
            rows.append((spec.name, f"{spec.name:<24} {size:>7}  {spec.template}", spec.demo))
        return rows

    def _show_catalog(self) -> None:
        """The models the filter's words match; the chosen one highlighted, else the first where something is
        filtered or nothing chosen, else none (Enter in the filter then goes on with the model typed)."""
        words = self.query_one("#filter", Input).value.lower().split()
        catalog = self.query_one("#catalog", OptionList)
        catalog.clear_options()
        catalog.add_options([Option(text, id=name) for name, text, _ in self.rows
                             if all(word in text.lower() for word in words)])
        self._highlight(bool(words))

    def _highlight(self, filtered: bool) -> None:
        catalog = self.query_one("#catalog", OptionList)
        names = [catalog.get_option_at_index(i).id for i in range(catalog.option_count)]
        chosen = str(self.choices.values.get("model_name_or_path") or "").strip()
        if chosen in names:
            catalog.highlighted = names.index(chosen)
        elif names and (filtered or not chosen):
            catalog.highlighted = 0
        else:
            catalog.highlighted = None

    def _preselect(self) -> None:
        """No model chosen yet: the first demo model, which needs no download and trains on any machine."""
        if self.choices.values.get("model_name_or_path"):
            return
        demo = next((name for name, _, is_demo in self.rows if is_demo), None)
        if demo is None:
            return
        self.suggested = demo
        self.query_one("#model_name_or_path", Input).value = demo
        gpus = bool(self.app.hardware and self.app.hardware.gpus)
        why = ("to try the wizard end to end; pick a model from the list or type a hub id for a real run" if gpus
               else "the kind of model that suits a machine without a GPU")
        suggested = self.query_one("#suggested", Static)
        suggested.update(Content(f"{demo} preselected: a demo model, no download, {why}"))
        suggested.display = True

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self._show_catalog()

    def take_highlighted(self) -> None:
        """Enter from the filter or the catalog takes the highlighted model on its way on; with none highlighted (the
        model typed is not in the catalog) it goes on with the model typed."""
        catalog = self.query_one("#catalog", OptionList)
        if self.focused in (catalog, self.query_one("#filter")) and catalog.highlighted is not None:
            name = catalog.get_option_at_index(catalog.highlighted).id
            self.choices.values["model_name_or_path"] = name  # now: Next's check reads it before the field's event
            self._choose(name)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        """A click on a model takes it; Enter on one also goes on (take_highlighted)."""
        self._choose(event.option.id)

    def _choose(self, name: str) -> None:
        field = self.query_one("#model_name_or_path", Input)
        field.value = name
        field.focus()

    def changed(self, key: str) -> None:
        self._checking()
        self._highlight(bool(self.query_one("#filter", Input).value.split()))
        self.later("resolve", lambda: self.work("resolve", self.check, "resolving the model"))

    def action_next(self) -> None:
        self._checking()
        super().action_next()

    def _checking(self) -> None:
        """While the model is looked up: a sign that it is, in place of what was said about the name before."""
        name = str(self.choices.values.get("model_name_or_path") or "").strip()
        self.show_problems({})
        self._resolved(f"checking {name}…" if name else "")
        if name != self.suggested:
            self.query_one("#suggested", Static).display = False

    def show_problems(self, problems: dict[str, str]) -> None:
        super().show_problems(problems)
        if problems:
            self._resolved("")

    def check(self) -> dict[str, str]:
        """The model resolved as a run will (downloading nothing); a catalog model whose weights cannot be had now
        (the hub out of reach) goes on with a warning: its estimate needs only the catalog, and the run's start
        refuses it until the weights are there."""
        from engine.models.catalog import lookup
        from engine.models.download import HubUnreachable
        from engine.models.resolve import resolve_configured, resolve_model

        name = str(self.choices.values.get("model_name_or_path", "")).strip()
        if not name:
            return {"model_name_or_path": "type a model: a catalog name, a hub id or a local directory"}
        model = self.choices.model_section()  # the typed token, revision and cache directory, when they build
        try:
            resolved = resolve_configured(model) if model is not None else resolve_model(name)
        except HubUnreachable as exc:
            if lookup(name) is None:
                return {"model_name_or_path": str(exc)}
            self.app.call_from_thread(self._resolved, Content.assemble(
                (f"⚠ weights not here yet: {exc.message}\n", "$text-warning"),
                f"a run downloads them when it starts (or now: `tuner download {name}`); offline it cannot start "
                f"until they are in the cache\n{describe(name, model)}"))
            return {}
        except UserError as exc:
            return {"model_name_or_path": str(exc)}
        where = f"✔ {WHERE[resolved.source]}: {resolved.path}"
        if resolved.plan is not None:
            where += f" ({download_size(resolved.plan)})"
        self.app.call_from_thread(self._resolved, f"{where}\n{describe(name, model)}")
        return {}

    def _resolved(self, text: str | Content) -> None:
        self.query_one("#resolved", Static).update(Content(text) if isinstance(text, str) else text)

    def done(self, group: str, result: Any) -> None:
        if group == "catalog":
            self.rows = result
            self._preselect()
            self._show_catalog()
        elif group == "resolve":
            self.show_problems(result)

    def failed(self, group: str, text: str) -> bool:
        if group == "resolve":
            self._resolved("")
            self.show_problems({"model_name_or_path": text})
            return True
        return super().failed(group, text)
