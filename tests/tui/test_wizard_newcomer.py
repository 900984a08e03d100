"""The wizard as a newcomer meets it: the machine check on step 1, a model preselected and the catalog walked from
its filter, signs while things load, a deliberate start, LLaMA-Factory's table only beside a model it describes, and
the demo model's recipe. Pilot on recorded GPU states, the real doctor checks of this CPU machine (the hub left offline
by tests/conftest.py) and the tiny demo models."""

from __future__ import annotations

import json
import threading
import time

import yaml
from textual.widgets import DataTable, Input, OptionList, Select, Static
from tui_helpers import error, on_step, shown, type_into, until, wizard

from engine.rundir import read_status
from engine.rundir.process import signal_run
from tuner_tui.dashboard.screen import DashboardScreen
from tuner_tui.wizard.app import WizardApp
from tuner_tui.wizard.state import Choices, default_text
from tuner_tui.wizard.steps import (DataStep, HardwareStep, HyperparametersStep, MethodStep, ModelStep,
                                    ReviewStep)
from tuner_tui.wizard.steps.data import PREVIEWING
from tuner_tui.wizard.steps.hardware import CHECKING, doctor_findings

DEMO = {"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca"}
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "tie_word_embeddings": False}


async def open_step(pilot, app, step) -> None:
    await on_step(pilot, app, HardwareStep)
    await until(pilot, lambda: app.hardware is not None, "the probe")
    await app.push_screen(step())
    await pilot.pause()


async def test_a_newcomer_reaches_a_started_run_with_one_enter_per_step_and_ctrl_r(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.chdir(tmp_path)
    app = wizard("none", tmp_path)
    presses = 0

    async def press(*keys: str) -> None:
        nonlocal presses
        presses += len(keys)
        await pilot.press(*keys)

    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await on_step(pilot, app, HardwareStep)
            await until(pilot, lambda: app.hardware is not None, "the probe")
            await press("enter")  # Next is focused
            await on_step(pilot, app, ModelStep)
            await until(pilot, lambda: app.choices.values.get("model_name_or_path") == "tiny-llama", "the preselection")
            await press("enter")  # the empty filter takes the highlighted model and goes on
            await on_step(pilot, app, MethodStep)
            await until(pilot, lambda: app.screen.query_one(DataTable).row_count == 5, "the estimates")
            await press("enter")  # the recipe's method, full, is highlighted
            await on_step(pilot, app, DataStep)
            await until(pilot, lambda: app.choices.values.get("dataset") == "demo_alpaca", "the demo data")
            await press("enter")  # the template's drop-down is focused: closed, Enter goes on
            await on_step(pilot, app, HyperparametersStep)
            await press("enter")
            await on_step(pilot, app, ReviewStep)
            await press("ctrl+r")
            await on_step(pilot, app, DashboardScreen)
            assert app.run_dir is not None and app.run_dir.is_dir()
        assert presses == 6, presses
        config = yaml.safe_load((app.run_dir / "config.yaml").read_text().replace("### ", "# "))
        assert (config["finetuning_type"], config["max_steps"], config["learning_rate"]) == ("full", 300, 3e-3)
    finally:
        if getattr(app, "run_dir", None) is not None:
            stop_and_wait(app.run_dir)  # 300 steps would hold this machine's two cores for a while


def stop_and_wait(run_dir) -> None:
    deadline = time.monotonic() + 60
    while read_status(run_dir).pid is None:
        assert time.monotonic() < deadline, "the run never said its pid"
        time.sleep(0.1)
    signal_run(read_status(run_dir))
    while read_status(run_dir).state in ("queued", "running"):
        assert time.monotonic() < deadline, "the run did not stop"
        time.sleep(0.1)


async def test_hardware_step_shows_the_doctors_problems_with_their_fixes_after_a_checking_sign(tmp_path, monkeypatch):
    # The doctor's own checks, on a CPU build of torch with no extras and a roomy disk whatever this machine has.
    from collections import namedtuple

    from engine import doctor as checks

    real_extras, real_disk = checks.check_extras, checks.check_disk
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checks, "torch_info", lambda see_gpus: checks.TorchInfo("2.13.0+cpu", None, None, None))
    monkeypatch.setattr(checks, "check_extras", lambda on_gpu: real_extras(on_gpu, find_spec=lambda module: None))
    monkeypatch.setattr(checks, "check_disk",
                        lambda places: real_disk(places, usage=lambda path: usage(1 << 40, 1 << 39, 1 << 39)))
    release = threading.Event()

    def held_doctor(hw):
        release.wait(30)
        return doctor_findings(hw)

    app = WizardApp(probe=wizard("a100-80gb", tmp_path).probe, state_dir=tmp_path / "state", doctor=held_doctor)
    async with app.run_test(size=(120, 40)) as pilot:
        await on_step(pilot, app, HardwareStep)
        doctor = app.screen.query_one("#doctor", Static)
        assert shown(doctor) == CHECKING
        await until(pilot, lambda: "A100-SXM4-80GB" in shown(app.screen.query_one("#gpu-info")), "the GPUs")
        assert shown(doctor) == CHECKING  # the probe's result does not wait for the checks
        release.set()
        await until(pilot, lambda: "Machine check:" in shown(doctor), "the findings")
        text = shown(doctor)
        # a CPU torch on the recorded A100: the wheel for its driver, as `tuner doctor` says
        assert "✘ driver: driver 550.54.15 (supports CUDA 12.4), but torch" in text
        assert ("fix: pip uninstall -y torch && pip install torch --index-url https://download.pytorch.org/whl/cu124"
                in text)
        assert "⚠ flash-attn: flash-attn not installed" in text and "fix: pip install flash-attn" in text
        assert "ℹ hub: offline mode (HF_HUB_OFFLINE=1)" in text  # a note, not a problem
        assert text.index("✘") < text.index("⚠") < text.index("ℹ") and "✔ " in text
        assert "disk" in text.rsplit("✔", 1)[1]
        assert app.findings and any(f.state == "problem" for f in app.findings)
        await pilot.press("enter")
        await on_step(pilot, app, ModelStep)  # findings inform; they do not block
        await app.push_screen(ReviewStep())
        await pilot.pause()
        assert shown(app.screen.query_one("#setup")) == ("✘ the machine check found 2 set-up problem(s): driver, "
                                                         "torch; step 1 shows their fixes")


