"""What `tuner` prints about a run on a terminal 80 columns wide, wrapped at spaces with no word, id or path split:
the recipe line and the detach hint of `tuner train`, export's summary, predict's warning about scoring the data the
run trained on; and the model given as the first word of train, predict and export."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from engine.cli import main
from engine.config.schema import given_values
from engine.infer.followup import training_data_warning
from engine.models.catalog import with_recipe
from engine.rundir.jobs import find_job

TRAIN = ["--dataset", "demo_alpaca", "--max_samples", "16", "--per_device_train_batch_size", "8"]


def within(text: str, width: int = 80) -> bool:
    """No line of ``text`` is wider than ``width`` unless it holds a single word too long for any line."""
    return all(len(line) <= width or len(line.split()) == 1 for line in text.splitlines())


@pytest.fixture(scope="module")
def lora_run(tiny_models, tmp_path_factory) -> Path:
    """A LoRA run on demo_alpaca without an eval_dataset, its model given as train's first word."""
    out = tmp_path_factory.mktemp("narrow") / "run"
    assert main(["train", "tiny-llama", "--output_dir", str(out), *TRAIN, "--max_steps", "2"]) == 0
    return out


def test_detached_train_at_80_columns_wraps_the_recipe_line_and_puts_each_command_on_its_line(
        home, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    argv = ["tiny-llama", "--dataset", "demo_alpaca", "--output_dir", str(home / "detached")]
    assert main(["train", *argv, "--detach"]) == 0
    out, err = capsys.readouterr()
    run_id, pid = out.split()[2], int(re.search(r"\(pid (\d+)\)", out)[1])
    os.kill(pid, signal.SIGKILL)  # its 300 steps are not this test's business
    recipe = with_recipe(given_values(["--model_name_or_path", *argv])).describe()
    assert recipe.startswith("demo recipe of tiny-llama: ") and len(recipe) > 80
    assert err.split() == recipe.split() and within(err)
    assert err.splitlines()[1].startswith("  ")  # a continued line hangs under its start
    assert out.splitlines()[-3:] == [f"  follow it: tuner logs {run_id} -f", f"  stop it:   tuner stop {run_id}",
                                     "  list:      tuner runs"]
    assert within(out) and str(home / "detached") in out.split()


def test_export_at_80_columns_wraps_its_summary_at_spaces(lora_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    target = tmp_path / "merged"
    assert main(["export", "tiny-llama", "--adapter_name_or_path", str(lora_run), "--export_dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert within(out) and max(map(len, out.splitlines())) > 60  # long enough to need wrapping
    words = " ".join(out.split())
    assert re.match(rf"loading \S+ in float32 on the CPU with adapter {re.escape(str(lora_run))}, to merge it in "
                    rf"writing float32 safetensors to {re.escape(str(target))}\.tmp-\d+ ", words)
    assert re.search(rf"exported {re.escape(str(target))}: 1 safetensors file, [\d.]+ MB, \w+, chat template \w+ "
                     r"check: logits of a sample conversation match base \+ adapter within \S+ "
                     r"\(largest difference; limit \S+\)$", words)


def test_predict_with_a_run_that_trained_on_its_dataset_warns_as_the_dashboard_does(lora_run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["predict", "--run", str(lora_run), "--max_samples", "2", "--max_new_tokens", "2"]) == 0
    out, err = capsys.readouterr()
    warning = training_data_warning(find_job(str(lora_run)), "demo_alpaca")
    assert warning.startswith(f"run {find_job(str(lora_run)).id} trained on demo_alpaca: ")
    assert err.split() == f"tuner: warning: {warning}".split() and within(err)
    assert "2 predictions in" in out and within(out)


def test_a_dataset_the_run_did_not_train_on_gets_no_warning(lora_run):
    job = find_job(str(lora_run))
    assert training_data_warning(job, "identity") is None
    assert training_data_warning(job, "identity, demo_alpaca") is not None
