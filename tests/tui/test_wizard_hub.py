"""The wizard's model step on hub models, against the stand-in hub on localhost: what the run will download and the
room for it, and a gated model answered with what to do, before anything starts."""

from __future__ import annotations

from textual.widgets import Static
from tui_helpers import error, on_step, shown, type_into, until, wizard

from engine.models import download as downloads
from tuner_tui.wizard.state import Choices
from tuner_tui.wizard.steps import HardwareStep, ModelStep


async def model_step(pilot, app, model: str) -> None:
    """The model step with ``model`` typed in its field."""
    await on_step(pilot, app, HardwareStep)
    await until(pilot, lambda: app.hardware is not None, "the probe")
    await app.push_screen(ModelStep())
    await pilot.pause()
    await type_into(pilot, app, "model_name_or_path", model)


async def test_a_hub_model_shows_what_the_run_will_download_and_the_room_for_it(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "_free_bytes", lambda cache: 812_000_000_000)
    app = wizard("a100-80gb", tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await model_step(pilot, app, "org/tiny")
        resolved = app.screen.query_one("#resolved", Static)
        await until(pilot, lambda: shown(resolved).startswith("✔ on the hub"), "the plan")
        text = " ".join(shown(resolved).split())
        assert "downloaded when the run starts, its progress on the dashboard" in text
        assert "to fetch, 812.0 GB free at" in text and str(tmp_path / "hf" / "hub") in text, text


async def test_a_gated_model_says_how_to_get_access_at_the_model_step(hub, tmp_path):
    app = wizard("a100-80gb", tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await model_step(pilot, app, "org/gated")
        await until(pilot, lambda: "gated" in error(app, "model_name_or_path"), "the refusal")
        message = " ".join(error(app, "model_name_or_path").split())
        assert f"accept its licence at {hub.url}/org/gated" in message and "hf auth login" in message, message


async def test_a_model_too_big_for_the_disk_is_refused_at_the_model_step(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "_free_bytes", lambda cache: 10_000)
    app = wizard("a100-80gb", tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await model_step(pilot, app, "org/tiny")
        await until(pilot, lambda: "free at" in error(app, "model_name_or_path"), "the refusal")
        assert "HF_HOME" in error(app, "model_name_or_path")


async def test_a_gated_model_with_the_token_typed_in_the_wizard_resolves(hub, tmp_path):
    app = wizard("a100-80gb", tmp_path, Choices({"hf_hub_token": "hf_granted"}))
    async with app.run_test(size=(120, 40)) as pilot:
        await model_step(pilot, app, "org/gated")
        resolved = app.screen.query_one("#resolved", Static)
        await until(pilot, lambda: shown(resolved).startswith("✔ on the hub"), "the plan")
        assert "architecture unknown" not in shown(resolved) and not error(app, "model_name_or_path")
