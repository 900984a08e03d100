"""LLaMA-Factory's config keys that are not tuner's own: what each becomes, or why it is refused.

LLaMA-Factory users bring their YAML files. Most of their keys are tuner's keys or Hugging Face TrainingArguments
fields and simply work; this module handles the rest, before the config is built:

- ``TRANSLATED``: keys that mean one of ours under another name or form (``disable_gradient_checkpointing: true`` is
  ``gradient_checkpointing: false``).
- ``SAME_AS_TUNER``: keys whose value, when it is LLaMA-Factory's default, describes what tuner does anyway; any other
  value is refused, because tuner would not act on it.
- ``UNSUPPORTED`` (exact names) and ``UNSUPPORTED_PREFIXES`` (families such as ``galore_*``): refused with what to use
  instead.
"""

from __future__ import annotations

from typing import Any

from engine.config.library import flag_word

SFT_ONLY = ("tuner runs supervised fine-tuning (stage sft), DPO and KTO (stages dpo, kto), reward models (stage rm) "
            "and pre-training (stage pt) only")
# The preference keys tuner's stages dpo and kto act on; the rest of LLaMA-Factory's pref_* / dpo_* / simpo_*
# family is refused with what there is.
PREFERENCE_KEYS = ("pref_beta", "pref_ftx", "pref_loss", "pref_bco_weight", "dpo_label_smoothing", "simpo_gamma",
                   "kto_chosen_weight", "kto_rejected_weight", "ld_alpha", "ref_model", "ref_model_adapters",
                   "ref_model_quantization_bit", "precompute_ref_log_probs")
PREFERENCE_LATER = ("tuner's stage dpo takes pref_beta, pref_ftx, pref_loss (sigmoid, hinge, ipo, orpo, simpo), "
                    "pref_bco_weight, dpo_label_smoothing, simpo_gamma and ld_alpha, stage kto pref_beta, "
                    "kto_chosen_weight and kto_rejected_weight, both ref_model, ref_model_adapters and "
                    "ref_model_quantization_bit")
TEXT_ONLY = "tuner trains text models; images, videos and audio are not supported"
HF_BACKEND = "tuner generates with transformers (infer_backend huggingface)"

