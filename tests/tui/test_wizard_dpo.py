"""Preference tuning in the wizard: the stage chosen on step 3 (sft preselected) shows DPO's settings and counts
the pairs and the reference in the estimate; step 4 then lists the ranking datasets, with demo_pairs, and previews
a pair; the command reviewed says stage dpo. On a recorded A100 80GB and the tiny demo model."""

from __future__ import annotations

from textual.widgets import DataTable, Select, Static
from tui_helpers import on_step, shown, until, wizard

from tuner_tui.wizard.state import Choices
from tuner_tui.wizard.steps import DataStep, HardwareStep, MethodStep


async def on_the_method_step(pilot, app) -> DataTable:
    """Past the hardware probe to step 3, its methods estimated: their table."""
    await on_step(pilot, app, HardwareStep)
    await until(pilot, lambda: app.hardware is not None, "the probe")
    await app.push_screen(MethodStep())
    table = app.screen.query_one("#methods", DataTable)
    await until(pilot, lambda: table.row_count == 5, "the estimates")
    return table


async def test_stage_dpo_shows_its_settings_lists_pairs_and_previews_one(tiny_models, tmp_path):
    app = wizard("a100-80gb", tmp_path, Choices({"model_name_or_path": "tiny-llama"}))
    async with app.run_test(size=(100, 40)) as pilot:
        table = await on_the_method_step(pilot, app)
        assert app.screen.focused is table
        assert not app.screen.query_one("#row-pref_beta").display
        full_sft = float(str(table.get_row("full")[1]))
        app.screen.query_one("#stage", Select).value = "dpo"
        await until(pilot, lambda: app.screen.query_one("#row-pref_beta").display, "DPO's settings")
        assert app.screen.query_one("#row-pref_loss").display and app.screen.query_one("#row-pref_ftx").display
        await until(pilot, lambda: float(str(table.get_row("full")[1])) > full_sft, "the reference counted")
        full_dpo = float(str(table.get_row("full")[1]))
        loss = app.screen.query_one("#row-pref_loss Select", Select)
        assert {"orpo", "simpo"} <= {value for _, value in loss._options}
        loss.value = "orpo"  # no reference model
        await until(pilot, lambda: float(str(table.get_row("full")[1])) < full_dpo, "the reference left out")
        loss.value = "sigmoid"
        assert not app.choices.recipe().applied  # the demo model's recipe is a supervised fine-tune's

        await app.push_screen(DataStep())
        options = app.screen.query_one("#dataset-select", Select)
        await until(pilot, lambda: app.choices.values.get("dataset") == "demo_pairs", "the demo pairs chosen")
        assert [value for _, value in options._options if value is not Select.NULL] == ["demo_pairs"]
        preview = app.screen.query_one("#preview", Static)
        await until(pilot, lambda: "── pair 1" in shown(preview), "a pair previewed")
        text = shown(preview)
        assert "chosen" in text and "rejected" in text and "How many letters are in 'ship'?" in text
        assert "--stage dpo" in app.choices.command_line()


async def test_stage_kto_shows_its_weights_lists_tagged_data_and_previews_a_judged_reply(tiny_models, tmp_path):
    app = wizard("a100-80gb", tmp_path, Choices({"model_name_or_path": "tiny-llama"}))
    async with app.run_test(size=(100, 40)) as pilot:
        table = await on_the_method_step(pilot, app)
        full_sft = float(str(table.get_row("full")[1]))
        app.screen.query_one("#stage", Select).value = "kto"
        await until(pilot, lambda: app.screen.query_one("#row-kto_chosen_weight").display, "KTO's settings")
        assert app.screen.query_one("#row-pref_beta").display and not app.screen.query_one("#row-pref_loss").display
        # estimated again, without the demo model's recipe (a supervised fine-tune's); the reference's share:
        # tests/unit/test_memory.py
        await until(pilot, lambda: float(str(table.get_row("full")[1])) != full_sft, "the estimate for stage kto")

        await app.push_screen(DataStep())
        options = app.screen.query_one("#dataset-select", Select)
        await until(pilot, lambda: app.choices.values.get("dataset") == "demo_feedback", "the demo feedback chosen")
        assert [value for _, value in options._options if value is not Select.NULL] == ["demo_feedback"]
        assert options.value == "demo_feedback"  # the registered dataset shown chosen too
        preview = app.screen.query_one("#preview", Static)
        await until(pilot, lambda: "── sample 1" in shown(preview), "a sample previewed")
        assert "undesirable" in shown(preview)
        assert "--stage kto" in app.choices.command_line()


