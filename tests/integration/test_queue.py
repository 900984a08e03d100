"""A run waits, queued, while another run on this host holds its GPUs; --force starts it at once."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import engine.hardware
import engine.train.sft
from engine.cli import main
from engine.hardware import HardwareState
from engine.runs.index import register
from engine.runs.process import pid_start_time
from engine.runs import RunStatus, read_status, write_status

A100 = Path(__file__).resolve().parents[1] / "data" / "gpu_states" / "a100-80gb.json"
RUN = ["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--max_steps", "2",
       "--save_strategy", "no"]


@pytest.fixture
def holder(tmp_path, tiny_models, monkeypatch):
    """A live process recorded as a running run on the A100 this machine is made to report (NVML faked)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    state = HardwareState.from_json(json.loads(A100.read_text()))
    monkeypatch.setattr(engine.hardware, "probe", lambda nvml=None: state)
    monkeypatch.setattr(engine.train.sft, "QUEUE_POLL_S", 0.2)
    process = subprocess.Popen(["sleep", "60"])
    run_dir = tmp_path / "holder"
    run_dir.mkdir()
    write_status(run_dir, RunStatus(id="holder-run", name="holder", state="running", pid=process.pid,
                                    pid_started_at=pid_start_time(process.pid),
                                    host=socket.gethostname(), gpus=[state.gpus[0].uuid]))
    register(run_dir, "holder-run")
    yield process
    process.kill()
    process.wait()


def test_run_waits_queued_until_the_gpus_are_free(holder, tmp_path):
    def end_holder():
        time.sleep(2.0)
        holder.kill()
        holder.wait()

    threading.Thread(target=end_holder).start()
    out = tmp_path / "waiting"
    started = time.time()
    assert main([*RUN, "--output_dir", str(out)]) == 0
    assert time.time() - started >= 2.0
    log = (out / "train.log").read_text()
    assert "queued: run holder-run holds this run's GPUs" in log
    assert read_status(out).state == "completed"


def test_force_starts_at_once(holder, tmp_path):
    out = tmp_path / "forced"
    assert main([*RUN, "--output_dir", str(out), "--force"]) == 0
    assert "queued" not in (out / "train.log").read_text()
    assert holder.poll() is None, "the other run was left alone"


def test_stopping_a_queued_run_marks_it_stopped(holder, tmp_path):
    import os
    import signal

    out = tmp_path / "stopped"
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    assert main([*RUN, "--output_dir", str(out)]) == 128 + signal.SIGTERM
    status = read_status(out)
    assert status.state == "stopped" and status.step == 0
