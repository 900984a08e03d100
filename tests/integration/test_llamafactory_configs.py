"""LLaMA-Factory's own example configs, written as theirs are, run unchanged but for the model, in a folder laid out as
LLaMA-Factory's checkout (its data/ as tests/llamafactory_layout.py writes it; on their real data: tests/shared)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import job_helpers
import pytest
import yaml

from engine.rundir import read_events, read_status

# examples/train_lora/qwen3_lora_sft.yaml and examples/train_qlora/llama3_lora_sft_otfq.yaml of LLaMA-Factory, as
# they are but for the model (and comments); the eval block of the first is commented out there too.
LORA_SFT = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

QLORA_SFT = """\
### model
model_name_or_path: {model}
quantization_bit: 4
quantization_method: bitsandbytes  # choices: [bitsandbytes (4/8), hqq (2/3/4/5/6/8), eetq (8)]

### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

# examples/train_lora/llama3_lora_predict.yaml and examples/merge_lora/llama3_lora_sft.yaml
PREDICT = """\
### model
model_name_or_path: {model}
adapter_name_or_path: saves/llama3-8b/lora/sft

### method
stage: sft
do_predict: true
finetuning_type: lora

### dataset
eval_dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 50
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/predict
overwrite_output_dir: true

### eval
per_device_eval_batch_size: 1
predict_with_generate: true
ddp_timeout: 180000000
"""

MERGE = """\
### Note: DO NOT use quantized model or quantization_bit when merging lora adapters

### model
model_name_or_path: {model}
adapter_name_or_path: saves/llama3-8b/lora/sft
template: llama3
trust_remote_code: true

### export
export_dir: output/llama3_lora_sft
export_size: 2
export_device: cpu
export_legacy_format: false
"""

# examples/train_lora/qwen3_lora_{dpo,kto,reward,pretrain}.yaml of LLaMA-Factory: the stages after (and before) SFT,
# as they are but for the model and comments. They share LORA_SFT's output and train blocks (save_only_model and
# resume_from_checkpoint left out of the KTO file there).
AFTER_SFT = """\
### model
model_name_or_path: {{model}}
trust_remote_code: true

### method
stage: {stage}
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
{method}
### dataset
dataset: {dataset}
{template}cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/{output}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: {learning_rate}
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""
LF_STAGES = {
    "dpo": dict(stage="dpo", method="pref_beta: 0.1\npref_loss: sigmoid\n", dataset="dpo_en_demo",
                template="template: qwen3_nothink\n", output="dpo", learning_rate="5.0e-6"),
    "kto": dict(stage="kto", method="pref_beta: 0.1\n", dataset="kto_en_demo", template="template: qwen3_nothink\n",
                output="kto", learning_rate="5.0e-6"),
    "reward": dict(stage="rm", method="", dataset="dpo_en_demo", template="template: qwen3_nothink\n",
                   output="reward", learning_rate="1.0e-4"),
    "pretrain": dict(stage="pt", method="", dataset="c4_demo", template="", output="pretrain",
                     learning_rate="1.0e-4"),
}

# Small enough for a CPU: the files say 1000 samples for 3 epochs.
SHORTER = ["--max_samples", "12", "--num_train_epochs", "1", "--logging_steps", "1"]


@pytest.fixture
def workdir(tmp_path, llamafactory_data, home) -> Path:
    """A folder laid out as LLaMA-Factory's checkout: its data/ holds a dataset_info.json and data files."""
    (tmp_path / "data").symlink_to(llamafactory_data, target_is_directory=True)
    return tmp_path


