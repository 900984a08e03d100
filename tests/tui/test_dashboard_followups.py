"""From a finished run's dashboard: chat with it, predict and export it (real processes on the tiny run), and move
between the runs list and dashboards."""

from __future__ import annotations

import json
import os
import subprocess

from textual.widgets import DataTable, Input, Static
from tui_helpers import recorded, shown, until

from engine.rundir import read_status, write_status
from engine.rundir.process import pid_start_time
from engine.runs.tasks import read_task, result_path_for
from tuner_tui.dashboard.screen import DashboardScreen
from tuner_tui.followup.chat import ChatScreen, Turn
from tuner_tui.followup.tasks import ExportScreen, PredictScreen
from tuner_tui.monitor import MonitorApp
from tuner_tui.runs.screen import RunsScreen

FAST = {"interval_s": 0.1, "gpu_interval_s": 0.1}


def monitor(run_dir) -> MonitorApp:
    return MonitorApp(run_dir, probe=recorded("a100-80gb"), **FAST)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def ended(app: MonitorApp):
    return lambda: isinstance(app.screen, DashboardScreen) and app.screen.run is not None


async def open_form(pilot, app: MonitorApp, key: str, kind: type):
    """From the dashboard of an ended run, the predict or export form, filled from the run."""
    await until(pilot, ended(app), "the run to be read")
    await pilot.press(key)
    screen = app.screen
    assert isinstance(screen, kind)
    await until(pilot, lambda: not screen.query_one("#start").disabled, "the form")
    return screen


async def test_chat_with_a_finished_run_streams_a_reply(run_copy, state_home):
    app = monitor(run_copy)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, ended(app), "the run to be read")
        await pilot.press("c")
        assert isinstance(app.screen, ChatScreen)
        await until(pilot, lambda: app.screen.session is not None, "the model to load")
        assert "template llama2" in shown(app.screen.query_one("#status", Static))
        prompt = app.screen.query_one("#prompt", Input)
        assert app.focused is prompt
        await pilot.press(*"hello", "enter")
        await until(pilot, lambda: not prompt.disabled and len(app.screen.query(Turn)) == 2, "the reply")
        user, answer = app.screen.query(Turn)
        assert user.text == "hello" and answer.role == "assistant"
        assert app.screen.session.history[-1] == {"role": "assistant", "content": answer.text}
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert not app.screen.query(Turn) and app.screen.session.history == []
        await pilot.press("escape")
        assert isinstance(app.screen, DashboardScreen)


async def test_predict_runs_as_its_own_process_and_shows_its_result_once_with_the_scores(run_copy, state_home):
    app = monitor(run_copy)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_form(pilot, app, "p", PredictScreen)
        assert screen.query_one("#dataset", Input).value == "demo_alpaca"
        assert "trained on" in shown(screen.query_one("#note", Static))
        screen.query_one("#max_samples", Input).value = "abc"
        await pilot.press("ctrl+r")
        await until(pilot, lambda: "max_samples" in shown(screen.query_one("#status", Static)), "the complaint")
        assert screen.started is None
        screen.query_one("#max_samples", Input).value = "6"
        screen.query_one("#max_new_tokens", Input).value = "4"
        await pilot.press("ctrl+r")
        await until(pilot, lambda: screen.started is not None, "the start")
        assert os.getsid(screen.started.pid) == screen.started.pid  # its own session: a hangup does not reach it
        await until(pilot, lambda: shown(screen.query_one("#status", Static)).startswith("finished"),
                    "predict to finish", timeout=120)
        result = read_task(result_path_for(screen.target / "predict.log"))
        assert (result.done, result.total) == (6, 6)
        log = (screen.target / "predict.log").read_text()
        assert "predicting 6 samples" in log and "6 of 6 predicted" in log
        text = shown(screen.query_one("#result", Static))
        assert text.count("6 predictions in") == 1 and " s " in text + " " and "samples/s" in text
        assert not screen.query_one("#log").display  # the log ends with the same result: not shown twice
        status = shown(screen.query_one("#status", Static))
        assert status.startswith("finished in ") and str(screen.target / "predict.log") in status
        assert screen.query_one("#result", Static).region.width > 100  # wrapped to the screen, not to 80 columns
        results = json.loads((screen.target / "predict_results.json").read_text())
        assert results["predict_samples"] == 6 and screen.target.parent == run_copy
        await pilot.press("escape")
        assert isinstance(app.screen, DashboardScreen)


