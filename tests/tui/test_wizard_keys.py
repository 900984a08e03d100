"""The wizard's keys as the footer states them: Enter goes on from every step (a list's highlighted row taken on the
way, a drop-down opened with Space), Ctrl+Q quits from any screen while letters typed stay in their field; and what
the steps say where a newcomer stumbled: a catalog model not downloaded offline, Epochs beside Max steps, auto-fit on
a machine without a GPU. Pilot on recorded GPU states, the hub offline (tests/conftest.py)."""

from __future__ import annotations

from textual.widgets import Collapsible, DataTable, Footer, Input, Select, Static
from tui_helpers import error, on_step, shown, type_into, until, wizard

from engine.rundir import RunStatus, write_status
from engine.rundir.process import pid_start_time
from tuner_tui.dashboard.screen import DashboardScreen
from tuner_tui.wizard.files import DatasetPicker
from tuner_tui.wizard.state import Choices
from tuner_tui.wizard.steps import (DataStep, HardwareStep, HyperparametersStep, MethodStep, ModelStep,
                                    ReviewStep)

DEMO = {"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca"}


def footer(app) -> dict[str, tuple[str, bool]]:
    """The footer's keys as shown: each key with its description and whether it is enabled now."""
    return {key.key: (key.description, not key.has_class("-disabled"))
            for key in app.screen.query_one(Footer).query("FooterKey")}


async def footer_shows(pilot, app, key: str, description: str, enabled: bool = True) -> None:
    await until(pilot, lambda: footer(app).get(key) == (description, enabled), f"{key} {description} in the footer")


async def open_step(pilot, app, step) -> None:
    await on_step(pilot, app, HardwareStep)
    await until(pilot, lambda: app.hardware is not None, "the probe")
    await app.push_screen(step())
    await pilot.pause()


async def test_enter_goes_on_from_every_step_and_the_footer_says_so_with_ctrl_q_to_quit(tiny_models, tmp_path):
    app = wizard("none", tmp_path, Choices(dict(DEMO), "full"))
    async with app.run_test(size=(80, 24)) as pilot:
        for step in (HardwareStep, ModelStep, MethodStep, DataStep, HyperparametersStep):
            await on_step(pilot, app, step)
            await footer_shows(pilot, app, "enter", "Next")
            await footer_shows(pilot, app, "ctrl+q", "Quit")
            if step is HardwareStep:
                await until(pilot, lambda: app.hardware is not None, "the probe")
            if step is ModelStep:
                await until(pilot, lambda: "✔ demo model" in shown(app.screen.query_one("#resolved")), "the model")
            if step is MethodStep:
                await until(pilot, lambda: app.screen.query_one(DataTable).row_count == 5, "the estimates")
            await pilot.press("enter")  # from the step's first focus: Next, the model field, the table, a drop-down...
        await on_step(pilot, app, ReviewStep)
        await footer_shows(pilot, app, "ctrl+r", "Start")  # the last step: Start goes on, Enter is not Next here
        await footer_shows(pilot, app, "ctrl+q", "Quit")
        assert "enter" not in footer(app)
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert app.return_code == 0 and app.return_value is None and app.run_dir is None


async def test_enter_on_a_closed_drop_down_goes_on_and_space_opens_it_for_enter_to_pick(tiny_models, tmp_path):
    app = wizard("none", tmp_path, Choices(dict(DEMO), "full"))
    async with app.run_test(size=(80, 24)) as pilot:
        await open_step(pilot, app, DataStep)
        template = app.screen.query_one("#template-select", Select)
        await until(pilot, lambda: template.value == "llama2", "the model's template")
        assert app.screen.focused is template
        await pilot.press("space")
        await until(pilot, lambda: template.expanded, "the open list")
        await footer_shows(pilot, app, "enter", "Next", enabled=False)  # Enter picks in the open list
        await pilot.press("down", "enter")
        await until(pilot, lambda: not template.expanded, "the list closed")
        assert isinstance(app.screen, DataStep) and template.value != "llama2"
        assert app.choices.values["template"] == template.value
        await footer_shows(pilot, app, "enter", "Next")
        await pilot.press("enter")
        await on_step(pilot, app, HyperparametersStep)


