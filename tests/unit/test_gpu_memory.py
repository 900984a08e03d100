"""The memory a run records (``gpu_memory_gib``): NVML's reading must be of the process's own GPU, which NVML numbers
as nvidia-smi does while CUDA numbers it after CUDA_VISIBLE_DEVICES. This machine has no GPU: torch's CUDA calls and
NVML are faked (NVML from a recorded machine); the code between them is the production one."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from test_hardware import FakeNvml, mig_machine, recorded

from engine.train.callbacks import gpu_memory_gib

GIB = 1024**3


class CudaUuid:
    """torch's ``_CUuuid``: ``str()`` gives CUDA's 16 bytes as 8-4-4-4-12 hex, without NVML's GPU-/MIG- prefix."""

    def __init__(self, nvml_uuid: str):
        self.text = nvml_uuid.split("-", 1)[1]

    def __str__(self) -> str:
        return self.text


def fake_cuda(monkeypatch, nvml: FakeNvml, uuid: CudaUuid | None) -> None:
    """One CUDA device (CUDA's 0, whatever GPU it is), its UUID as torch gives it (None: a torch without one)."""
    properties = SimpleNamespace(name="fake") if uuid is None else SimpleNamespace(name="fake", uuid=uuid)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 4 * GIB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


@pytest.mark.parametrize("spec", ["3", "GPU-4e8b2d06-a9c1-37f5-6b3e-f02d9c7a51b8"])
@pytest.mark.parametrize("torch_gives_uuid", [True, False])
def test_run_pinned_to_gpu_3_records_gpu_3s_memory_not_gpu_0s(monkeypatch, spec, torch_gives_uuid):
    state = recorded("8x-h100")
    state.gpus[3].memory_used_gib = 41.5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    nvml = FakeNvml(state)
    fake_cuda(monkeypatch, nvml, CudaUuid(state.gpus[3].uuid) if torch_gives_uuid else None)
    assert gpu_memory_gib() == {"max_allocated_gib": 3.0, "max_reserved_gib": 4.0, "nvml_used_gib": 41.5}
    assert nvml.open == 0


def test_run_on_a_mig_instance_records_the_instances_memory(monkeypatch):
    state, migs = mig_machine()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", migs[1][0].uuid)
    fake_cuda(monkeypatch, FakeNvml(state, migs=migs), CudaUuid(migs[1][0].uuid))
    assert gpu_memory_gib()["nvml_used_gib"] == 12.0


def test_without_nvml_torchs_figures_still_stand(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake_cuda(monkeypatch, FakeNvml(recorded("a100-80gb"), init_error=FakeNvml.NVMLError), None)
    assert gpu_memory_gib() == {"max_allocated_gib": 3.0, "max_reserved_gib": 4.0}
