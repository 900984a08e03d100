"""Snapshots (SVG) of every wizard step at 80x24 and 120x40: the A100 recorded state, the tiny Llama, demo data.

The screens show paths, so the model and the data are copied to one fixed place (FIXED) that is the same on every
machine whatever the checkout's directory.

A step is shot once its workers (probe, estimate, preview) have finished and nothing has run for a moment, so the
picture does not depend on timing. `pytest tests/tui/test_snapshots.py --snapshot-update` rewrites them after an
intended change; look at the report (snapshot_report.html) before committing.
"""

from __future__ import annotations

import difflib
import html
import pickle
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

import pytest
from textual.worker import WorkerState
from tui_helpers import recorded

from engine.doctor import PROBLEM, WARNING, Finding
from tuner_tui.wizard.app import WizardApp
from tuner_tui.wizard.state import Choices

FIXED = Path("/tmp/tuner-tui-snapshots")
SIZES = {"80x24": (80, 24), "120x40": (120, 40)}
STEPS = ("HardwareStep", "ModelStep", "MethodStep", "DataStep", "HyperparametersStep", "ReviewStep")
QUIET_S = 0.6
CHOICES = {"model_name_or_path": str(FIXED / "tiny-llama"), "template": "llama2",
           "dataset": str(FIXED / "alpaca_demo.json"), "cutoff_len": "256",
           "max_samples": "200", "learning_rate": "2e-4", "num_train_epochs": "1", "output_dir": "saves/snapshot",
           "lora_rank": "16"}


# The machine check's findings as a GPU server and a laptop give them, so the screens do not show this machine's.
GPU_SERVER = [Finding("driver", "ok", "driver 550.54 (supports CUDA 12.4), torch 2.5.1+cu124"),
              Finding("torch sees the GPUs", "ok", "1 of 1"),
              Finding("bitsandbytes", "ok", "0.45.0, CUDA library loads"),
              Finding("flash-attn", WARNING, "not installed: SDPA attention instead (slower on long sequences)",
                      "pip install flash-attn --no-build-isolation"),
              Finding("disk", "ok", "812 GiB free"), Finding("hub", "ok", "huggingface.co answers"),
              Finding("token", WARNING, "none: gated models (Llama) cannot be downloaded", "hf auth login")]
LAPTOP = [Finding("driver", WARNING, "no NVIDIA driver; torch 2.13.0+cpu"),
          Finding("disk", PROBLEM, "1.2 GiB free at ~/.cache/huggingface",
                  "free space, or set HF_HOME to a larger disk"),
          Finding("hub", "ok", "huggingface.co answers")]


@pytest.fixture(scope="module")
def fixed_inputs(tiny_models) -> Path:
    from engine.paths import PRESETS_DIR

    shutil.copytree(tiny_models["tiny-llama"], FIXED / "tiny-llama", dirs_exist_ok=True)
    shutil.copy(PRESETS_DIR / "data" / "demo_alpaca.json", FIXED / "alpaca_demo.json")
    return FIXED


async def settled(pilot, timeout: float = 60.0) -> None:
    """Until no worker has been running or due to start (debounced, 0.3 s after a change) for QUIET_S."""
    app, deadline, quiet_since = pilot.app, time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        busy = getattr(app.screen, "starting", False) or any(
            w.state in (WorkerState.PENDING, WorkerState.RUNNING) for w in app.workers)
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S:
            return
        await pilot.pause(0.05)
    raise AssertionError("the wizard's workers did not settle")


def walk_to(step: str):
    async def run_before(pilot) -> None:
        app = pilot.app
        for name in STEPS[:STEPS.index(step) + 1]:
            deadline = time.monotonic() + 60
            while type(app.screen).__name__ != name:
                assert time.monotonic() < deadline, f"the wizard did not reach {name}"
                await pilot.pause(0.05)
            await settled(pilot)
            if name != step:
                app.screen.action_next()
        app.screen.set_focus(None)  # no blinking cursor in the picture
        await settled(pilot)  # the footer follows the focus a moment later

    return run_before


def svg_lines(svg: str) -> list[str]:
    """The text of a Rich SVG screenshot, one string per terminal row."""
    styles = dict(re.findall(r"\.(terminal-r\d+) \{ ([^}]*) \}", svg))  # numbered in order of use: compare values
    rows: dict[float, list[tuple[float, str, str]]] = defaultdict(list)
    for m in re.finditer(r'<text class="([^"]*)" x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        rows[float(m.group(3))].append((float(m.group(2)), html.unescape(m.group(4)), styles.get(m.group(1), "")))
    lines = []
    for y in sorted(rows):
        text = ""
        for x, chunk, _ in sorted(rows[y]):
            text = text.ljust(round(x / 12.2)) + chunk
        looks = " | ".join(style for _, _, style in sorted(rows[y]))
        lines.append(f"{text.rstrip()}    [{looks}]")
    return lines


def difference(request) -> str:
    """How the picture differs from the snapshot, in text, for the CI log (the HTML report stays on that machine)."""
    from pytest_textual_snapshot import node_to_report_path, normalize_svg

    data = pickle.loads(node_to_report_path(request.node).read_bytes())
    expected, actual = normalize_svg(data[1]), normalize_svg(data[2])
    diff = difflib.unified_diff(svg_lines(expected), svg_lines(actual), "snapshot", "now", n=1, lineterm="")
    lines = "\n".join(diff) or "(text and colours match: the difference is in backgrounds or shapes)"
    return f"the screen differs from the snapshot (each row's text, then its styles):\n{lines}"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("step", STEPS)
def test_wizard_step(snap_compare, fixed_inputs, tmp_path, request, step, size):
    app = WizardApp(probe=recorded("a100-80gb"), choices=Choices(values=dict(CHOICES), method="lora"),
                    state_dir=tmp_path / "state", doctor=lambda hw: GPU_SERVER)
    assert snap_compare(app, terminal_size=SIZES[size], run_before=walk_to(step)), difference(request)


def test_wizard_without_a_gpu(snap_compare, fixed_inputs, tmp_path, request):
    app = WizardApp(probe=recorded("none"), choices=Choices(values=dict(CHOICES)), state_dir=tmp_path / "state",
                    doctor=lambda hw: LAPTOP)
    assert snap_compare(app, terminal_size=SIZES["80x24"], run_before=walk_to("HardwareStep")), difference(request)