async def test_enter_on_a_button_or_a_section_title_is_theirs_and_a_switch_goes_on(tmp_path):
    app = wizard("none", tmp_path, Choices(dict(DEMO), "lora"))
    async with app.run_test(size=(80, 24)) as pilot:
        await open_step(pilot, app, ModelStep)
        await app.push_screen(HyperparametersStep())
        await pilot.pause()
        advanced = app.screen.query_one("#advanced", Collapsible)
        advanced.query_one("CollapsibleTitle").focus()
        await footer_shows(pilot, app, "enter", "Next", enabled=False)
        await pilot.press("enter")  # opens the section, stays on the step
        assert not advanced.collapsed and isinstance(app.screen, HyperparametersStep)

        app.screen.query_one("#train_on_prompt").focus()
        await pilot.press("space")  # Space flips a switch
        await until(pilot, lambda: app.choices.values.get("train_on_prompt") == "true", "the switch flipped")
        await pilot.press("enter")  # Enter goes on from it
        await on_step(pilot, app, ReviewStep)

        await pilot.press("escape")
        await on_step(pilot, app, HyperparametersStep)
        app.screen.query_one("#back").focus()
        await footer_shows(pilot, app, "enter", "Next", enabled=False)
        await pilot.press("enter")  # Back, focused, goes back
        await on_step(pilot, app, ModelStep)


async def test_enter_on_the_methods_table_takes_its_row_and_on_back_goes_back(tmp_path):
    app = wizard("none", tmp_path, Choices(dict(DEMO), "lora"))
    async with app.run_test(size=(80, 24)) as pilot:
        await open_step(pilot, app, ModelStep)
        await app.push_screen(MethodStep())
        table = app.screen.query_one("#methods", DataTable)
        await until(pilot, lambda: table.row_count == 5, "the estimates")
        app.screen.query_one("#back").focus()
        await pilot.press("enter")
        await on_step(pilot, app, ModelStep)

        await app.push_screen(MethodStep())
        table = app.screen.query_one("#methods", DataTable)
        await until(pilot, lambda: table.row_count == 5, "the estimates")
        table.focus()
        table.move_cursor(row=table.get_row_index("freeze"))
        await pilot.press("enter")
        await on_step(pilot, app, DataStep)
        assert app.choices.method == "freeze"


async def test_q_types_into_the_model_field_and_ctrl_q_quits_from_a_field(tmp_path):
    app = wizard("none", tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_step(pilot, app, ModelStep)
        field = app.screen.query_one("#model_name_or_path", Input)
        await until(pilot, lambda: field.value == "tiny-llama", "the preselected model")
        field.focus()
        await footer_shows(pilot, app, "ctrl+q", "Quit")
        await pilot.press("q")  # typed over the text selected as the field took the focus, as in any text field
        assert field.value == "q" and app.is_running
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert app.return_code == 0 and app.return_value is None


async def test_ctrl_q_quits_from_the_file_picker_shown_in_its_footer(tmp_path):
    app = wizard("none", tmp_path, Choices(dict(DEMO), "full"))
    async with app.run_test(size=(80, 24)) as pilot:
        await open_step(pilot, app, DataStep)
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, DatasetPicker), "the picker")
        await footer_shows(pilot, app, "ctrl+q", "Quit")
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert app.return_code == 0


async def test_ctrl_q_on_the_wizards_dashboard_leaves_the_run_and_returns_the_line_to_reattach(tmp_path, sleeper):
    run_dir = tmp_path / "live"
    run_dir.mkdir()
    write_status(run_dir, RunStatus(id="20250101-000000-abcdef", name="live", state="running", pid=sleeper.pid,
                                    pid_started_at=pid_start_time(sleeper.pid), output_dir=str(run_dir),
                                    model="tiny-llama", method="lora", total_steps=100))
    app = wizard("none", tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_dashboard(run_dir)
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.run is not None
                    and app.screen.run.active, "the running run")
        await footer_shows(pilot, app, "q", "Quit")
        assert "ctrl+q" not in footer(app)  # one Quit in the dashboard's footer: q, and Ctrl+Q does the same
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert app.return_value == "run 20250101-000000-abcdef goes on: tuner monitor 20250101-000000-abcdef"
    assert sleeper.poll() is None


