"""The GPU probe: what NVML reports about this machine's NVIDIA GPUs, numbered as CUDA will number them (a MIG
instance that CUDA_VISIBLE_DEVICES names is one GPU), and which NVML device a CUDA device is.

No driver, no GPU or every GPU hidden by ``CUDA_VISIBLE_DEVICES`` is a normal state with a message, never an
exception; a reading a card does not support is ``None``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
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


@dataclasses.dataclass(frozen=True)
class NvmlDevice:
    """A device NVML lists: a whole GPU (``index``: nvidia-smi's number), or one MIG instance of GPU ``index`` in
    its slot ``mig``; ``handle`` is NVML's, for reading it."""

    index: int
    uuid: str | None = None
    mig: int | None = None
    legacy_uuid: str | None = None  # a MIG instance's older name, MIG-<its GPU's UUID>/<GPU instance>/<compute inst.>
    handle: Any = dataclasses.field(default=None, compare=False, repr=False)


def visible_devices(spec: str | None, devices: Sequence[NvmlDevice]) -> list[NvmlDevice]:
    """The devices CUDA will see, in CUDA's order, for a CUDA_VISIBLE_DEVICES value; ``devices`` are NVML's.

    Follows CUDA (as PyTorch mirrors it): unset shows every whole GPU; entries are indices, ``GPU-`` or ``MIG-`` UUID
    prefixes, of the first entry's kind; the first invalid, out-of-range or ambiguous entry ends the list; a repeated
    device hides them all. A process enumerates one MIG instance at most (CUDA's limit): of MIG entries the first
    counts. The older ``MIG-GPU-<uuid>/<gi>/<ci>`` form is matched whole against each instance's ``legacy_uuid``.
    """
    gpus = [d for d in devices if d.mig is None]
    if spec is None:
        return gpus
    kind = next((prefix for prefix in ("GPU-", "MIG-") if spec.strip().startswith(prefix)), None)
    candidates = [d for d in devices if (d.mig is None) == (kind == "GPU-")]
    chosen: list[NvmlDevice] = []
    for entry in (e.strip() for e in spec.split(",")):
        if kind:
            matches = [d for d in candidates if entry.startswith(kind) and (
                (d.uuid or "").startswith(entry) or entry == d.legacy_uuid)]
            device = matches[0] if len(matches) == 1 else None
        else:
            digits = entry[:len(entry) - len(entry.lstrip("0123456789"))]  # CUDA reads it like strtoul: "1abc" is 1
            device = gpus[int(digits)] if digits and int(digits) < len(gpus) else None
        if device is None:
            break
        if device in chosen:
            return []
        chosen.append(device)
    return chosen[:1] if kind == "MIG-" else chosen


def nvml_device_for(cuda_index: int, cuda_uuid: str | None, devices: Sequence[NvmlDevice],
                    spec: str | None) -> NvmlDevice | None:
    """The NVML device behind CUDA device ``cuda_index``: NVML numbers GPUs as nvidia-smi does, ignoring
    CUDA_VISIBLE_DEVICES (``spec``), so it is found by the UUID torch gives (``cuda_uuid``, with or without the
    ``GPU-``/``MIG-`` prefix), else by its place in CUDA_VISIBLE_DEVICES' order (which assumes CUDA numbers GPUs in
    nvidia-smi's order, as CUDA_DEVICE_ORDER=PCI_BUS_ID does)."""
    order = visible_devices(spec, devices)
    placed = order[cuda_index] if 0 <= cuda_index < len(order) else None
    body = _uuid_body(cuda_uuid)
    matched = next((d for d in devices if body and _uuid_body(d.uuid) == body), None)
    if matched and placed and matched.mig is None and placed.mig is not None and placed.index == matched.index:
        return placed  # a MIG instance that CUDA named by its GPU's UUID
    return matched or placed


def _uuid_body(uuid: str | None) -> str | None:
    """A UUID without NVML's ``GPU-`` or ``MIG-`` prefix (torch prints a CUDA UUID bare), lower-case."""
    if not uuid:
        return None
    return uuid.removeprefix("GPU-").removeprefix("MIG-").lower()


def probe(nvml: Any = None) -> HardwareState:
    """Read every visible GPU through NVML; ``nvml`` is the ``pynvml`` module unless a test passes a fake one."""
    return _with_nvml(nvml, _read_state, lambda error: _no_gpu(str(error)))


def _with_nvml(nvml: Any, read, unavailable):
    """``read(nvml)`` between NVML's start and its shutdown; ``unavailable(error)`` where it does not start. ``nvml``
    is the ``pynvml`` module unless a test passes a fake one."""
    if nvml is None:
        import pynvml as nvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        return unavailable(e)
    try:
        return read(nvml)
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
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = nvml_devices(nvml, count)
    order = visible_devices(spec, devices)
    if not order:
        return _no_gpu(f"CUDA_VISIBLE_DEVICES={spec!r} hides every GPU", driver, cuda)
    gpus = [_read_device(nvml, d, devices, i) for i, d in enumerate(order)]
    return HardwareState(gpus=gpus, driver_version=driver, cuda_version=cuda)


def nvml_devices(nvml: Any, count: int | None = None) -> list[NvmlDevice]:
    """Every device NVML lists (after ``nvmlInit``): the GPUs in nvidia-smi's order, then the MIG instances of each
    GPU in MIG mode."""
    if count is None:
        count = _call(nvml, nvml.nvmlDeviceGetCount) or 0
    gpus = []
    for i in range(count):
        handle = _call(nvml, nvml.nvmlDeviceGetHandleByIndex, i)
        uuid = None if handle is None else _call(nvml, nvml.nvmlDeviceGetUUID, handle)
        gpus.append(NvmlDevice(index=i, uuid=uuid, handle=handle))
    return gpus + [instance for gpu in gpus for instance in _mig_instances(nvml, gpu)]


def _mig_instances(nvml: Any, gpu: NvmlDevice) -> list[NvmlDevice]:
    mode = None if gpu.handle is None else _call(nvml, nvml.nvmlDeviceGetMigMode, gpu.handle)
    if not mode or mode[0] != nvml.NVML_DEVICE_MIG_ENABLE:  # (current, pending)
        return []
    instances = []
    for slot in range(_call(nvml, nvml.nvmlDeviceGetMaxMigDeviceCount, gpu.handle) or 0):
        handle = _call(nvml, nvml.nvmlDeviceGetMigDeviceHandleByIndex, gpu.handle, slot)  # an empty slot raises
        if handle is None:
            continue
        ids = (_call(nvml, nvml.nvmlDeviceGetGpuInstanceId, handle), _call(nvml, nvml.nvmlDeviceGetComputeInstanceId,
                                                                           handle))
        legacy = None if gpu.uuid is None or None in ids else f"MIG-{gpu.uuid}/{ids[0]}/{ids[1]}"
        instances.append(NvmlDevice(index=gpu.index, uuid=_call(nvml, nvml.nvmlDeviceGetUUID, handle), mig=slot,
                                    legacy_uuid=legacy, handle=handle))
    return instances


def _read_device(nvml: Any, device: NvmlDevice, devices: list[NvmlDevice], cuda_index: int) -> Gpu:
    """A MIG instance reads from its own handle (its memory, its processes); NVML names it "<GPU> MIG <profile>",
    else it takes its GPU's name."""
    gpu = _read_gpu(nvml, device.handle, Gpu(index=cuda_index, physical_index=device.index, uuid=device.uuid))
    if device.mig is not None and not gpu.name:
        parent = devices[device.index].handle
        name = None if parent is None else _call(nvml, nvml.nvmlDeviceGetName, parent)
        gpu.name = None if name is None else f"{name} MIG"
    return gpu


def cuda_nvml_mapping(nvml: Any = None, cuda_uuids: list[str | None] | None = None) -> list[dict[str, Any]]:
    """Each CUDA device with the NVML device behind it (`tuner doctor --gpu`): ``cuda`` and ``cuda_uuid`` (CUDA's
    index and the UUID torch gives, from ``cuda_uuids`` else torch's own), ``nvml`` (nvidia-smi's index of the GPU),
    ``mig`` (the MIG slot, None for a whole GPU), NVML's ``uuid`` and ``name``, ``by`` ("uuid" or "order": how it was
    found; None where NVML shows no device for it)."""
    uuids = cuda_device_uuids() if cuda_uuids is None else cuda_uuids

    def read(nvml):
        devices, spec = nvml_devices(nvml), os.environ.get("CUDA_VISIBLE_DEVICES")
        return [_mapped(i, uuid, nvml_device_for(i, uuid, devices, spec), nvml) for i, uuid in enumerate(uuids)]

    return _with_nvml(nvml, read, lambda error: [_mapped(i, uuid, None, None) for i, uuid in enumerate(uuids)])


def _mapped(cuda_index: int, cuda_uuid: str | None, device: NvmlDevice | None, nvml: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"cuda": cuda_index, "cuda_uuid": cuda_uuid, "nvml": None, "mig": None, "uuid": None,
                           "name": None, "by": None}
    if device is not None:
        name = None if device.handle is None else _call(nvml, nvml.nvmlDeviceGetName, device.handle)
        by = "uuid" if cuda_uuid and _uuid_body(cuda_uuid) == _uuid_body(device.uuid) else "order"
        row.update(nvml=device.index, mig=device.mig, uuid=device.uuid, name=name, by=by)
    return row


def nvml_memory_used(cuda_index: int, cuda_uuid: str | None, nvml: Any = None) -> int | None:
    """Bytes in use on CUDA device ``cuda_index`` as NVML counts them (every process's); ``None`` where NVML cannot
    say. ``cuda_uuid`` is the UUID torch gives the device, None where unknown."""
    def read(nvml):
        device = nvml_device_for(cuda_index, cuda_uuid, nvml_devices(nvml), os.environ.get("CUDA_VISIBLE_DEVICES"))
        memory = None if device is None or device.handle is None else _call(
            nvml, nvml.nvmlDeviceGetMemoryInfo, device.handle)
        return None if memory is None else memory.used

    return _with_nvml(nvml, read, lambda error: None)


def cuda_device_uuids() -> list[str | None]:
    """The UUID torch gives each CUDA device this process sees, in CUDA's order; empty where torch sees none."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [cuda_device_uuid(i) for i in range(torch.cuda.device_count())]


def cuda_device_uuid(index: int) -> str | None:
    """torch's UUID of CUDA device ``index``: it prints CUDA's bytes bare (``0c3e9a51-7b2d-...``), without NVML's
    ``GPU-``/``MIG-`` prefix; ``None`` where this torch gives none."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return None if uuid is None else str(uuid)


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
