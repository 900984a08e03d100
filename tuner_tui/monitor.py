"""`tuner monitor [RUN]`: the run dashboard on its own, attached to a run started by `tuner train`.

Quitting (q, Ctrl-C) leaves the run alone; only the confirmed stop key signals it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from engine.hardware import HardwareState, probe
from engine.rundir.jobs import find_job
from tuner_tui.runs.navigation import RunsNavigation


class MonitorApp(RunsNavigation, App):
    TITLE = "tuner monitor"
    BINDINGS = [
        Binding("q", "quit", "Quit", tooltip="Close the dashboard; the run goes on"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, run_dir: Path, probe: Callable[[], HardwareState] = probe, interval_s: float = 1.0,
                 gpu_interval_s: float = 2.0):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.probe, self.dashboard_interval_s, self.gpu_interval_s = probe, interval_s, gpu_interval_s

    def on_mount(self) -> None:
        self.push_screen(self.dashboard(self.run_dir))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if hasattr(screen, "system_commands"):
            yield from screen.system_commands()


def monitor_app(run_ref: str | None, probe: Callable[[], HardwareState] = probe) -> MonitorApp:
    """The app on a run given by id, id prefix, name or directory (the newest run when None); UserError if none."""
    return MonitorApp(find_job(run_ref).dir, probe)
