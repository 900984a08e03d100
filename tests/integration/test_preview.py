"""`tuner preview`: samples exactly as the model sees them, the learned part marked, token-length stats."""

from __future__ import annotations

import json

from engine.cli import main
from engine.data import load_conversations
from engine.models.loading import load_tokenizer
from engine.config.schema import build_config


def preview_json(capsys, *args: str) -> dict:
    assert main(["preview", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_preview_json_marks_only_the_replies_as_learned(tiny_models, capsys):
    data = preview_json(capsys, "--model_name_or_path", "tiny-mistral", "--dataset", "demo_sharegpt", "-n", "2")
    assert data["template"] == "mistral" and len(data["samples"]) == 2
    tokenizer = load_tokenizer(str(tiny_models["tiny-mistral"]), build_config({}))
    sample = data["samples"][0]
    assert sample["text"] == sample["prompt"] + sample["completion"]
    assert sample["prompt"].endswith("[/INST]") and sample["completion"].endswith("</s>")
    learned = tokenizer.decode([label for label in sample["labels"] if label != -100])
    replies = [m["content"] for m in load_conversations("demo_sharegpt", None).train[0]["messages"]
               if m["role"] == "assistant"]
    assert learned.replace(" ", "") == "".join(reply + "</s>" for reply in replies).replace(" ", "")

def test_preview_stats_count_samples_over_cutoff(tiny_models, capsys):
    data = preview_json(capsys, "--model_name_or_path", "tiny-llama", "--dataset", "demo_sharegpt",
                        "--cutoff_len", "64")
    stats = data["stats"]
    assert stats["count"] == 200
    assert stats["p50"] <= stats["p95"] <= stats["max"]
    assert 0 < stats["over_cutoff"] < 200
    assert all(len(s["input_ids"]) <= 64 for s in data["samples"])


def test_preview_without_model_is_one_line(capsys):
    assert main(["preview", "--dataset", "demo_alpaca"]) == 2
    assert capsys.readouterr().err == "tuner: error: model_name_or_path is required for `tuner preview`\n"
