"""The wizard's method and hyperparameter options (LoRA targets, the advanced section) and its keyboard flow at 80x24,
with Pilot on recorded GPU states and the tiny demo model."""

from __future__ import annotations

import json

import yaml
from textual.widgets import Button, Collapsible, DataTable, Input, Select, Static, Switch
from tui_helpers import error, on_step, shown, type_into, until, wizard

from tuner_tui.wizard.steps import (DataStep, HardwareStep, HyperparametersStep, MethodStep, ModelStep,
                                    ReviewStep)
from tuner_tui.wizard.state import Choices

# Llama 2 7B's config.json: a model directory the wizard can estimate for without weights.
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "tie_word_embeddings": False}
READY = {"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "template": "llama2"}





async def open_step(pilot, app, step) -> None:
    """Open ``step`` on top of the hardware step, as Next from the step before it would."""
    await on_step(pilot, app, HardwareStep)
    await until(pilot, lambda: app.hardware is not None, "the probe")
    await app.push_screen(step())
    await pilot.pause()



def lora_estimate(app) -> str:
    table = app.screen.query_one("#methods", DataTable)
    return str(table.get_row("lora")[1]) if table.row_count == 5 else ""


async def test_lora_targets_offer_the_models_layers_are_checked_and_move_the_estimate(tmp_path):
    model = tmp_path / "llama2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    app = wizard("a100-80gb", tmp_path, Choices({"model_name_or_path": str(model)}, "lora"))
    async with app.run_test(size=(120, 40)) as pilot:
        await open_step(pilot, app, MethodStep)
        targets = app.screen.query_one("#targets", Static)
        await until(pilot, lambda: "LoRA trains" in shown(targets), "the model's layers")
        assert shown(targets) == ("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all · "
                                  "LoRA trains 20.0M parameters")
        assert app.screen.query_one("#lora_target", Input).placeholder == "all: every linear layer"
        every_layer = lora_estimate(app)

        await type_into(pilot, app, "lora_target", "q_proj,v_proj")
        await until(pilot, lambda: "4.2M" in shown(targets), "the re-estimate")
        assert float(lora_estimate(app)) < float(every_layer)

        await type_into(pilot, app, "lora_target", "q_proj,qkv_proj")
        await until(pilot, lambda: error(app, "lora_target"), "the message as typed")
        assert error(app, "lora_target").startswith("lora_target qkv_proj not found in this model")
        await pilot.press("ctrl+n")
        await pilot.pause(0.5)
        assert isinstance(app.screen, MethodStep) and "qkv_proj" in error(app, "lora_target")

        field = app.screen.query_one("#lora_target", Input)
        field.focus()
        field.value = ""
        await pilot.press(*"q_proj,do")
        await until(pilot, lambda: field._suggestion == "q_proj,down_proj", "the suggested layer")
        await pilot.press("right")
        assert field.value == "q_proj,down_proj"
        await until(pilot, lambda: not error(app, "lora_target"), "the message to clear")
        await pilot.press("enter")
        await on_step(pilot, app, DataStep)
    assert app.choices.config().finetune.lora_target == "q_proj,down_proj"


async def test_advanced_settings_are_collapsed_show_defaults_and_are_checked_as_typed(tmp_path):
    app = wizard("a100-80gb", tmp_path, Choices(dict(READY), "lora"))
    async with app.run_test(size=(120, 40)) as pilot:
        await open_step(pilot, app, HyperparametersStep)
        advanced = app.screen.query_one("#advanced", Collapsible)
        assert advanced.collapsed and app.screen.query_one("#warmup_ratio", Input).region.area == 0
        placeholders = {key: app.screen.query_one(f"#{key}", Input).placeholder
                        for key in ("learning_rate", "warmup_ratio", "logging_steps", "save_steps", "seed",
                                    "save_total_limit", "lora_dropout")}
        assert placeholders == {"learning_rate": "5e-05", "warmup_ratio": "0.0", "logging_steps": "10",
                                "save_steps": "500", "seed": "42", "save_total_limit": "none: keep all",
                                "lora_dropout": "0.0"}
        assert app.screen.query_one("#lr_scheduler_type", Select).is_blank()
        assert "weight decay" in str(app.screen.query_one("#weight_decay", Input).tooltip).lower()
        assert app.screen.query_one("#gradient_checkpointing", Select).is_blank()  # auto-fit decides
        assert app.screen.query_one("#auto_fit", Switch).value is True
        assert app.screen.query_one("#padding_free", Switch).value is True
        assert app.screen.query_one("#enable_liger_kernel", Select).is_blank()

        await pilot.click("#advanced CollapsibleTitle")
        assert not advanced.collapsed
        await type_into(pilot, app, "warmup_ratio", "1.5")
        await type_into(pilot, app, "seed", "lucky")
        await until(pilot, lambda: error(app, "seed"), "the messages as typed")
        assert error(app, "seed") == "seed: expected a whole number, got 'lucky'"
        await type_into(pilot, app, "seed", "7")
        await until(pilot, lambda: error(app, "warmup_ratio"), "the range check")
        assert error(app, "warmup_ratio") == "warmup_ratio must be in [0, 1), got 1.5"
        await type_into(pilot, app, "warmup_ratio", "0.1")

        app.screen.query_one("#eval_strategy", Select).value = "steps"
        await until(pilot, lambda: error(app, "eval_strategy"), "the missing evaluation data")
        assert "set val_size or eval_dataset" in error(app, "eval_strategy")
        await type_into(pilot, app, "val_size", "0.1")
        await until(pilot, lambda: not error(app, "eval_strategy"), "the message to clear")

        app.screen.query_one("#bf16", Select).value = "true"
        app.screen.query_one("#fp16", Select).value = "true"
        await until(pilot, lambda: error(app, "bf16"), "the precision clash")
        assert error(app, "bf16") == "bf16 and fp16 are both set: choose one precision"
        app.screen.query_one("#bf16", Select).clear()
        await until(pilot, lambda: not error(app, "bf16"), "the message to clear")

        await type_into(pilot, app, "optim", "adamw_8bt")
        await until(pilot, lambda: error(app, "optim"), "the optimizer look-up")  # imports transformers
        assert error(app, "optim").startswith("optim 'adamw_8bt' is not an optimizer transformers knows: did you "
                                              "mean adamw_8bit")
        await type_into(pilot, app, "optim", "paged_adamw_8bit")
        await until(pilot, lambda: not error(app, "optim"), "the message to clear")

        app.screen.query_one("#lr_scheduler_type", Select).value = "cosine"
        app.screen.query_one("#packing", Switch).value = True
        app.screen.query_one("#use_dora", Switch).value = True
        app.screen.query_one("#gradient_checkpointing", Select).value = "false"
        app.screen.query_one("#auto_fit", Switch).value = False
        for key, value in (("eval_steps", "5"), ("save_total_limit", "2"), ("neftune_noise_alpha", "5"),
                           ("lora_dropout", "0.05"), ("max_samples", "100"), ("max_steps", "2"),
                           ("run_name", "dora-try")):
            await type_into(pilot, app, key, value)
        await pilot.press("ctrl+n")
        await on_step(pilot, app, ReviewStep)
        saved = tmp_path / "run.yaml"
        await type_into(pilot, app, "save_path", str(saved))
        await pilot.press("ctrl+s")
        await until(pilot, saved.exists, "the saved config")
    config = yaml.safe_load(saved.read_text())
    assert {key: config[key] for key in ("lr_scheduler_type", "warmup_ratio", "seed", "eval_strategy", "eval_steps",
                                         "val_size", "packing", "gradient_checkpointing", "save_total_limit",
                                         "neftune_noise_alpha", "lora_dropout", "max_samples", "bf16", "fp16",
                                         "optim", "use_dora", "run_name", "auto_fit")} == {
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "seed": 7, "eval_strategy": "steps", "eval_steps": 5,
        "val_size": 0.1, "packing": True, "gradient_checkpointing": False, "save_total_limit": 2,
        "neftune_noise_alpha": 5.0, "lora_dropout": 0.05, "max_samples": 100, "bf16": None, "fp16": True,
        "optim": "paged_adamw_8bit", "use_dora": True, "run_name": "dora-try", "auto_fit": False}


async def test_a_bad_advanced_value_opens_the_section_and_lora_only_settings_hide_for_full(tmp_path):
    """A bad value brought in (from --config or remembered) is checked as the step opens, like one typed there."""
    app = wizard("none", tmp_path, Choices({**READY, "weight_decay": "heavy"}, "full"))
    async with app.run_test(size=(120, 40)) as pilot:
        await open_step(pilot, app, HyperparametersStep)
        advanced = app.screen.query_one("#advanced", Collapsible)
        assert not any(app.screen.query_one(f"#row-{key}").display for key in ("lora_dropout", "use_rslora", "use_dora"))
        await until(pilot, lambda: error(app, "weight_decay"), "the message beside the field")
        assert error(app, "weight_decay") == "weight_decay: expected a number, got 'heavy'"
        assert not advanced.collapsed
        await pilot.press("enter")
        await pilot.pause(0.5)
        assert isinstance(app.screen, HyperparametersStep) and error(app, "weight_decay")


def focus_shown(app) -> bool:
    """The focused widget is on screen: in the nav bar, or in the body's visible part (an 80x24 terminal)."""
    focused, body = app.screen.focused, app.screen.query_one("#body")
    return focused.region.height > 0 and (body not in focused.ancestors or body.region.contains_region(focused.region))


async def tab_to(pilot, app, button: str = "next") -> list[str | None]:
    """Tab through the step to one of its buttons, checking each field is scrolled into view; the ids passed."""
    passed = []
    for _ in range(40):
        focused = app.screen.focused
        if isinstance(focused, Button) and focused.id == button:
            return passed
        assert focused is None or focus_shown(app), f"{focused} is out of view at 80x24"
        passed.append(getattr(focused, "id", None))
        await pilot.press("tab")
    raise AssertionError(f"#{button} not reached by Tab; passed {passed}")


async def shift_tab_to(pilot, app, widget) -> None:
    for _ in range(40):
        if app.screen.focused is widget:
            assert focus_shown(app), f"{widget} is out of view at 80x24"
            return
        await pilot.press("shift+tab")
    raise AssertionError(f"{widget} not reached by Shift+Tab")


async def test_keyboard_alone_walks_the_wizard_at_80x24(tiny_models, tmp_path):
    app = wizard("2x-rtx-4090", tmp_path, Choices({"dataset": "demo_alpaca"}))
    async with app.run_test(size=(80, 24)) as pilot:
        await on_step(pilot, app, HardwareStep)
        await until(pilot, lambda: app.hardware is not None, "the probe")
        assert app.screen.focused.id == "next"
        await pilot.press("enter")

        await on_step(pilot, app, ModelStep)
        assert app.screen.focused.id == "filter"
        await until(pilot, lambda: app.screen.query_one("#catalog").option_count > 3, "the catalog")
        await pilot.press(*"tiny-ll", "enter")  # Enter in the filter takes the model shown and goes on

        await on_step(pilot, app, MethodStep)
        assert app.choices.values["model_name_or_path"] == "tiny-llama"
        table = app.screen.query_one("#methods", DataTable)
        assert app.screen.focused is table
        await until(pilot, lambda: table.row_count == 5, "the estimates")
        await pilot.press("down", "down")  # LoRA, whose settings show (the demo recipe's full method has none)
        await until(pilot, lambda: app.screen.query_one("#row-lora_target").display, "LoRA's settings")
        assert "lora_target" in await tab_to(pilot, app)
        await shift_tab_to(pilot, app, app.screen.query_one("#lora_target"))
        await pilot.press("enter")

        await on_step(pilot, app, DataStep)
        await tab_to(pilot, app)
        await pilot.press("enter")

        await on_step(pilot, app, HyperparametersStep)
        assert app.screen.focused.id == "learning_rate"
        await pilot.press(*"2e-4")
        passed = await tab_to(pilot, app)
        assert "output_dir" in passed and "warmup_ratio" not in passed
        await shift_tab_to(pilot, app, app.screen.query_one("#advanced CollapsibleTitle"))
        await pilot.press("enter")  # opens the section
        assert not app.screen.query_one("#advanced", Collapsible).collapsed
        passed = await tab_to(pilot, app)
        assert {"warmup_ratio", "packing", "lr_scheduler_type", "bf16", "report_to"} <= set(passed)
        await pilot.press("enter")

        await on_step(pilot, app, ReviewStep)
        assert app.screen.focused.id == "save_path" and focus_shown(app)
        await until(pilot, lambda: shown(app.screen.query_one("#command", Static)), "the command line")
        saved = tmp_path / "run.yaml"
        app.screen.focused.value = str(saved)
        await pilot.press("enter")  # Enter in the path saves; it does not start a run
        await until(pilot, saved.exists, "the saved config")
        await pilot.pause(0.5)
        assert isinstance(app.screen, ReviewStep) and app.run_dir is None
        assert "save" in await tab_to(pilot, app, "start")
    config = yaml.safe_load(saved.read_text())
    assert config["model_name_or_path"] == "tiny-llama" and config["learning_rate"] == 2e-4
