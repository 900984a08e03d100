"""Step 1, Hardware: probe the GPUs, show their memory, use and temperature, and choose the ones to train on; check
the machine as `tuner doctor` does and show each problem with its fix."""

from __future__ import annotations

from functools import partial
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.content import Content
from textual.widgets import SelectionList, Static

from engine.hardware import HardwareState
from tuner_tui.wizard.steps.base import WizardStep

CHECKING = "checking this machine as `tuner doctor` does (driver, torch, kernels, disk, the hub)…"
MARKS = {"problem": ("✘", "bold $text-error"), "warning": ("⚠", "$text-warning"), "info": ("ℹ", "$text-primary"),
         "ok": ("✔", "$text-success")}


def doctor_findings(hw: HardwareState) -> list:
    """`tuner doctor`'s quick checks (not `--full`) on the GPUs this wizard probed, imported in the worker that runs
    them: their HTTP modules stay off the first frame."""
    from engine.doctor import run_checks

    return run_checks(hw)


def render_findings(findings: list) -> Content:
    """Problems, then warnings, each with its fix below it, then notes (offline mode); the checks that passed by name,
    on one line."""
    counts = {state: sum(f.state == state for f in findings) for state in MARKS}
    parts: list = [(f"Machine check: {counts['problem']} problem(s), {counts['warning']} warning(s), "
                    f"{counts['ok']} ok (`tuner doctor` shows every detail)\n", "bold")]
    for state in ("problem", "warning", "info"):
        mark, style = MARKS[state]
        for f in (f for f in findings if f.state == state):
            parts.append((f"{mark} {f.check}: {f.detail}\n", style))
            if f.fix:
                parts.append((f"    fix: {f.fix}\n", "bold"))
    passed = [f.check for f in findings if f.state == "ok"]
    if passed:
        parts.append((f"{MARKS['ok'][0]} {', '.join(passed)}", MARKS["ok"][1]))
    return Content.assemble(*parts)


class HardwareStep(WizardStep):
    TITLE = "Hardware: the GPUs to train on"
    STEP = 1
    CHECKED = ("gpus",)
    AUTO_FOCUS = "#next"  # every GPU starts chosen: Enter goes on, Shift+Tab reaches the list

    def body(self) -> ComposeResult:
        yield Static("probing the GPUs…", id="gpu-info")
        yield SelectionList[int](id="gpu-list")
        yield Static("", id="err-gpus", classes="error")
        yield Static(Content(CHECKING), id="doctor")

    def on_mount(self) -> None:
        self.work("probe", self.app.probe, "probing the GPUs")

    def done(self, group: str, result: Any) -> None:
        if group == "probe":
            self.work("doctor", partial(self.app.doctor, result), "checking this machine")
            self._show_gpus(result)
        elif group == "doctor":
            self.app.findings = result
            self.query_one("#doctor", Static).update(render_findings(result))

    def failed(self, group: str, text: str) -> bool:
        if group == "doctor":
            self.query_one("#doctor", Static).update(Content.styled(f"the machine check failed: {text}", "bold"))
            return True
        return super().failed(group, text)

    def _show_gpus(self, state: HardwareState) -> None:
        self.app.hardware = state
        info = self.query_one("#gpu-info", Static)
        chosen = self.query_one(SelectionList)
        chosen.clear_options()
        if not state.gpus:
            info.update(Text(f"{state.message or 'no NVIDIA GPU found'}.\nOnly small models such as the demo "
                             "models (tiny-llama, tiny-mistral, tiny-mixtral) train in reasonable time there.",
                             style="bold"))
            chosen.display = False
            return
        lines = [f"driver {state.driver_version or '?'} · CUDA {state.cuda_version or '?'}"]
        for gpu in state.gpus:
            lines.append(f"GPU {gpu.index}: {gpu.name} · {_gib(gpu.memory_free_gib)}/{_gib(gpu.memory_total_gib)} "
                         f"GiB free · util {_n(gpu.utilization_pct, '%')} · {_n(gpu.temperature_c, ' °C')}")
        info.update("\n".join(lines))
        picked = self.choices.gpus
        for gpu in state.gpus:
            chosen.add_option((f"GPU {gpu.index}: {gpu.name} ({_gib(gpu.memory_total_gib)} GiB)", gpu.index,
                               picked is None or gpu.index in picked))

    def check(self) -> dict[str, str]:
        return {}

    def action_next(self) -> None:
        state = self.app.hardware
        if state is None:
            self.show_problems({"gpus": "the GPUs are still being probed"})
            return
        if state.gpus:
            selected = sorted(self.query_one(SelectionList).selected)
            if not selected:
                self.show_problems({"gpus": "choose at least one GPU to train on"})
                return
            self.choices.gpus = None if len(selected) == len(state.gpus) else selected
        self.show_problems({})
        self.app.advance(self)


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}".rstrip("0").rstrip(".")


def _n(value: Any, unit: str) -> str:
    return "?" if value is None else f"{value}{unit}"
