"""The one config: YAML + key=value + --flags, old spellings, and validation that reports every problem at once."""

from __future__ import annotations

import importlib.util
import os

import pytest
import yaml

from engine.cli import main
from engine.config.schema import build_config, parse_args, parse_overrides
from engine.errors import ConfigError, UserError
from engine.config.validation import validate

CLASSIC = (
    "--stage sft --model_name_or_path tiny-llama --do_train --dataset demo_alpaca --template llama2 "
    "--finetuning_type lora --quantization_bit 4 --lora_target q_proj,v_proj --output_dir out --overwrite_cache "
    "--per_device_train_batch_size 2 --gradient_accumulation_steps 4 --lr_scheduler_type cosine --logging_steps 10 "
    "--save_steps 100000 --learning_rate 2e-5 --num_train_epochs 2.0 --neftune_noise_alpha 5 --flash_attn --bf16 "
    "--max_samples 64"
).split()


def problems_of(cfg, command="train") -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(cfg, command)
    return info.value.problems


def test_classic_tutorial_command_keeps_its_meaning():
    cfg = parse_args(CLASSIC)
    assert cfg.finetune.stage == "sft" and cfg.train.do_train is True
    assert cfg.model.quantization_bit == 4 and cfg.finetune.lora_target == "q_proj,v_proj"
    assert cfg.model.flash_attn == "fa2", "a bare --flash_attn asks for flash attention 2"
    assert cfg.train.bf16 is True and cfg.train.overwrite_output_dir is False
    assert cfg.data.overwrite_cache is True and cfg.data.max_samples == 64
    assert cfg.train.learning_rate == pytest.approx(2e-5) and cfg.train.num_train_epochs == 2.0
    assert cfg.finetune.neftune_noise_alpha == 5.0 and cfg.train.save_steps == 100000
    validate(cfg, "train")


def test_checkpoint_dir_is_the_adapter_path():
    cfg = parse_args(["--checkpoint_dir", "saves/lora"])
    assert cfg.model.adapter_name_or_path == "saves/lora"


def test_yaml_file_then_key_value_then_flag_later_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: tiny-llama\nlearning_rate: 1.0e-3\nlora_rank: 16\ncutoff_len: 256\n")
    cfg = parse_args([str(path), "learning_rate=1e-4", "--lora_rank", "32"])
    assert cfg.model.model_name_or_path == "tiny-llama"
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.finetune.lora_rank == 32 and cfg.data.cutoff_len == 256


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 2e-5\n")
    assert parse_args([str(path)]).train.learning_rate == pytest.approx(2e-5)


def test_print_config_round_trips_through_yaml(tmp_path):
    cfg = parse_args(CLASSIC + ["--hf_hub_token", "hf_secret"])
    text = cfg.to_yaml()
    assert "hf_secret" not in text and "hf_hub_token" not in text, "secrets never reach a saved config"
    saved = tmp_path / "saved.yaml"
    saved.write_text(text)
    again = parse_args([str(saved)])
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(text)["flash_attn"] == "fa2"


def test_bare_boolean_flag_does_not_swallow_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora_rank: 4\n")
    files, overrides = parse_overrides(["--do_train", str(path), "--flash_attn", "--bf16", "false"])
    assert files == [str(path)]
    assert overrides == {"do_train": True, "flash_attn": True, "bf16": "false"}


def test_negative_number_is_a_value_not_a_flag():
    assert parse_args(["--max_steps", "-1", "--freeze_trainable_layers", "-2"]).finetune.freeze_trainable_layers == -2


def test_unknown_key_names_the_closest_known_key():
    with pytest.raises(ConfigError) as info:
        parse_args(["--learning_rat", "1e-4", "--lora_rnk", "8"])
    assert info.value.problems == [
        "unknown key 'learning_rat': did you mean learning_rate?",
        "unknown key 'lora_rnk': did you mean lora_rank?",
    ]