UNSUPPORTED = {
    "use_galore": "use optim galore_adamw with optim_target_modules (transformers' own GaLore), or finetuning_type "
                  "lora",
    "use_apollo": "use finetuning_type lora, or quantization_bit 4 to save memory",
    "use_badam": "use finetuning_type freeze (train the last layers) or lora",
    "use_llama_pro": "use finetuning_type freeze or lora",
    "use_adam_mini": "choose an optim transformers knows (adamw_torch, adamw_8bit, paged_adamw_8bit, ...)",
    "use_muon": "choose an optim transformers knows (adamw_torch, adamw_8bit, paged_adamw_8bit, ...)",
    "use_mca": "use fsdp or deepspeed for large models",
    "use_kt": "use quantization_bit 4 (QLoRA) for large models",
    "use_unsloth": "tuner's padding-free batches and Liger kernels are on by default",
    "use_unsloth_gc": "use gradient_checkpointing",
    "use_dft_loss": "tuner trains with the cross-entropy of the replies",
    "use_swanlab": "use report_to swanlab",
    "use_v1_kernels": "tuner's Liger kernels are on by default on a GPU (enable_liger_kernel)",
    "shift_attn": "use rope_scaling to train past the model's context",
    "mixture_of_depths": "train the model as it is",
    "train_from_scratch": "start from a pre-trained model",
    "upcast_layernorm": "tuner keeps the norms in the training precision",
    "upcast_lmhead_output": "tuner computes the loss in float32 already",
    "resize_vocab": "the vocabulary stays the model's",
    "add_tokens": "the vocabulary stays the model's",
    "add_special_tokens": "the vocabulary stays the model's",
    "new_special_tokens_config": "the vocabulary stays the model's",
    "init_special_tokens": "the vocabulary stays the model's",
    "split_special_tokens": "special tokens written in the data become their ids",
    "use_fast_tokenizer": "tuner loads the model's fast tokenizer",
    "adapter_folder": "use adapter_name_or_path",
    "ms_hub_token": "tuner downloads from the Hugging Face hub (hf_hub_token or HF_TOKEN)",
    "om_hub_token": "tuner downloads from the Hugging Face hub (hf_hub_token or HF_TOKEN)",
    "hub_token": "set HF_TOKEN in the environment, or `hf auth login`: tokens are never written to a run's config",
    "print_param_status": "the run's train.log lists the trainable parameters",
    "quantization_device_map": "tuner places a quantized model on the GPU itself",
    "fp8": "use bf16",
    "infer_dtype": "tuner generates in the precision the model was trained in",
    "use_kv_cache": "generation uses the KV cache",
    "offload_folder": "use deepspeed with CPU offload",
    "low_cpu_mem_usage": "tuner loads weights lazily already",
    "export_hub_model_id": "push the exported folder with `hf upload`",
    "compute_accuracy": "evaluation reports the loss; predict with predict_with_generate scores answers",
    "disable_shuffling": "training order is shuffled with seed (set data_seed to fix it apart from seed)",
    "early_stopping_steps": "use save_total_limit with load_best_model_at_end and metric_for_best_model",
    "include_effective_tokens_per_second": "tuner's events record tokens_per_s",
    "freeze_vision_tower": TEXT_ONLY,
    "freeze_multi_modal_projector": TEXT_ONLY,
    "freeze_language_model": TEXT_ONLY,
    "freeze_extra_modules": "list the modules in freeze_trainable_modules, or use finetuning_type full",
    "media_dir": TEXT_ONLY,
    "crop_to_patches": TEXT_ONLY,
    "use_audio_in_video": TEXT_ONLY,
    "streaming": "tuner tokenizes the whole dataset once and caches it; use max_samples for a part",
    "buffer_size": "tuner tokenizes the whole dataset once and caches it",
    "mix_strategy": "several datasets are concatenated",
    "interleave_probs": "several datasets are concatenated",
    "preprocessing_batch_size": "use preprocessing_num_workers",
    "eval_num_beams": "use num_beams",
    "eval_on_each_dataset": "evaluation runs on all eval datasets together",
    "ignore_pad_token_for_loss": "padding is never learned",
    "neat_packing": "use packing: tuner's packed samples never attend to each other",
    "tool_format": "the template's own tool format is used",
    "finetuning_args": "write the keys at the top level of the YAML file",
    "sortish_sampler": "use train_sampling_strategy group_by_length",
    "generation_max_length": "use max_new_tokens",
    "generation_num_beams": "use num_beams",
    "generation_config": "use the generation keys (max_new_tokens, temperature, top_p, ...)",
    "length_penalty": "use repetition_penalty, or num_beams 1",
    "skip_special_tokens": "special tokens are left out of generated text",
    "enable_thinking": "choose the template: qwen3 thinks, qwen3_nothink does not",
    "resources_per_worker": "launch several processes with torchrun",
    "placement_strategy": "launch several processes with torchrun",
    "cpu_infer": "use quantization_bit 4 (QLoRA) for large models",
    "chunk_size": "use quantization_bit 4 (QLoRA) for large models",
    "export_quantization_bit": "quantize when loading instead (quantization_bit 4 or 8); exported models are 16-bit",
}

UNSUPPORTED_PREFIXES = {
    "galore_": UNSUPPORTED["use_galore"],
    "apollo_": UNSUPPORTED["use_apollo"],
    "badam_": UNSUPPORTED["use_badam"],
    "oft_": "use finetuning_type lora",
    "module_dropout": "use finetuning_type lora",
    "pref_": PREFERENCE_LATER,
    "dpo_": PREFERENCE_LATER,
    "kto_": SFT_ONLY,
    "simpo_": PREFERENCE_LATER,
    "ppo_": SFT_ONLY,
    "reward_model": SFT_ONLY,
    "swanlab_": UNSUPPORTED["use_swanlab"],
    "vllm_": HF_BACKEND,
    "sglang_": HF_BACKEND,
    "kt_": UNSUPPORTED["use_kt"],
    "ray_": "launch several processes with torchrun",
    "fp8_": UNSUPPORTED["fp8"],
    "image_": TEXT_ONLY,
    "video_": TEXT_ONLY,
    "audio_": TEXT_ONLY,
    "export_quantization_": UNSUPPORTED["export_quantization_bit"],
}

