"""LLaMA-Factory's model, finetune, train and export keys acting in real tiny runs on the CPU: LoRA+, PiSSA,
additional_target, create_new_adapter, rope_scaling, pure_bf16, export_device and the refusals (fa3, legacy format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main
from engine.rundir import read_events, read_status

SHORT = ["--dataset", "demo_alpaca", "--max_samples", "16", "--per_device_train_batch_size", "4", "--logging_steps",
         "1", "--save_strategy", "no", "--max_steps", "2"]


def train(out: Path, *args: str, model: str = "tiny-llama") -> Path:
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(out), *SHORT, *args]) == 0
    return out


def adapter_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def adapter_config(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


def logits(base: Path, *adapters: Path):
    """Logits of a fixed prompt from the base with the adapters applied (all but the last merged)."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.models.loading import load_adapters

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = load_adapters(model, ",".join(map(str, adapters)), quantized=False).eval()
    with torch.inference_mode():
        return model(input_ids=torch.arange(3, 40)[None]).logits


def test_loraplus_lora_b_learns_at_ratio_times_the_learning_rate(tiny_models, tmp_path):
    import torch

    out = train(tmp_path / "loraplus", "--learning_rate", "1e-3", "--loraplus_lr_ratio", "16",
                "--save_strategy", "steps", "--save_steps", "2")
    groups = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=False)["param_groups"]
    by_lr = sorted((round(group["initial_lr"], 9), len(group["params"])) for group in groups if group["params"])
    lora_b = sum("lora_B" in key for key in adapter_tensors(out))
    lora_a = sum("lora_A" in key for key in adapter_tensors(out))
    assert by_lr == [(1e-3, lora_a), (1.6e-2, lora_b)]
    assert "LoRA+: lora_B matrices learn at 0.016" in (out / "train.log").read_text()


def test_pissa_initialises_from_the_weights_and_converts_to_plain_lora(tiny_models, tmp_path):
    import torch

    out = train(tmp_path / "pissa", "--lora_rank", "4", "--lora_target", "q_proj,v_proj", "--pissa_init",
                "--pissa_iter", "-1", "--pissa_convert", "--learning_rate", "5e-3")
    initial = adapter_tensors(out / "pissa_init")
    assert all(t.abs().sum() > 0 for key, t in initial.items() if "lora_B" in key), "default init: lora_B is zero"
    assert adapter_config(out)["init_lora_weights"] == "pissa"

    converted = adapter_config(out / "pissa_converted")
    assert converted["r"] == 8 and converted["init_lora_weights"] is True
    base = tiny_models["tiny-llama"]
    trained = logits(base, out)  # PEFT redoes the exact SVD on the base, then applies the trained adapter
    plain = logits(base, out / "pissa_converted")  # a plain LoRA on the untouched base
    assert torch.allclose(trained, plain, atol=1e-4), (trained - plain).abs().max()
    assert not torch.allclose(plain, logits(base, train(tmp_path / "default", "--lora_rank", "4",
                                                         "--lora_target", "q_proj,v_proj", "--learning_rate", "5e-3")),
                              atol=1e-3)


