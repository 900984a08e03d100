"""Step 4 of the wizard: the template compared with the model's own, the token-length histogram cut at cutoff_len
(following a change made on step 5) and the dataset file picker, on the tiny demo model and real files."""

from __future__ import annotations

import json
import re
import shutil

from textual.widgets import Input, Select, Static
from tui_helpers import recorded, shown, until

from tuner_tui.wizard.app import WizardApp
from tuner_tui.wizard.files import DataFileTree, DatasetPicker
from tuner_tui.wizard.steps import DataStep, HardwareStep, HyperparametersStep
from tuner_tui.wizard.state import Choices

BUCKET = re.compile(r"^\s*(\d+)–(\d+)\s")


async def open_data_step(pilot, app) -> DataStep:
    """Step 4 straight after the probe, so these tests do not depend on how steps 2 and 3 are walked."""
    await until(pilot, lambda: isinstance(app.screen, HardwareStep), "the first step")
    await app.push_screen(DataStep())
    return app.screen


def wizard(tmp_path, **values: str) -> WizardApp:
    return WizardApp(probe=recorded("none"), choices=Choices(values, "lora"), state_dir=tmp_path / "state")


def note(app) -> Static:
    return app.screen.query_one("#template-note", Static)


def preview(app) -> str:
    return shown(app.screen.query_one("#preview", Static))


