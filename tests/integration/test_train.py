"""Supervised fine-tuning end to end on the tiny demo models: every method, the run directory, stop and resume."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import job_helpers
import pytest
import yaml
from job_helpers import wait_for

from engine.cli import main
from engine.rundir import read_events, read_status

CLASSIC = (
    "train --stage sft --model_name_or_path {model} --do_train --dataset demo_alpaca --template {template} "
    "--finetuning_type lora --quantization_bit 4 --lora_target q_proj,v_proj --output_dir {out} --overwrite_cache "
    "--per_device_train_batch_size 2 --gradient_accumulation_steps 4 --lr_scheduler_type cosine --logging_steps 10 "
    "--save_steps 100000 --learning_rate 2e-5 --num_train_epochs 2.0 --neftune_noise_alpha 5 --flash_attn --bf16 "
    "--max_samples 64"
)


def tuner(*args: str, cwd: Path | None = None, **popen) -> subprocess.Popen:
    """`tuner ARGS` as a process of its own, for the tests of what a process is sent (signals)."""
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def typed(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`tuner ARGS` typed here (in this process, job_helpers.tuner): its exit code and its output, stdout then
    stderr."""
    done = job_helpers.tuner(*args, cwd=Path.cwd(), env=env)
    return done.returncode, done.stdout + done.stderr


def logged_losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["type"] == "log"]


def events_of(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_events(run_dir) if e["type"] == kind]


def test_classic_qlora_command_runs_as_written(tiny_models, tmp_path):
    out = tmp_path / "out"
    code, output = typed(*CLASSIC.format(model="tiny-llama", template="llama2", out=out).split())
    assert code == 0, output

    for name in ("config.yaml", "status.json", "events.jsonl", "train.log", "trainer_log.jsonl",
                 "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "checkpoint-16"):
        assert (out / name).exists(), name
    status = read_status(out)
    assert status.state == "completed" and status.exit_code == 0 and status.method == "qlora-4bit"
    assert status.step == status.total_steps == 16  # 64 samples / (2 x 4) per step x 2 epochs

    start = events_of(out, "start")[0]
    assert start["precision"] == "fp32" and "no GPU" in start["precision_reason"]
    assert start["attention"] == "sdpa" and "flash attention 2 was asked" in start["attention_reason"]
    speed = {f["feature"]: f for f in start["speed"]}  # every speed feature, on or off, with its reason
    assert not speed["padding-free batches"]["on"] and "NEFTune" in speed["padding-free batches"]["why"]
    assert not speed["liger kernels"]["on"]
    assert "no GPU" in speed["liger kernels"]["why"] and speed["loss"]["value"] == "the model's own cross-entropy"
    assert not speed["gradient checkpointing"]["on"] and "CPU" in speed["gradient checkpointing"]["why"]
    assert start["batch"] == {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                              "packed_tokens": None, "gradient_checkpointing": False}
    assert start["world_size"] == 1 and start["template"] == "llama2" and start["train_samples"] == 64
    assert 0 < start["trainable_params"] < start["total_params"]
    log = events_of(out, "log")[0]
    assert {"step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "elapsed_s",
            "remaining_s"} <= set(log)
    assert log["step"] == 10 and log["total_steps"] == 16 and log["tokens_per_s"] > 0
    assert events_of(out, "end")[0]["state"] == "completed"
    assert events_of(out, "checkpoint")[0]["path"] == str((out / "checkpoint-16").resolve())

    trainer_log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert trainer_log[0]["current_steps"] == 10 and trainer_log[0]["total_steps"] == 16
    assert {"loss", "lr", "epoch", "percentage", "elapsed_time", "remaining_time"} <= set(trainer_log[0])

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["quantization_bit"] == 4 and saved["flash_attn"] == "fa2" and saved["neftune_noise_alpha"] == 5
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"] and adapter["r"] == 8
    log_text = (out / "train.log").read_text()
    assert "\r" not in log_text and "trainable parameters" in log_text and "step 10/16" in log_text


def test_classic_command_with_mistral_template_on_mixtral(tiny_models, tmp_path):
    out = tmp_path / "mixtral"
    assert main(CLASSIC.format(model="tiny-mixtral", template="mistral", out=out).split()) == 0
    assert read_status(out).state == "completed"
    assert events_of(out, "start")[0]["template"] == "mistral"
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", [
    ["--finetuning_type", "lora", "--learning_rate", "5e-3"],
    ["--finetuning_type", "lora", "--quantization_bit", "4", "--learning_rate", "5e-3"],
    ["--finetuning_type", "lora", "--quantization_bit", "8", "--learning_rate", "5e-3"],
    ["--finetuning_type", "freeze", "--learning_rate", "2e-3"],
    ["--finetuning_type", "full", "--learning_rate", "2e-3"],
], ids=["lora", "qlora4", "qlora8", "freeze", "full"])
def test_each_method_trains_and_the_loss_falls(tiny_models, tmp_path, method):
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--output_dir", str(out),
                 "--max_steps", "40", "--per_device_train_batch_size", "8", "--logging_steps", "5",
                 "--save_steps", "1000", *method]) == 0
    losses = logged_losses(out)
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, losses
    weights = "model.safetensors" if "full" in method or "freeze" in method else "adapter_model.safetensors"
    assert (out / weights).is_file()