def test_bad_values_and_choices_are_all_reported():
    with pytest.raises(ConfigError) as info:
        build_config({"cutoff_len": "long", "finetuning_type": "qlora", "bf16": "maybe", "stage": "ppo"})
    assert info.value.problems == [
        "cutoff_len: expected a whole number, got 'long'",
        "finetuning_type: 'qlora' is not one of lora, freeze, full",
        "bf16: expected true or false, got 'maybe'",
        "LLaMA-Factory's stage ppo is not supported by tuner: tuner runs supervised fine-tuning (stage sft), "
        "preference tuning (stages dpo and kto), reward models (stage rm) and pre-training (stage pt)",
    ]


def test_non_finite_numbers_are_refused_with_the_field_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_config({"learning_rate": "nan", "num_train_epochs": "inf", "val_size": "-inf", "max_steps": "inf",
                      "temperature": float("nan")})
    assert info.value.problems == [
        "learning_rate: expected a finite number, got 'nan'",
        "num_train_epochs: expected a finite number, got 'inf'",
        "val_size: expected a finite number, got '-inf'",
        "max_steps: expected a whole number, got 'inf'",
        "temperature: expected a finite number, got nan",
    ]
    path = tmp_path / "run.yaml"
    path.write_text("max_grad_norm: .inf\n")
    with pytest.raises(ConfigError, match=r"^max_grad_norm: expected a finite number, got inf$"):
        parse_args([str(path)])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_learning_rate_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys, value):
    code = main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--learning_rate", value,
                 "--output_dir", str(tmp_path / "x")])
    assert code == 2
    assert capsys.readouterr().err == f"tuner: error: learning_rate: expected a finite number, got '{value}'\n"


def test_numbers_outside_their_valid_range_are_all_reported():
    cfg = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "max_steps": -5,
                        "cutoff_len": "1e9", "max_grad_norm": -1, "warmup_steps": -1, "save_total_limit": 0,
                        "eval_steps": 0, "dataloader_num_workers": -1, "ddp_timeout": 0, "weight_decay": -0.1,
                        "adam_epsilon": 0, "adam_beta1": 1, "adam_beta2": -0.5, "preprocessing_num_workers": 0,
                        "top_k": -1, "num_beams": 0, "repetition_penalty": 0, "seed": -1})
    assert problems_of(cfg) == [
        "cutoff_len must be at most 1048576 tokens, got 1000000000",
        "preprocessing_num_workers must be at least 1, got 0",
        "warmup_steps must be at least 0, got -1",
        "max_steps must be at least 1, or -1 to train for num_train_epochs, got -5",
        "save_total_limit must be at least 1, got 0",
        "eval_steps must be at least 1, got 0",
        "weight_decay must be at least 0, got -0.1",
        "adam_beta1 must be in [0, 1), got 1.0",
        "adam_beta2 must be in [0, 1), got -0.5",
        "adam_epsilon must be positive, got 0.0",
        "max_grad_norm must be at least 0 (0 turns clipping off), got -1.0",
        "seed must be in [0, 2**32), got -1",
        "dataloader_num_workers must be at least 0, got -1",
        "ddp_timeout must be at least 1 (seconds), got 0",
        "top_k must be at least 0, got -1",
        "repetition_penalty must be positive, got 0.0",
        "num_beams must be at least 1, got 0",
    ]


def test_the_edges_of_the_valid_ranges_are_accepted():
    validate(build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "max_steps": -1,
                           "cutoff_len": 2**20, "max_grad_norm": 0, "warmup_steps": 0, "save_total_limit": 1,
                           "eval_steps": 1, "adam_beta1": 0, "top_k": 0, "seed": 0}))
    validate(build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "max_steps": 1}))
    cfg = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "max_steps": 0})
    assert problems_of(cfg) == ["max_steps must be at least 1, or -1 to train for num_train_epochs, got 0"]


def test_numbers_too_large_for_the_optimizer_or_a_clock_are_refused_before_they_reach_torch(tmp_path, capsys):
    code = main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--learning_rate",
                 "1e300", "--max_steps", "99999999999999999999999", "--save_steps", "2000000000",
                 "--output_dir", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and not (tmp_path / "x").exists()
    assert err[0] == ("tuner: error: learning_rate 1e+300 cannot be held by the optimizer (float32, at most 3.4e38); "
                      "usual values are 1e-6 to 1e-3")
    assert err[1].startswith("tuner: error: max_steps must be at most 1,000,000,000, got ")
    assert err[2] == "tuner: error: save_steps must be at most 1,000,000,000, got 2000000000"
    validate(build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "max_steps": 10**9,
                           "learning_rate": 3e38}))


