"""The dashboard and the runs list as a newcomer meets them at 80x24 and 120x40: what fits, what keys say, what is
kept between screens, and axis labels a person can read."""

from __future__ import annotations

import json

import pytest
from textual.widgets import DataTable, Static
from tui_helpers import recorded, shown, until

from tuner_tui.dashboard.screen import DashboardScreen
from tuner_tui.dashboard.widgets import LossChart, axis
from tuner_tui.monitor import MonitorApp
from tuner_tui.runs.screen import RunsScreen, fitting_columns

FAST = {"interval_s": 0.1, "gpu_interval_s": 0.1}


def monitor(run_dir) -> MonitorApp:
    return MonitorApp(run_dir, probe=recorded("a100-80gb"), **FAST)


def read(app):
    return lambda: isinstance(app.screen, DashboardScreen) and app.screen.run is not None


def screen_text(app) -> list[str]:
    from test_snapshots import svg_lines

    return [line.rsplit("    [", 1)[0].replace("\u00a0", " ") for line in svg_lines(app.export_screenshot())]


async def open_runs(pilot, app):
    await pilot.press("r")
    await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.query_one(DataTable).row_count,
                "the runs list")


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_the_footer_shows_every_dashboard_key_and_quit_whole(finished_run, size):
    app = monitor(finished_run)
    async with app.run_test(size=size) as pilot:
        await until(pilot, read(app), "the run to be read")
        await until(pilot, lambda: "^p palette" in screen_text(app)[-1], "the footer on the last line")
        footer = screen_text(app)[-1]
        for key in ("s Stop", "l Log scale", "c Chat", "p Predict", "e Export", "r Runs", "q Quit", "^p palette"):
            assert key in footer, (key, footer)


async def test_runs_list_at_80_columns_keeps_id_state_progress_and_loss_and_esc_goes_back(finished_run,
                                                                                          state_home):
    app = monitor(finished_run)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, read(app), "the run to be read")
        await open_runs(pilot, app)
        table = app.screen.query_one(DataTable)
        shown_columns = [str(column.label) for column in table.ordered_columns]
        assert {"id", "state", "progress", "loss"} <= set(shown_columns)
        assert sum(column.get_render_width(table) for column in table.ordered_columns) <= 80
        hidden = [c for c in ("name", "model", "method", "started", "elapsed") if c not in shown_columns]
        assert hidden, "at 80 columns some column has to give way"
        detail = shown(app.screen.query_one("#detail", Static))
        assert all(f"{column} " in detail for column in hidden)  # what the table leaves out, the detail says
        footer = screen_text(app)[-1]
        assert "esc Back" in footer and "Open" in footer
        await pilot.press("escape")
        await until(pilot, read(app), "the dashboard again")
        assert app.screen.run_dir == finished_run


def test_narrow_tables_drop_the_least_telling_columns_first():
    row = {"id": "20250101-000000-abcdef", "name": "my-long-run-name", "state": "completed", "model": "Qwen2.5-7B",
           "method": "lora", "progress": "1000/1000", "loss": "1.2345", "started": "01-01 10:00",
           "elapsed": "1:02:03"}
    assert fitting_columns([row], 200) == tuple(row)
    assert fitting_columns([row], 60) == ("id", "state", "progress", "loss")
    assert fitting_columns([row], 10) == ("id",)


async def test_log_scale_stays_on_when_a_run_is_reopened(finished_run, state_home):
    app = monitor(finished_run)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, read(app), "the run to be read")
        await pilot.press("l")
        assert app.screen.query_one(LossChart).log_scale
        await open_runs(pilot, app)
        await pilot.press("enter")
        await until(pilot, read(app), "the dashboard again")
        assert app.screen.log_scale and app.screen.query_one(LossChart).log_scale
        assert "log scale" in app.screen.query_one(LossChart).border_title


async def test_one_logged_point_labels_its_axes_with_a_few_digits(run_copy):
    events = [json.loads(line) for line in (run_copy / "events.jsonl").read_text().splitlines()]
    logs = [e for e in events if e["type"] == "log"]
    kept = [e for e in events if e["type"] not in ("log", "eval")] + logs[:1]
    (run_copy / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept))
    loss = logs[0]["loss"]
    app = monitor(run_copy)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: read(app)() and app.screen.query_one(LossChart).series.steps, "the one point")
        await pilot.pause(0.2)
        chart = "\n".join(screen_text(app))
        assert f"{loss:.4g}" in chart and repr(loss) not in chart and f"{loss:.8f}" not in chart


@pytest.mark.parametrize("low, high, log, labels", [
    (6.9192619323730469, 6.9192619323730469, False, ["6.919"]),  # one point
    (2.5, 2.5, True, ["2.5"]),  # a flat series on a log scale
    (6.9033, 6.9318, False, ["6.91", "6.92", "6.93"]),
    (2.3, 2.30001, False, ["2.300000", "2.300005", "2.300010"]),  # a tiny range still tells its ticks apart
    (0.5, 7.0, True, ["0.5", "1", "2", "5"]),
])
def test_axis_labels_have_a_sensible_number_of_digits(low, high, log, labels):
    limits, ticks, shown_labels = axis(low, high, 5, log=log)
    assert shown_labels == labels and len(ticks) == len(labels) and limits[0] < limits[1]


def test_step_axis_labels_are_whole_steps():
    assert axis(5, 20, 6, whole=True)[2] == ["5", "10", "15", "20"]
    assert axis(5, 5, 6, whole=True)[2] == ["5"]
