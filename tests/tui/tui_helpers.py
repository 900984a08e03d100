"""Helpers for Pilot tests: GPU states recorded on real machines, waiting on samplers, what a widget shows."""

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


async def until(pilot, predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def shown(widget) -> str:
    """The plain text a widget renders now."""
    rendered = widget.render()
    return getattr(rendered, "plain", str(rendered)).replace("\u00a0", " ")