LONG_RUN = ["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--max_steps", "200",
            "--per_device_train_batch_size", "2", "--logging_steps", "5", "--save_steps", "1000",
            "--learning_rate", "1e-3"]


def test_sigterm_stops_gracefully_and_the_rerun_resumes_the_step_count(tiny_models, tmp_path):
    out = tmp_path / "stop"
    proc = tuner(*LONG_RUN, "--output_dir", str(out))
    wait_for(lambda: events_of(out, "log"), 120, "the first log event")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output  # stopped, not completed: `&& tuner export` stops here

    status = read_status(out)
    assert status.state == "stopped" and status.step < 200
    end = events_of(out, "end")[-1]
    assert end["state"] == "stopped" and end["signal"] == "SIGTERM"
    checkpoint = out / f"checkpoint-{end['step']}"
    assert (checkpoint / "adapter_model.safetensors").is_file(), "the graceful stop saved a checkpoint"
    assert not (out / "adapter_model.safetensors").exists(), "a stopped run is not presented as finished"

    assert main([*LONG_RUN, "--output_dir", str(out)]) == 0
    starts = events_of(out, "start")
    assert len(starts) == 2 and starts[1]["resumed_from"] == str(checkpoint)
    resumed_fit = {f["feature"]: f for f in starts[1]["speed"]}["auto-fit"]
    assert starts[1]["batch"] == starts[0]["batch"] and "resumed" in resumed_fit["why"], "the same layout resumes"
    steps = [e["step"] for e in events_of(out, "log")]
    assert steps == sorted(steps) and steps[-1] == 200, "the resumed curve continues the same step count"
    assert len(set(steps)) == len(steps)
    assert read_status(out).state == "completed" and read_status(out).id == status.id


def test_completed_run_is_not_overwritten_without_asking(tiny_models, tmp_path):
    out = tmp_path / "done"
    args = ["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_steps", "1000"]
    assert main(args) == 0
    code, output = typed(*args)
    assert code == 2
    assert output.strip().splitlines()[-1] == (
        f"tuner: error: output_dir {out} holds a completed run (choose another output_dir, "
        "or set overwrite_output_dir true to replace it)")
    assert main([*args, "--overwrite_output_dir"]) == 0
    assert len(events_of(out, "start")) == 1, "overwrite starts a fresh event stream"


