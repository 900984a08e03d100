"""The GPU probe: the production ``probe()`` runs on a fake NVML module that replays recorded machines.

This machine has no NVIDIA driver, so the real ``probe()`` is checked for the no-GPU state it must give here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from engine import hardware
from engine.hardware import GIB, HardwareState, probe, visible_devices
from engine.cli.info import render_gpus

STATES = Path(__file__).resolve().parent.parent / "data" / "gpu_states"
MACHINES = ["a100-80gb", "2x-rtx-4090", "8x-h100"]


class NVMLError(Exception):
    """Mirrors pynvml: one base class, a subclass per error code, ``str()`` gives NVML's own text."""

    text = "Unknown Error"

    def __str__(self) -> str:
        return self.text


class NVMLError_NotSupported(NVMLError):
    text = "Not Supported"


class NVMLError_NotFound(NVMLError):
    text = "Not Found"


class NVMLError_LibraryNotFound(NVMLError):
    text = "NVML Shared Library Not Found"


class NVMLError_DriverNotLoaded(NVMLError):
    text = "Driver Not Loaded"


class FakeNvml:
    """Answers NVML's calls, in NVML's units, from a recorded state; a ``None`` field or a name in ``failing``
    raises NotSupported as a card without that sensor does."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, state: HardwareState, init_error: type[NVMLError] | None = None,
                 failing: frozenset[str] | set[str] = frozenset()):
        self.gpus = sorted(state.gpus, key=lambda g: g.physical_index)
        self.state = state
        self.init_error = init_error
        self.failing = failing
        self.open = 0

    def _answer(self, call: str, value):
        if call in self.failing or value is None:
            raise NVMLError_NotSupported()
        return value

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error()
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlSystemGetDriverVersion(self):
        return self._answer("nvmlSystemGetDriverVersion", self.state.driver_version)

    def nvmlSystemGetCudaDriverVersion_v2(self):
        major, minor = self._answer("nvmlSystemGetCudaDriverVersion_v2", self.state.cuda_version).split(".")
        return int(major) * 1000 + int(minor) * 10

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self._answer("nvmlDeviceGetHandleByIndex", self.gpus[i])

    def nvmlDeviceGetName(self, gpu):
        return self._answer("nvmlDeviceGetName", gpu.name)

    def nvmlDeviceGetUUID(self, gpu):
        return self._answer("nvmlDeviceGetUUID", gpu.uuid)

    def nvmlDeviceGetMemoryInfo(self, gpu):
        self._answer("nvmlDeviceGetMemoryInfo", gpu.memory_total_gib)
        return SimpleNamespace(total=round(gpu.memory_total_gib * GIB), used=round(gpu.memory_used_gib * GIB),
                               free=round(gpu.memory_free_gib * GIB))

    def nvmlDeviceGetUtilizationRates(self, gpu):
        return SimpleNamespace(gpu=self._answer("nvmlDeviceGetUtilizationRates", gpu.utilization_pct), memory=0)

    def nvmlDeviceGetTemperature(self, gpu, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._answer("nvmlDeviceGetTemperature", gpu.temperature_c)

    def nvmlDeviceGetPowerUsage(self, gpu):
        return round(self._answer("nvmlDeviceGetPowerUsage", gpu.power_w) * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu):
        return round(self._answer("nvmlDeviceGetEnforcedPowerLimit", gpu.power_limit_w) * 1000)

    def nvmlDeviceGetComputeRunningProcesses(self, gpu):
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=None if p.used_gib is None else round(p.used_gib * GIB))
                for p in self._answer("nvmlDeviceGetComputeRunningProcesses", gpu.processes)]

    def nvmlSystemGetProcessName(self, pid):
        names = {p.pid: p.name for g in self.gpus for p in g.processes or []}
        if "nvmlSystemGetProcessName" in self.failing or names.get(pid) is None:
            raise NVMLError_NotFound()
        return "/usr/bin/" + names[pid]


def recorded(name: str) -> HardwareState:
    return HardwareState.from_json(json.loads((STATES / f"{name}.json").read_text()))


def rendered(state: HardwareState) -> str:
    console = Console(record=True, width=120)
    console.print(render_gpus(state))
    return console.export_text()


@pytest.fixture(autouse=True)
def _all_gpus_visible(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.parametrize("machine", MACHINES)
def test_probe_reads_back_each_recorded_machine_and_shuts_nvml_down(machine):
    state = recorded(machine)
    nvml = FakeNvml(state)
    assert probe(nvml) == state
    assert nvml.open == 0


def test_probe_converts_nvml_units_to_gib_watts_and_cuda_version():
    state = probe(FakeNvml(recorded("a100-80gb")))
    gpu = state.gpus[0]
    assert (gpu.name, gpu.memory_total_gib, gpu.power_limit_w, gpu.temperature_c) == ("NVIDIA A100-SXM4-80GB", 80.0,
                                                                                      400.0, 31)
    assert (state.driver_version, state.cuda_version, state.message) == ("550.54.15", "12.4", None)
    assert state.has_gpu


def test_probe_lists_running_processes_with_their_names_and_memory():
    first, second = probe(FakeNvml(recorded("2x-rtx-4090"))).gpus
    assert [(p.pid, p.name, p.used_gib) for p in first.processes] == [(48213, "python3", 10.0)]
    assert second.processes == []


def test_process_name_falls_back_to_proc_comm(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "PROC", tmp_path)
    nvml = FakeNvml(recorded("2x-rtx-4090"), failing={"nvmlSystemGetProcessName"})
    assert probe(nvml).gpus[0].processes[0].name is None
    (tmp_path / "48213").mkdir()
    (tmp_path / "48213" / "comm").write_text("pt_main_thread\n")
    assert probe(nvml).gpus[0].processes[0].name == "pt_main_thread"


def test_unsupported_readings_become_none_and_render_as_na():
    unsupported = {"nvmlDeviceGetUtilizationRates", "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage",
                   "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetComputeRunningProcesses",
                   "nvmlSystemGetCudaDriverVersion_v2"}
    state = probe(FakeNvml(recorded("a100-80gb"), failing=unsupported))
    gpu = state.gpus[0]
    assert (gpu.utilization_pct, gpu.temperature_c, gpu.power_w, gpu.power_limit_w, gpu.processes) == (None,) * 5
    assert (gpu.name, gpu.memory_free_gib, state.driver_version, state.cuda_version) == (
        "NVIDIA A100-SXM4-80GB", 79.47, "550.54.15", None)
    text = rendered(state)
    assert "n/a / 400" not in text and "n/a / n/a" in text and "CUDA n/a" in text


def test_gpu_without_a_handle_keeps_its_place_with_no_readings():
    state = probe(FakeNvml(recorded("2x-rtx-4090"), failing={"nvmlDeviceGetHandleByIndex"}))
    assert [(g.index, g.physical_index, g.name, g.uuid, g.processes) for g in state.gpus] == [
        (0, 0, None, None, None), (1, 1, None, None, None)]


def test_cuda_visible_devices_by_index_filters_and_renumbers(monkeypatch):
    state = recorded("2x-rtx-4090")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    gpus = probe(FakeNvml(state)).gpus
    assert [(g.index, g.physical_index, g.uuid) for g in gpus] == [(0, 1, state.gpus[1].uuid),
                                                                 (1, 0, state.gpus[0].uuid)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    (only,) = probe(FakeNvml(state)).gpus
    assert (only.index, only.physical_index, only.processes) == (0, 1, [])
    assert "0 (nvidia-smi 1)" in rendered(HardwareState(gpus=[only]))


def test_cuda_visible_devices_by_uuid_and_uuid_prefix(monkeypatch):
    state = recorded("8x-h100")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{state.gpus[7].uuid},GPU-6a2d")
    assert [(g.index, g.physical_index) for g in probe(FakeNvml(state)).gpus] == [(0, 7), (1, 5)]


def test_empty_cuda_visible_devices_is_the_no_gpu_state(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    state = probe(FakeNvml(recorded("8x-h100")))
    assert not state.has_gpu
    assert state.message == ("no NVIDIA GPU found (CUDA_VISIBLE_DEVICES='' hides every GPU): "
                             "training runs on the CPU, fit for small models only")
    assert state.driver_version == "535.183.01"


@pytest.mark.parametrize("spec, expected", [
    (None, [0, 1, 2]),
    ("2, 0", [2, 0]),
    ("0,7,1", [0]),         # an out-of-range index ends the list, as in CUDA
    ("1,-1,2", [1]),
    ("0,0", []),            # a repeated device hides every device
    ("1gpu", [1]),          # read like strtoul
    ("GPU-b", [1]),
    ("GPU-", []),           # ambiguous prefix
    ("GPU-c,GPU-a", [2, 0]),
    ("GPU-a,1", [0]),
])
def test_visible_devices_follows_cuda_parsing(spec, expected):
    assert visible_devices(spec, ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]) == expected


def test_missing_library_gives_the_recorded_no_gpu_state():
    assert probe(FakeNvml(recorded("none"), init_error=NVMLError_LibraryNotFound)) == recorded("none")


def test_driver_not_loaded_or_no_device_is_a_state_not_an_error():
    state = probe(FakeNvml(recorded("a100-80gb"), init_error=NVMLError_DriverNotLoaded))
    assert state.message.startswith("no NVIDIA GPU found (Driver Not Loaded): ")
    state = probe(FakeNvml(HardwareState(gpus=[], driver_version="550.54.15", cuda_version="12.4")))
    assert (state.gpus, state.driver_version) == ([], "550.54.15")
    assert state.message.startswith("no NVIDIA GPU found (the driver sees no device): ")


def test_real_probe_on_this_machine_never_raises():
    state = probe()
    if state.has_gpu:
        assert state.message is None and all(g.name for g in state.gpus)
    else:
        assert state.message.startswith("no NVIDIA GPU found (")
        assert state.message.endswith("): training runs on the CPU, fit for small models only")


@pytest.mark.parametrize("name", MACHINES + ["none"])
def test_recorded_states_round_trip_through_json(name):
    data = json.loads((STATES / f"{name}.json").read_text())
    state = HardwareState.from_json(data)
    assert state.to_json() == data
    assert state.has_gpu == (name != "none")


def test_render_shows_each_gpu_and_the_driver_line():
    text = rendered(recorded("2x-rtx-4090"))
    assert text.count("NVIDIA GeForce RTX 4090") == 2
    for expected in ["10.5 / 24.0", "97 %", "68 °C", "412.6 / 450.0", "driver 550.120, CUDA 12.4"]:
        assert expected in text
    assert len(rendered(recorded("8x-h100")).splitlines()) == 10


def test_render_without_gpu_shows_the_message():
    assert rendered(recorded("none")).strip() == recorded("none").message


def test_importing_the_module_loads_neither_pynvml_nor_rich():
    code = "import sys, engine.hardware; print('pynvml' in sys.modules, 'rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["False", "False"]
