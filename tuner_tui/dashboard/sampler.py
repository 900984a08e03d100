"""What the dashboard shows, as immutable snapshots built off the UI thread: a run's directory through the engine's
``RunWatcher`` (which owns the run directory's format and folds its events into series) and the GPUs through an
injectable probe (``GpuSampler``; on a machine without one, the CPU and memory the run's processes use instead),
keeping the short history the sparklines need.

A sampler is called by one thread at a time (the screen starts the next sample only after the previous ended).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.hardware import HardwareState
from engine.process_usage import UsageReading, cpu_percent, read_usage
from engine.rundir.series import Checkpoint, LossSeries, Progress, ema
from engine.rundir.watch import RunSnapshot, RunWatcher

__all__ = ["Checkpoint", "GpuReading", "GpuSampler", "GpuSnapshot", "HostSnapshot", "LossSeries", "Progress",
           "RunSampler", "RunSnapshot", "ema"]

GPU_HISTORY = 60
GIB = 1024**3

RunSampler = RunWatcher


@dataclass(frozen=True)
class GpuReading:
    """One GPU now, with its recent history (oldest first) for sparklines."""

    index: int
    name: str | None
    memory_used_gib: float | None
    memory_total_gib: float | None
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    pids: tuple[int, ...] = ()
    utilization_history: tuple[float, ...] = ()
    memory_history: tuple[float, ...] = ()
    power_history: tuple[float, ...] = ()


@dataclass(frozen=True)
class HostSnapshot:
    """Without a GPU: the CPU and memory the run's processes use and the machine's memory, with recent history."""

    processes: int  # the run's process and its descendants alive now; 0 once the run has ended
    cpu_pct: float | None  # 100 for each busy core; None until a second reading
    rss_gib: float
    cpu_count: int
    memory_used_gib: float
    memory_total_gib: float
    cpu_history: tuple[float, ...] = ()
    rss_history: tuple[float, ...] = ()
    memory_history: tuple[float, ...] = ()


@dataclass(frozen=True)
class GpuSnapshot:
    gpus: tuple[GpuReading, ...] = ()
    message: str | None = None  # why there is no GPU to show
    host: HostSnapshot | None = None  # what the run uses of the CPU and memory instead, when there is no GPU


class GpuSampler:
    """Calls the probe (``engine.hardware.probe`` or a test's recorded state) and keeps a short history per GPU; when
    there is none, reads the CPU and memory of the process ``run_pid()`` names (None: no run process to read)."""

    def __init__(self, probe: Callable[[], HardwareState], history: int = GPU_HISTORY,
                 run_pid: Callable[[], int | None] = lambda: None):
        self._probe = probe
        self._length = history
        self._run_pid = run_pid
        self._history: dict[str, tuple[deque, deque, deque]] = {}
        self._host_history = tuple(deque(maxlen=history) for _ in range(3))
        self._last_usage: UsageReading | None = None

    def sample(self) -> GpuSnapshot:
        state = self._probe()
        if not state.gpus:
            return GpuSnapshot(message=state.message or "no NVIDIA GPU found", host=self._host())
        readings = []
        for gpu in state.gpus:
            key = gpu.uuid or str(gpu.physical_index)
            util, memory, power = self._history.setdefault(
                key, tuple(deque(maxlen=self._length) for _ in range(3)))
            for series, value in ((util, gpu.utilization_pct), (memory, gpu.memory_used_gib), (power, gpu.power_w)):
                series.append(float(value) if value is not None else 0.0)
            readings.append(GpuReading(
                index=gpu.index, name=gpu.name, memory_used_gib=gpu.memory_used_gib,
                memory_total_gib=gpu.memory_total_gib, utilization_pct=gpu.utilization_pct,
                temperature_c=gpu.temperature_c, power_w=gpu.power_w, power_limit_w=gpu.power_limit_w,
                pids=tuple(p.pid for p in gpu.processes or ()), utilization_history=tuple(util),
                memory_history=tuple(memory), power_history=tuple(power)))
        return GpuSnapshot(gpus=tuple(readings))

    def _host(self) -> HostSnapshot:
        usage, before = read_usage(self._run_pid()), self._last_usage
        self._last_usage = usage
        cpu = cpu_percent(before, usage) if before is not None and usage.processes else None
        rss, used = usage.rss_bytes / GIB, usage.memory_used_bytes / GIB
        cpu_history, rss_history, memory_history = self._host_history
        for series, value in ((cpu_history, cpu or 0.0), (rss_history, rss), (memory_history, used)):
            series.append(value)
        return HostSnapshot(len(usage.processes), cpu, rss, usage.cpu_count, used, usage.memory_total_bytes / GIB,
                            tuple(cpu_history), tuple(rss_history), tuple(memory_history))