def test_bad_data_fails_with_one_line_and_leaves_the_run_directory(tiny_models, tmp_path):
    data = tmp_path / "bad.json"
    data.write_text('[{"instruction": "hi", "output": "ho"},\n {"instruction": "x", "output": }]\n')
    out = tmp_path / "bad-run"
    code, output = typed("train", "--model_name_or_path", "tiny-llama", "--dataset", str(data), "--output_dir",
                         str(out))
    assert code == 2
    last = output.strip().splitlines()[-1]
    assert last.startswith("tuner: error: ") and "bad.json" in last and "line 2" in last
    assert "Traceback" not in output
    status = read_status(out)
    assert status.state == "failed" and "line 2" in status.error
    assert events_of(out, "error")[0]["message"] == status.error
    assert (out / "train.log").is_file() and (out / "config.yaml").is_file()


REFUSALS = {
    # WORLD_SIZE without MASTER_ADDR: a multi-node launch set up by hand, half-way
    "half a distributed launch": ((), {"WORLD_SIZE": "2"}, "MASTER_ADDR"),
    # an optimizer transformers knows whose package is not installed
    "an optimizer's missing package": (("--optim", "lomo"), {}, "lomo_optim"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_training_arguments_transformers_refuses_end_the_run_in_one_line(tiny_models, tmp_path, case):
    """Refused by transformers once the model has loaded: the run ends failed in one line, its directory kept."""
    flags, env, named = REFUSALS[case]
    if case == "an optimizer's missing package" and importlib.util.find_spec("lomo_optim"):
        pytest.skip("lomo_optim is installed here")
    out = tmp_path / "refused"
    args = ("train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--max_steps", "1",
            "--output_dir", str(out), *flags)
    if env:  # a process's launch environment: its own process (torch.distributed keeps what it found)
        proc = tuner(*args, env={**{k: v for k, v in os.environ.items() if k != "MASTER_ADDR"}, **env})
        output, _ = proc.communicate(timeout=120)
        code = proc.returncode
    else:
        code, output = typed(*args)
    assert code == 2 and "Traceback" not in output
    last = output.strip().splitlines()[-1]
    assert last.startswith("tuner: error: transformers refused the training arguments: ") and named in last
    assert read_status(out).state == "failed"
    assert (out / "train.log").is_file() and (out / "config.yaml").is_file()


def test_packing_and_neftune_train(tiny_models, tmp_path):
    out = tmp_path / "packed"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--output_dir", str(out),
                 "--packing", "true", "--cutoff_len", "256", "--neftune_noise_alpha", "5", "--num_train_epochs", "1",
                 "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no"]) == 0
    status = read_status(out)
    # 400 samples of ~27 tokens pack into ~42 sequences of 256 tokens: far fewer than the 100 unpacked steps.
    assert status.state == "completed" and status.total_steps < 20


def test_validation_split_writes_eval_events(tiny_models, tmp_path):
    out = tmp_path / "eval"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--output_dir", str(out),
                 "--val_size", "0.1", "--eval_strategy", "steps", "--eval_steps", "5", "--max_steps", "10",
                 "--per_device_train_batch_size", "8", "--save_strategy", "no"]) == 0
    evals = events_of(out, "eval")
    assert [e["step"] for e in evals] == [5, 10] and all(e["eval_loss"] > 0 for e in evals)
    assert events_of(out, "start")[0]["eval_samples"] == 40


def test_template_differing_from_the_models_own_is_warned(tiny_models, tmp_path):
    out = tmp_path / "mismatch"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--template", "chatml",
                 "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no"]) == 0
    log = (out / "train.log").read_text()
    assert "WARNING tuner: template 'chatml' differs from the chat_template" in log


def test_torchrun_two_processes_train_one_run_directory(tiny_models, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "engine.cli", "train",
         "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--output_dir", str(out),
         "--max_steps", "10", "--logging_steps", "5", "--per_device_train_batch_size", "4", "--save_steps", "1000"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [e["type"] for e in read_events(out)] == ["start", "log", "log", "checkpoint", "end"], \
        "only rank 0 writes the run's events"
    assert events_of(out, "start")[0]["world_size"] == 2
    assert events_of(out, "log")[-1]["epoch"] == pytest.approx(10 * 4 * 2 / 400)
    assert read_status(out).state == "completed" and (out / "adapter_model.safetensors").is_file()
