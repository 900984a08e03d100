"""Prediction: the classic command, files written as it goes, metrics, and a trained model beating its base."""

from __future__ import annotations

import json

import pytest

from engine.cli import main
from engine.infer.predict import score

TRAIN = ["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--save_strategy", "no",
         "--per_device_train_batch_size", "16"]


@pytest.fixture(scope="module")
def lora_run(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert main([*TRAIN, "--output_dir", str(out), "--max_steps", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def full_run(tiny_models, tmp_path_factory):
    """The demo model fully fine-tuned until it has learned the demo data."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main([*TRAIN, "--output_dir", str(out), "--finetuning_type", "full", "--learning_rate", "3e-3",
                 "--max_steps", "150", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05"]) == 0
    return out


def read_predictions(out):
    return [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]


def test_classic_predict_command_writes_predictions_and_metrics(lora_run, tmp_path):
    out = tmp_path / "predict"
    assert main(["train", "--stage", "sft", "--do_predict", "--predict_with_generate", "--model_name_or_path",
                 "tiny-llama", "--checkpoint_dir", str(lora_run), "--dataset", "demo_alpaca", "--max_samples", "10",
                 "--per_device_eval_batch_size", "1", "--max_new_tokens", "8", "--output_dir", str(out)]) == 0
    lines = read_predictions(out)
    assert len(lines) == 10 and set(lines[0]) == {"prompt", "predict", "label"}
    assert lines[0]["prompt"].startswith("<s>[INST] ") and lines[0]["prompt"].endswith(" [/INST]")
    results = json.loads((out / "predict_results.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_runtime",
            "predict_samples_per_second"} <= set(results)
    assert results["predict_samples"] == 10 and results["template"] == "llama2"


def test_trained_model_predicts_better_than_its_base(full_run, tmp_path, capsys):
    args = ["predict", "--dataset", "demo_alpaca", "--max_samples", "24", "--per_device_eval_batch_size", "8",
            "--max_new_tokens", "16"]
    assert main([*args, "--model_name_or_path", "tiny-llama", "--output_dir", str(tmp_path / "base")]) == 0
    assert main([*args, "--model_name_or_path", str(full_run), "--output_dir", str(tmp_path / "tuned")]) == 0
    base = json.loads((tmp_path / "base" / "predict_results.json").read_text())
    tuned = json.loads((tmp_path / "tuned" / "predict_results.json").read_text())
    assert tuned["template"] == "llama2", "the template the run trained with is used again"
    assert tuned["predict_rouge-l"] > base["predict_rouge-l"] + 20
    assert tuned["predict_bleu-4"] > base["predict_bleu-4"]


def test_qlora_adapter_predicts_with_the_base_quantized_again(tiny_models, tmp_path):
    run = tmp_path / "qlora"
    assert main([*TRAIN, "--output_dir", str(run), "--max_steps", "2", "--quantization_bit", "4"]) == 0
    out = tmp_path / "predict"
    assert main(["predict", "--model_name_or_path", "tiny-llama", "--adapter_name_or_path", str(run),
                 "--quantization_bit", "4", "--dataset", "demo_openai", "--max_samples", "4",
                 "--max_new_tokens", "4", "--output_dir", str(out)]) == 0
    assert len(read_predictions(out)) == 4


def test_existing_predictions_are_kept_unless_asked(lora_run, tmp_path, capsys):
    args = ["predict", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--max_samples", "2",
            "--max_new_tokens", "2", "--output_dir", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 2
    assert "generated_predictions.jsonl already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite_output_dir"]) == 0


def test_full_output_dir_given_as_adapter_is_one_clear_line(full_run, tmp_path, capsys):
    assert main(["predict", "--model_name_or_path", "tiny-llama", "--adapter_name_or_path", str(full_run),
                 "--dataset", "demo_alpaca", "--max_samples", "1", "--output_dir", str(tmp_path)]) == 2
    assert "is not a LoRA adapter (no adapter_config.json)" in capsys.readouterr().err


def test_scores_are_exact_at_the_extremes():
    same = score(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["predict_bleu-4"] == pytest.approx(100.0) and same["predict_rouge-l"] == pytest.approx(100.0)
    disjoint = score(["alpha beta"], ["gamma delta"])
    assert disjoint == {"predict_bleu-4": 0.0, "predict_rouge-1": 0.0, "predict_rouge-2": 0.0, "predict_rouge-l": 0.0}
    assert score(["", "x y"], ["a b", "x y"])["predict_rouge-1"] == pytest.approx(50.0)