async def test_export_merges_into_the_directory_given(run_copy, state_home, tmp_path):
    app = monitor(run_copy)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_form(pilot, app, "e", ExportScreen)
        assert screen.query_one("#export_dir", Input).value == str(run_copy / "merged")
        screen.query_one("#export_dir", Input).value = str(tmp_path / "exported")
        await pilot.press("ctrl+r")
        await until(pilot, lambda: "finished" in shown(screen.query_one("#status", Static)), "export to finish",
                    timeout=120)
        assert shown(screen.query_one("#result", Static)).startswith(f"exported {tmp_path / 'exported'}")
        assert (tmp_path / "exported" / "model.safetensors").is_file()


async def test_a_refused_export_shows_the_error_its_result_file_records(run_copy, state_home, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something.txt").write_text("not an export")
    app = monitor(run_copy)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_form(pilot, app, "e", ExportScreen)
        screen.query_one("#export_dir", Input).value = str(taken)
        await pilot.press("ctrl+r")
        status = screen.query_one("#status", Static)
        await until(pilot, lambda: "failed" in shown(status), "the export to fail", timeout=120)
        assert shown(status).startswith(f"failed (exit 2): export_dir {taken} is not empty")
        result = json.loads(next(run_copy.glob("export-*.result.json")).read_text())
        assert result["state"] == "failed" and result["error"] in shown(status)


async def test_follow_ups_wait_for_the_run_to_end(run_copy, state_home):
    status = read_status(run_copy)
    status.state, status.pid, status.pid_started_at = "running", os.getpid(), pid_start_time(os.getpid())
    write_status(run_copy, status)
    app = monitor(run_copy)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, ended(app), "the run to be read")
        assert app.screen.run.state == "running"
        for key in ("c", "p", "e"):
            await pilot.press(key)
            assert isinstance(app.screen, DashboardScreen)
        said = [n.message for n in app._notifications]
        assert len(said) == 3 and all("is still running: chat, predict and export open once it ends" in m
                                      for m in said)


async def test_runs_list_opens_a_dashboard_and_back(finished_run, state_home):
    app = monitor(finished_run)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, ended(app), "the run to be read")
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.query_one(DataTable).row_count,
                    "the runs list")
        table = app.screen.query_one(DataTable)
        run_id = read_status(finished_run).id
        assert [str(table.get_cell(run_id, column)) for column in ("id", "state", "progress")] == \
            [run_id, "completed", "20/20"]
        assert str(finished_run) in shown(app.screen.query_one("#detail", Static))
        depth = len(app.screen_stack)
        await pilot.press("enter")
        await until(pilot, ended(app), "the dashboard")
        assert app.screen.run_dir == finished_run and len(app.screen_stack) == depth


async def test_runs_list_shows_what_a_dead_run_said_last(run_copy, state_home):
    from engine.rundir.index import register

    status = read_status(run_copy)
    status.id, status.state, status.pid, status.output_dir = "20990101-000000-dead00", "running", dead_pid(), str(run_copy)
    write_status(run_copy, status)
    register(run_copy, status.id)
    app = monitor(run_copy)
    async with app.run_test(size=(120, 30)) as pilot:
        await until(pilot, ended(app), "the run to be read")
        assert app.screen.run.state == "failed"
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.query_one(DataTable).row_count,
                    "the runs list")
        table = app.screen.query_one(DataTable)
        row = table.get_row_index("20990101-000000-dead00")
        assert [str(table.get_cell("20990101-000000-dead00", column)) for column in ("name", "state")] == \
            ["run", "failed"]
        table.move_cursor(row=row)
        await pilot.pause()
        detail = shown(app.screen.query_one("#detail", Static))
        last = (run_copy / "train.log").read_text().splitlines()[-1]
        assert "failed; the end of its train.log:" in detail and last.strip() in detail
