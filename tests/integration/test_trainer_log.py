"""trainer_log.jsonl as LLaMA-Factory's LogCallback writes it (so LlamaBoard and users' scripts read our runs), and
plot_loss's figures, from real runs on the tiny demo model."""

from __future__ import annotations

import json
import re

from engine.cli import main

TRAIN = ["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--save_strategy", "no",
         "--per_device_train_batch_size", "8"]

# LLaMA-Factory's on_log: current_steps, total_steps, loss, eval_loss, predict_loss, reward, accuracy, lr, epoch,
# percentage, elapsed_time, remaining_time, then throughput and total_tokens when tokens are counted; None dropped.
LOSS_LINE = ["current_steps", "total_steps", "loss", "lr", "epoch", "percentage", "elapsed_time", "remaining_time",
             "throughput", "total_tokens"]
EVAL_LINE = ["current_steps", "total_steps", "eval_loss", "epoch", "percentage", "elapsed_time", "remaining_time",
             "throughput", "total_tokens"]
SUMMARY_LINE = ["current_steps", "total_steps", "epoch", "percentage", "elapsed_time", "remaining_time",
                "throughput", "total_tokens"]
# Its on_prediction_step, every 5 batches of a predict.
PREDICT_LINE = ["current_steps", "total_steps", "percentage", "elapsed_time", "remaining_time"]

DURATION = re.compile(r"^\d+:\d\d:\d\d$")  # str(timedelta(seconds=int(...)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def trainer_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def assert_png(path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > len(PNG_SIGNATURE), path


def test_trainer_log_has_a_line_per_log_eval_and_the_summary_in_llamafactory_order_and_plots(tiny_models, tmp_path):
    out = tmp_path / "eval"
    assert main([*TRAIN, "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "2", "--val_size", "0.1",
                 "--eval_strategy", "steps", "--eval_steps", "2", "--plot_loss"]) == 0

    lines = trainer_log(out)
    assert [list(line) for line in lines] == [LOSS_LINE, EVAL_LINE, LOSS_LINE, EVAL_LINE, SUMMARY_LINE]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert len(history) == len(lines)
    for line, logged in zip(lines, history):  # LLaMA-Factory takes each value from the Trainer's log as it is
        assert line["current_steps"] == logged["step"] and line["total_steps"] == 4
        assert line["epoch"] == logged["epoch"]
        assert line.get("loss") == logged.get("loss") and line.get("eval_loss") == logged.get("eval_loss")
        assert line.get("lr") == logged.get("learning_rate")
        assert line["total_tokens"] == logged["num_input_tokens_seen"] > 0
        assert line["percentage"] == round(line["current_steps"] / 4 * 100, 2)
        assert DURATION.match(line["elapsed_time"]) and DURATION.match(line["remaining_time"])
        assert line["throughput"] > 0  # tokens since the start over the time since the start
    assert [line["percentage"] for line in lines] == [50.0, 50.0, 100.0, 100.0, 100.0]
    assert lines[-1]["remaining_time"] == "0:00:00"
    assert [line["total_tokens"] for line in lines] == sorted(line["total_tokens"] for line in lines)

    assert_png(out / "training_loss.png")
    assert_png(out / "training_eval_loss.png")
    assert "figure saved at" in (out / "train.log").read_text()


def test_run_shorter_than_logging_steps_still_writes_the_summary_line(tiny_models, tmp_path):
    out = tmp_path / "short"
    assert main([*TRAIN, "--output_dir", str(out), "--max_steps", "2", "--logging_steps", "10", "--plot_loss"]) == 0

    lines = trainer_log(out)
    assert [list(line) for line in lines] == [SUMMARY_LINE]
    assert lines[0]["current_steps"] == lines[0]["total_steps"] == 2 and lines[0]["percentage"] == 100
    assert not list(out.glob("*.png"))  # nothing was logged to draw
    assert "no loss to plot" in (out / "train.log").read_text()


def test_predict_writes_llamafactory_progress_lines_every_five_batches(tiny_models, tmp_path):
    out = tmp_path / "predict"
    args = ["predict", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--max_samples", "10",
            "--per_device_eval_batch_size", "1", "--max_new_tokens", "2", "--output_dir", str(out)]
    assert main(args) == 0

    lines = trainer_log(out)
    assert [list(line) for line in lines] == [PREDICT_LINE, PREDICT_LINE]
    assert [(line["current_steps"], line["total_steps"], line["percentage"]) for line in lines] == \
        [(5, 10, 50.0), (10, 10, 100.0)]
    assert all(DURATION.match(line["elapsed_time"]) for line in lines) and lines[-1]["remaining_time"] == "0:00:00"

    assert main([*args, "--overwrite_output_dir"]) == 0  # as LLaMA-Factory: the previous log goes with it
    assert len(trainer_log(out)) == 2