# LLaMA-Factory's defaults for keys in UNSUPPORTED that describe what tuner does anyway: given with this value, the
# key is accepted (and has nothing to do); given with another, it is refused.
SAME_AS_TUNER = {
    "use_galore": False, "use_apollo": False, "use_badam": False, "use_llama_pro": False, "use_adam_mini": False,
    "use_muon": False, "use_mca": False, "use_kt": False, "use_unsloth": False, "use_unsloth_gc": False,
    "use_dft_loss": False, "use_swanlab": False, "use_v1_kernels": False, "shift_attn": False,
    "mixture_of_depths": None, "train_from_scratch": False, "upcast_layernorm": False, "upcast_lmhead_output": False,
    "resize_vocab": False, "add_tokens": None, "add_special_tokens": None, "new_special_tokens_config": None,
    "split_special_tokens": False, "use_fast_tokenizer": True, "adapter_folder": None, "ms_hub_token": None,
    "om_hub_token": None, "print_param_status": False, "quantization_device_map": None, "fp8": False,
    "infer_dtype": "auto", "use_kv_cache": True, "low_cpu_mem_usage": True, "export_hub_model_id": None,
    "compute_accuracy": False, "disable_shuffling": False, "early_stopping_steps": None,
    "include_effective_tokens_per_second": False, "freeze_vision_tower": True, "freeze_multi_modal_projector": True,
    "freeze_language_model": False, "freeze_extra_modules": None, "media_dir": None, "streaming": False,
    "mix_strategy": "concat", "interleave_probs": None, "eval_num_beams": None, "eval_on_each_dataset": False,
    "ignore_pad_token_for_loss": True, "neat_packing": False, "tool_format": None, "sortish_sampler": False,
    "generation_max_length": None, "generation_num_beams": None, "generation_config": None, "length_penalty": 1.0,
    "skip_special_tokens": True, "export_quantization_bit": None, "image_do_pan_and_scan": False,
    "crop_to_patches": False, "use_audio_in_video": False, "hub_token": None, "enable_thinking": True,
}

# Keys that mean one of tuner's (or a TrainingArguments field) in another form: see _translate_one.
TRANSLATED = ("disable_gradient_checkpointing", "use_reentrant_gc", "moe_aux_loss_coef")

QUANTIZATION_METHODS = {"bnb": "bnb", "bitsandbytes": "bnb"}
OTHER_QUANTIZATION = ("gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4")


def translate(values: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """``values`` with LLaMA-Factory's own keys turned into tuner's, or removed with a line in ``problems``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        handled = _translate_one(key, value, out)
        if handled is None:
            out.pop(key, None)
            out[key] = value  # later keys win, translated or not
        elif handled:
            problems.append(handled)
    return out


def _translate_one(key: str, value: Any, out: dict[str, Any]) -> str | None | bool:
    """None: not LLaMA-Factory's own, keep it; False: translated into ``out``; text: the problem to report."""
    if key == "disable_gradient_checkpointing":
        flag = flag_word(value)
        if flag is None:
            return f"disable_gradient_checkpointing: expected true or false, got {value!r}"
        if flag:
            out["gradient_checkpointing"] = False
        return False
    if key == "use_reentrant_gc":
        flag = flag_word(value)
        if flag is None:
            return f"use_reentrant_gc: expected true or false, got {value!r}"
        out.pop("gradient_checkpointing_kwargs", None)
        out["gradient_checkpointing_kwargs"] = {"use_reentrant": flag}
        return False
    if key == "moe_aux_loss_coef":
        out["router_aux_loss_coef"] = value
        return False
    if key == "quantization_method":
        method = str(value).lower()
        if method in QUANTIZATION_METHODS:
            out[key] = QUANTIZATION_METHODS[method]
            return False
        if method in OTHER_QUANTIZATION:
            return (f"LLaMA-Factory's quantization_method {method} is not supported by tuner: quantization_bit "
                    "4 or 8 quantizes with bitsandbytes (quantization_method bnb)")
        return None
    if key == "infer_backend" and str(value).lower() in ("vllm", "sglang", "ktransformers"):
        return f"LLaMA-Factory's infer_backend {value} is not supported by tuner: {HF_BACKEND}"
    if key in PREFERENCE_KEYS:
        return None  # tuner's own keys (engine.config.schema)
    if key == "finetuning_type" and str(value).lower() == "oft":
        return "LLaMA-Factory's finetuning_type oft is not supported by tuner: use finetuning_type lora"
    instead = UNSUPPORTED.get(key) or next(
        (text for prefix, text in UNSUPPORTED_PREFIXES.items() if key.startswith(prefix)), None)
    if instead is None:
        return None
    if key in SAME_AS_TUNER and _same(value, SAME_AS_TUNER[key]):
        return False  # LLaMA-Factory's default: what tuner does anyway
    shown = f" {value}" if key in SAME_AS_TUNER and not isinstance(SAME_AS_TUNER[key], bool) else ""
    return f"LLaMA-Factory's {key}{shown} is not supported by tuner: {instead}"


def _same(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return flag_word(value) is default
    if default is None:
        return value is None or str(value).lower() in ("null", "none", "~", "")
    if isinstance(default, float):
        try:
            return float(value) == default
        except (TypeError, ValueError):
            return False
    return str(value) == str(default)
