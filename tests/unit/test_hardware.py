"""The GPU probe: the production ``probe()`` runs on a fake NVML module that replays recorded machines.

This machine has no NVIDIA driver, so the real ``probe()`` is checked for the no-GPU state it must give here.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from engine import hardware
from engine.hardware import (GIB, Gpu, GpuProcess, HardwareState, NvmlDevice, cuda_nvml_mapping, nvml_device_for,
                             nvml_memory_used, probe, visible_devices)
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
    raises NotSupported as a card without that sensor does. ``migs`` puts GPUs (by nvidia-smi's index) in MIG mode:
    their slots, each a MIG instance (a ``Gpu`` record read through its own handle) or ``None`` where empty."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, state: HardwareState, init_error: type[NVMLError] | None = None,
                 failing: frozenset[str] | set[str] = frozenset(), migs: dict[int, list[Gpu | None]] | None = None):
        self.gpus = sorted(state.gpus, key=lambda g: g.physical_index)
        self.state = state
        self.init_error = init_error
        self.failing = failing
        self.migs = migs or {}
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

    def nvmlDeviceGetMigMode(self, gpu):
        enabled = int(any(gpu is g for g in self.gpus) and gpu.physical_index in self.migs)
        return self._answer("nvmlDeviceGetMigMode", (enabled, enabled))

    def nvmlDeviceGetMaxMigDeviceCount(self, gpu):
        return len(self.migs.get(gpu.physical_index, []))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, gpu, slot):
        instance = self.migs[gpu.physical_index][slot]
        if instance is None:
            raise NVMLError_NotFound()
        return instance

    def nvmlDeviceGetGpuInstanceId(self, instance):
        return self._slot(instance) + 1  # as `nvidia-smi mig -lgi` numbers them here

    def nvmlDeviceGetComputeInstanceId(self, instance):
        return 0

    def _slot(self, instance):
        return next(slots.index(instance) for slots in self.migs.values() if instance in slots)

    def _all(self):
        return self.gpus + [m for slots in self.migs.values() for m in slots if m is not None]

    def nvmlSystemGetProcessName(self, pid):
        names = {p.pid: p.name for g in self._all() for p in g.processes or []}
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
    ("GPU-a,MIG-1", [0]),   # the first entry's kind: a MIG entry ends a list of GPUs
])
def test_visible_devices_follows_cuda_parsing(spec, expected):
    devices = [NvmlDevice(index=i, uuid=u) for i, u in enumerate(["GPU-aaaa", "GPU-bbbb", "GPU-cccc"])]
    devices.append(NvmlDevice(index=2, uuid="MIG-1111", mig=0))
    assert [d.index for d in visible_devices(spec, devices)] == expected


def mig_machine() -> tuple[HardwareState, dict[int, list[Gpu | None]]]:
    """Two A100-SXM4-80GB (the recorded one, twice): GPU 0 whole, GPU 1 in MIG mode with a 3g.40gb instance in slot
    0, slot 1 empty and a 1g.10gb instance in slot 2, as `nvidia-smi -L` lists such a machine."""
    (a100,) = recorded("a100-80gb").gpus
    second = dataclasses.replace(a100, index=1, physical_index=1, uuid="GPU-9d1e4b27-36c0-4f8a-b5d2-0e7a6c3f81b4",
                                 memory_used_gib=12.3, memory_free_gib=67.7, utilization_pct=None)
    big = Gpu(index=1, physical_index=1, name="NVIDIA A100-SXM4-80GB MIG 3g.40gb",
              uuid="MIG-4f5a2c1d-8e3b-5a7f-9c60-2d1b7e4a3f95", memory_total_gib=39.25, memory_used_gib=12.0,
              memory_free_gib=27.25, processes=[GpuProcess(pid=51234, name="python3", used_gib=11.9)])
    small = Gpu(index=1, physical_index=1, name=None, uuid="MIG-b7c3e901-2f4d-5e6a-8b19-c0d2e3f4a5b6",
                memory_total_gib=9.75, memory_used_gib=0.25, memory_free_gib=9.5, processes=[])
    state = HardwareState(gpus=[a100, second], driver_version="550.54.15", cuda_version="12.4")
    return state, {1: [big, None, small, None, None, None, None]}


def test_cuda_visible_devices_by_mig_uuid_shows_that_instance_with_its_own_memory(monkeypatch):
    state, migs = mig_machine()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", migs[1][0].uuid)
    probed = probe(FakeNvml(state, migs=migs))
    (gpu,) = probed.gpus
    assert (gpu.index, gpu.physical_index, gpu.uuid, gpu.name) == (0, 1, migs[1][0].uuid,
                                                                   "NVIDIA A100-SXM4-80GB MIG 3g.40gb")
    assert (gpu.memory_total_gib, gpu.memory_used_gib, gpu.memory_free_gib) == (39.25, 12.0, 27.25)
    assert [(p.pid, p.name, p.used_gib) for p in gpu.processes] == [(51234, "python3", 11.9)]
    assert probed.has_gpu and probed.message is None
    assert "0 (nvidia-smi 1)" in rendered(probed)


@pytest.mark.parametrize("spec", [
    "MIG-b7c3e901",                                                   # a unique prefix, as for GPU- UUIDs
    "MIG-b7c3e901-2f4d-5e6a-8b19-c0d2e3f4a5b6",
    "MIG-GPU-9d1e4b27-36c0-4f8a-b5d2-0e7a6c3f81b4/3/0",               # the older form: GPU instance 3, compute 0
    "MIG-b7c3e901-2f4d-5e6a-8b19-c0d2e3f4a5b6,MIG-4f5a2c1d-8e3b-5a7f-9c60-2d1b7e4a3f95",  # CUDA shows the first only
])
def test_mig_entries_select_one_instance_named_after_its_gpu(monkeypatch, spec):
    state, migs = mig_machine()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    (gpu,) = probe(FakeNvml(state, migs=migs)).gpus
    assert (gpu.physical_index, gpu.uuid, gpu.name, gpu.memory_total_gib) == (
        1, migs[1][2].uuid, "NVIDIA A100-SXM4-80GB MIG", 9.75)  # NVML gave no name: its GPU's, marked MIG


@pytest.mark.parametrize("spec", ["MIG-0000", "MIG-4f5a,MIG-4f5a", "MIG-"])
def test_unknown_repeated_or_ambiguous_mig_entries_hide_every_gpu(monkeypatch, spec):
    state, migs = mig_machine()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    probed = probe(FakeNvml(state, migs=migs))
    assert not probed.has_gpu and f"CUDA_VISIBLE_DEVICES={spec!r} hides every GPU" in probed.message


def test_mig_machine_without_cuda_visible_devices_lists_whole_gpus_and_ignores_mig_on_other_cards():
    state, migs = mig_machine()
    assert [(g.index, g.uuid) for g in probe(FakeNvml(state, migs=migs)).gpus] == [(0, state.gpus[0].uuid),
                                                                                 (1, state.gpus[1].uuid)]
    unsupported = probe(FakeNvml(recorded("2x-rtx-4090"), failing={"nvmlDeviceGetMigMode"}))
    assert [g.physical_index for g in unsupported.gpus] == [0, 1]


def _bare(uuid: str) -> str:
    """A UUID as torch prints it: CUDA's bytes, without NVML's GPU-/MIG- prefix."""
    return uuid.split("-", 1)[1]


@pytest.mark.parametrize("spec", ["3", "GPU-4e8b2d06-a9c1-37f5-6b3e-f02d9c7a51b8", "GPU-4e8b"])
@pytest.mark.parametrize("torch_gives_uuid", [True, False])
def test_pinned_run_reads_memory_of_the_physical_gpu_not_nvml_index_0(monkeypatch, spec, torch_gives_uuid):
    state = recorded("8x-h100")
    state.gpus[3].memory_used_gib = 41.5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    cuda_uuid = _bare(state.gpus[3].uuid) if torch_gives_uuid else None
    nvml = FakeNvml(state)
    assert nvml_memory_used(0, cuda_uuid, nvml) == round(41.5 * GIB)
    assert nvml.open == 0


def test_cuda_uuid_wins_over_the_order_cuda_visible_devices_gives():
    """CUDA's default order (fastest first) can differ from nvidia-smi's; the UUID says which GPU it is."""
    devices = [NvmlDevice(index=i, uuid=u) for i, u in enumerate(["GPU-aaaa-1", "GPU-bbbb-2", "GPU-cccc-3"])]
    assert nvml_device_for(0, "cccc-3", devices, None).index == 2
    assert nvml_device_for(0, "GPU-CCCC-3", devices, None).index == 2
    assert nvml_device_for(0, "dddd-4", devices, "1").index == 1   # unknown to NVML: CUDA_VISIBLE_DEVICES' order
    assert nvml_device_for(1, None, devices, "1") is None


def test_cuda_nvml_mapping_gives_each_cuda_device_its_gpu_uuid_and_name(monkeypatch):
    state = recorded("8x-h100")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,2")
    nvml = FakeNvml(state)
    assert cuda_nvml_mapping(nvml, cuda_uuids=[_bare(state.gpus[5].uuid), None]) == [
        {"cuda": 0, "cuda_uuid": _bare(state.gpus[5].uuid), "nvml": 5, "mig": None, "uuid": state.gpus[5].uuid,
         "name": "NVIDIA H100 80GB HBM3", "by": "uuid"},
        {"cuda": 1, "cuda_uuid": None, "nvml": 2, "mig": None, "uuid": state.gpus[2].uuid,
         "name": "NVIDIA H100 80GB HBM3", "by": "order"},
    ]
    assert nvml.open == 0
    assert cuda_nvml_mapping(FakeNvml(state, init_error=NVMLError_DriverNotLoaded), cuda_uuids=["x"]) == [
        {"cuda": 0, "cuda_uuid": "x", "nvml": None, "mig": None, "uuid": None, "name": None, "by": None}]


@pytest.mark.parametrize("cuda_uuid, by", [
    ("4f5a2c1d-8e3b-5a7f-9c60-2d1b7e4a3f95", "uuid"),   # the MIG instance's own UUID
    ("9d1e4b27-36c0-4f8a-b5d2-0e7a6c3f81b4", "order"),  # its GPU's: CUDA_VISIBLE_DEVICES says which instance
])
def test_cuda_nvml_mapping_on_a_mig_instance(monkeypatch, cuda_uuid, by):
    state, migs = mig_machine()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", migs[1][0].uuid)
    nvml = FakeNvml(state, migs=migs)
    assert cuda_nvml_mapping(nvml, cuda_uuids=[cuda_uuid]) == [
        {"cuda": 0, "cuda_uuid": cuda_uuid, "nvml": 1, "mig": 0, "uuid": migs[1][0].uuid,
         "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "by": by}]
    assert nvml_memory_used(0, cuda_uuid, nvml) == round(12.0 * GIB)


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
