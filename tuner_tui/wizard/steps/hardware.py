"""Step 1, Hardware: probe the GPUs, show their memory, use and temperature, and choose the ones to train on."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import SelectionList, Static

from tuner_tui.wizard.steps.base import WizardStep


class HardwareStep(WizardStep):
    TITLE = "Hardware: the GPUs to train on"
    STEP = 1
    CHECKED = ("gpus",)
    AUTO_FOCUS = "#next"  # every GPU starts chosen: Enter goes on, Shift+Tab reaches the list

    def body(self) -> ComposeResult:
        yield Static("probing the GPUs…", id="gpu-info")
        yield SelectionList[int](id="gpu-list")
        yield Static("", id="err-gpus", classes="error")

    def on_mount(self) -> None:
        self.work("probe", self.app.probe, "probing the GPUs")

    def done(self, group: str, state: Any) -> None:
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
