"""The GPU probe: what NVML reports about this machine's NVIDIA GPUs, numbered as CUDA will number them.

No driver, no GPU or every GPU hidden by ``CUDA_VISIBLE_DEVICES`` is a normal state with a message, never an
exception; a reading a card does not support is ``None``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

GIB = 1024**3
PROC = Path("/proc")
NO_GPU = "no NVIDIA GPU found ({reason}): training runs on the CPU, fit for small models only"


@dataclasses.dataclass
class GpuProcess:
    pid: int
    name: str | None = None
    used_gib: float | None = None


@dataclasses.dataclass
class Gpu:
    """One GPU; ``index`` is CUDA's number for it (after CUDA_VISIBLE_DEVICES), ``physical_index`` nvidia-smi's."""

    index: int
    physical_index: int
    name: str | None = None
    uuid: str | None = None
    memory_total_gib: float | None = None
    memory_used_gib: float | None = None
    memory_free_gib: float | None = None
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    processes: list[GpuProcess] | None = None  # None: the driver would not list them (e.g. no permission)


@dataclasses.dataclass
class HardwareState:
    gpus: list[Gpu]
    driver_version: str | None = None
    cuda_version: str | None = None
    message: str | None = None

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HardwareState:
        gpus = []
        for g in data["gpus"]:
            procs = g.get("processes")
            gpus.append(Gpu(**{**g, "processes": None if procs is None else [GpuProcess(**p) for p in procs]}))
        return cls(gpus=gpus, driver_version=data.get("driver_version"), cuda_version=data.get("cuda_version"),
                   message=data.get("message"))


def _no_gpu(reason: str, driver_version: str | None = None, cuda_version: str | None = None) -> HardwareState:
    return HardwareState(gpus=[], driver_version=driver_version, cuda_version=cuda_version,
                         message=NO_GPU.format(reason=reason))


def visible_devices(spec: str | None, uuids: list[str | None]) -> list[int]:
    """NVML indices of the GPUs CUDA will see, in CUDA's order, for a CUDA_VISIBLE_DEVICES value.

    Follows CUDA (as PyTorch mirrors it): unset shows all; entries are indices or ``GPU-`` UUID prefixes; the first
    invalid, out-of-range or ambiguous entry ends the list; a repeated device hides them all.
    """
    if spec is None:
        return list(range(len(uuids)))
    by_uuid = spec.strip().startswith("GPU-")
    chosen: list[int] = []
    for entry in (e.strip() for e in spec.split(",")):
        if by_uuid:
            matches = [i for i, u in enumerate(uuids) if u and entry.startswith("GPU-") and u.startswith(entry)]
            index = matches[0] if len(matches) == 1 else -1
        else:
            digits = entry[:len(entry) - len(entry.lstrip("0123456789"))]  # CUDA reads it like strtoul: "1abc" is 1
            index = int(digits) if digits and int(digits) < len(uuids) else -1
        if index < 0:
            break
        if index in chosen:
            return []
        chosen.append(index)
    return chosen


def probe(nvml: Any = None) -> HardwareState:
    """Read every visible GPU through NVML; ``nvml`` is the ``pynvml`` module unless a test passes a fake one."""
    if nvml is None:
        import pynvml as nvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        return _no_gpu(str(e))
    try:
        return _read_state(nvml)
    finally:
        _call(nvml, nvml.nvmlShutdown)


def _read_state(nvml: Any) -> HardwareState:
    driver = _call(nvml, nvml.nvmlSystemGetDriverVersion)
    cuda = _call(nvml, nvml.nvmlSystemGetCudaDriverVersion_v2)
    cuda = None if cuda is None else f"{cuda // 1000}.{cuda % 1000 // 10}"
    try:
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError as e:
        return _no_gpu(str(e), driver, cuda)
    if count == 0:
        return _no_gpu("the driver sees no device", driver, cuda)
    handles = [_call(nvml, nvml.nvmlDeviceGetHandleByIndex, i) for i in range(count)]
    uuids = [None if h is None else _call(nvml, nvml.nvmlDeviceGetUUID, h) for h in handles]
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    order = visible_devices(spec, uuids)
    if not order:
        return _no_gpu(f"CUDA_VISIBLE_DEVICES={spec!r} hides every GPU", driver, cuda)
    gpus = [_read_gpu(nvml, handles[p], Gpu(index=i, physical_index=p, uuid=uuids[p])) for i, p in enumerate(order)]
    return HardwareState(gpus=gpus, driver_version=driver, cuda_version=cuda)


def _read_gpu(nvml: Any, handle: Any, gpu: Gpu) -> Gpu:
    if handle is None:
        return gpu
    gpu.name = _call(nvml, nvml.nvmlDeviceGetName, handle)
    memory = _call(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
    if memory is not None:
        gpu.memory_total_gib, gpu.memory_used_gib, gpu.memory_free_gib = (
            _gib(memory.total), _gib(memory.used), _gib(memory.free))
    utilization = _call(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
    gpu.utilization_pct = None if utilization is None else utilization.gpu
    gpu.temperature_c = _call(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    gpu.power_w = _watts(_call(nvml, nvml.nvmlDeviceGetPowerUsage, handle))
    gpu.power_limit_w = _watts(_call(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle))
    procs = _call(nvml, nvml.nvmlDeviceGetComputeRunningProcesses, handle)
    if procs is not None:
        gpu.processes = [GpuProcess(pid=p.pid, name=_process_name(nvml, p.pid),
                                    used_gib=None if p.usedGpuMemory is None else _gib(p.usedGpuMemory))
                         for p in procs]
    return gpu


def _process_name(nvml: Any, pid: int) -> str | None:
    """NVML's name (the executable, as nvidia-smi shows it); else the kernel's short name from /proc/<pid>/comm."""
    name = _call(nvml, nvml.nvmlSystemGetProcessName, pid)
    if name:
        return name.rsplit("/", 1)[-1]
    try:
        return (PROC / str(pid) / "comm").read_text().strip() or None
    except OSError:
        return None


def _call(nvml: Any, fn: Any, *args: Any) -> Any:
    """One NVML reading, ``None`` where the card or the driver cannot give it (NotSupported, NoPermission, ...)."""
    try:
        return fn(*args)
    except nvml.NVMLError:
        return None


def _gib(n_bytes: int) -> float:
    return round(n_bytes / GIB, 2)


def _watts(milliwatts: int | None) -> float | None:
    return None if milliwatts is None else round(milliwatts / 1000, 1)


def check_machine(strategy: str, on_gpu: bool) -> None:
    """One line for a strategy this machine cannot run: FSDP shards only GPU process groups."""
    from engine.errors import UserError

    if strategy.startswith("fsdp") and not on_gpu:
        raise UserError(f"strategy {strategy} needs GPUs: on the CPU accelerate wraps the model in plain DDP "
                        "and shards nothing", "use strategy ddp, zero2 or zero3 on the CPU")
