"""What every wizard step shares: fields bound to config keys, and WizardStep, which lays out a step and calls the
engine in thread workers; one handler per screen turns a worker's result or failure into what the screen shows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from rich.text import Text
from textual.actions import SkipAction
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Button, Collapsible, Footer, Input, Label, Select, Static, Switch
from textual.worker import Worker, WorkerState

from tuner_tui.errors import failure_text
from tuner_tui.wizard.state import Choices, default_text, help_text, kind_of, options_of

NEXT = "next"
DEBOUNCE_S = 0.3


class Field(Input):
    """An input bound to one config key: what is typed is kept in the wizard's choices at once."""

    def __init__(self, key: str, choices: Choices, placeholder: str = "", **kwargs: Any):
        super().__init__(value=str(choices.values.get(key, "")), placeholder=placeholder, id=key, **kwargs)
        self.key = key


class ChoiceField(Select):
    """A select bound to one config key; choosing nothing leaves the default (the model's recipe or the config's)."""

    def __init__(self, key: str, choices: Choices, **kwargs: Any):
        options = options_of(key)
        current = str(choices.values.get(key, ""))
        super().__init__([(option, option) for option in options], prompt=_prompt(key, choices.recipe()),
                         value=current if current in options else Select.NULL, id=key, **kwargs)
        self.key = key


class SwitchField(Switch):
    """An on/off setting bound to one config key."""

    def __init__(self, key: str, choices: Choices, **kwargs: Any):
        super().__init__(value=choices.is_on(key), id=key, **kwargs)
        self.key = key


def field_row(label: str, field: Widget) -> ComposeResult:
    with Horizontal(classes="row", id=f"row-{field.id}"):
        yield Label(label, classes="label")
        yield field
    yield Static("", id=f"err-{field.id}", classes="error")


def _prompt(key: str, recipe) -> str:
    return f"{default_text(key, recipe)} (default)"


def setting_row(key: str, label: str, choices: Choices, **kwargs: Any) -> ComposeResult:
    """A labelled row for one config key: a switch, a select or an input by the key's type, its help as tooltip and
    the default (the model's recipe value while it applies) as placeholder or prompt."""
    kind = kind_of(key)
    field = (SwitchField(key, choices) if kind == "switch" else ChoiceField(key, choices) if kind == "select"
             else Field(key, choices, default_text(key, choices.recipe()), **kwargs))
    field.tooltip = help_text(key)
    field.add_class("setting")
    yield from field_row(label, field)


class WizardStep(Screen):
    """A step: title, body, Back/Next, footer. Subclasses say what Next checks (in a worker) and what to do with
    workers' results.

    Enter goes on from wherever a value is chosen: a text field, a closed drop-down, a switch, a list or table (its
    highlighted row taken on the way, see ``take_highlighted``) and Next. It stays with the few widgets whose Enter is
    their own: another button presses itself, an open drop-down picks its row, a section's title opens it. Space (or
    ↓) opens a drop-down and flips a switch; Ctrl+N goes on from anywhere."""

    CSS_PATH = "../wizard.tcss"  # Textual resolves it beside the module of each step's own class (steps/)
    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="The previous step; what was entered is kept"),
        Binding("enter", "go_on", "Next", priority=True,
                tooltip="Check this step and go on, the highlighted row of a list taken on the way"),
        Binding("ctrl+n", "next", "Next", show=False, tooltip="Check this step and go on, wherever the focus is"),
    ]
    AUTO_FOCUS = "#body *, #next"  # the first field, or Next where there is none
    VERTICAL_BREAKPOINTS = [(0, "-short"), (32, "-tall")]  # -short: one-line fields and buttons (wizard.tcss)
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
            self._debounce.pop(group).stop()

        def fire() -> None:
            if self._debounce.get(group) is timer:
                del self._debounce[group]
            start()

        timer = self._debounce[group] = self.set_timer(DEBOUNCE_S, fire)

    @property
    def starting(self) -> bool:
        """Whether a debounced start is still due (its worker is not running yet)."""
        return bool(self._debounce)

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
    def enter_goes_on(self) -> bool:
        """Whether Enter goes on from the focused widget, rather than being that widget's own key."""
        focused = self.focused
        if focused is None:
            return True
        if isinstance(focused, Button):
            return focused.id == "next"
        if isinstance(focused.parent, Collapsible):  # its title: Enter opens or closes the section
            return False
        return not any(isinstance(node, Select) for node in focused.ancestors)  # an open drop-down's list picks

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "go_on":
            return True if self.enter_goes_on() else None  # None: the footer dims it, the widget takes Enter
        return True

    def take_highlighted(self) -> None:
        """Enter's first half, where the step has a list whose highlighted row is not yet the choice."""

    def action_go_on(self) -> None:
        if not self.enter_goes_on():
            raise SkipAction()  # where check_action is not asked first (a step's own check_action)
        self.take_highlighted()
        self.action_next()

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
            self.show_defaults()
            self.changed(event.input.key)

    def on_select_changed(self, event: Select.Changed) -> None:
        if isinstance(event.select, ChoiceField):
            self.choices.values[event.select.key] = "" if event.value is Select.NULL else str(event.value)
            self.show_defaults()
            self.changed(event.select.key)

    def on_switch_changed(self, event: Switch.Changed) -> None:
        if isinstance(event.switch, SwitchField):
            self.choices.values[event.switch.key] = "true" if event.value else "false"
            self.show_defaults()
            self.changed(event.switch.key)

    def show_defaults(self) -> None:
        """Each setting's placeholder or prompt, again: a value typed may have switched the model's recipe on or off."""
        recipe = self.choices.recipe()
        for field in self.query(".setting"):
            if isinstance(field, ChoiceField):
                field.prompt = _prompt(field.key, recipe)
            elif isinstance(field, Field):
                field.placeholder = default_text(field.key, recipe)

    def changed(self, key: str) -> None:
        """A field changed (its value is already in the choices)."""

    def system_commands(self) -> Iterable[SystemCommand]:
        yield SystemCommand("Next step", "Check this step and go on", self.action_next)
        yield SystemCommand("Previous step", "Go back a step, keeping what was entered", self.action_back)
