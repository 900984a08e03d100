"""A run waits, queued, while another run on this host holds its GPUs; --force starts it at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import sys
import time
from pathlib import Path

import pytest

import engine.hardware
import engine.runs.gpu_queue
from engine.cli import main
from engine.hardware import HardwareState
from engine.rundir.index import register
from engine.rundir.process import pid_start_time
from engine.rundir import RunStatus, read_status, write_status

A100 = Path(__file__).resolve().parents[1] / "data" / "gpu_states" / "a100-80gb.json"
RUN = ["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--max_steps", "2",
       "--save_strategy", "no"]
DEADLINE_S = 120.0


@pytest.fixture
def a100(tmp_path, monkeypatch):
    """This machine made to report the recorded A100 (NVML faked), with its own index of runs."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    state = HardwareState.from_json(json.loads(A100.read_text()))
    monkeypatch.setattr(engine.hardware, "probe", lambda nvml=None: state)
    monkeypatch.setattr(engine.runs.gpu_queue, "QUEUE_POLL_S", 0.2)
    return state


@pytest.fixture
def gpu_holder(a100, tmp_path):
    """A live process recorded as a running run on that A100."""
    process = subprocess.Popen(["sleep", "60"])
    run_dir = tmp_path / "holder"
    run_dir.mkdir()
    write_status(run_dir, RunStatus(id="holder-run", name="holder", state="running", pid=process.pid,
                                    pid_started_at=pid_start_time(process.pid),
                                    host=socket.gethostname(), gpus=[a100.gpus[0].uuid]))
    register(run_dir, "holder-run")
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def holder(gpu_holder, tiny_models):
    return gpu_holder


def queued_behind(run_dir: Path) -> bool:
    """Whether the run has looked at its GPUs and is waiting for them (its status queued, its GPUs written)."""
    status = read_status(run_dir)
    return status is not None and status.state == "queued" and bool(status.gpus)


def when(condition, then) -> threading.Thread:
    """Run ``then`` in a thread as soon as ``condition()`` holds (at the deadline at the latest, so nothing hangs)."""
    def watch():
        deadline = time.monotonic() + DEADLINE_S
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_run_waits_queued_until_the_gpus_are_free(holder, tmp_path):
    out = tmp_path / "waiting"
    when(lambda: queued_behind(out), lambda: (holder.kill(), holder.wait()))
    assert main([*RUN, "--output_dir", str(out)]) == 0
    log = (out / "train.log").read_text()
    assert "queued: run holder-run holds this run's GPUs" in log
    assert read_status(out).state == "completed"


def test_force_starts_at_once(holder, tmp_path):
    out = tmp_path / "forced"
    assert main([*RUN, "--output_dir", str(out), "--force"]) == 0
    assert "queued" not in (out / "train.log").read_text()
    assert holder.poll() is None, "the other run was left alone"


