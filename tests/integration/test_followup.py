"""predict, chat and export with --run: the run's weights, base, template and data, the user's flags on top."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from job_helpers import tuner

from engine.errors import UserError
from engine.infer.followup import followup_values, trained_weights
from engine.rundir import read_status
from engine.rundir.jobs import find_job
from engine.rundir.process import pid_start_time

TRAIN = ["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--template", "alpaca",
         "--max_samples", "40", "--per_device_train_batch_size", "8", "--logging_steps", "5", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models) -> Path:
    """A completed LoRA run ("lora-done") and a freeze run stopped by max_steps with save_steps ("freeze-done")."""
    work = tmp_path_factory.mktemp("followup")
    for name, extra in (("lora-done", ["--max_steps", "6"]),
                        ("freeze-done", ["--finetuning_type", "freeze", "--max_steps", "4"])):
        result = tuner(*TRAIN, "--output_dir", name, *extra, cwd=work)
        assert result.returncode == 0, result.stderr
    return work


def job(project: Path, name: str):
    return find_job(str(project / name))


def test_lora_run_values_point_at_its_adapter_base_and_template(project):
    lora = job(project, "lora-done")
    values = followup_values(lora, "predict")
    assert values["model_name_or_path"] == "tiny-llama"
    assert values["adapter_name_or_path"] == str(lora.dir)
    assert values["template"] == "alpaca" and values["dataset"] == "demo_alpaca"
    assert Path(values["output_dir"]).parent == lora.dir and Path(values["output_dir"]).name.startswith("predict-")
    assert followup_values(lora, "export")["export_dir"] == str(lora.dir / "merged")


def test_freeze_run_is_a_whole_model(project):
    freeze = job(project, "freeze-done")
    values = followup_values(freeze, "chat")
    assert values["model_name_or_path"] == str(freeze.dir) and "adapter_name_or_path" not in values


def test_predict_with_run_scores_into_the_run_directory(project):
    result = tuner("predict", "--run", str(project / "lora-done"), "--max_samples", "6", "--max_new_tokens", "8",
                   cwd=project)
    assert result.returncode == 0, result.stderr
    [out] = list((project / "lora-done").glob("predict-*"))
    lines = (out / "generated_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 and {"prompt", "predict", "label"} <= set(json.loads(lines[0]))
    assert "### Instruction:" in json.loads(lines[0])["prompt"]  # the run's template, alpaca
    results = json.loads((out / "predict_results.json").read_text())
    assert results["predict_samples"] == 6 and results["template"] == "alpaca"


def test_chat_with_run_by_its_id(project):
    run_id = read_status(project / "lora-done").id
    result = tuner("chat", "--run", run_id, "--max_new_tokens", "4", cwd=project, input="hello\n")
    assert result.returncode == 0, result.stderr
    assert "(template alpaca)" in result.stdout and "assistant:" in result.stdout


def test_export_with_run_merges_into_the_run_directory(project):
    result = tuner("export", "--run", str(project / "lora-done"), cwd=project)
    assert result.returncode == 0, result.stderr
    merged = project / "lora-done" / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    assert not (merged / "adapter_config.json").exists()


def test_stopped_run_uses_its_newest_checkpoint(project, tmp_path):
    lora = job(project, "lora-done")
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text((lora.dir / "config.yaml").read_text())
    for step in (2, 10, 12):  # 10 sorts after 2 by number, not by text
        checkpoint = stopped / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "adapter_config.json").write_text("{}")
        (checkpoint / "adapter_model.safetensors").write_bytes(b"\x02" + bytes(7) + b"{}")  # safetensors, no tensor
        if step != 12:  # checkpoint-12's save was cut short: it has no trainer_state.json
            (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    status = read_status(lora.dir)
    status.state, status.output_dir = "stopped", str(stopped)
    from engine.rundir import write_status

    write_status(stopped, status)
    assert trained_weights(find_job(str(stopped))) == stopped / "checkpoint-10"


def test_a_running_run_or_a_foreign_directory_is_refused_in_one_line(project, tmp_path):
    running = tmp_path / "running"
    running.mkdir()
    status = read_status(project / "lora-done")
    status.state, status.pid, status.output_dir = "running", os.getpid(), str(running)
    status.pid_started_at = pid_start_time(os.getpid())
    from engine.rundir import write_status

    write_status(running, status)
    with pytest.raises(UserError, match="still running"):
        trained_weights(find_job(str(running)))
    result = tuner("chat", "--run", "no-such-run", cwd=project)
    assert result.returncode == 2 and "no run 'no-such-run'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_follow_up_loads_the_adapters_a_run_merged_then_its_own(tmp_path):
    """An adapter a run trained further is in the run's own weights already (loading it again would apply it twice);
    adapters it merged (create_new_adapter, or a language model's adapter under a reward model) come first."""
    from engine.infer.followup import adapter_chain

    assert adapter_chain({"adapter_name_or_path": "sft"}, "run") == "run"
    assert adapter_chain({"adapter_name_or_path": "a,b"}, "run") == "a,run"
    assert adapter_chain({"adapter_name_or_path": "a,b", "create_new_adapter": True}, "run") == "a,b,run"
    assert adapter_chain({"adapter_name_or_path": "sft", "stage": "rm"}, "run") == "sft,run"
    assert adapter_chain({}, "run") == "run"
