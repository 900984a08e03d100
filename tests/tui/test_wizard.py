"""The wizard (`tuner` with no arguments), walked with Pilot on recorded GPU states and the tiny demo model."""

from __future__ import annotations

import pytest
import yaml
from textual.widgets import DataTable, Input, Select, SelectionList, Static
from tui_helpers import error, on_step, shown, type_into, until, wizard

from engine.rundir import read_status
from tuner_tui.dashboard.screen import DashboardScreen
from tuner_tui.dashboard.widgets import StateBanner
from engine.cli import tuner as main
from tuner_tui.wizard.steps import (LEARNED, DataStep, HardwareStep, HyperparametersStep, MethodStep, ModelStep,
                                    ReviewStep)
from tuner_tui.wizard.state import Choices






async def next_blocked(pilot, app, key: str, step) -> str:
    """Press Next, wait for the message beside ``key`` and check the wizard stayed on ``step``."""
    await pilot.click("#next")
    await until(pilot, lambda: error(app, key), f"the message beside {key}")
    await pilot.pause(0.2)
    assert isinstance(app.screen, step)
    return error(app, key)


async def walk_to_review(pilot, app, machine: str) -> None:
    # 1. Hardware
    await on_step(pilot, app, HardwareStep)
    info = app.screen.query_one("#gpu-info", Static)
    await until(pilot, lambda: "probing" not in shown(info), "the probe")
    if machine == "none":
        assert "no NVIDIA GPU found" in shown(info) and "CPU" in shown(info)
    else:
        assert "A100-SXM4-80GB" in shown(info) and "driver" in shown(info)
        gpus = app.screen.query_one(SelectionList)
        assert gpus.selected == [0]
        gpus.deselect_all()
        assert "at least one GPU" in await next_blocked(pilot, app, "gpus", HardwareStep)
        gpus.select_all()
    await pilot.click("#next")

    # 2. Model: the catalog filters, a missing directory is refused beside the field
    await on_step(pilot, app, ModelStep)
    catalog = app.screen.query_one("#catalog")
    await until(pilot, lambda: catalog.option_count > 3, "the catalog")
    await type_into(pilot, app, "filter", "tiny-ll")
    assert catalog.option_count == 1
    await type_into(pilot, app, "model_name_or_path", "/no/such/model")
    assert "/no/such/model" in await next_blocked(pilot, app, "model_name_or_path", ModelStep)
    catalog.highlighted = 0
    catalog.action_select()
    await pilot.pause()
    assert app.screen.query_one("#model_name_or_path", Input).value == "tiny-llama"
    await pilot.click("#next")

    # 3. Method: every method estimated, the demo recipe's method (full) preselected; a bad rank blocks Next
    await on_step(pilot, app, MethodStep)
    table = app.screen.query_one("#methods", DataTable)
    await until(pilot, lambda: table.row_count == 5, "the estimates")
    reason = shown(app.screen.query_one("#reason", Static))
    assert "no NVIDIA GPU" in reason if machine == "none" else "LoRA (16-bit) is recommended" in reason
    assert app.choices.method == "full" and "demo recipe of tiny-llama: finetuning_type full" in reason
    first = [str(c) for c in table.get_row_at(0)]
    assert first[0].startswith("Full") and float(first[1]) > 0 and first[2] in ("—", "✔ yes")
    assert len(first) == 3 and "LLaMA-Factory's README VRAM table left out" in reason  # for 7B models
    bits = app.screen.query_one("#qlora-bits", Select)
    bits.value = 4
    await until(pilot, lambda: table.cursor_row == 4, "the QLoRA 4-bit row")
    assert app.choices.method == "qlora-4bit"
    table.move_cursor(row=2)  # LoRA
    await until(pilot, lambda: bits.value is Select.NULL, "the bits cleared")
    assert app.choices.method == "lora"
    await type_into(pilot, app, "lora_rank", "0")
    assert "lora_rank must be at least 1" in await next_blocked(pilot, app, "lora_rank", MethodStep)
    before = table.get_row_at(2)[1]
    await type_into(pilot, app, "lora_rank", "64")
    await until(pilot, lambda: table.row_count == 5 and table.get_row_at(2)[1] != before
                and not error(app, "lora_rank"), "the re-estimate")
    assert app.choices.method == "lora"
    await pilot.click("#next")

    # 4. Template and dataset: a missing file is refused; the preview shows the learned part and the stats
    await on_step(pilot, app, DataStep)
    template = app.screen.query_one("#template-select", Select)
    await until(pilot, lambda: template.value == "llama2", "the model's template")
    await type_into(pilot, app, "dataset", "missing.json")
    assert "missing.json" in await next_blocked(pilot, app, "dataset", DataStep)
    app.screen.query_one("#dataset-select", Select).value = "demo_alpaca"
    preview = app.screen.query_one("#preview", Static)
    try:
        await until(pilot, lambda: "tokens:" in shown(preview), "the preview")
    except AssertionError:
        raise AssertionError(f"{error(app, 'dataset')!r} {shown(preview)!r} {app.choices.values}")
    assert app.choices.values["dataset"] == "demo_alpaca"
    assert "over cutoff_len" in shown(preview) and "sample 1" in shown(preview)
    assert any(span.style == LEARNED for span in preview.render().spans)
    await pilot.click("#next")

    # 5. Hyperparameters: validated as typed
    await on_step(pilot, app, HyperparametersStep)
    await type_into(pilot, app, "learning_rate", "fast")
    await until(pilot, lambda: "learning_rate" in error(app, "learning_rate"), "the message as typed")
    assert "learning_rate" in await next_blocked(pilot, app, "learning_rate", HyperparametersStep)
    await type_into(pilot, app, "learning_rate", "2e-4")
    await type_into(pilot, app, "max_steps", "2")
    await type_into(pilot, app, "per_device_train_batch_size", "2")
    await type_into(pilot, app, "cutoff_len", "256")
    await until(pilot, lambda: not error(app, "learning_rate"), "the message to clear")
    await pilot.click("#next")
    await on_step(pilot, app, ReviewStep)