async def test_a_catalog_model_not_downloaded_goes_on_offline_to_its_estimate_and_its_start_is_refused(
        tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = wizard("none", tmp_path, Choices({"model_name_or_path": "llama2-7b", "dataset": "demo_alpaca"}))
    async with app.run_test(size=(120, 40)) as pilot:
        await open_step(pilot, app, ModelStep)
        resolved = app.screen.query_one("#resolved", Static)
        await until(pilot, lambda: "weights not here yet" in shown(resolved), "the warning")
        text = " ".join(shown(resolved).split())
        assert "meta-llama/Llama-2-7b-hf is not in the local Hugging Face cache" in text
        assert "a run downloads them when it starts (or now: `tuner download llama2-7b`)" in text
        assert "offline it cannot start until they are in the cache" in text
        assert "llama · 6.7B parameters · 32 layers" in text and not error(app, "model_name_or_path")

        await pilot.press("enter")
        await on_step(pilot, app, MethodStep)
        table = app.screen.query_one("#methods", DataTable)
        await until(pilot, lambda: table.row_count == 5, "the estimates from the catalog")
        assert float(str(table.get_row("full")[1])) > 50  # a 7B model's full fine-tune, in GiB

        app.choices.method = "lora"
        await app.push_screen(ReviewStep())
        await until(pilot, lambda: "needs about" in shown(app.screen.query_one("#estimate")), "the estimate")
        await pilot.press("ctrl+r")
        await until(pilot, lambda: "not in the local Hugging Face cache" in error(app, "start"), "the refusal")
        assert isinstance(app.screen, ReviewStep) and app.run_dir is None and not (tmp_path / "saves").exists()


async def test_the_hyperparameters_step_says_whether_max_steps_or_epochs_sets_the_length(tmp_path):
    app = wizard("none", tmp_path, Choices(dict(DEMO), "full"))
    async with app.run_test(size=(80, 24)) as pilot:
        await open_step(pilot, app, HyperparametersStep)
        note = app.screen.query_one("#length-note", Static)
        assert shown(note) == ("Max steps 300 is above 0, so it sets the run's length and Epochs is unused (as in HF "
                               "Trainer)")  # the demo recipe's 300 beside Epochs' default 3.0
        await type_into(pilot, app, "max_steps", "-1")
        await type_into(pilot, app, "num_train_epochs", "2")
        assert shown(note) == "Epochs 2 sets the run's length (Max steps above 0 would override it)"
        await type_into(pilot, app, "max_steps", "50")
        assert shown(note).startswith("Max steps 50 is above 0")
        await type_into(pilot, app, "max_steps", "5x")  # half typed: the note stays
        assert shown(note).startswith("Max steps 50 is above 0")


async def test_review_says_what_auto_fit_does_on_a_machine_without_a_gpu(tiny_models, tmp_path):
    for values, line in (
            ({}, "Auto-fit on the CPU: micro-batch 16 x accumulation 1 kept, gradient checkpointing off unless the "
                 "activations would crowd the RAM"),
            ({"gradient_checkpointing": "true"}, "Auto-fit on the CPU: micro-batch 16 x accumulation 1 kept, gradient "
                                                 "checkpointing on as given")):
        app = wizard("none", tmp_path, Choices({**DEMO, **values}, "full"))
        async with app.run_test(size=(120, 40)) as pilot:
            await open_step(pilot, app, ReviewStep)
            estimate = app.screen.query_one("#estimate", Static)
            await until(pilot, lambda: "Auto-fit" in shown(estimate), "the estimate")
            assert line in " ".join(shown(estimate).split()) and "GPU memory" not in shown(estimate)
