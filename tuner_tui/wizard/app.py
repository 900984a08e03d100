"""`tuner` with no arguments: the wizard app. Quitting (Ctrl+Q or Ctrl+C on any screen, q on a run's dashboard) never
touches a run it started."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from engine.hardware import Gpu, HardwareState, probe
from tuner_tui.dashboard.screen import DashboardScreen
from tuner_tui.runs.navigation import RunsNavigation
from tuner_tui.wizard.steps import STEPS, WizardStep
from tuner_tui.wizard.steps.hardware import doctor_findings
from tuner_tui.wizard.state import Choices


class WizardApp(RunsNavigation, App):
    TITLE = "tuner"
    # Ctrl+Q, not q: a letter typed into a field stays there. (The dashboard's own q shares its footer entry.)
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True, tooltip="Leave the wizard; a started run goes on"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, probe: Callable[[], HardwareState] = probe, choices: Choices | None = None,
                 state_dir: Path | None = None, dashboard_interval_s: float = 1.0,
                 doctor: Callable[[HardwareState], list] = doctor_findings):
        super().__init__()
        self.probe, self.doctor = probe, doctor
        self.findings: list | None = None  # the machine check's findings (engine.doctor.Finding), once made
        self.data_shown: dict[str, Any] = {}  # step 4's template note and preview, kept until replaced
        self.state_dir = state_dir
        self.choices = choices if choices is not None else Choices.recalled(state_dir)
        self.hardware: HardwareState | None = None
        self.dashboard_interval_s, self.gpu_interval_s = dashboard_interval_s, max(2.0, dashboard_interval_s)
        self.run_dir: Path | None = None

    def on_mount(self) -> None:
        self.push_screen(STEPS[0]())

    def advance(self, step: WizardStep) -> None:
        self.remember()
        index = STEPS.index(type(step))
        if index + 1 < len(STEPS):
            self.push_screen(STEPS[index + 1]())

    def remember(self) -> None:
        try:
            self.choices.remember(self.state_dir)
        except OSError as exc:
            self.notify(f"cannot remember the choices: {exc}", severity="warning", markup=False)

    def chosen_gpus(self) -> list[Gpu]:
        gpus = self.hardware.gpus if self.hardware else []
        picked = self.choices.gpus
        return [g for g in gpus if picked is None or g.index in picked]

    def visible_devices(self) -> str | None:
        """CUDA_VISIBLE_DEVICES for the run when only some GPUs were chosen; None: leave it as it is."""
        if not self.hardware or not self.hardware.gpus or self.choices.gpus is None:
            return None
        return ",".join(g.uuid or str(g.physical_index) for g in self.chosen_gpus())

    def open_dashboard(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.push_screen(self.dashboard(self.run_dir))

    async def action_quit(self) -> None:
        """Leave; from a run's dashboard (or a screen over it) as its own q does: the shell gets how to return."""
        dashboard = next((s for s in reversed(self.screen_stack) if isinstance(s, DashboardScreen)), None)
        if dashboard is not None:
            dashboard.action_quit()
        else:
            self.exit()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if hasattr(screen, "system_commands"):
            yield from screen.system_commands()


def run_wizard(config_path: str | None = None) -> int:
    choices = Choices.from_file(config_path, Choices.recalled()) if config_path else None
    line = WizardApp(choices=choices).run()
    if line:  # the dashboard left a run going: say how to come back, now that the screen is the shell's again
        print(line)
    return 0
