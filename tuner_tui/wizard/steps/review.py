"""Step 6, Review: the command line and config YAML; save the config to a file or start the run and open its
dashboard."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

from rich.text import Text
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.content import Content
from textual.widgets import Button, Input, Static

from tuner_tui.wizard.state import save_config, start_run
from tuner_tui.wizard.steps.base import WizardStep, field_row


def auto_fit_line(cfg, on_gpu: bool) -> str:
    """What auto-fit will do with the batch settings, in one line: on a GPU it lays the batch out for the free
    memory; on the CPU it keeps the batch and decides only checkpointing (engine.memory.autofit.fit_cpu)."""
    t = cfg.train
    batch = f"micro-batch {t.per_device_train_batch_size} x accumulation {t.gradient_accumulation_steps}"
    if not t.auto_fit:
        return f"Auto-fit off: {batch} as given"
    if not on_gpu:
        checkpointing = ("gradient checkpointing off unless the activations would crowd the RAM"
                         if t.gradient_checkpointing is None else
                         f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'} as given")
        return f"Auto-fit on the CPU: {batch} kept, {checkpointing}"
    samples = t.per_device_train_batch_size * t.gradient_accumulation_steps
    return (f"Auto-fit on: batch layout and checkpointing chosen at the start for the free GPU memory, "
            f"{samples} samples per step kept")


CHECKING_HUB = "checking whether this run needs the hub…"


class ReviewStep(WizardStep):
    TITLE = "Review: save the config or start the run"
    STEP = 6
    BINDINGS = [
        Binding("ctrl+s", "save", "Save", tooltip="Write the config YAML to the path given"),
        Binding("ctrl+r", "start", "Start", tooltip="Start the run detached and open its dashboard"),
    ]

    def body(self) -> ComposeResult:
        yield Static("estimating memory…", id="estimate")
        yield Static("", id="setup")
        yield Static("", id="hub-need")
        yield Static("", id="recipe", classes="hint")
        yield Static("", id="command")
        yield Static("", id="other-nodes")
        yield from field_row("Save to", Input(value=str(self.choices.values.get("_save_path", "run.yaml")),
                                              id="save_path"))
        yield Static("", id="err-start", classes="error")
        yield Static("", id="yaml")

    def nav_buttons(self) -> ComposeResult:
        yield Button("Save", id="save")
        yield Button("Start", id="start", variant="success")

    def _show_setup_problems(self) -> None:
        """The machine check's problems (step 1), named once more before the run starts; an offline or unreachable hub
        only when this run needs it."""
        findings = self.app.findings or []
        problems = [f.check for f in findings if f.state == "problem"]
        setup = self.query_one("#setup", Static)
        setup.display = bool(problems)
        setup.update(Content.styled(f"✘ the machine check found {len(problems)} set-up problem(s): "
                                    f"{', '.join(problems)}; step 1 shows their fixes", "bold $text-error"))
        hub = next((f for f in findings if f.check == "hub" and f.state != "ok"), None)
        need = self.query_one("#hub-need", Static)
        need.display = hub is not None
        if hub is not None:
            need.update(Content(CHECKING_HUB))
            self.work("hub", partial(self._hub_need, hub.state), "checking what the run needs of the hub")

    def _hub_need(self, hub_state: str) -> str:
        """What this run needs of a hub that step 1 found off or silent, in one line; empty when it needs nothing."""
        from engine.doctor import INFO, hub_needs

        needs = hub_needs(self.choices.config())
        if not needs:
            return ""
        why = ("offline mode is on: unset HF_HUB_OFFLINE, or download them where the hub answers" if hub_state == INFO
               else "the hub does not answer: step 1 shows the fix")
        return f"⚠ this run needs the hub for {' and '.join(needs)}, but {why}"

    def on_mount(self) -> None:
        self._show_setup_problems()
        recipe, line = self.choices.recipe(), self.query_one("#recipe", Static)
        line.display = bool(recipe.model)
        if recipe.model:
            line.update(Content(recipe.describe()))
        self.query_one("#other-nodes", Static).display = False
        self.work("render", self._texts, "writing the config")
        self.work("estimate", self._estimate, "estimating memory")

    def _texts(self) -> tuple[str, str, list[str]]:
        """The command line, the YAML, and the command each other machine types (a run over several)."""
        gpus = len(self.app.chosen_gpus())
        return self.choices.command_line(), self.choices.to_yaml(), self.choices.other_node_commands(gpus)

    def _estimate(self) -> tuple[str, bool]:
        """The chosen method's estimate once more, per GPU under the chosen strategy; True when it does not fit."""
        from engine.memory.recommend import (STRATEGY_LABELS, memory_budget, model_geometry, recommend,
                                             shape_from_config, strategy_of)

        cfg, gpus = self.choices.config(), self.app.chosen_gpus()
        world = self.choices.world_size(len(gpus))
        shape = shape_from_config(cfg, model_geometry(cfg.model.model_name_or_path, cfg.model), world)
        rec = recommend(shape, memory_budget(gpus))
        row = next(row for row in rec.rows if row.method == shape.method)
        needs = f"{row.label} needs about {row.estimate.total_gib:g} GiB per GPU"
        if world > 1:
            strategy = strategy_of(shape)
            needs = (f"{row.label} with {STRATEGY_LABELS[strategy]} (strategy {strategy}) needs about "
                     f"{row.estimate.total_gib:g} GiB per GPU over {world} GPUs")
        fit = "\n" + auto_fit_line(cfg, on_gpu=bool(gpus))
        if rec.budget_gib is None:
            return f"{needs}; no NVIDIA GPU here, so it trains on the CPU{fit}", False
        on = f"{len(gpus)} x {gpus[0].name}" if gpus else "the GPUs"
        if row.fits:
            return f"✔ {needs}: it fits in the {rec.budget_gib:g} GiB usable on {on}{fit}", False
        return (f"✘ {needs}: more than the {rec.budget_gib:g} GiB usable on {on}; go back to the method step{fit}",
                True)

    def done(self, group: str, result: Any) -> None:
        if group == "estimate":
            text, too_big = result
            self.query_one("#estimate", Static).update(Content.styled(text, "bold $text-error" if too_big else "bold"))
        elif group == "render":
            command, text, others = result
            self.query_one("#command", Static).update(Text(command, style="bold"))
            self.query_one("#yaml", Static).update(Text(text))
            nodes = self.query_one("#other-nodes", Static)
            nodes.display = bool(others)
            nodes.update(Text("\n".join(["On each other machine, once this one has started:",
                                          *(f"  {line}" for line in others)])))
        elif group == "hub":
            need = self.query_one("#hub-need", Static)
            need.display = bool(result)
            need.update(Content.styled(result, "bold $text-warning"))
        elif group == "save":
            self.query_one("#err-save_path", Static).update("")
            self.notify(f"saved to {result}", title="config saved", markup=False)
        elif group == "start":
            self.query_one("#err-start", Static).update("")
            self.app.open_dashboard(result)

    def failed(self, group: str, text: str) -> bool:
        target = {"save": "#err-save_path", "start": "#err-start", "render": "#err-start",
                  "estimate": "#estimate"}.get(group)
        if target:
            self.query_one(target, Static).update(Text(text, style="bold"))
            return True
        return False

    def on_input_changed(self, event: Input.Changed) -> None:
        self.choices.values["_save_path"] = event.value

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Nothing comes after this step, so Enter is not Next here: in the path it saves, on a button it presses it
        (never Start unless Start is focused); Ctrl+R starts."""
        return False if action == "go_on" else super().check_action(action, parameters)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter in the path saves; it never starts a run."""
        event.prevent_default()
        event.stop()
        self.action_save()

    def action_next(self) -> None:
        """The last step: Next never starts a run; it says how to."""
        self.query_one("#err-start", Static).update(
            Text("this is the last step: press Ctrl+R (or Start) to start the run, Ctrl+S to save the config",
                 style="bold"))

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