def test_additional_target_is_trained_in_full_and_saved_with_the_adapter(tiny_models, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = train(tmp_path / "extra", "--additional_target", "embed_tokens", "--learning_rate", "5e-3")
    assert adapter_config(out)["modules_to_save"] == ["embed_tokens"]
    saved = [t for key, t in adapter_tensors(out).items() if "embed_tokens" in key]
    base = load_file(tiny_models["tiny-llama"] / "model.safetensors")["model.embed_tokens.weight"]
    assert len(saved) == 1 and saved[0].shape == base.shape and not torch.equal(saved[0], base)


def test_additional_target_trains_in_fp32_beside_a_4bit_base(tiny_models, tmp_path):
    """TRL casts a quantized model's trainable weights to bfloat16; a module trained whole does not cast its input as
    LoRA's layers do, so it goes back to fp32 (on the CPU an fp32 input met a bfloat16 lm_head and the run failed)."""
    from safetensors.torch import load_file

    out = train(tmp_path / "extra", "--quantization_bit", "4", "--additional_target", "lm_head")
    assert read_status(out).state == "completed"
    saved = [t for key, t in adapter_tensors(out).items() if "lm_head" in key]
    base = load_file(tiny_models["tiny-llama"] / "model.safetensors")["lm_head.weight"]
    assert len(saved) == 1 and saved[0].shape == base.shape


def test_create_new_adapter_trains_a_second_adapter_over_the_merged_first(tiny_models, tmp_path):
    import torch

    first = train(tmp_path / "first", "--lora_rank", "8", "--learning_rate", "5e-3")
    second = train(tmp_path / "second", "--adapter_name_or_path", str(first), "--create_new_adapter",
                   "--lora_rank", "4", "--learning_rate", "5e-3")
    assert adapter_config(second)["r"] == 4
    log = (second / "train.log").read_text()
    assert f"merged 1 adapter(s) into the base: {first}" in log and "training a new adapter over the merged" in log
    base = tiny_models["tiny-llama"]
    assert not torch.allclose(logits(base, first, second), logits(base, first), atol=1e-4)

    further = train(tmp_path / "further", "--adapter_name_or_path", str(first), "--lora_rank", "4",
                    "--learning_rate", "5e-3")
    assert adapter_config(further)["r"] == 8, "without create_new_adapter the given adapter trains further"
    assert f"training the adapter {first} further" in (further / "train.log").read_text()


@pytest.fixture(scope="module")
def short_context_model(tiny_models, tmp_path_factory) -> Path:
    """tiny-llama with a 64-position context, so a cutoff_len of 128 is longer than the model's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("short") / "tiny-llama-64"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["tiny-llama"])
    model.config.max_position_embeddings = 64
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_models["tiny-llama"]).save_pretrained(path)
    return path


def test_rope_scaling_stretches_the_saved_config_only_when_cutoff_len_is_longer(short_context_model, tmp_path):
    out = train(tmp_path / "rope", "--finetuning_type", "full", "--rope_scaling", "linear", "--cutoff_len", "128",
                model=str(short_context_model))
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0
    assert config["max_position_embeddings"] == 128
    assert "rope scaling: linear, factor 2.0, for cutoff_len 128 over the model's 64 positions" in \
        (out / "train.log").read_text()

    fits = train(tmp_path / "fits", "--finetuning_type", "full", "--rope_scaling", "linear", "--cutoff_len", "64",
                 model=str(short_context_model))
    config = json.loads((fits / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "default" and config["max_position_embeddings"] == 64


def test_pure_bf16_trains_bfloat16_weights_without_mixed_precision(tiny_models, tmp_path):
    import torch

    out = train(tmp_path / "pure", "--finetuning_type", "full", "--pure_bf16", "--learning_rate", "2e-3",
                "--max_steps", "4")
    start = [e for e in read_events(out) if e["type"] == "start"][0]
    assert start["precision"] == "pure_bf16"
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.bf16 is False and args.fp16 is False
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    losses = [e["loss"] for e in read_events(out) if e["type"] == "log" and "loss" in e]
    assert len(losses) == 4 and all(0 < loss < 100 for loss in losses)


def test_pure_bf16_with_fp16_is_refused_in_one_line(tiny_models, tmp_path, capsys):
    out = tmp_path / "clash"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--output_dir", str(out), *SHORT, "--pure_bf16",
                 "--fp16"]) == 2
    err = capsys.readouterr().err
    assert "pure_bf16 and fp16" in err and len(err.strip().splitlines()) == 1
    assert not (out / "model.safetensors").exists()


def test_fa3_without_a_gpu_is_refused_before_the_model_loads(tiny_models, tmp_path, capsys):
    out = tmp_path / "fa3"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--output_dir", str(out), *SHORT,
                 "--flash_attn", "fa3"]) == 2
    err = capsys.readouterr().err
    assert "flash_attn fa3 needs a GPU" in err and "use flash_attn sdpa" in err
    assert read_status(out).state == "failed"
    assert "trainable parameters" not in (out / "train.log").read_text()


def test_export_device_cpu_merges_on_the_cpu_and_legacy_format_is_refused(tiny_models, tmp_path, capsys):
    run = train(tmp_path / "run", "--learning_rate", "5e-3")
    merged = tmp_path / "merged"
    assert main(["export", "--model_name_or_path", "tiny-llama", "--adapter_name_or_path", str(run),
                 "--export_dir", str(merged), "--export_device", "cpu"]) == 0
    assert "on the CPU with adapter" in capsys.readouterr().out
    assert (merged / "model.safetensors").is_file()

    legacy = tmp_path / "legacy"
    assert main(["export", "--model_name_or_path", "tiny-llama", "--adapter_name_or_path", str(run),
                 "--export_dir", str(legacy), "--export_legacy_format", "true"]) == 2
    err = capsys.readouterr().err
    assert "export_legacy_format" in err and "safetensors only" in err
    assert not legacy.exists()
