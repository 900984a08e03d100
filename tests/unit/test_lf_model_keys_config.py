"""The pure choices behind LLaMA-Factory's model keys: RoPE stretch, pure_bf16, fa3, PiSSA init, the early refusals
and where an export merges."""

from __future__ import annotations

import pytest

from engine.config.schema import build_config
from engine.errors import UserError
from engine.infer.export import merge_device_map
from engine.models.loading import (Hardware, Precision, additional_targets, check_requests, choose_attention,
                                   choose_precision, flash_attention_3_refusal, load_model, lora_init, rope_parameters)

CPU = Hardware(on_gpu=False, bf16_supported=False, flash_attn_installed=False, device_name="cpu")
GPU_WITHOUT_FA3 = Hardware(on_gpu=True, bf16_supported=True, flash_attn_installed=True, device_name="H200")
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.parametrize("kind, expected, positions", [
    ("linear", {"rope_type": "linear", "factor": 3.0}, 129),
    ("dynamic", {"rope_type": "dynamic", "factor": 3.0}, 64),
    ("yarn", {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 64}, 129),
    ("llama3", {"rope_type": "llama3", "factor": 3.0, "original_max_position_embeddings": 64,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 129),
])
def test_rope_factor_is_the_ceiling_of_cutoff_len_over_the_models_positions(kind, expected, positions):
    params, max_positions = rope_parameters(kind, DEFAULT_ROPE, cutoff_len=129, max_positions=64)
    assert params == {"rope_theta": 10000.0, **expected} and max_positions == positions


def test_rope_is_left_alone_when_cutoff_len_fits():
    assert rope_parameters("linear", DEFAULT_ROPE, cutoff_len=64, max_positions=64) is None
    assert rope_parameters("yarn", DEFAULT_ROPE, cutoff_len=4096, max_positions=None) is None


def test_rope_scaling_reaches_the_loaded_model(tiny_models):
    cfg = build_config({"rope_scaling": "yarn", "cutoff_len": 5000})
    model = load_model(str(tiny_models["tiny-llama"]), cfg, Precision("fp32", ""), "sdpa")
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.rope_parameters["factor"] == 3.0
    assert model.model.rotary_emb.rope_type == "yarn" and model.config.max_position_embeddings == 5000


def test_pure_bf16_holds_bfloat16_on_the_cpu_and_on_a_gpu_with_bf16():
    import torch

    on_cpu = choose_precision(None, None, False, False, pure_bf16=True)
    assert on_cpu.name == "pure_bf16" and on_cpu.torch_dtype == torch.bfloat16 and "CPU" in on_cpu.reason
    assert choose_precision(True, None, True, True, pure_bf16=True).name == "pure_bf16"


def test_pure_bf16_is_refused_with_fp16_and_on_a_gpu_without_bf16():
    with pytest.raises(UserError, match="pure_bf16 and fp16 are both set"):
        choose_precision(None, True, True, True, pure_bf16=True)
    with pytest.raises(UserError, match="needs bfloat16, which this GPU does not support"):
        choose_precision(None, None, True, False, pure_bf16=True)


def test_fa3_maps_to_transformers_flash_attention_3_on_a_gpu():
    assert choose_attention("fa3", True, False)[0] == "flash_attention_3"
    with pytest.raises(UserError, match="fa3 needs a GPU"):
        choose_attention("fa3", False, False)


def test_fa3_refusal_names_what_to_install_or_use_instead():
    missing = flash_attention_3_refusal(on_gpu=True, installed=False)
    assert "FlashAttention-3" in missing.message and "flash_attn fa2" in missing.hint and "sdpa" in missing.hint
    assert flash_attention_3_refusal(on_gpu=True, installed=True) is None
    with pytest.raises(UserError, match="not installed"):
        check_requests(build_config({"flash_attn": "fa3"}), GPU_WITHOUT_FA3)


def test_fa3_without_a_gpu_is_refused_before_the_model_loads():
    with pytest.raises(UserError, match="fa3 needs a GPU"):
        check_requests(build_config({"flash_attn": "fa3"}), CPU)


@pytest.mark.parametrize("keys, message", [
    ({"pissa_init": True, "quantization_bit": 4}, "pissa_init cannot initialise an adapter on a quantized model"),
    ({"create_new_adapter": True, "adapter_name_or_path": "a", "quantization_bit": 4},
     "cannot be done on a quantized model"),
    ({"pissa_convert": True}, "pissa_init is off"),
    ({"loraplus_lr_ratio": 16, "fsdp": "full_shard auto_wrap"}, "loraplus_lr_ratio cannot be used with fsdp"),
])
def test_combinations_that_cannot_run_are_refused_by_validation(keys, message):
    from engine.config.validation import problems_in

    assert any(message in problem for problem in problems_in(build_config(keys), "train"))


def test_pissa_init_names_peft_s_initialisation():
    assert lora_init(build_config({}).finetune) is True
    assert lora_init(build_config({"pissa_init": True}).finetune) == "pissa_niter_16"
    assert lora_init(build_config({"pissa_init": True, "pissa_iter": -1}).finetune) == "pissa"


def test_additional_target_must_name_modules_of_the_model(tiny_models):
    model = load_model(str(tiny_models["tiny-llama"]), build_config({}), Precision("fp32", ""), "sdpa")
    assert additional_targets(model, "embed_tokens, lm_head") == ["embed_tokens", "lm_head"]
    assert additional_targets(model, None) is None
    with pytest.raises(UserError, match="additional_target wte not found"):
        additional_targets(model, "embed_tokens,wte")


@pytest.mark.parametrize("device, on_gpu, expected", [
    ("cpu", True, None), ("cpu", False, None), ("auto", True, "auto"), ("auto", False, None),
])
def test_export_device_chooses_where_the_merge_runs(device, on_gpu, expected):
    assert merge_device_map(device, on_gpu) == expected