async def test_a_preference_stage_starts_from_a_finished_lora_run_of_the_model(home, tmp_path):
    """LLaMA-Factory's recipe in the wizard: after a LoRA SFT run of the model, stage dpo offers it as the start
    (adapter_name_or_path); the model itself stays the default."""
    from engine.cli import main

    sft = tmp_path / "sft"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--finetuning_type",
                 "lora", "--max_steps", "1", "--output_dir", str(sft)]) == 0
    app = wizard("a100-80gb", tmp_path, Choices({"model_name_or_path": "tiny-llama"}))
    async with app.run_test(size=(100, 40)) as pilot:
        await on_the_method_step(pilot, app)
        start = app.screen.query_one("#adapter_name_or_path", Select)
        assert not app.screen.query_one("#row-adapter_name_or_path").display  # stage sft: no such row
        app.screen.query_one("#stage", Select).value = "dpo"
        await until(pilot, lambda: len(start._options) > 1, "the finished runs listed")
        assert app.screen.query_one("#row-adapter_name_or_path").display
        assert [value for _, value in start._options if value is not Select.NULL] == [str(sft)]
        assert start.value is Select.NULL and "adapter_name_or_path" not in app.choices.command_line()
        app.choices.method = "full"
        start.value = str(sft)
        await until(pilot, lambda: app.choices.values.get("adapter_name_or_path") == str(sft), "the run chosen")
        assert f"--adapter_name_or_path {sft}" in app.choices.command_line()
        assert app.choices.method == "lora"  # its adapter trains on as LoRA
        app.screen.query_one("#stage", Select).value = "sft"  # a supervised run starts from the model again
        await until(pilot, lambda: "adapter_name_or_path" not in app.choices.command_line(), "the start dropped")
        assert start.value is Select.NULL and not app.screen.query_one("#row-adapter_name_or_path").display


async def test_stage_rm_estimates_a_score_head_lists_pairs_and_starts_from_an_sft_run(home, tmp_path):
    """A reward model in the wizard: no preference settings, an estimate without the LM head's logits, the ranking
    datasets with demo_pairs and a pair previewed; it may start from a finished LoRA SFT run, whose adapter is merged
    under the new one. A reward model's run is offered to stage rm only, never to DPO."""
    from engine.cli import main

    sft, rm = tmp_path / "sft", tmp_path / "rm"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--max_steps", "1",
                 "--output_dir", str(sft)]) == 0
    assert main(["train", "--stage", "rm", "--model_name_or_path", "tiny-llama", "--dataset", "demo_pairs",
                 "--max_steps", "1", "--output_dir", str(rm)]) == 0
    app = wizard("a100-80gb", tmp_path, Choices({"model_name_or_path": "tiny-llama"}))
    async with app.run_test(size=(100, 40)) as pilot:
        table = await on_the_method_step(pilot, app)
        lora_sft = float(str(table.get_row("lora")[1]))
        start = app.screen.query_one("#adapter_name_or_path", Select)
        app.screen.query_one("#stage", Select).value = "rm"
        await until(pilot, lambda: len(start._options) > 2, "the finished runs listed")
        assert {value for _, value in start._options if value is not Select.NULL} == {str(sft), str(rm)}
        assert not app.screen.query_one("#row-pref_beta").display
        await until(pilot, lambda: float(str(table.get_row("lora")[1])) != lora_sft, "the estimate for stage rm")
        start.value = str(sft)
        await until(pilot, lambda: app.choices.values.get("adapter_name_or_path") == str(sft), "the run chosen")
        app.screen.query_one("#stage", Select).value = "dpo"
        await until(pilot, lambda: [v for _, v in start._options if v is not Select.NULL] == [str(sft)],
                    "the runs DPO can start from")

        app.screen.query_one("#stage", Select).value = "rm"
        await app.push_screen(DataStep())
        await until(pilot, lambda: app.choices.values.get("dataset") == "demo_pairs", "the demo pairs chosen")
        preview = app.screen.query_one("#preview", Static)
        await until(pilot, lambda: "── pair 1" in shown(preview), "a pair previewed")
        assert "--stage rm" in app.choices.command_line()
