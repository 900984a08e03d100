"""The machine check on an offline server or one the hub does not answer: step 1 shows the hub as a note or a warning
naming what needs it, never a problem; step 6 raises it only when the chosen model or dataset comes from the hub.
Pilot on recorded GPU states with the real doctor checks of this CPU machine; the hub is a closed local port or
offline mode (tests/conftest.py)."""

from __future__ import annotations

import socket

from textual.widgets import Static
from tui_helpers import on_step, shown, until, wizard

from tuner_tui.wizard.state import Choices
from tuner_tui.wizard.steps import HardwareStep, ReviewStep
from tuner_tui.wizard.steps.review import CHECKING_HUB

DEMO = {"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca"}
OFFLINE_NOTE = ("ℹ hub: offline mode (HF_HUB_OFFLINE=1): hub models and datasets come from the local cache only; the "
                "demo models and local models and data work without it")


def silent_hub(monkeypatch) -> str:
    """The hub's address made a closed local port, offline mode off: the hub does not answer."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    return url


async def checked(pilot, app) -> str:
    """Step 1's machine check, once it has answered."""
    await on_step(pilot, app, HardwareStep)
    doctor = app.screen.query_one("#doctor", Static)
    await until(pilot, lambda: "Machine check:" in shown(doctor), "the machine check")
    return shown(doctor)


async def review(pilot, app) -> Static:
    """Step 6 opened once the machine check has answered, and its line on the hub once that is known."""
    await checked(pilot, app)
    await app.push_screen(ReviewStep())
    await pilot.pause()
    return app.screen.query_one("#hub-need", Static)


async def test_offline_hub_is_a_note_on_step_1_not_a_problem(tmp_path):
    app = wizard("none", tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        text = await checked(pilot, app)
        assert OFFLINE_NOTE in " ".join(text.split())
        assert text.startswith("Machine check: 0 problem(s), ") and "✘" not in text
        assert text.index("⚠ driver") < text.index("ℹ hub")  # the notes after the warnings


async def test_silent_hub_is_a_warning_on_step_1_naming_what_needs_it(tmp_path, monkeypatch):
    url = silent_hub(monkeypatch)
    app = wizard("none", tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        text = await checked(pilot, app)
        assert f"⚠ hub: {url} does not answer within 3 s (" in text
        assert ("hub models and datasets not in the cache, and `tuner download`, need it; the demo models and local "
                "models and data work without it") in " ".join(text.split())
        assert "fix: export HTTPS_PROXY=http://PROXY:PORT" in text
        assert text.startswith("Machine check: 0 problem(s), ") and "✘" not in text


async def test_step_6_says_nothing_of_an_offline_hub_the_demo_run_does_not_need(tmp_path):
    app = wizard("none", tmp_path, choices=Choices(values=dict(DEMO)))
    async with app.run_test(size=(80, 24)) as pilot:
        line = await review(pilot, app)
        assert [f.state for f in app.findings if f.check == "hub"] == ["info"]  # so step 6 asks what the run needs
        await until(pilot, lambda: shown(line) != CHECKING_HUB, "what the run needs of the hub")
        assert shown(line) == "" and not line.display
        assert not app.screen.query_one("#setup", Static).display


async def test_step_6_says_clearly_that_an_uncached_hub_model_needs_the_hub_offline_mode_keeps_out(tmp_path):
    app = wizard("none", tmp_path, choices=Choices(values={**DEMO, "model_name_or_path": "llama2-7b"}))
    async with app.run_test(size=(120, 40)) as pilot:
        line = await review(pilot, app)
        await until(pilot, lambda: shown(line) not in ("", CHECKING_HUB), "the hub line")
        assert shown(line) == ("⚠ this run needs the hub for the model llama2-7b (not in the local cache), but "
                               "offline mode is on: unset HF_HUB_OFFLINE, or download them where the hub answers")
        assert not app.screen.query_one("#setup", Static).display  # the hub is not a set-up problem


async def test_step_6_names_the_hub_dataset_a_silent_hub_keeps_out(tmp_path, monkeypatch):
    silent_hub(monkeypatch)
    app = wizard("none", tmp_path, choices=Choices(values={**DEMO, "dataset": "demo_alpaca,someone/chats"}))
    async with app.run_test(size=(120, 40)) as pilot:
        line = await review(pilot, app)
        await until(pilot, lambda: shown(line) not in ("", CHECKING_HUB), "the hub line")
        assert shown(line) == ("⚠ this run needs the hub for the hub dataset someone/chats, but the hub does not "
                               "answer: step 1 shows the fix")
