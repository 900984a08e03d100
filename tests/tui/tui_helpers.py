"""Helpers for Pilot tests: GPU states recorded on real machines, waiting on samplers, what a widget shows, and
the wizard on a recorded machine."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from engine.hardware import HardwareState

GPU_STATES = Path(__file__).resolve().parent.parent / "data" / "gpu_states"


def recorded(machine: str) -> Callable[[], HardwareState]:
    """A probe that answers with a state recorded on a real machine (this one has no NVIDIA GPU)."""
    state = HardwareState.from_json(json.loads((GPU_STATES / f"{machine}.json").read_text()))
    return lambda: state


async def until(pilot, predicate: Callable[[], object], what: str, timeout: float = 120.0) -> None:
    """Wait for ``predicate`` to hold; the timeout only ends a wait that would never end (a loaded machine is slow)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def shown(widget) -> str:
    """The plain text a widget renders now."""
    rendered = widget.render()
    return getattr(rendered, "plain", str(rendered)).replace("\u00a0", " ")


def wizard(machine: str, tmp_path: Path, choices=None):
    """The wizard on a recorded machine, remembering its choices under ``tmp_path`` (nothing remembered yet)."""
    from tuner_tui.wizard.app import WizardApp

    return WizardApp(probe=recorded(machine), choices=choices, state_dir=tmp_path / "state", dashboard_interval_s=0.2)


def error(app, key: str) -> str:
    """The message beside a wizard field."""
    return shown(app.screen.query_one(f"#err-{key}"))


async def on_step(pilot, app, step) -> None:
    await until(pilot, lambda: isinstance(app.screen, step), step.__name__)


async def type_into(pilot, app, key: str, value: str) -> None:
    app.screen.query_one(f"#{key}").value = value
    await pilot.pause()
