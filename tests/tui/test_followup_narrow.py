"""The predict form on an 80x24 terminal: the output dir shown whole, broken after a '/', under a field too narrow
for it; the warning about scoring the data the run trained on, from the engine function `tuner predict` uses."""

from __future__ import annotations

from test_dashboard_narrow import screen_text
from test_followup_screens import monitor, predict_form
from textual.widgets import Input, Static
from tui_helpers import shown, until

from engine.infer.followup import training_data_warning
from engine.rundir.jobs import find_job
from tuner_tui.followup.tasks import WholePath, path_lines


def test_a_path_breaks_after_a_slash_and_inside_a_name_only_when_the_name_is_wider_than_a_line():
    assert path_lines("/tmp/run/predict-20261206-153012", 80) == ["/tmp/run/predict-20261206-153012"]
    assert path_lines("/tmp/run/predict-20261206-153012", 12) == ["/tmp/run/", "predict-2026", "1206-153012"]
    assert path_lines("/home/someone/saves/run/predict-1", 20) == ["/home/someone/saves/", "run/predict-1"]


async def test_the_predict_forms_output_dir_is_shown_whole_at_80x24(run_copy, state_home):
    app = monitor(run_copy)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await predict_form(pilot, app)
        field, whole = screen.query_one("#output_dir", Input), screen.query_one(WholePath)
        assert len(field.value) >= field.region.width  # the field alone cuts it
        await until(pilot, lambda: whole.region.height > 1, "the whole path under the field")
        lines = path_lines(field.value, whole.region.width)
        assert "".join(lines) == field.value and all(line.endswith("/") for line in lines[:-1])
        assert whole.region.x == field.region.x and whole.region.width == field.region.width
        text = screen_text(app)
        assert all(any(line.strip() == part for line in text) for part in lines), text
        warning = training_data_warning(find_job(str(run_copy)), "demo_alpaca")
        assert warning and shown(screen.query_one("#note", Static)) == warning
        assert screen.query_one("#start").region.y < 23  # the form still shows its Start above the footer


async def test_an_output_dir_that_fits_its_field_takes_no_extra_line(run_copy, state_home):
    app = monitor(run_copy)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await predict_form(pilot, app)
        whole = screen.query_one(WholePath)
        await until(pilot, lambda: whole.region.height > 1, "the whole path under the field")
        screen.query_one("#output_dir", Input).value = "/tmp/predict-1"
        await until(pilot, lambda: whole.region.height == 0, "the line to go")


async def test_the_predict_forms_warning_follows_the_dataset_typed(run_copy, state_home):
    app = monitor(run_copy)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await predict_form(pilot, app)
        note, dataset = screen.query_one("#note", Static), screen.query_one("#dataset", Input)
        warning = training_data_warning(find_job(str(run_copy)), "demo_alpaca")
        assert dataset.value == "demo_alpaca" and shown(note) == warning
        dataset.value = "demo_openai"  # data the run never saw: a fair score, nothing to warn of
        await until(pilot, lambda: shown(note) == "", "the warning to go")
        dataset.value = "demo_openai,demo_alpaca"
        await until(pilot, lambda: shown(note) == training_data_warning(find_job(str(run_copy)), dataset.value),
                    "the warning back")