def tuner(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return job_helpers.tuner(*args, cwd=workdir)


def write(workdir: Path, name: str, text: str, model: Path) -> str:
    (workdir / name).write_text(text.format(model=model))
    return name


def test_llamafactory_lora_sft_config_runs_unchanged(workdir, tiny_models):
    config = write(workdir, "qwen3_lora_sft.yaml", LORA_SFT, tiny_models["tiny-llama"])
    done = tuner(workdir, "train", config, *SHORTER)
    assert done.returncode == 0, done.stdout + done.stderr

    out = workdir / "saves/qwen3-4b/lora/sft"
    assert read_status(out).state == "completed"
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # plot_loss, as LLaMA-Factory names it
    results = json.loads((out / "train_results.json").read_text())  # LLaMA-Factory's results files, its keys
    assert {"train_loss", "train_runtime", "train_samples_per_second", "epoch"} <= set(results)
    assert json.loads((out / "all_results.json").read_text()) == results
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert lines and list(lines[0])[:2] == ["current_steps", "total_steps"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dataset_dir"] == str((workdir / "data").resolve()) or Path(saved["dataset_dir"]).is_absolute()
    assert saved["template"] == "qwen3_nothink" and saved["save_only_model"] is False
    start = next(e for e in read_events(out) if e["type"] == "start")
    assert start["train_samples"] == 12
    log = (out / "train.log").read_text()
    assert "{{name}}" in log and "{{author}}" in log  # identity's placeholders are pointed out


def test_llamafactory_qlora_config_then_predict_and_merge_configs_run_unchanged(workdir, tiny_models):
    model = tiny_models["tiny-llama"]
    done = tuner(workdir, "train", write(workdir, "otfq.yaml", QLORA_SFT, model), *SHORTER, "--do_eval")
    assert done.returncode == 0, done.stdout + done.stderr
    out = workdir / "saves/llama3-8b/lora/sft"
    status = read_status(out)
    assert status.state == "completed" and status.method == "qlora-4bit"
    evals = [e for e in read_events(out) if e["type"] == "eval"]  # val_size 0.1: eval steps, and do_eval's at the end
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_loss"] == evals[-1]["eval_loss"] and results["perplexity"] == pytest.approx(
        math.exp(results["eval_loss"]))
    assert json.loads((out / "all_results.json").read_text()).keys() >= {"train_loss", "eval_loss", "perplexity"}

    predicted = tuner(workdir, "train", write(workdir, "predict.yaml", PREDICT, model), "--max_samples", "2",
                      "--max_new_tokens", "4")
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    predictions = workdir / "saves/llama3-8b/lora/predict/generated_predictions.jsonl"
    assert len(predictions.read_text().splitlines()) == 4  # two of each eval dataset

    merged = tuner(workdir, "export", write(workdir, "merge.yaml", MERGE, model))
    assert merged.returncode == 0, merged.stdout + merged.stderr
    exported = workdir / "output/llama3_lora_sft"
    assert list(exported.glob("*.safetensors")) and not list(exported.glob("*.bin"))


@pytest.mark.parametrize("example", ["dpo", "reward", "pretrain"])
def test_llamafactorys_examples_of_the_other_stages_run_unchanged(workdir, tiny_models, example):
    text = AFTER_SFT.format(**LF_STAGES[example])
    shorter = [*SHORTER, "--cutoff_len", "64"] if example == "pretrain" else SHORTER  # our c4_demo: 5 short texts
    done = tuner(workdir, "train", write(workdir, f"qwen3_lora_{example}.yaml", text, tiny_models["tiny-llama"]),
                 *shorter)
    assert done.returncode == 0, done.stdout + done.stderr
    out = workdir / f"saves/qwen3-4b/lora/{example}"
    status = read_status(out)
    assert status.state == "completed" and status.method == f"{LF_STAGES[example]['stage']}-lora"
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert lines and list(lines[0])[:2] == ["current_steps", "total_steps"]


def test_llamafactorys_kto_example_is_refused_with_what_to_change(workdir, tiny_models):
    """Its batch of one sample leaves KTO's KL term (TRL's KTOTrainer pairs each prompt with another reply of the
    same batch) nothing to pair with: one line says what to change."""
    text = AFTER_SFT.format(**LF_STAGES["kto"])
    done = tuner(workdir, "train", write(workdir, "qwen3_lora_kto.yaml", text, tiny_models["tiny-llama"]), *SHORTER)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "per_device_train_batch_size 1: KTO's KL term pairs each prompt with another sample's reply" in done.stderr
    assert "give 2 or more, and halve gradient_accumulation_steps" in done.stderr
    done = tuner(workdir, "train", "qwen3_lora_kto.yaml", *SHORTER, "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "4")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_config_with_keys_tuner_does_not_run_fails_in_one_round(workdir, tiny_models):
    text = LORA_SFT.replace("template: qwen3_nothink", "template: qwen3_nothinkk") + "use_galore: true\n" \
        "ref_model: meta-llama/Llama-2-7b-hf\n"
    done = tuner(workdir, "train", write(workdir, "bad.yaml", text, tiny_models["tiny-llama"]))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert any(line.startswith("tuner: error: LLaMA-Factory's use_galore is not supported by tuner: use optim "
                               "galore_adamw") for line in lines)
    assert any("ref_model meta-llama/Llama-2-7b-hf acts in preference tuning: set stage dpo or kto" in line
               for line in lines)
    assert any("template 'qwen3_nothinkk' does not exist" in line for line in lines)
    assert not (workdir / "saves").exists()


def test_training_arguments_fields_act_in_a_run(workdir, tiny_models):
    config = workdir / "fields.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_models["tiny-llama"]), "dataset": "alpaca_en_demo", "template": "alpaca",
        "max_samples": 16, "per_device_train_batch_size": 2, "max_steps": 6, "logging_steps": 5, "save_steps": 3,
        "output_dir": "out", "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.5},
        "logging_first_step": True, "save_only_model": True, "disable_gradient_checkpointing": True}))
    done = tuner(workdir, "train", config.name)
    assert done.returncode == 0, done.stdout + done.stderr
    out = workdir / "out"
    logs = [e for e in read_events(out) if e["type"] == "log"]
    assert [e["step"] for e in logs] == [1, 5]  # logging_first_step
    assert logs[-1]["learning_rate"] >= 0.5e-3  # cosine_with_min_lr never goes below min_lr_rate x the peak
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "optimizer.pt").exists()  # save_only_model
    start = next(e for e in read_events(out) if e["type"] == "start")
    assert start["batch"]["gradient_checkpointing"] is False