@pytest.mark.parametrize("machine", ["a100-80gb", "none"])
async def test_walk_the_wizard_and_save(machine, tiny_models, tmp_path):
    app = wizard(machine, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await walk_to_review(pilot, app, machine)
        command = app.screen.query_one("#command", Static)
        await until(pilot, lambda: shown(command), "the command line")
        assert shown(command).startswith("tuner train ") and "--max_steps 2" in shown(command)
        assert "learning_rate: 0.0002" in shown(app.screen.query_one("#yaml", Static))
        estimate = app.screen.query_one("#estimate", Static)
        await until(pilot, lambda: "GiB" in shown(estimate), "the estimate once more")
        if machine == "none":
            assert "LoRA (16-bit) needs about" in shown(estimate) and "CPU" in shown(estimate)
        else:
            assert shown(estimate).startswith("✔ LoRA (16-bit) needs about")
            assert "usable on 1 x NVIDIA A100-SXM4-80GB" in shown(estimate)

        await type_into(pilot, app, "save_path", str(tmp_path / "no" / "such" / "run.yaml"))
        await pilot.click("#save")
        await until(pilot, lambda: "does not exist" in error(app, "save_path"), "the refused path")
        saved = tmp_path / "run.yaml"
        await type_into(pilot, app, "save_path", str(saved))
        await pilot.press("ctrl+s")
        await until(pilot, saved.exists, "the saved config")
        await until(pilot, lambda: not error(app, "save_path"), "the message to clear")
    config = yaml.safe_load(saved.read_text())
    assert config["model_name_or_path"] == "tiny-llama" and config["dataset"] == "demo_alpaca"
    assert config["finetuning_type"] == "lora" and config["lora_rank"] == 64 and config["quantization_bit"] is None
    assert config["learning_rate"] == 2e-4 and config["max_steps"] == 2 and config["cutoff_len"] == 256
    assert config["per_device_train_batch_size"] == 2 and config["template"] == "llama2"

    remembered = Choices.recalled(tmp_path / "state")
    assert remembered.values["model_name_or_path"] == "tiny-llama" and remembered.method == "lora"


async def test_esc_goes_back_keeping_values_at_80x24(tiny_models, tmp_path):
    app = wizard("none", tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await on_step(pilot, app, HardwareStep)
        await until(pilot, lambda: app.hardware is not None, "the probe")
        await pilot.press("ctrl+n")
        await on_step(pilot, app, ModelStep)
        await type_into(pilot, app, "model_name_or_path", "tiny-llama")
        await pilot.press("ctrl+n")
        await on_step(pilot, app, MethodStep)
        table = app.screen.query_one("#methods", DataTable)
        await until(pilot, lambda: table.row_count == 5, "the estimates")
        table.move_cursor(row=2)  # LoRA, whose settings show (the demo recipe's full method has none)
        await until(pilot, lambda: app.screen.query_one("#row-lora_rank").display, "LoRA's settings")
        await type_into(pilot, app, "lora_rank", "16")
        await pilot.press("escape")
        await on_step(pilot, app, ModelStep)
        assert app.screen.query_one("#model_name_or_path", Input).value == "tiny-llama"
        await pilot.press("ctrl+n")
        await on_step(pilot, app, MethodStep)
        assert app.screen.query_one("#lora_rank", Input).value == "16"
        next_button = app.screen.query_one("#next")
        assert next_button.region.bottom <= 23 and next_button.region.height > 0  # above the footer at 80x24
        app.screen.query_one("#lora_rank", Input).focus()
        await pilot.press("q")  # a letter typed into a field stays there
        assert app.screen.query_one("#lora_rank", Input).value.endswith("q") and app.is_running
        await pilot.press("ctrl+q")  # Ctrl+Q quits, from a field too
        await pilot.pause()
    assert app.return_code == 0 and app.return_value is None


def test_config_file_prefills_and_bad_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: tiny-llama\ndataset: demo_alpaca\nquantization_bit: 4\nmax_steps: 7\n")
    choices = Choices.from_file(path)
    assert choices.method == "qlora-4bit" and choices.values["max_steps"] == "7"
    assert "--quantization_bit 4" in choices.command_line() and "--max_steps 7" in choices.command_line()
    (tmp_path / "bad.yaml").write_text("lora_rnak: 8\n")
    assert main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert main(["--config"]) == 2


async def test_start_launches_a_detached_run_and_opens_its_dashboard(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    run_dir = tmp_path / "run"
    choices = Choices({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "max_steps": "2",
                       "output_dir": str(run_dir), "cutoff_len": "128"}, "lora")
    app = wizard("none", tmp_path, choices)
    async with app.run_test(size=(120, 40)) as pilot:
        for step in (HardwareStep, ModelStep, MethodStep, DataStep, HyperparametersStep):
            await on_step(pilot, app, step)
            if step is HardwareStep:
                await until(pilot, lambda: app.hardware is not None, "the probe")
            if step is MethodStep:
                await until(pilot, lambda: app.screen.query_one(DataTable).row_count == 5, "the estimates")
            if step is DataStep:
                await until(pilot, lambda: app.screen.query_one("#template-select", Select).value == "llama2",
                            "the template")
            await pilot.press("ctrl+n")
        await on_step(pilot, app, ReviewStep)
        await pilot.click("#start")
        await on_step(pilot, app, DashboardScreen)
        assert app.run_dir == run_dir.resolve()
        banner = app.screen.query_one(StateBanner)
        await until(pilot, lambda: shown(banner).startswith("✔ COMPLETED"), "the run to complete")
    status = read_status(run_dir)
    assert status.state == "completed" and status.method == "lora"
    config = yaml.safe_load((run_dir / "config.yaml").read_text().replace("### ", "# "))
    assert config["max_steps"] == 2 and config["cutoff_len"] == 128 and config["dataset"] == "demo_alpaca"
    assert (run_dir / "checkpoint-2").is_dir()


def test_tuner_without_arguments_opens_the_wizard(monkeypatch, capsys):
    import tuner_tui.wizard.app as wizard_app

    opened = []
    monkeypatch.setattr(wizard_app, "run_wizard", lambda path=None: opened.append(path) or 0)
    assert main([]) == 0 and main(["--config", "run.yaml"]) == 0 and main(["--config=other.yaml"]) == 0
    assert opened == [None, "run.yaml", "other.yaml"]
    assert main(["--help"]) == 0 and "monitor" in capsys.readouterr().out


def test_a_token_is_never_remembered(tmp_path):
    choices = Choices({"model_name_or_path": "tiny-llama", "hf_hub_token": "hf_SecretNeverSaved"}, "lora", None)
    path = choices.remember(tmp_path)
    assert "hf_SecretNeverSaved" not in path.read_text()
    assert Choices.recalled(tmp_path).values == {"model_name_or_path": "tiny-llama"}
