"""Output directories of other tools, read-only: a Hugging Face Trainer's and a LLaMA-Factory's."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.cli import main
from engine.rundir.foreign import foreign_run
from engine.rundir import read_events


@pytest.fixture(scope="module")
def our_run(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--output_dir", str(out),
                 "--max_steps", "20", "--logging_steps", "5", "--save_steps", "10", "--val_size", "0.1",
                 "--eval_strategy", "steps", "--eval_steps", "10"]) == 0
    return out


def test_hf_trainer_directory_reads_as_events(our_run, tmp_path):
    hf = tmp_path / "hf-run"
    shutil.copytree(our_run, hf)
    for name in ("status.json", "events.jsonl", "trainer_log.jsonl", "config.yaml"):
        (hf / name).unlink()
    status, events = foreign_run(hf)
    ours = read_events(our_run)
    assert [e["loss"] for e in events if e["type"] == "log"] == \
        pytest.approx([e["loss"] for e in ours if e["type"] == "log"])
    assert [e["step"] for e in events if e["type"] == "eval"] == [10, 20]
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [10, 20]
    assert status.state == "completed" and status.step == 20 and status.total_steps == 20
    assert status.method == "hf-trainer" and status.pid is None
    state = json.loads((hf / "trainer_state.json").read_text())  # fp16: an overflowed step logs grad_norm NaN
    state["log_history"][0]["grad_norm"] = float("nan")
    (hf / "trainer_state.json").write_text(json.dumps(state))
    status, events = foreign_run(hf)
    assert status.step == 20 and next(e for e in events if e["type"] == "log")["grad_norm"] is None


def test_hf_trainer_state_found_in_the_newest_checkpoint(our_run, tmp_path):
    hf = tmp_path / "mid-run"
    shutil.copytree(our_run / "checkpoint-10", hf / "checkpoint-10")
    status, events = foreign_run(hf)
    assert status.state == "external" and status.step == 10
    assert [e["step"] for e in events if e["type"] == "log"] == [5, 10]


def test_llamafactory_trainer_log_reads_as_events(tmp_path):
    lines = [
        {"current_steps": 10, "total_steps": 30, "loss": 1.52, "lr": 4.8e-05, "epoch": 0.33, "percentage": 33.33,
         "elapsed_time": "0:00:21", "remaining_time": "0:00:42", "throughput": 1520.5, "total_tokens": 32000},
        {"current_steps": 20, "total_steps": 30, "eval_loss": 1.31, "epoch": 0.67, "percentage": 66.67,
         "elapsed_time": "0:00:40", "remaining_time": "0:00:20"},
        {"current_steps": 30, "total_steps": 30, "loss": 1.18, "lr": 1.2e-06, "epoch": 1.0, "percentage": 100.0,
         "elapsed_time": "0:01:02", "remaining_time": "0:00:00"},
    ]
    (tmp_path / "trainer_log.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + '\n{"current_st')
    status, events = foreign_run(tmp_path)
    assert [(e["type"], e["step"]) for e in events] == [("log", 10), ("eval", 20), ("log", 30)]
    assert events[0]["learning_rate"] == 4.8e-05 and events[0]["tokens_per_s"] == 1520.5
    assert status.state == "completed" and status.loss == 1.18 and status.method == "llama-factory"


def test_a_directory_of_neither_kind_is_none(tmp_path):
    assert foreign_run(tmp_path) is None


def test_find_job_opens_another_tools_directory_read_only(tmp_path):
    from engine.errors import UserError
    from engine.rundir.jobs import find_job, job_events, stop_job

    (tmp_path / "trainer_log.jsonl").write_text(json.dumps(
        {"current_steps": 5, "total_steps": 10, "loss": 2.0, "lr": 1e-4, "epoch": 0.5}) + "\n")
    job = find_job(str(tmp_path))
    assert job.foreign and job.state == "external" and job.last_log["loss"] == 2.0
    assert [e["step"] for e in job_events(job)] == [5]
    with pytest.raises(UserError, match="written by another tool"):
        stop_job(job)
