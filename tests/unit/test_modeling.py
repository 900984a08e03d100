"""Precision and attention choices for the hardware at hand, LoRA targets, freeze patterns, k-bit preparation."""

from __future__ import annotations

import pytest

from engine.config.schema import build_config
from engine.errors import UserError
from engine.models.loading import (Precision, apply_lora, choose_attention, choose_precision, freeze_pattern,
                             linear_module_names, load_model, lora_targets)


@pytest.mark.parametrize("bf16, fp16, on_gpu, supported, expected", [
    (True, None, False, False, "fp32"),
    (None, None, False, False, "fp32"),
    (None, None, True, True, "bf16"),
    (True, None, True, False, "fp16"),
    (None, True, True, True, "fp16"),
    (False, None, True, True, "fp16"),
])
def test_precision_follows_the_request_and_the_hardware(bf16, fp16, on_gpu, supported, expected):
    assert choose_precision(bf16, fp16, on_gpu, supported).name == expected


def test_bf16_on_cpu_says_why_it_fell_back():
    assert choose_precision(True, None, False, False).reason == \
        "bf16 was asked but there is no GPU: training in fp32 on the CPU"


@pytest.mark.parametrize("asked, on_gpu, installed, expected", [
    ("auto", True, True, "flash_attention_2"),
    ("auto", True, False, "sdpa"),
    ("fa2", False, True, "sdpa"),
    ("fa2", True, True, "flash_attention_2"),
    ("eager", True, True, "eager"),
    ("sdpa", True, True, "sdpa"),
])
def test_attention_implementation(asked, on_gpu, installed, expected):
    assert choose_attention(asked, on_gpu, installed)[0] == expected


def test_fa2_without_the_package_says_how_to_get_it():
    assert "pip install flash-attn" in choose_attention("fa2", True, False)[1]


def test_freeze_pattern_selects_the_last_layers_and_named_modules():
    last_two = freeze_pattern(32, 2, "all")
    assert last_two.search("model.layers.31.mlp.up_proj.weight") and last_two.search("model.layers.30.x")
    assert not last_two.search("model.layers.29.mlp.up_proj.weight") and not last_two.search("model.layers.3.a")
    mlp_only = freeze_pattern(32, 1, "mlp")
    assert mlp_only.search("model.layers.31.mlp.down_proj.weight")
    assert not mlp_only.search("model.layers.31.self_attn.q_proj.weight")
    assert freeze_pattern(32, -1, "all").search("model.layers.0.input_layernorm.weight")


def _load(path, bits=None, precision="fp32"):
    cfg = build_config({"quantization_bit": bits})
    return cfg, load_model(str(path), cfg, Precision(precision, ""), "sdpa")


def test_lora_all_finds_every_linear_but_the_head_and_router(tiny_models):
    _, model = _load(tiny_models["tiny-llama"])
    assert linear_module_names(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    _, mixtral = _load(tiny_models["tiny-mixtral"])
    assert linear_module_names(mixtral) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with pytest.raises(UserError, match="lora_target qkv not found in this model"):
        lora_targets(model, "q_proj,qkv")


def test_kbit_preparation_leaves_the_4bit_fused_experts_packed(tiny_models):
    cfg, model = _load(tiny_models["tiny-mixtral"], bits=4, precision="bf16")
    model = apply_lora(model, cfg, gradient_checkpointing=True)
    dtypes = {name: str(p.dtype).removeprefix("torch.") for name, p in model.named_parameters()}
    layer = "base_model.model.model.layers.0."
    assert dtypes[layer + "mlp.experts.parametrizations.gate_up_proj.original"] == "uint8"
    assert dtypes[layer + "input_layernorm.weight"] == "float32"
    assert dtypes["base_model.model.lm_head.weight"] == "float32"
    assert dtypes[layer + "self_attn.q_proj.lora_A.default.weight"] == "float32"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_tokenizers_load_from_several_threads_at_first_import(tiny_models):
    """The TUI's workers may load tokenizers together in a fresh process; transformers' lazy module alone fails
    then ("cannot import name 'AutoTokenizer'"), engine.models.loading imports from it one thread at a time."""
    import subprocess
    import sys

    script = f"""
import threading
from engine.config.schema import TunerConfig
from engine.models.loading import load_tokenizer
errors = []
def load():
    try:
        load_tokenizer({str(tiny_models['tiny-llama'])!r}, TunerConfig())
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=load) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
