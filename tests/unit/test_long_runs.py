"""A run that logged every step for weeks (a million log lines): what lists runs reads its events backwards from the
end, a watcher skims what it has to catch up on (every event but the logs, and an even sample of those), and the
chart's series keep a few thousand points however long the run. Each is checked against reading everything."""

from __future__ import annotations

import json
import random

import pytest

from engine.rundir import events as events_module
from engine.rundir.events import EventReader, lines_backward, newest_events, read_events
from engine.rundir.jobs import load_job
from engine.rundir.series import History, Thinned
from engine.rundir.status import RunStatus, write_status
from engine.rundir.watch import RunWatcher


def log(step: int, loss: float = 1.0) -> dict:
    return {"time": 1_700_000_000.0 + step, "type": "log", "step": step, "total_steps": 100_000, "loss": loss,
            "learning_rate": 1e-4}


def write_events(run_dir, events, tail: bytes = b"") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "events.jsonl", "wb") as file:
        for event in events:
            file.write(json.dumps(event).encode() + b"\n")
        file.write(tail)


def a_long_run(run_dir, steps: int) -> list[dict]:
    """A resumed run: logs every step, evals every 500, checkpoints every 1000, a start at 0 and at 4000 (the resume
    repeats steps 4001-4100 it had logged before it was killed), and its end."""
    events = [{"time": 1.7e9, "type": "start", "batch": {"per_device_train_batch_size": 2}}]
    for step in range(1, steps + 1):
        if step == 4100:
            events.append({"time": 1.7e9, "type": "start", "batch": {"per_device_train_batch_size": 4}})
        events.append(log(4001 + step - 4100 if step >= 4100 else step, loss=10 / step))
        if step % 500 == 0:
            events.append({"time": 1.7e9 + step, "type": "eval", "step": step, "eval_loss": 5 / step})
        if step % 1000 == 0:
            events.append({"time": 1.7e9 + step, "type": "checkpoint", "step": step, "path": f"/x/checkpoint-{step}"})
    events.append({"time": 1.7e9 + steps, "type": "end", "state": "completed"})
    write_events(run_dir, events)
    return events


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 16])
def test_lines_read_backwards_are_the_lines_read_forwards_reversed(tmp_path, chunk, monkeypatch):
    monkeypatch.setattr(events_module, "MAX_LINE_BYTES", 50)
    rng = random.Random(chunk)
    lines = [b"x" * rng.choice([0, 1, 5, 20, 49, 50]) + str(i).encode() for i in range(300)]
    path = tmp_path / "lines"
    path.write_bytes(b"\n".join(lines) + b"\n" + b"torn, no newline yet")
    whole = [line for line in lines if len(line) <= 50]
    with open(path, "rb") as file:
        assert list(lines_backward(file, chunk=chunk)) == whole[::-1]
        size = path.stat().st_size
        window = list(lines_backward(file, max_bytes=size // 2, chunk=chunk))
    assert window and window == whole[::-1][:len(window)]  # the end of the file, none cut by the window
    assert all(size - path.read_bytes().rfind(b"\n" + line + b"\n") <= size // 2 for line in window)


def test_newest_events_start_at_the_end_and_skip_what_is_not_wanted(tmp_path):
    events = a_long_run(tmp_path, 5000)
    write_events(tmp_path, events, tail=b'{"time": 1.0, "type": "end", "state": "torn')
    assert next(newest_events(tmp_path)) == events[-1]
    assert [e["batch"] for e in newest_events(tmp_path, types=("start",), max_bytes=None)] == \
        [{"per_device_train_batch_size": 4}, {"per_device_train_batch_size": 2}]
    assert list(newest_events(tmp_path / "nowhere")) == []


def test_a_listed_run_is_its_last_log_and_last_event_time_read_from_the_end(tmp_path):
    events = a_long_run(tmp_path, 5000)
    write_status(tmp_path, RunStatus(id="r", name="r", state="completed"))
    job = load_job("r", tmp_path)
    assert job.last_log == [e for e in events if e["type"] == "log"][-1] and job.last_seen == 1.7e9 + 5000
    # the last event with a sound time, past hostile ones; a run that never logged has no last log
    write_events(tmp_path, [log(1), {"time": 1e308, "type": "end"}, {"type": "end"}])
    assert load_job("r", tmp_path).last_seen == 1_700_000_001.0
    write_events(tmp_path, [{"time": 5.0, "type": "start"}])
    assert load_job("r", tmp_path).last_log is None


def test_a_skimmed_read_has_every_event_but_the_logs_and_an_even_sample_of_those(tmp_path, monkeypatch):
    monkeypatch.setattr(events_module, "CHUNK_BYTES", 64 << 10)
    events = a_long_run(tmp_path, 20_000)
    everything = read_events(tmp_path)
    assert everything == events  # a plain read still reads every line, a chunk at a time
    skimmed, restarted = EventReader(tmp_path / "events.jsonl", skim=True).read()
    assert not restarted and skimmed[-1] == events[-1]
    assert [e for e in skimmed if e["type"] != "log"] == [e for e in events if e["type"] != "log"]
    logs = [e for e in skimmed if e["type"] == "log"]
    assert all(e in everything for e in logs) and 500 < len(logs) < len(everything) / 5
    steps = [e["step"] for e in logs if e["time"] > 1_700_000_000.0 + 5000]  # past the resume: in order
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert max(gaps) < 3 * sum(gaps) / len(gaps)  # evenly spread: no stretch of the run left out


def test_a_series_keeps_at_most_twice_its_limit_evenly_with_the_latest_point_last():
    series = Thinned(limit=100)
    for step in range(1, 100_001):
        series.add((step, float(step)))
        assert len(series.kept) < 200 and series.columns()[0][-1] == step
    steps = series.columns()[0]
    gaps = [b - a for a, b in zip(steps[:-2], steps[1:-1])]
    assert steps[0] == 1 and max(gaps) <= 2 * min(gaps)
    series.add((50_000, -1.0))  # a resumed run logs steps again: they replace the later ones
    assert series.columns()[0][-1] == 50_000 and max(series.columns()[0][:-1]) < 50_000


def test_the_dashboard_of_a_long_run_shows_its_whole_span_every_eval_and_checkpoint_in_few_points(tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setattr(events_module, "CHUNK_BYTES", 64 << 10)
    events = a_long_run(tmp_path / "run", 20_000)
    write_status(tmp_path / "run", RunStatus(id="r", name="r", state="completed", step=20_000, total_steps=20_000))
    snapshot = RunWatcher(tmp_path / "run").sample()
    full = History()
    for event in events:
        full.add(event)
    loss, rates = full.series()
    assert snapshot.loss.eval_steps == loss.eval_steps and len(loss.eval_steps) == 40
    assert [c.step for c in snapshot.checkpoints] == list(range(1000, 20_001, 1000))
    assert snapshot.loss.steps[0] < 20_000 / 1000 and snapshot.loss.steps[-1] == loss.steps[-1] == 20_000 - 99
    assert len(snapshot.loss.steps) < 20_000 / 5 and len(snapshot.learning_rates) == len(snapshot.loss.steps)
    last_log = [e for e in events if e["type"] == "log"][-1]
    assert snapshot.progress.step == 20_000 and snapshot.progress.loss == last_log["loss"]


def test_a_series_started_again_from_an_early_step_keeps_its_points_dense_again():
    series = Thinned(limit=100)
    for step in range(1, 100_001):
        series.add((step, 1.0))
    for step in range(1, 51):  # the run started over in the same directory: a short new run shows all its points
        series.add((step, 2.0))
    assert series.columns()[0] == tuple(range(1, 51))


def test_a_skimmed_chunk_ending_in_other_events_keeps_its_last_log(tmp_path, monkeypatch):
    monkeypatch.setattr(events_module, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(events_module, "LOG_SAMPLES", 2)
    events = [log(step) for step in range(1, 3000)] + [{"time": 1.7e9, "type": "eval", "step": 2999, "eval_loss": 1.0}] * 50
    write_events(tmp_path, events)
    reader = EventReader(tmp_path / "events.jsonl", skim=True)
    read = []
    while True:  # a chunk at a time, as a watcher catching up on a long file would
        found, _ = reader.read(max_bytes=64 << 10)
        if not found:
            break
        read += found
    assert [e for e in read if e["type"] == "log"][-1]["step"] == 2999


def test_a_read_limited_below_a_line_still_gets_past_it(tmp_path):
    write_events(tmp_path, [log(1), log(2)])
    reader = EventReader(tmp_path / "events.jsonl", max_line_bytes=1000)
    assert [e["step"] for e in reader.read(max_bytes=10)[0]] == [1, 2]  # never stuck short of a whole line
