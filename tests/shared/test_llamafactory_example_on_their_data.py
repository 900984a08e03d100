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


def test_llamafactorys_reward_and_dpo_examples_run_on_their_pairs(tmp_path, shared_data, home, tiny_models):
    """Their examples/train_lora/qwen3_lora_reward.yaml and qwen3_lora_dpo.yaml on their dpo_en_demo (shortened):
    each trains, and the reward model scores their pairs."""
    from test_llamafactory_configs import AFTER_SFT, LF_STAGES

    (tmp_path / "data").symlink_to(shared_data / "llamafactory", target_is_directory=True)
    for example in ("reward", "dpo"):
        config = write(tmp_path, f"{example}.yaml", AFTER_SFT.format(**LF_STAGES[example]), tiny_models["tiny-llama"])
        done = tuner(tmp_path, "train", config, *SHORTER, "--cutoff_len", "256")
        assert done.returncode == 0, done.stdout + done.stderr
        out = tmp_path / f"saves/qwen3-4b/lora/{example}"
        assert read_status(out).state == "completed" and (out / "adapter_model.safetensors").is_file()
    done = tuner(tmp_path, "predict", "--run", str(tmp_path / "saves/qwen3-4b/lora/reward"), "--max_samples", "6",
                 "--output_dir", str(tmp_path / "scored"))
    assert done.returncode == 0 and "6 pairs scored" in done.stdout, done.stdout + done.stderr
    results = json.loads((tmp_path / "scored" / "predict_results.json").read_text())
    assert 0 <= results["predict_accuracy"] <= 1 and results["predict_samples"] == 6
