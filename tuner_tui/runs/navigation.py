"""What an app that shows runs does when a screen asks for a run's dashboard or for the runs list: the screen on
top is replaced, so moving back and forth never grows the stack. The runs themselves are never touched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.hardware import HardwareState
from tuner_tui.dashboard.screen import DashboardScreen
from tuner_tui.runs.screen import OpenRun, RunsScreen, ShowRuns


class RunsNavigation:
    """Mixed into an App that sets ``probe``, ``dashboard_interval_s`` and ``gpu_interval_s``. The loss chart's
    scale is kept for the app's session: every dashboard opened after a switch shows the scale chosen last."""

    probe: Callable[[], HardwareState]
    dashboard_interval_s: float
    gpu_interval_s: float
    loss_log_scale: bool = False

    def dashboard(self, run_dir: Path) -> DashboardScreen:
        return DashboardScreen(Path(run_dir), self.probe, self.dashboard_interval_s, self.gpu_interval_s,
                               log_scale=self.loss_log_scale)

    def on_open_run(self, message: OpenRun) -> None:
        self.switch_screen(self.dashboard(message.run_dir))

    def on_show_runs(self, message: ShowRuns) -> None:
        self.switch_screen(RunsScreen(back_to=message.run_dir))

    def on_dashboard_screen_log_scale_changed(self, message: DashboardScreen.LogScaleChanged) -> None:
        self.loss_log_scale = message.log_scale
