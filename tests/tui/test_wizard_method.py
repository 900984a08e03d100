"""Step 3 as a newcomer reads it: the method recommended with one line of why, LLaMA-Factory's README table named as
such, and only the settings of the method chosen. Pilot on a recorded A100 80GB and Llama-2-7B's catalog geometry."""

from __future__ import annotations

from textual.widgets import DataTable, Select
from tui_helpers import error, on_step, shown, type_into, until, wizard

from tuner_tui.wizard.state import Choices
from tuner_tui.wizard.steps import HardwareStep, MethodStep

ROWS = ("lora_rank", "lora_alpha", "lora_target", "freeze_trainable_layers", "qlora-bits")


async def method_step(pilot, app) -> DataTable:
    """Step 3 opened on the recorded machine, once its estimates are in."""
    await on_step(pilot, app, HardwareStep)
    await until(pilot, lambda: app.hardware is not None, "the probe")
    await app.push_screen(MethodStep())
    table = app.screen.query_one("#methods", DataTable)
    await until(pilot, lambda: table.row_count == 5 and "recommended" in shown(app.screen.query_one("#reason")),
                "the estimates")
    return table


def rows_shown(app) -> list[str]:
    return [key for key in ROWS if app.screen.query_one(f"#row-{key}").display]


async def test_step_3_recommends_lora_on_80gb_with_one_line_of_why_and_names_llamafactorys_table(tmp_path):
    app = wizard("a100-80gb", tmp_path, Choices({"model_name_or_path": "llama2-7b"}))
    async with app.run_test(size=(80, 24)) as pilot:
        table = await method_step(pilot, app)
        assert app.choices.method == "lora" and str(table.get_row("lora")[0]) == "LoRA (16-bit) ★"
        lines = shown(app.screen.query_one("#reason")).splitlines()
        assert lines[0].startswith("LoRA (16-bit) is recommended: 24.447 GiB of ")
        assert lines[1] == ("why: LoRA whenever it fits (LLaMA-Factory's default: small adapters, quality close to "
                            "full fine-tuning); Freeze also fits, to train whole layers")
        assert ("QLoRA 8-bit: above LoRA (16-bit) at this batch: the layer inputs its 8-bit matmul keeps for the "
                "backward pass take 41.5 GiB at 8 x 2048 tokens") in lines
        assert [str(column.label) for column in table.columns.values()][3] == "LLaMA-Factory GB"
        assert str(table.get_row("qlora-8bit")[3]) == "10"
        assert ("LLaMA-Factory GB: the VRAM table in LLaMA-Factory's README for 7B models, for comparison (it does "
                "not change with batch or cutoff_len)") in lines
        assert "seed" not in " ".join(lines).lower()


async def test_step_3_shows_only_the_settings_of_the_method_chosen_as_the_cursor_moves(tmp_path):
    app = wizard("a100-80gb", tmp_path, Choices({"model_name_or_path": "llama2-7b"}))
    async with app.run_test(size=(80, 24)) as pilot:
        table = await method_step(pilot, app)
        assert app.screen.focused is table and rows_shown(app) == ["lora_rank", "lora_alpha", "lora_target"]
        assert app.screen.query_one("#targets").display
        await pilot.press("up")
        await until(pilot, lambda: app.choices.method == "freeze", "freeze chosen")
        assert rows_shown(app) == ["freeze_trainable_layers"] and not app.screen.query_one("#targets").display
        await pilot.press("up")
        await until(pilot, lambda: app.choices.method == "full", "full chosen")
        assert rows_shown(app) == []
        await pilot.press("down", "down", "down", "down")
        await until(pilot, lambda: app.choices.method == "qlora-4bit", "QLoRA 4-bit chosen")
        assert rows_shown(app) == ["lora_rank", "lora_alpha", "lora_target", "qlora-bits"]
        assert app.screen.query_one("#qlora-bits", Select).value == 4
        app.screen.query_one("#qlora-bits", Select).clear()  # no bits: back to 16-bit LoRA, the bits row goes
        await until(pilot, lambda: app.choices.method == "lora" and rows_shown(app) == list(ROWS[:3]), "LoRA again")


async def test_a_setting_with_a_problem_stays_in_sight_when_another_method_is_chosen(tmp_path):
    app = wizard("a100-80gb", tmp_path, Choices({"model_name_or_path": "llama2-7b"}))
    async with app.run_test(size=(80, 24)) as pilot:
        table = await method_step(pilot, app)
        await type_into(pilot, app, "lora_rank", "0")
        await until(pilot, lambda: "lora_rank must be at least 1" in error(app, "lora_rank"), "the complaint")
        table.focus()
        table.move_cursor(row=0)  # full
        await until(pilot, lambda: app.choices.method == "full", "full chosen")
        assert rows_shown(app) == ["lora_rank"] and "lora_rank must be at least 1" in error(app, "lora_rank")
        await type_into(pilot, app, "lora_rank", "8")
        await until(pilot, lambda: rows_shown(app) == [], "the mended field hidden with the others")


async def test_a_late_echo_of_the_chosen_row_does_not_undo_the_qlora_bits_just_chosen(tmp_path):
    """The race the full walk once lost: the table's highlight of the chosen row (posted when a refill put the cursor
    there) arrives after the user picked 4-bit in the bits field but before that change is handled. The echo changes
    nothing, and the QLoRA 4-bit row ends up chosen."""
    app = wizard("a100-80gb", tmp_path, Choices({"model_name_or_path": "llama2-7b"}))
    async with app.run_test(size=(80, 24)) as pilot:
        table = await method_step(pilot, app)
        assert app.choices.method == "lora"
        lora = table.ordered_rows[table.cursor_row].key
        app.screen.query_one("#qlora-bits", Select).value = 4
        app.screen.on_data_table_row_highlighted(DataTable.RowHighlighted(table, table.cursor_row, lora))
        await until(pilot, lambda: app.choices.method == "qlora-4bit" and table.cursor_row == 4, "the QLoRA 4-bit row")
        await pilot.pause()
        assert app.choices.method == "qlora-4bit" and app.screen.query_one("#qlora-bits", Select).value == 4