def cutoff_marked_between_buckets(text: str, cutoff_len: int) -> bool:
    """The cutoff line lies after every bucket within cutoff_len and before every bucket over it."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if f"cutoff_len {cutoff_len}:" in line)
    buckets = [(i, int(m[1]), int(m[2])) for i, line in enumerate(lines) if (m := BUCKET.match(line))]
    return bool(buckets) and all(high <= cutoff_len if i < at else low > cutoff_len for i, low, high in buckets)


async def test_a_template_unlike_the_models_chat_template_is_warned_beside_it(tiny_models, tmp_path):
    app = wizard(tmp_path, model_name_or_path="tiny-llama")
    async with app.run_test(size=(80, 24)) as pilot:
        await open_data_step(pilot, app)
        template = app.screen.query_one("#template-select", Select)
        await until(pilot, lambda: template.value == "llama2", "the model's template")
        await until(pilot, lambda: "renders like the model's own chat_template" in shown(note(app)),
                    "the template compared")
        assert not note(app).has_class("warning")

        template.value = "chatml"
        await until(pilot, lambda: "differs from the chat_template" in shown(note(app)), "the warning")
        assert note(app).has_class("warning") and shown(note(app)).startswith("⚠ template 'chatml'")
        assert note(app).region.height > 0

        template.value = "llama2"
        await until(pilot, lambda: not note(app).has_class("warning"), "the warning to go")
        assert "renders like" in shown(note(app))


async def test_a_model_without_a_chat_template_gets_a_muted_note_not_a_warning(tiny_models, tmp_path):
    model = shutil.copytree(tiny_models["tiny-llama"], tmp_path / "plain-llama")
    (model / "chat_template.jinja").unlink()
    app = wizard(tmp_path, model_name_or_path=str(model))
    async with app.run_test(size=(80, 24)) as pilot:
        await open_data_step(pilot, app)
        await until(pilot, lambda: "no chat_template" in shown(note(app)), "the note")
        assert not note(app).has_class("warning")
        app.screen.query_one("#template-select", Select).value = "chatml"
        await until(pilot, lambda: app.choices.values.get("template") == "chatml", "the template chosen")
        await pilot.pause(1)
        assert "no chat_template" in shown(note(app)) and not note(app).has_class("warning")


async def test_histogram_marks_cutoff_len_and_follows_a_change_made_on_step_5(tiny_models, tmp_path):
    app = wizard(tmp_path, model_name_or_path="tiny-llama", dataset="demo_sharegpt", cutoff_len="64")
    async with app.run_test(size=(120, 40)) as pilot:
        await open_data_step(pilot, app)
        await until(pilot, lambda: "cutoff_len 64:" in preview(app), "the histogram")
        over = re.search(r"cutoff_len 64: (\d+) of 200 longer", preview(app))
        assert over and 0 < int(over[1]) < 200
        assert f"{over[1]} over cutoff_len" in preview(app)
        assert cutoff_marked_between_buckets(preview(app), 64)
        assert all(len(line) <= 76 for line in preview(app).splitlines() if BUCKET.match(line))

        await pilot.press("ctrl+n")
        await until(pilot, lambda: isinstance(app.screen, HyperparametersStep), "step 5")
        app.screen.query_one("#cutoff_len", Input).value = "128"
        await pilot.pause()
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, DataStep), "back on step 4")
        await until(pilot, lambda: "cutoff_len 128: 0 of 200 longer" in preview(app), "the new cutoff")
        assert "cutoff_len 64" not in preview(app) and "0 over cutoff_len" in preview(app)
        assert cutoff_marked_between_buckets(preview(app), 128)


def write_alpaca(path, count: int) -> None:
    path.write_text("".join(json.dumps({"instruction": f"Add {n} and {n}.", "input": "", "output": str(2 * n)}) + "\n"
                            for n in range(count)))


async def test_browse_picks_a_data_file_by_keyboard_or_mouse_and_esc_cancels(tiny_models, tmp_path):
    folder = tmp_path / "data"
    (folder / "more").mkdir(parents=True)
    write_alpaca(folder / "sums.jsonl", 5)
    write_alpaca(folder / "more" / "other.jsonl", 3)
    (folder / "notes.md").write_text("not data")
    (folder / ".hidden.json").write_text("[]")
    app = wizard(tmp_path, model_name_or_path="tiny-llama", dataset_dir=str(folder), cutoff_len="64")
    async with app.run_test(size=(80, 24)) as pilot:
        await open_data_step(pilot, app)
        field = app.screen.query_one("#dataset", Input)

        # keyboard: Ctrl+O opens the tree in dataset_dir, showing folders and data files only; Enter picks a file
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, DatasetPicker), "the picker")
        tree = app.screen.query_one(DataFileTree)
        await until(pilot, lambda: len(tree.root.children) == 2, "the folder listed")
        assert [node.data.path.name for node in tree.root.children] == ["more", "sums.jsonl"]
        assert shown(app.screen.query_one("#picker-folder", Static)) == str(folder)
        for _ in range(4):
            if tree.cursor_node is not None and tree.cursor_node.data.path.name == "sums.jsonl":
                break
            await pilot.press("down")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DataStep), "back on step 4")
        assert field.value == str(folder / "sums.jsonl") and app.choices.values["dataset"] == field.value
        assert field.has_focus
        await until(pilot, lambda: "tokens: 5 samples" in preview(app), "the picked file previewed")

        # Esc closes the picker and keeps the field; the Parent folder button goes up
        await pilot.click("#browse")
        await until(pilot, lambda: isinstance(app.screen, DatasetPicker), "the picker again")
        await pilot.click("#parent")
        await until(pilot, lambda: shown(app.screen.query_one("#picker-folder", Static)) == str(tmp_path),
                    "the parent folder")
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, DataStep), "the picker closed")
        assert field.value == str(folder / "sums.jsonl")

        # mouse: the Browse button, then a click on a file in an opened folder
        await pilot.click("#browse")
        await until(pilot, lambda: isinstance(app.screen, DatasetPicker), "the picker by mouse")
        tree = app.screen.query_one(DataFileTree)
        await until(pilot, lambda: len(tree.root.children) == 2, "the folder listed")
        more = tree.root.children[0]
        more.expand()
        await until(pilot, lambda: len(more.children) == 1 and more.children[0].line > 0, "the inner folder")
        await pilot.click(DataFileTree, offset=(12, more.children[0].line))
        await until(pilot, lambda: isinstance(app.screen, DataStep), "picked by mouse")
        assert field.value == str(folder / "more" / "other.jsonl")
        await until(pilot, lambda: "tokens: 3 samples" in preview(app), "the other file previewed")
