"""TrainerLog's lines as LLaMA-Factory's LogCallback writes them: key order, empty keys dropped, formats."""

from __future__ import annotations

import json
import math

from engine.train.callbacks import TrainerLog


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_line_keeps_llamafactorys_key_order_and_drops_what_was_not_logged(tmp_path):
    trainer_log = TrainerLog(tmp_path / "trainer_log.jsonl")
    trainer_log.start(total_steps=3)
    logs = {"epoch": 0.3333333333333333, "grad_norm": 1.5, "learning_rate": 1e-4, "loss": 2.5, "reward": None}
    trainer_log.training(1, logs, tokens_seen=0)
    trainer_log.training(3, {"loss": math.nan, "learning_rate": 0.0, "epoch": 1.0}, tokens_seen=120)
    trainer_log.close()
    first, second = lines(tmp_path / "trainer_log.jsonl")
    assert list(first) == ["current_steps", "total_steps", "loss", "lr", "epoch", "percentage", "elapsed_time",
                           "remaining_time"]  # no tokens counted: no throughput, no total_tokens
    assert first["epoch"] == 0.3333333333333333 and first["percentage"] == 33.33 and first["elapsed_time"] == "0:00:00"
    assert list(second)[-2:] == ["throughput", "total_tokens"] and second["total_tokens"] == 120
    assert second["loss"] is None and second["lr"] == 0.0  # strict JSON: a non-finite loss is null


def test_prediction_lines_come_every_five_batches(tmp_path):
    trainer_log = TrainerLog(tmp_path / "trainer_log.jsonl")
    trainer_log.start(total_steps=12)
    for step in range(1, 13):
        trainer_log.prediction_step(step)
    trainer_log.close()
    assert lines(tmp_path / "trainer_log.jsonl") == [
        {"current_steps": 5, "total_steps": 12, "percentage": 41.67, "elapsed_time": "0:00:00",
         "remaining_time": "0:00:00"},
        {"current_steps": 10, "total_steps": 12, "percentage": 83.33, "elapsed_time": "0:00:00",
         "remaining_time": "0:00:00"},
    ]


def test_percentage_is_100_when_there_are_no_steps(tmp_path):
    trainer_log = TrainerLog(tmp_path / "trainer_log.jsonl")
    trainer_log.training(0, {"epoch": 0.0}, tokens_seen=0)
    trainer_log.close()
    assert lines(tmp_path / "trainer_log.jsonl")[0]["percentage"] == 100
