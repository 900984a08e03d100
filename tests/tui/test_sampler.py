"""The samplers' reading of run files and GPU states, and the small pure helpers the widgets draw with."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone

from tui_helpers import recorded

from engine.rundir.process import pid_start_time
from engine.rundir import RunStatus, write_status
from tuner_tui.dashboard.sampler import GpuSampler, RunSampler, ema
from engine.rundir.events import EventReader
from engine.rundir.files import LogTail
from tuner_tui.dashboard.widgets import resample, spark, thin


def line(**event) -> str:
    return json.dumps(event) + "\n"


def test_event_reader_keeps_a_torn_line_for_the_next_read_and_skips_garbage(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventReader(path)
    assert tail.read() == ([], False)  # not written yet
    whole = line(type="log", step=5)
    path.write_text(line(type="start") + "not json\n" + whole[:7])
    assert tail.read() == ([{"type": "start"}], False)
    with open(path, "a") as file:
        file.write(whole[7:])
    assert tail.read() == ([{"type": "log", "step": 5}], False)
    assert tail.read() == ([], False)


def test_event_reader_starts_over_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(line(type="start", n=1) + line(type="log", step=1))
    tail = EventReader(path)
    assert len(tail.read()[0]) == 2
    path.unlink()
    path.write_text(line(type="start", n=2))
    assert tail.read() == ([{"type": "start", "n": 2}], True)


def test_log_tail_shows_the_last_lines_as_a_terminal_would(tmp_path):
    path = tmp_path / "train.log"
    path.write_text("".join(f"line {i}\n" for i in range(100)) + "10%\r50%\r100%\n\x1b[31mred\x1b[0m\n")
    assert LogTail(path, lines=3).read() == ("line 99", "100%", "red")
    assert LogTail(path, lines=50, max_bytes=30).read() == ("100%", "red")  # the cut first line is dropped
    assert LogTail(tmp_path / "missing.log").read() == ()


def test_resumed_run_replaces_the_steps_it_repeats(tmp_path):
    write_status(tmp_path, RunStatus(id="r", name="r", state="completed", pid=1, total_steps=20, step=20,
                                     started_at="2025-01-01T00:00:00+00:00", ended_at="2025-01-01T00:00:42+00:00"))
    (tmp_path / "events.jsonl").write_text(
        line(type="start", time=0.0) + "".join(line(type="log", step=s, loss=float(s), learning_rate=0.1, time=1.0)
                                               for s in (5, 10, 15)) +
        line(type="start", time=2.0, resumed_from="checkpoint-10") +
        line(type="log", step=15, loss=1.5, learning_rate=0.1, time=3.0) +
        line(type="log", step=20, loss=2.0, learning_rate=0.1, time=4.0) +
        line(type="eval", step=20, eval_loss=2.5) + line(type="end", state="completed", runtime_s=42.0))
    snapshot = RunSampler(tmp_path).sample()
    assert snapshot.loss.steps == (5, 10, 15, 20) and snapshot.loss.losses == (5.0, 10.0, 1.5, 2.0)
    assert snapshot.loss.eval_steps == (20,) and snapshot.loss.eval_losses == (2.5,)
    assert snapshot.progress.elapsed_s == 42.0 and snapshot.progress.remaining_s is None


def test_running_run_counts_elapsed_and_eta_on_between_log_events(tmp_path):
    write_status(tmp_path, RunStatus(id="r", name="r", state="running", pid=os.getpid(),
                                     pid_started_at=pid_start_time(os.getpid()), host=socket.gethostname(),
                                     started_at=datetime.fromtimestamp(900.0, timezone.utc).isoformat()))
    (tmp_path / "events.jsonl").write_text(line(type="log", step=10, total_steps=40, loss=1.0, elapsed_s=100.0,
                                                remaining_s=300.0, time=1000.0))
    now = [1000.0]
    sampler = RunSampler(tmp_path, clock=lambda: now[0])
    first = sampler.sample()
    now[0] = 1030.0
    later = sampler.sample()
    assert (first.progress.elapsed_s, first.progress.remaining_s) == (100.0, 300.0)
    assert (later.progress.elapsed_s, later.progress.remaining_s) == (130.0, 270.0)
    assert later.loss is first.loss  # nothing new: the series is not rebuilt


def test_gpu_sampler_keeps_a_bounded_history_per_gpu():
    sampler = GpuSampler(recorded("2x-rtx-4090"), history=3)
    for _ in range(5):
        snapshot = sampler.sample()
    busy, idle = snapshot.gpus
    assert busy.utilization_history == (97.0, 97.0, 97.0) and busy.pids == (48213,)
    assert idle.memory_history == (0.38, 0.38, 0.38) and idle.power_limit_w == 450.0
    assert GpuSampler(recorded("none")).sample().message.startswith("no NVIDIA GPU found")


def test_ema_smooths_and_carries_over_non_finite_points():
    assert ema(()) == ()
    assert ema((2.0, 2.0, 2.0)) == (2.0, 2.0, 2.0)
    smoothed = ema((4.0, float("nan"), 0.0))
    assert smoothed[0] == smoothed[1] == 4.0 and 0.0 < smoothed[2] < 4.0


def test_sparklines_keep_spikes_and_scale_to_the_given_range():
    assert resample([1, 9, 1, 1], 2) == [9, 1]
    assert spark([0, 50, 100], 10, 0, 100) == "▁▅█"
    assert spark([5, 5], 4) == "▁▁"
    xs, ys = thin(list(range(10)), list(range(10)), 4)
    assert xs[-1] == 9 and len(xs) <= 5
