"""What `tuner` prints where a person or a script reads it: into a pipe closed early, into a pipe whole, and the
settings a memory estimate is for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import EXIT_PIPE_CLOSED, main
from engine.models.catalog import list_models

ROOT = Path(__file__).resolve().parents[2]
MOE_4BIT = "mixture-of-experts weights (fused expert tensors) quantized to 4-bit NF4 like the Linear layers"
MOE_8BIT = ("mixture-of-experts weights (fused expert tensors) stay 16-bit: bitsandbytes has no 8-bit path for "
            "parameters outside Linear layers")
MIXTRAL = ["--model_name_or_path", "mixtral-8x7b", "--num_gpus", "1", "--gpu_memory_gib", "80",
           "per_device_train_batch_size=2", "cutoff_len=512"]


def closed_pipe_run(*argv: str) -> subprocess.CompletedProcess:
    """Run ``argv`` into a pipe whose reader is gone before the output comes (as `head -1`'s is once it has its
    line)."""
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    _, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, None, err)


def test_without_care_a_closed_pipe_ends_python_with_broken_pipe_error():
    result = closed_pipe_run(sys.executable, "-c", "import time; time.sleep(0.5); print('x' * 100)")
    assert "BrokenPipeError" in result.stderr


@pytest.mark.parametrize("args", [["models"], ["estimate", "--help"], ["train", "--help"]])
def test_a_pipe_closed_early_ends_the_command_quietly_with_the_sigpipe_code(args):
    result = closed_pipe_run(sys.executable, "-m", "engine.cli", *args)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert result.returncode == EXIT_PIPE_CLOSED


def test_models_into_a_pipe_are_tab_separated_with_whole_hub_ids(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("\t") for line in lines]
    assert rows[0] == ["name", "hub id", "params", "template", "family"]
    assert all(len(row) == 5 for row in rows)
    assert {row[1] for row in rows[1:]} >= {m.hub_id for m in list_models() if m.hub_id}
    assert ["mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1"] == rows[[r[0] for r in rows].index(
        "mixtral-8x7b-instruct")][:2]


def words(text: str) -> str:
    """The printed text with its line wrapping undone: Rich wraps at the console's width, whatever it is."""
    return " ".join(text.split())


def test_estimate_table_says_the_batch_it_is_for_and_how_qlora_treats_moe_experts(capsys):
    assert main(["estimate", *MIXTRAL]) == 0
    out = words(capsys.readouterr().out)
    assert out.startswith("figures for per_device_train_batch_size 2 x cutoff_len 512, gradient checkpointing on, 1 GPU")
    assert f"QLoRA 8-bit assumes {MOE_8BIT}" in out and f"QLoRA 4-bit assumes {MOE_4BIT}" in out


def test_estimate_table_of_a_qlora_run_on_moe_says_it_too(capsys):
    assert main(["estimate", *MIXTRAL, "--quantization_bit", "4", "gradient_checkpointing=false"]) == 0
    out = words(capsys.readouterr().out)
    assert "per_device_train_batch_size 2 x cutoff_len 512, gradient checkpointing off" in out
    assert f"assumes {MOE_4BIT}" in out


def test_estimate_of_a_dense_model_has_no_moe_note(capsys):
    assert main(["estimate", "--model_name_or_path", "llama2-7b", "--num_gpus", "1", "--gpu_memory_gib", "80"]) == 0
    out = words(capsys.readouterr().out)
    assert "mixture-of-experts" not in out and "QLoRA 4-bit assumes 4-bit Linear layers" in out


def test_estimate_json_has_the_batch_and_every_methods_assumptions(capsys):
    assert main(["estimate", *MIXTRAL, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["per_device_train_batch_size"], result["cutoff_len"], result["gradient_checkpointing"],
            result["num_gpus"]) == (2, 512, True, 1)
    methods = result["recommendation"]["methods"]
    assert MOE_4BIT in methods["qlora-4bit"]["assumptions"] and MOE_8BIT in methods["qlora-8bit"]["assumptions"]
    assert MOE_8BIT not in methods["lora"]["assumptions"] and MOE_4BIT not in result["assumptions"]
