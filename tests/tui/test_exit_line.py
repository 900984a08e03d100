"""Leaving the dashboard with q while its run goes on leaves the shell the run's id and the command to come back."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from tui_helpers import recorded, until, wizard

from engine.rundir import RunStatus, write_status
from engine.rundir.process import pid_start_time
from tuner_tui.dashboard.screen import DashboardScreen
from engine.cli import tuner as main
from tuner_tui.monitor import MonitorApp

RUN_ID = "20250101-000000-abcdef"


def running_run(tmp_path: Path, pid: int | None, state: str = "running") -> Path:
    run_dir = tmp_path / "live"
    run_dir.mkdir()
    write_status(run_dir, RunStatus(id=RUN_ID, name="live", state=state, pid=pid,
                                    pid_started_at=pid_start_time(pid) if pid else None, output_dir=str(run_dir),
                                    model="tiny-llama", method="lora", total_steps=100))
    return run_dir


def sampled(app):
    return lambda: isinstance(app.screen, DashboardScreen) and app.screen.run is not None


async def test_q_on_a_running_run_returns_the_line_to_reattach(tmp_path, sleeper):
    app = MonitorApp(running_run(tmp_path, sleeper.pid), recorded("a100-80gb"), interval_s=0.1, gpu_interval_s=0.1)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: sampled(app)() and app.screen.run.active, "the running run")
        await pilot.press("q")
    assert app.return_value == f"run {RUN_ID} goes on: tuner monitor {RUN_ID}"
    assert sleeper.poll() is None  # leaving never touches the run


async def test_q_on_an_ended_run_returns_nothing(tmp_path):
    app = MonitorApp(running_run(tmp_path, None, state="completed"), recorded("a100-80gb"), interval_s=0.1,
                     gpu_interval_s=0.1)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: sampled(app)() and app.screen.run.ended, "the ended run")
        await pilot.press("q")
    assert app.return_value is None


async def test_q_on_the_wizards_dashboard_returns_the_line_too(tmp_path, sleeper):
    app = wizard("a100-80gb", tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        app.open_dashboard(running_run(tmp_path, sleeper.pid))
        await until(pilot, lambda: sampled(app)() and app.screen.run.active, "the running run")
        await pilot.press("q")
    assert app.return_value == f"run {RUN_ID} goes on: tuner monitor {RUN_ID}"


def test_tuner_monitor_prints_the_line_after_the_app_closes(tmp_path, sleeper, monkeypatch, capsys):
    import tuner_tui.monitor as monitor

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    run_dir = running_run(tmp_path, sleeper.pid)

    async def quit_when_running(pilot):
        await until(pilot, lambda: sampled(pilot.app)() and pilot.app.screen.run.active, "the running run")
        await pilot.press("q")

    real = monitor.monitor_app

    def headless(run_ref):
        app = real(run_ref, recorded("a100-80gb"))
        app.run = partial(app.run, headless=True, size=(120, 40), auto_pilot=quit_when_running)
        return app

    monkeypatch.setattr(monitor, "monitor_app", headless)
    assert main(["monitor", str(run_dir)]) == 0
    assert capsys.readouterr().out == f"run {RUN_ID} goes on: tuner monitor {RUN_ID}\n"
