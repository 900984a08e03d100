"""What a run takes from the machine besides GPUs: the CPU time and resident memory of its process tree and the
machine's memory (psutil), read at the edge; the CPU share between two readings is plain arithmetic."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessReading:
    pid: int
    started: float  # psutil's create_time: with the pid, which process this is (a pid is reused)
    cpu_s: float  # user + system seconds it has run so far
    rss_bytes: int


@dataclass(frozen=True)
class UsageReading:
    time: float
    processes: tuple[ProcessReading, ...]  # the run's process and its descendants; () when none was given or alive
    memory_used_bytes: int  # the machine's: total less what is available
    memory_total_bytes: int
    cpu_count: int

    @property
    def rss_bytes(self) -> int:
        return sum(p.rss_bytes for p in self.processes)


def read_usage(pid: int | None) -> UsageReading:
    """The process ``pid`` and its descendants now, and the machine's memory; processes that end while they are read
    are left out."""
    import psutil

    processes = []
    if pid is not None:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for process in tree:
            try:
                with process.oneshot():
                    times, memory = process.cpu_times(), process.memory_info()
                    processes.append(ProcessReading(process.pid, process.create_time(), times.user + times.system,
                                                    memory.rss))
            except psutil.Error:
                continue
    memory = psutil.virtual_memory()
    return UsageReading(time.time(), tuple(processes), memory.total - memory.available, memory.total,
                        psutil.cpu_count() or 1)


def cpu_percent(before: UsageReading, after: UsageReading) -> float | None:
    """The process tree's CPU use between two readings, 100 for each core kept busy (as top counts): the CPU time its
    processes gained over the wall time between. A process that started in between counts from zero; one that ended
    in between is not counted. None when no time passed."""
    wall = after.time - before.time
    if wall <= 0:
        return None
    earlier = {(p.pid, p.started): p.cpu_s for p in before.processes}
    gained = sum(p.cpu_s - earlier.get((p.pid, p.started), 0.0) for p in after.processes
                 if (p.pid, p.started) in earlier or p.started >= before.time - 1.0)  # start times: whole-second boot
    return max(gained, 0.0) / wall * 100
