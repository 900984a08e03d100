"""``tuner doctor`` on a MIG instance chosen by CUDA_VISIBLE_DEVICES: the probe (on the fake NVML) shows the instance,
so the doctor counts it instead of saying every GPU is hidden."""

from __future__ import annotations

import os

from test_hardware import FakeNvml, mig_machine

from engine.doctor import OK, PROBLEM, Finding, TorchInfo, check_torch_gpus
from engine.hardware import probe

CUDA_TORCH_ONE_DEVICE = TorchInfo(version="2.7.0", cuda="12.4", cuda_available=True, device_count=1)


def test_mig_instance_in_cuda_visible_devices_is_one_gpu_torch_sees(monkeypatch):
    state, migs = mig_machine()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", migs[1][0].uuid)
    finding = check_torch_gpus(probe(FakeNvml(state, migs=migs)), CUDA_TORCH_ONE_DEVICE, os.environ)
    assert finding == Finding("torch", OK, f"torch sees the 1 GPU(s) (CUDA_VISIBLE_DEVICES={migs[1][0].uuid!r} "
                                           "chooses them)")


def test_mig_uuid_nvml_does_not_list_is_named_as_such(monkeypatch):
    state, migs = mig_machine()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-0000")
    finding = check_torch_gpus(probe(FakeNvml(state, migs=migs)), CUDA_TORCH_ONE_DEVICE, os.environ)
    assert finding == Finding("torch", PROBLEM, "CUDA_VISIBLE_DEVICES='MIG-0000' names no MIG instance NVML lists",
                              "`nvidia-smi -L` lists each MIG instance's UUID")