def test_an_adapter_given_as_a_path_must_be_an_adapter_directory(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    base = {"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "finetuning_type": "lora"}
    assert problems_of(build_config({**base, "adapter_name_or_path": "/nonexistent"})) == [
        "adapter_name_or_path /nonexistent: no such directory (a LoRA adapter, as training saves one)"]
    assert problems_of(build_config({**base, "adapter_name_or_path": str(adapter)})) == [
        f"{adapter} is not a LoRA adapter (no adapter_config.json): a freeze or full fine-tune output is a whole "
        "model, pass it as model_name_or_path"]
    (adapter / "adapter_config.json").write_text("{}")
    validate(build_config({**base, "adapter_name_or_path": f"{adapter}, user/on-the-hub"}))


def test_out_of_range_numbers_on_the_command_line_are_one_line_each_and_exit_2(tmp_path, capsys):
    code = main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--max_steps", "-5",
                 "--cutoff_len", "1e9", "--max_grad_norm", "-1", "--output_dir", str(tmp_path / "x")])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "tuner: error: cutoff_len must be at most 1048576 tokens, got 1000000000",
        "tuner: error: max_steps must be at least 1, or -1 to train for num_train_epochs, got -5",
        "tuner: error: max_grad_norm must be at least 0 (0 turns clipping off), got -1.0",
    ]


def test_output_dir_that_is_a_file_is_refused_before_the_run_starts(tmp_path, capsys):
    taken = tmp_path / "f"
    taken.write_text("")
    code = main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca",
                 "--output_dir", str(taken)])
    assert code == 2
    assert capsys.readouterr().err == (f"tuner: error: output_dir {taken} is a file, not a directory: "
                                       "choose a directory for the run\n")
    export = build_config({"model_name_or_path": "tiny-llama", "export_dir": str(taken), "output_dir": str(taken)})
    assert problems_of(export, "export") == [
        f"export_dir {taken} is a file, not a directory: choose a directory for the exported model"]
    validate(build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca",
                           "output_dir": str(tmp_path)}))


def test_contradictions_name_both_settings():
    cfg = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "bf16": True, "fp16": True,
                        "quantization_bit": 4, "finetuning_type": "full", "max_samples": 0})
    assert problems_of(cfg) == [
        "max_samples must be at least 1, got 0",
        "bf16 and fp16 are both set: choose one precision",
        "quantization_bit 4 works only with finetuning_type lora (QLoRA), not full",
    ]


def test_missing_required_keys_are_named_per_command():
    cfg = build_config({})
    assert problems_of(cfg, "train") == [
        "model_name_or_path is required for `tuner train`",
        "dataset is required for `tuner train`",
    ]
    assert problems_of(cfg, "export") == [
        "model_name_or_path is required for `tuner export`",
        "export_dir is required for `tuner export`",
    ]


def test_unknown_template_and_dataset_list_the_known_ones():
    cfg = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpca", "template": "llama"})
    template_problem, dataset_problem = problems_of(cfg)
    assert template_problem.startswith("template 'llama' does not exist; known: ")
    assert "llama2" in template_problem and "mistral" in template_problem
    assert dataset_problem.startswith("dataset: unknown dataset 'demo_alpca'; closest registered names: demo_alpaca")


def test_datasets_from_a_llamafactory_registry_validate(llamafactory_data):
    cfg = build_config({"model_name_or_path": "tiny-llama", "dataset": "alpaca_en_demo,identity",
                        "dataset_dir": str(llamafactory_data)})
    validate(cfg)


