"""LLaMA-Factory's config keys: TrainingArguments / SFTConfig fields passed through, LLaMA-Factory's own keys
translated or refused with what to use instead, and every problem of a config reported in one round."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from engine.config.argv import load_config
from engine.config.library import ENGINE_SET, library_fields
from engine.config.schema import build_config, parse_args
from engine.config.validation import problems_in
from engine.errors import ConfigError

BASE = ["--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca"]


def problems_of(*argv: str, command: str = "train") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config([*argv], command)
    return caught.value.problems


def test_the_library_fields_are_the_real_sftconfig_fields():
    from trl import SFTConfig

    real = {f.name for f in dataclasses.fields(SFTConfig) if f.init and not f.name.startswith("_")}
    assert set(library_fields()) == real


def test_the_library_fields_take_their_types_from_the_classes_and_are_kept_by_version(tmp_path, monkeypatch):
    """Read from SFTConfig itself (types through typing, not the text of an annotation), then from the cache file
    named by the installed versions, which a reader trusts instead of importing the libraries again."""
    import json
    from importlib.metadata import version

    from engine.config import library

    fields = library_fields()
    assert fields["liger_kernel_config"].kinds == ("dict",)  # dict[str, bool] | None: a mapping, not a flag
    assert "str" in fields["lr_scheduler_type"].kinds and fields["max_grad_norm"].kinds == ("float",)
    assert fields["optim"].default == "adamw_torch_fused" and fields["report_to"].optional
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    library.library_fields.cache_clear()
    try:
        read = library.library_fields()
        [kept] = (tmp_path / "tuner-tui" / "library-fields").iterdir()
        assert f"transformers{version('transformers')}" in kept.name and f"trl{version('trl')}" in kept.name
        assert read == fields
        rows = json.loads(kept.read_text())
        next(row for row in rows if row["name"] == "max_grad_norm")["help"] = "as kept"
        kept.write_text(json.dumps(rows))
        library.library_fields.cache_clear()
        assert library.library_fields()["max_grad_norm"].help == "as kept"
    finally:
        library.library_fields.cache_clear()


def test_training_arguments_fields_pass_through_with_their_types():
    cfg = parse_args([*BASE, "--save_only_model", "true", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}',
                      "--logging_first_step", "--data_seed", "7", "--tf32", "false", "--torch_compile", "false",
                      "--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss",
                      "--gradient_checkpointing_kwargs", '{"use_reentrant": true}', "--optim_target_modules",
                      "q_proj,v_proj", "--push_to_hub", "false", "--hub_model_id", "me/model"])
    assert cfg.passthrough == {
        "save_only_model": True, "lr_scheduler_kwargs": {"min_lr_rate": 0.1}, "logging_first_step": True,
        "data_seed": 7, "tf32": False, "torch_compile": False, "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss", "gradient_checkpointing_kwargs": {"use_reentrant": True},
        "optim_target_modules": "q_proj,v_proj", "push_to_hub": False, "hub_model_id": "me/model"}


def test_passed_through_fields_are_saved_and_read_back(tmp_path):
    cfg = parse_args([*BASE, "--save_only_model", "--lr_scheduler_kwargs", '{"min_lr": 1e-6}'])
    text = cfg.to_yaml()
    assert "### transformers" in text
    saved = tmp_path / "config.yaml"
    saved.write_text(text)
    again = build_config(yaml.safe_load(saved.read_text()))
    assert again.passthrough == {"save_only_model": True, "lr_scheduler_kwargs": {"min_lr": 1e-6}}


def test_a_yaml_mapping_passes_through_as_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs:\n  min_lr_rate: 0.05\n")
    cfg = load_config([str(path), *BASE], "train")
    assert cfg.passthrough["lr_scheduler_kwargs"] == {"min_lr_rate": 0.05}


def test_a_bad_value_of_a_library_field_names_the_field():
    problems = problems_of(*BASE, "--data_seed", "x", "--lr_scheduler_kwargs", "{not json")
    assert "data_seed: expected a whole number, got 'x'" in problems
    assert any(p.startswith("lr_scheduler_kwargs: is not valid JSON") for p in problems)


@pytest.mark.parametrize("key", ["max_length", "dataset_text_field", "use_cpu", "loss_type", "save_safetensors"])
def test_fields_the_engine_sets_are_refused_with_what_to_use(key):
    assert f"{key} is set by tuner: {ENGINE_SET[key]}" in problems_of(*BASE, f"--{key}", "1")


def test_the_schedules_that_need_keywords_say_which():
    assert problems_of(*BASE, "--lr_scheduler_type", "cosine_with_min_lr") == [
        "lr_scheduler_type cosine_with_min_lr needs min_lr or min_lr_rate in lr_scheduler_kwargs: e.g. "
        "lr_scheduler_kwargs: {min_lr_rate: 0.1}"]
    assert "num_decay_steps" in problems_of(*BASE, "--lr_scheduler_type", "warmup_stable_decay")[0]
    wrong = problems_of(*BASE, "--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}')
    assert wrong[0].startswith("lr_scheduler_kwargs: min_lr_rate not accepted by lr_scheduler_type cosine")
    load_config([*BASE, "--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs",
                 json.dumps({"num_decay_steps": 3, "min_lr_ratio": 0.1})], "train")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("use_galore", "true", "LLaMA-Factory's use_galore is not supported by tuner: use optim galore_adamw"),
    ("use_badam", "true", "LLaMA-Factory's use_badam is not supported by tuner: use finetuning_type freeze"),
    ("use_apollo", "true", "LLaMA-Factory's use_apollo is not supported by tuner"),
    ("use_llama_pro", "true", "LLaMA-Factory's use_llama_pro is not supported by tuner"),
    ("oft_rank", "8", "LLaMA-Factory's oft_rank is not supported by tuner: use finetuning_type lora"),
    ("reward_model", "other/model", "LLaMA-Factory's reward_model is not supported by tuner: tuner runs supervised"),
    ("export_quantization_bit", "4", "LLaMA-Factory's export_quantization_bit 4 is not supported by tuner"),
    ("use_unsloth", "true", "LLaMA-Factory's use_unsloth is not supported by tuner"),
    ("image_max_pixels", "1000", "LLaMA-Factory's image_max_pixels is not supported by tuner: tuner trains text"),
    ("vllm_maxlen", "4096", "LLaMA-Factory's vllm_maxlen is not supported by tuner"),
    ("quantization_method", "gptq", "LLaMA-Factory's quantization_method gptq is not supported by tuner"),
    ("infer_backend", "vllm", "LLaMA-Factory's infer_backend vllm is not supported by tuner"),
    ("finetuning_type", "oft", "LLaMA-Factory's finetuning_type oft is not supported by tuner"),
    ("stage", "ppo", "LLaMA-Factory's stage ppo is not supported by tuner"),
])
def test_llamafactory_keys_tuner_does_not_run_are_refused_with_what_to_use(key, value, message):
    assert any(p.startswith(message) for p in problems_of(*BASE, f"--{key}", value)), problems_of(
        *BASE, f"--{key}", value)


def test_llamafactory_keys_at_their_default_describe_what_tuner_does_and_are_accepted():
    cfg = load_config([*BASE, "--use_unsloth", "false", "--use_fast_tokenizer", "true", "--low_cpu_mem_usage",
                       "true", "--mix_strategy", "concat", "--neat_packing", "false"], "train")
    assert cfg.passthrough == {}


def test_translated_llamafactory_keys_act():
    cfg = load_config([*BASE, "--disable_gradient_checkpointing", "true", "--use_reentrant_gc", "true",
                       "--moe_aux_loss_coef", "0.01", "--quantization_method", "bitsandbytes"], "train")
    assert cfg.train.gradient_checkpointing is False
    assert cfg.passthrough == {"gradient_checkpointing_kwargs": {"use_reentrant": True},
                               "router_aux_loss_coef": 0.01}
    assert cfg.model.quantization_method == "bnb"
    assert load_config([*BASE, "--disable_gradient_checkpointing", "false"], "train").train.gradient_checkpointing \
        is None


@pytest.mark.parametrize(("value", "expected"), [("true", "fa2"), ("fa3", "fa3"), ("disabled", "eager"),
                                                 ("false", "sdpa"), ("auto", "auto")])
def test_flash_attn_takes_llamafactory_values(value, expected):
    assert parse_args(["--flash_attn", value]).model.flash_attn == expected


def test_every_problem_of_a_config_comes_in_one_round():
    problems = problems_of("--model_name_or_path", "tiny-llama", "--dataset", "no_such_set", "--template", "qwen9",
                           "--use_badam", "true", "--lora_rnk", "3", "--learning_rate", "-1")
    assert problems[0].startswith("LLaMA-Factory's use_badam")
    assert "unknown key 'lora_rnk': did you mean lora_rank?" in problems
    assert any(p.startswith("template 'qwen9' does not exist") for p in problems)
    assert any(p.startswith("dataset: unknown dataset 'no_such_set'") for p in problems)
    assert "learning_rate must be positive, got -1.0" in problems


@pytest.mark.parametrize("typo, meant", [("use_badamm", "use_badam"),
                                         ("disable_gradient_checkpointingg", "disable_gradient_checkpointing"),
                                         ("save_only_modle", "save_only_model"), ("lora_rnk", "lora_rank")])
def test_a_near_miss_is_pointed_at_the_key_of_the_same_meaning(typo, meant):
    assert f"unknown key '{typo}': did you mean {meant}?" in problems_of(*BASE, f"--{typo}", "1")


@pytest.mark.parametrize("command", ["export", "chat", "predict"])
def test_an_unknown_key_points_at_the_commands_own_help(command):
    assert f"unknown key 'zzzq': see `tuner {command} --help` for the known keys" in problems_of(
        "--zzzq", "1", command=command)


def test_predict_takes_eval_dataset_alone():
    cfg = parse_args(["--model_name_or_path", "tiny-llama", "--eval_dataset", "demo_alpaca"])
    assert problems_in(cfg, "predict") == []
    assert problems_in(parse_args(["--model_name_or_path", "tiny-llama"]), "predict") == [
        "dataset or eval_dataset is required for `tuner predict`"]


def test_llamafactory_defaults():
    cfg = parse_args([])
    assert cfg.data.cutoff_len == 2048 and cfg.data.dataset_dir == "data"


def test_lora_only_keys_and_collisions_are_refused():
    problems = problems_of(*BASE, "--finetuning_type", "full", "--loraplus_lr_ratio", "16", "--pissa_init",
                           "--additional_target", "embed_tokens", "--mask_history", "--train_on_prompt",
                           "--pure_bf16", "--fp16", "true")
    for key in ("loraplus_lr_ratio", "pissa_init", "additional_target"):
        assert f"{key} works only with finetuning_type lora, not full" in problems
    assert any(p.startswith("mask_history and train_on_prompt collide") for p in problems)
    assert any(p.startswith("pure_bf16 and fp16 collide") for p in problems)
    assert any(p.startswith("create_new_adapter trains a new adapter")
               for p in problems_of(*BASE, "--create_new_adapter"))
    assert any("safetensors only" in p for p in problems_of(
        "--model_name_or_path", "tiny-llama", "--export_dir", "x", "--export_legacy_format", "true",
        command="export"))


def test_help_lists_the_passed_through_fields_without_importing_the_libraries():
    """Once these versions were read (the first use after an install or upgrade reads the classes), help reads the
    cache: no torch, transformers or trl."""
    from engine.config import library

    library.library_fields.cache_clear()
    library.library_fields()  # this session's cache directory holds them now
    code = ("import sys; from engine.cli import main; main(['train', '--help']); "
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "passed through" in out and "--save_only_model (default False)" in out
    assert "--lr_scheduler_kwargs (default None)" in out
    assert out.strip().endswith("HEAVY []")


@pytest.mark.parametrize("keys", [{"use_reentrant_gc": True},
                                  {"gradient_checkpointing_kwargs": {"use_reentrant": True}}])
def test_the_users_checkpointing_keywords_reach_sftconfig_in_place_of_the_engines(keys, tiny_models):
    from trl import SFTConfig

    from engine.models.loading import Precision, load_model
    from engine.train.arguments import checkpointing_args as _checkpointing_args
    from engine.train.arguments import with_passthrough as _with_passthrough

    cfg = build_config(keys)
    model = load_model(str(tiny_models["tiny-llama"]), cfg, Precision("fp32", ""), "sdpa")
    chosen = {"output_dir": "/tmp/unused", "use_cpu": True, **_checkpointing_args(SFTConfig, True)}
    args = SFTConfig(**_with_passthrough(chosen, cfg, model))
    name = next(n for n in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs") if n in chosen)
    assert getattr(args, name) == {"use_reentrant": True}


@pytest.mark.parametrize("model, kept", [("tiny-llama", False), ("tiny-mixtral", True)])
def test_moe_aux_loss_coef_applies_to_mixture_of_experts_models_only(model, kept, tiny_models):
    from engine.models.loading import Precision, load_model
    from engine.train.arguments import with_passthrough as _with_passthrough

    cfg = build_config({"moe_aux_loss_coef": 0.01})
    loaded = load_model(str(tiny_models[model]), cfg, Precision("fp32", ""), "sdpa")
    fields = _with_passthrough({"gradient_checkpointing_kwargs": {}}, cfg, loaded)
    assert ("router_aux_loss_coef" in fields) is kept


def test_later_keys_win_over_translated_ones():
    assert build_config({"disable_gradient_checkpointing": True, "gradient_checkpointing": True}) \
        .train.gradient_checkpointing is True
    assert build_config({"gradient_checkpointing": True, "disable_gradient_checkpointing": True}) \
        .train.gradient_checkpointing is False
    assert build_config({"use_reentrant_gc": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}) \
        .passthrough == {"gradient_checkpointing_kwargs": {"use_reentrant": False}}


def test_deepspeed_collisions_llamafactory_refuses_too(tmp_path):
    from engine.config.validation import _deepspeed_collisions

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}))
    cfg = build_config({"deepspeed": str(ds), "pure_bf16": True, "pissa_init": True, "loraplus_lr_ratio": 16})
    problems = _deepspeed_collisions(cfg)
    assert len(problems) == 3 and problems[0].startswith("pure_bf16 does not work with DeepSpeed ZeRO-3")
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert _deepspeed_collisions(cfg) == []


def test_a_file_named_by_fsdp_config_is_saved_as_an_absolute_path(tmp_path, monkeypatch):
    from engine.runs.launch import saved_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fsdp.json").write_text("{}")
    saved = saved_config(build_config({"fsdp_config": "fsdp.json"}), tmp_path / "run")
    assert saved.passthrough["fsdp_config"] == str(tmp_path / "fsdp.json")