async def test_model_step_preselects_a_demo_model_and_the_filter_walks_the_catalog(tmp_path):
    app = wizard("none", tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_step(pilot, app, ModelStep)
        field = app.screen.query_one("#model_name_or_path", Input)
        catalog = app.screen.query_one("#catalog", OptionList)
        await until(pilot, lambda: field.value == "tiny-llama", "the preselected model")
        assert "tiny-llama preselected: a demo model" in shown(app.screen.query_one("#suggested"))
        assert catalog.highlighted == 0 and app.screen.focused.id == "filter"
        await until(pilot, lambda: "✔ demo model" in shown(app.screen.query_one("#resolved")), "the model resolved")

        await pilot.press("down")  # from the filter, through the list
        assert catalog.highlighted == 1 and app.screen.focused.id == "filter"
        await pilot.press("down", "up", "enter")  # Enter takes the highlighted model and goes on
        await on_step(pilot, app, MethodStep)
        assert app.choices.values["model_name_or_path"] == "tiny-mistral"

        await pilot.press("escape")
        await on_step(pilot, app, ModelStep)
        assert field.value == "tiny-mistral" and app.screen.focused is field
        app.screen.query_one("#filter", Input).focus()
        await pilot.press(*"mixtral", "enter")
        await on_step(pilot, app, MethodStep)
        assert app.choices.values["model_name_or_path"] == "tiny-mixtral"


async def test_a_model_being_checked_shows_a_sign_and_no_stale_message(tmp_path):
    app = wizard("none", tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_step(pilot, app, ModelStep)
        resolved = app.screen.query_one("#resolved", Static)
        await type_into(pilot, app, "model_name_or_path", str(tmp_path / "no-such-model"))
        await until(pilot, lambda: "no-such-model" in error(app, "model_name_or_path"), "the message")
        assert "checking" not in shown(resolved)
        await type_into(pilot, app, "model_name_or_path", "tiny-llama")
        assert not error(app, "model_name_or_path") and shown(resolved) == "checking tiny-llama…"
        await until(pilot, lambda: shown(resolved).startswith("✔ demo model"), "the model resolved")


async def test_next_on_the_review_step_says_how_to_start_and_starts_nothing(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = wizard("none", tmp_path, Choices(dict(DEMO), "full"))
    async with app.run_test(size=(80, 24)) as pilot:
        await open_step(pilot, app, ReviewStep)
        await until(pilot, lambda: shown(app.screen.query_one("#command")), "the command line")
        await pilot.press("ctrl+n")
        await until(pilot, lambda: "Ctrl+R" in error(app, "start"), "the hint")
        assert "press Ctrl+R (or Start) to start the run" in error(app, "start")
        await pilot.pause(0.5)
        assert isinstance(app.screen, ReviewStep) and app.run_dir is None and not (tmp_path / "saves").exists()


def preview(app) -> str:
    return shown(app.screen.query_one("#preview", Static))


async def test_the_data_preview_shows_a_sign_while_it_loads_and_keeps_the_last_one_meanwhile(tiny_models, tmp_path):
    app = wizard("none", tmp_path, Choices({**DEMO, "cutoff_len": "64"}, "full"))
    async with app.run_test(size=(80, 24)) as pilot:
        PREVIEWING.acquire()  # the preview waits for it: a slow disk or a busy machine, made certain
        try:
            await open_step(pilot, app, DataStep)
            busy = app.screen.query_one("#data-busy", Static)
            await until(pilot, lambda: "previewing the data…" in shown(busy), "the sign")
        finally:
            PREVIEWING.release()
        await until(pilot, lambda: "cutoff_len 64:" in preview(app), "the preview")
        await until(pilot, lambda: not shown(busy) and shown(app.screen.query_one("#template-note")),
                    "the sign to go")
        note = shown(app.screen.query_one("#template-note"))

        PREVIEWING.acquire()
        try:
            await type_into(pilot, app, "dataset", "demo_sharegpt")
            await until(pilot, lambda: "previewing the data…" in shown(busy), "the sign again")
            assert "cutoff_len 64:" in preview(app) and shown(app.screen.query_one("#template-note")) == note
        finally:
            PREVIEWING.release()
        await until(pilot, lambda: "of 200 longer" in preview(app), "the new preview")

        app.pop_screen()  # leaving and coming back: the last preview shows at once
        await app.push_screen(DataStep())
        await pilot.pause()
        assert "of 200 longer" in preview(app) and shown(app.screen.query_one("#template-note")) == note


async def test_the_llamafactory_column_shows_only_beside_a_model_its_figures_are_for(tmp_path):
    model = tmp_path / "llama2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    for name, columns in (("tiny-llama", 3), (str(model), 4)):
        app = wizard("a100-80gb", tmp_path, Choices({"model_name_or_path": name}, "lora"))
        async with app.run_test(size=(120, 40)) as pilot:
            await open_step(pilot, app, MethodStep)
            table = app.screen.query_one("#methods", DataTable)
            await until(pilot, lambda: table.row_count == 5, "the estimates")
            headers = [str(column.label) for column in table.columns.values()]
            reason = shown(app.screen.query_one("#reason"))
            assert len(headers) == columns
            if columns == 4:
                assert headers[3] == "LLaMA-Factory GB" and str(table.get_row("full")[3]) == "160"
            else:
                assert "README VRAM table left out: its nearest figures are for 7B models" in reason


def test_a_demo_models_recipe_applies_whole_or_not_at_all():
    cfg = Choices(dict(DEMO)).config()
    assert (cfg.finetune.finetuning_type, cfg.train.learning_rate, cfg.train.max_steps) == ("full", 3e-3, 300)
    assert (cfg.train.per_device_train_batch_size, cfg.train.lr_scheduler_type) == (16, "cosine")
    assert (cfg.train.warmup_ratio, cfg.train.logging_steps) == (0.05, 10)
    assert Choices(dict(DEMO, max_steps="300"), "full").recipe().applied  # equal values keep it
    for changed, method in ((dict(DEMO, learning_rate="1e-4"), None), (dict(DEMO), "lora"),
                            (dict(DEMO, num_train_epochs="2"), None), (dict(DEMO), "qlora-4bit")):
        choices = Choices(changed, method)
        assert choices.recipe().applied == {} and choices.config().train.max_steps == -1
    assert Choices(dict(DEMO)).recipe_method() == "full" and Choices(dict(DEMO), "lora").recipe_method() is None
    line = Choices(dict(DEMO)).command_line()
    assert "--max_steps 300" in line and "--logging_steps 10" in line and "--finetuning_type full" in line
    assert default_text("max_steps", Choices(dict(DEMO)).recipe()) == "300: tiny-llama's recipe"
    plain = Choices({"model_name_or_path": "llama2-7b"}, "lora")
    assert plain.flat() == {"model_name_or_path": "llama2-7b", "finetuning_type": "lora"}
    assert default_text("max_steps", plain.recipe()) == "-1: use epochs"


async def test_fields_show_the_recipe_while_it_applies_and_the_method_step_keeps_it_for_full(tmp_path):
    app = wizard("none", tmp_path, Choices(dict(DEMO)))
    async with app.run_test(size=(120, 40)) as pilot:
        await open_step(pilot, app, MethodStep)
        table = app.screen.query_one("#methods", DataTable)
        await until(pilot, lambda: table.row_count == 5, "the estimates")
        assert app.choices.method == "full" and table.cursor_row == 0
        reason = app.screen.query_one("#reason", Static)
        assert "demo recipe of tiny-llama: finetuning_type full" in shown(reason)
        table.move_cursor(row=2)  # LoRA: the recipe is a full fine-tune's, so none of it applies
        await until(pilot, lambda: "recipe of tiny-llama not used: finetuning_type set" in shown(reason),
                    "the estimate without the recipe")
        table.move_cursor(row=0)
        await until(pilot, lambda: "demo recipe of tiny-llama: finetuning_type full" in shown(reason),
                    "the recipe back")

        await app.push_screen(HyperparametersStep())
        await pilot.pause()
        placeholder = lambda key: app.screen.query_one(f"#{key}", Input).placeholder  # noqa: E731
        assert placeholder("max_steps") == "300: tiny-llama's recipe"
        assert placeholder("learning_rate") == "0.003: tiny-llama's recipe"
        assert "cosine: tiny-llama's recipe" in str(app.screen.query_one("#lr_scheduler_type", Select).prompt)
        await type_into(pilot, app, "max_steps", "300")  # the recipe's own value keeps it
        assert placeholder("learning_rate") == "0.003: tiny-llama's recipe"
        await type_into(pilot, app, "max_steps", "20")
        assert placeholder("learning_rate") == "5e-05" and placeholder("warmup_ratio") == "0.0"
        await type_into(pilot, app, "max_steps", "")
        assert placeholder("learning_rate") == "0.003: tiny-llama's recipe"

        await pilot.press("ctrl+n")
        await on_step(pilot, app, ReviewStep)
        command, yaml_text = app.screen.query_one("#command"), app.screen.query_one("#yaml")
        await until(pilot, lambda: shown(command), "the command line")
        assert "--max_steps 300 --logging_steps 10" in shown(command)
        assert "lr_scheduler_type: cosine" in shown(yaml_text) and "learning_rate: 0.003" in shown(yaml_text)
        assert shown(app.screen.query_one("#recipe")).startswith("demo recipe of tiny-llama: finetuning_type full")


async def test_a_method_preselected_for_the_demo_model_is_chosen_again_for_the_next_model(tmp_path):
    app = wizard("a100-80gb", tmp_path, Choices(dict(DEMO)))
    async with app.run_test(size=(120, 40)) as pilot:
        await open_step(pilot, app, MethodStep)
        table = app.screen.query_one("#methods", DataTable)
        await until(pilot, lambda: table.row_count == 5 and app.choices.method == "full", "the recipe's method")
        app.pop_screen()
        app.choices.values["model_name_or_path"] = "llama2-70b"
        await app.push_screen(MethodStep())
        await until(pilot, lambda: app.choices.preselected_for == "llama2-70b", "a method for the new model")
        assert app.choices.method != "full"
        assert yaml.safe_load(app.choices.remember(tmp_path / "kept").read_text())["method"] is None

        table = app.screen.query_one("#methods", DataTable)
        await until(pilot, lambda: table.row_count == 5, "the estimates")
        table.move_cursor(row=table.get_row_index("qlora-4bit"))
        await until(pilot, lambda: app.choices.method == "qlora-4bit", "the user's choice")
        assert app.choices.preselected_for is None
        assert yaml.safe_load(app.choices.remember(tmp_path / "kept").read_text())["method"] == "qlora-4bit"