def test_missing_config_file_and_bad_yaml_are_one_line(tmp_path):
    with pytest.raises(UserError, match="config file .*nope.yaml does not exist"):
        parse_args([str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [1\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+, column \d+ is not valid YAML"):
        parse_args([str(bad)])
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a mapping"):
        parse_args([str(listed)])
    for name, data, says in (
            ("bin.yaml", bytes(range(128, 256)), r"is not UTF-8 text \(byte 0x80 at offset 0\)"),
            ("latin.yaml", "dataset: café\n".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 at offset 12\)"),
            ("deep.yaml", b"[" * 100_000, "nests too deeply"),
            ("fifo.yaml", None, "cannot be read: .*not a regular file but a FIFO")):
        path = tmp_path / name
        os.mkfifo(path) if data is None else path.write_bytes(data)
        with pytest.raises(UserError, match=f"config file .*{name} {says}"):
            parse_args([str(path)])
    (tmp_path / "bom.yaml").write_bytes("\ufeffmodel_name_or_path: tiny-llama\n".encode())  # Notepad's UTF-8
    assert parse_args([str(tmp_path / "bom.yaml")]).model.model_name_or_path == "tiny-llama"


def test_no_is_a_choice_not_false_on_the_command_line_and_in_yaml(tmp_path):
    assert parse_args(["--save_strategy", "no"]).train.save_strategy == "no"
    path = tmp_path / "run.yaml"
    path.write_text("save_strategy: no\neval_strategy: 'no'\n")
    cfg = parse_args([str(path)])
    assert cfg.train.save_strategy == "no" and cfg.train.eval_strategy == "no"


def test_null_clears_an_optional_value():
    cfg = parse_args(["--max_samples", "10", "max_samples=null", "--template", "none"])
    assert cfg.data.max_samples is None and cfg.model.template is None


def test_report_to_names_a_known_tracker():
    cfg = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "report_to": "wandbb"})
    assert problems_of(cfg) == [
        "report_to: wandbb is not one of none, tensorboard, wandb, mlflow, comet_ml, swanlab, trackio, all"]


def test_training_settings_that_would_fail_once_the_model_has_loaded_are_refused_first(monkeypatch):
    """optim, trackers, DeepSpeed and FSDP are checked against what is installed and how the run was launched, so a
    typo costs a second, not a model load followed by a traceback."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "optim": "adamw_8bt",
                        "lr_scheduler_type": "reduce_lr_on_plateau", "report_to": "none", "fsdp": "full_shard"})
    problems = problems_of(cfg)
    assert problems[0].startswith("lr_scheduler_type reduce_lr_on_plateau lowers the rate when the eval loss stops "
                                  "falling: it needs eval_strategy steps or epoch")
    assert problems[1].startswith("optim 'adamw_8bt' is not an optimizer transformers knows: did you mean adamw_8bit")
    assert "known" not in problems[1]
    assert problems[2] == ("fsdp full_shard shards the model across processes and this run has one: set "
                           "nproc_per_node 2 or more (or nnodes 2 or more)")
    assert len(problems) == 3
    unlike = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "optim": "newton"})
    assert problems_of(unlike)[0].startswith("optim 'newton' is not an optimizer transformers knows: known: adamw_torch")
    deepspeed = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca",
                              "deepspeed": "/nonexistent/ds_z3.json"})
    assert problems_of(deepspeed) == [
        "deepspeed /nonexistent/ds_z3.json: the deepspeed package is not installed (pip install deepspeed), or leave "
        "deepspeed out" if importlib.util.find_spec("deepspeed") is None
        else "deepspeed config file /nonexistent/ds_z3.json does not exist"]
    no_data = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "do_eval": True})
    assert problems_of(no_data) == ["do_eval evaluates once training ends, on evaluation data: set val_size or "
                                    "eval_dataset"]

    fine = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "optim": "adamw_8bit",
                         "lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "steps", "val_size": 0.1,
                         "fsdp": "full_shard", "nproc_per_node": 2})
    validate(fine)


def test_a_tracker_that_is_not_installed_is_named_with_its_package():
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    missing = [name for name in ("wandb", "tensorboard", "mlflow") if name not in get_available_reporting_integrations()]
    if not missing:
        pytest.skip("every tracker is installed here")
    cfg = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca", "report_to": missing[0]})
    assert problems_of(cfg) == [
        f"report_to {missing[0]}: the {missing[0]} package is not installed (pip install {missing[0]}), or leave it out"]
    validate(cfg, "preview")  # only training reports to trackers


def test_help_answers_without_loading_the_heavy_libraries():
    import subprocess
    import sys

    code = ("import sys; from engine.cli import main; main(['--help']); main(['train', '--help']); "
            "heavy = {'torch', 'transformers', 'peft', 'trl', 'datasets', 'bitsandbytes'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