def test_stopping_a_queued_run_marks_it_stopped(holder, tmp_path):
    import signal

    out = tmp_path / "stopped"
    when(lambda: queued_behind(out), lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert main([*RUN, "--output_dir", str(out)]) == 128 + signal.SIGTERM
    status = read_status(out)
    assert status.state == "stopped" and status.step == 0


WAITER = """
import json, sys
from pathlib import Path

import engine.hardware
from engine.hardware import HardwareState
from engine.runs.gpu_queue import wait_for_gpus
from engine.rundir.process import own_identity
from engine.rundir.run import RunDir
from engine.rundir.status import read_status, write_status
from engine.runs.stop import StopRequest

state = HardwareState.from_json(json.loads(Path(sys.argv[1]).read_text()))
engine.hardware.probe = lambda nvml=None: state
if len(sys.argv) > 3:  # a slow look at the other runs, so runs arriving together overlap in it
    import time
    import engine.rundir.jobs
    look = engine.rundir.jobs.gpu_claims
    engine.rundir.jobs.gpu_claims = lambda *a: (look(*a), time.sleep(float(sys.argv[3])))[0]
stop = StopRequest().install()
run_dir = Path(sys.argv[2])
status = read_status(run_dir)
status.pid, status.pid_started_at = own_identity()
write_status(run_dir, status)
wait_for_gpus(RunDir(run_dir, None, status), stop, poll_s=0.05)
sys.stdin.read()
"""
class Waiter:
    """A run's process of its own that waits for the A100 (NVML faked in it too), then holds it until told to
    end; it ends without a word, so its status.json still says running, its process gone."""

    def __init__(self, tmp_path: Path, run_id: str, started_at: str, look_s: float | None):
        self.id, self.dir = run_id, tmp_path / run_id
        self.dir.mkdir()
        write_status(self.dir, RunStatus(id=run_id, name=run_id, state="queued", started_at=started_at))
        register(self.dir, run_id)
        self.log = open(tmp_path / f"{run_id}.out", "wb")
        self.process = subprocess.Popen([sys.executable, "-c", WAITER, str(A100), str(self.dir),
                                         *([str(look_s)] if look_s else [])],
                                        stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ))

    @property
    def status(self) -> RunStatus:
        return read_status(self.dir)

    def decided(self) -> bool:
        """Whether it has looked at the GPUs under the lock: queued or running with its GPUs written."""
        status = self.status
        return status.pid == self.process.pid and bool(status.gpus)

    def end(self) -> None:
        self.process.stdin.close()
        assert self.process.wait(timeout=DEADLINE_S) == 0, (self.dir.parent / f"{self.id}.out").read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def running(waiters: list[Waiter]) -> list[str]:
    return [w.id for w in waiters if w.process.poll() is None and w.status.state == "running"]


@pytest.fixture
def spawn(tmp_path):
    started: list[Waiter] = []

    def start(run_id: str, started_at: str = "2025-01-01T10:00:00+00:00", look_s: float | None = None) -> Waiter:
        started.append(Waiter(tmp_path, run_id, started_at, look_s))
        return started[-1]

    yield start
    for waiter in started:
        waiter.kill()


def test_runs_queued_for_a_busy_gpu_start_one_at_a_time_first_queued_first(gpu_holder, spawn):
    late = spawn("queued-second", "2025-01-01T10:00:01+00:00")
    wait_until(late.decided, "the later run is queued")
    early = spawn("queued-first", "2025-01-01T10:00:00+00:00")
    wait_until(early.decided, "the earlier run is queued")
    assert (late.status.state, early.status.state) == ("queued", "queued")

    gpu_holder.kill()
    gpu_holder.wait()
    wait_until(lambda: running([early, late]), "a queued run starts after the holder ends")
    assert running([early, late]) == ["queued-first"]
    window = time.monotonic() + 0.5  # ten of the waiting run's looks at the GPU
    while time.monotonic() < window:
        assert late.status.state == "queued", "the second run started while the first holds the GPU"
        time.sleep(0.02)

    early.end()
    wait_until(lambda: late.status.state == "running", "the second run starts once the first one's process is gone")
    assert running([early, late]) == ["queued-second"]


def test_runs_arriving_together_at_a_free_gpu_claim_it_one_at_a_time(a100, spawn):
    waiters = [spawn(run_id, look_s=1.0) for run_id in ("together-a", "together-b", "together-c")]
    while waiters:
        wait_until(lambda: all(w.decided() for w in waiters) and running(waiters), "one of them has the GPU")
        holding = running(waiters)
        assert len(holding) == 1, f"{holding} all started on the one GPU"
        rest = [w for w in waiters if w.id != holding[0]]
        assert all(w.status.state == "queued" for w in rest)
        next(w for w in waiters if w.id == holding[0]).end()
        waiters = rest
        if waiters:
            wait_until(lambda: running(waiters), "the next one starts")
            assert running(waiters) == [waiters[0].id], "the tie goes to the lower run id, in every process"
