"""The wizard on a recorded 8 x H100 machine: the strategy the method step recommends and lets the user choose, the
per-GPU estimate under it on the review, the command for the other machines, and what the saved config holds."""

from __future__ import annotations

import yaml
from textual.widgets import DataTable, SelectionList, Select, Static
from tui_helpers import on_step, shown, type_into, until, wizard

from tuner_tui.wizard.state import Choices
from tuner_tui.wizard.steps import HardwareStep, MethodStep, ModelStep, ReviewStep

LLAMA2_70B = {"model_name_or_path": "llama2-70b", "dataset": "demo_alpaca", "template": "llama2",
              "per_device_train_batch_size": "1", "cutoff_len": "1024"}


async def method_step_on(pilot, app, gpus: list[int]) -> None:
    """Choose ``gpus`` on the hardware step and open the method step (the model is already chosen)."""
    await on_step(pilot, app, HardwareStep)
    await until(pilot, lambda: app.hardware is not None, "the probe")
    chosen = app.screen.query_one(SelectionList)
    chosen.deselect_all()
    for index in gpus:
        chosen.select(index)
    await pilot.click("#next")
    await on_step(pilot, app, ModelStep)
    await pilot.pause(0.2)
    app.push_screen(MethodStep())  # the model step would ask the hub about llama2-70b: this machine is offline
    await on_step(pilot, app, MethodStep)
    await until(pilot, lambda: app.screen.query("#methods"), "the method step's table")
    table = app.screen.query_one("#methods", DataTable)
    await until(pilot, lambda: table.row_count == 5, "the estimates")


async def test_four_of_eight_gpus_recommend_zero3_and_the_choice_reaches_the_saved_config(tmp_path):
    app = wizard("8x-h100", tmp_path, Choices(dict(LLAMA2_70B)))
    async with app.run_test(size=(120, 50)) as pilot:
        await method_step_on(pilot, app, [0, 1, 2, 3])
        strategy = app.screen.query_one("#strategy", Select)
        await until(pilot, lambda: strategy.value == "zero3", "the recommended strategy preselected")
        note = app.screen.query_one("#strategy-note", Static)
        assert shown(note).startswith("recommended for 4 GPUs: FSDP or ZeRO-3 (strategy zero3)")
        reason = app.screen.query_one("#reason", Static)
        await until(pilot, lambda: "with FSDP or ZeRO-3 (strategy zero3) is recommended" in shown(reason),
                    "the reason naming the strategy")
        assert app.screen.query_one("#row-strategy").display and app.screen.check_action("strategy", ())
        await pilot.press("ctrl+t")
        assert app.focused is strategy

        strategy.value = "zero3_offload"
        await until(pilot, lambda: app.choices.values.get("strategy") == "zero3_offload", "the user's strategy")
        assert "_strategy_auto" not in app.choices.values
        assert app.choices.flat()["nproc_per_node"] == "4"

        app.push_screen(ReviewStep())
        await on_step(pilot, app, ReviewStep)
        await until(pilot, lambda: app.screen.query("#estimate"), "the review")
        estimate = app.screen.query_one("#estimate", Static)
        await until(pilot, lambda: "GiB" in shown(estimate), "the estimate")
        assert "with FSDP or ZeRO-3 with CPU offload (strategy zero3_offload) needs about" in shown(estimate)
        assert "GiB per GPU over 4 GPUs" in shown(estimate) and shown(estimate).startswith("✔ ")
        command = app.screen.query_one("#command", Static)
        await until(pilot, lambda: shown(command), "the command line")
        assert "--strategy zero3_offload" in shown(command) and "--nproc_per_node 4" in shown(command)
        assert not app.screen.query_one("#other-nodes", Static).display
        saved = tmp_path / "run.yaml"
        await type_into(pilot, app, "save_path", str(saved))
        await pilot.press("ctrl+s")
        await until(pilot, saved.exists, "the saved config")
    config = yaml.safe_load(saved.read_text())
    assert config["strategy"] == "zero3_offload" and config["nproc_per_node"] == 4
    assert app.visible_devices() == ",".join(g.uuid for g in app.hardware.gpus[:4])


async def test_two_machines_show_the_command_for_the_other_one_and_the_estimate_over_both(tmp_path):
    values = {**LLAMA2_70B, "nnodes": "2", "master_addr": "10.0.0.1", "strategy": "zero3"}
    app = wizard("8x-h100", tmp_path, Choices(values, method="lora"))
    async with app.run_test(size=(120, 50)) as pilot:
        await on_step(pilot, app, HardwareStep)
        await until(pilot, lambda: app.hardware is not None, "the probe")
        app.push_screen(ReviewStep())
        await on_step(pilot, app, ReviewStep)
        await until(pilot, lambda: app.screen.query("#estimate"), "the review")
        estimate = app.screen.query_one("#estimate", Static)
        await until(pilot, lambda: "GiB" in shown(estimate), "the estimate")
        assert "LoRA (16-bit) with FSDP or ZeRO-3 (strategy zero3) needs about" in shown(estimate)
        assert "GiB per GPU over 16 GPUs" in shown(estimate)
        nodes = app.screen.query_one("#other-nodes", Static)
        await until(pilot, lambda: nodes.display, "the other machine's command")
        lines = shown(nodes).splitlines()
        assert lines[0] == "On each other machine, once this one has started:"
        assert len(lines) == 2 and lines[1].strip().startswith("tuner train ")
        assert lines[1].endswith("--nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 29500")
        assert "--detach" not in lines[1] and "--strategy zero3" in lines[1]


async def test_one_gpu_offers_no_strategy_and_runs_one_process(tmp_path):
    app = wizard("8x-h100", tmp_path, Choices({**LLAMA2_70B, "model_name_or_path": "llama2-7b",
                                               "strategy": "zero3"}))
    async with app.run_test(size=(120, 50)) as pilot:
        await method_step_on(pilot, app, [2])
        await until(pilot, lambda: "strategy" not in app.choices.values, "the strategy dropped")
        assert not app.screen.query_one("#row-strategy").display
        assert not app.screen.check_action("strategy", ())
        flat = app.choices.flat()
        assert flat["nproc_per_node"] == "1" and "strategy" not in flat  # the saved YAML trains on one GPU too
        reason = shown(app.screen.query_one("#reason", Static))
        assert "strategy" not in reason and "is recommended" in reason
