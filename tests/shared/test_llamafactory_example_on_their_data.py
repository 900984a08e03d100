"""LLaMA-Factory's example LoRA config, as theirs is but for the model, against their real registry and identity data
(../shared/data/llamafactory laid out as their `data/` folder)."""

from __future__ import annotations

import json

from test_llamafactory_configs import LORA_SFT, SHORTER, tuner, write

from engine.rundir import read_events, read_status


def test_llamafactory_lora_sft_config_runs_unchanged_on_their_data(tmp_path, shared_data, home, tiny_models):
    (tmp_path / "data").symlink_to(shared_data / "llamafactory", target_is_directory=True)
    done = tuner(tmp_path, "train", write(tmp_path, "qwen3_lora_sft.yaml", LORA_SFT, tiny_models["tiny-llama"]),
                 *SHORTER)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "saves/qwen3-4b/lora/sft"
    assert read_status(out).state == "completed" and (out / "adapter_model.safetensors").is_file()
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert lines and list(lines[0])[:2] == ["current_steps", "total_steps"]
    assert next(e for e in read_events(out) if e["type"] == "start")["train_samples"] == 12
    log = (out / "train.log").read_text()
    assert "{{name}}" in log and "{{author}}" in log  # identity's placeholders are pointed out
