"""Loading the tokenizer and model (precision, attention kernel, quantization) and applying LoRA, freeze or full tuning.

The choices (``choose_precision``, ``choose_attention``) are plain functions of what was asked and what the hardware
has, so they test without a GPU; the loaders are the only places that touch transformers, peft and bitsandbytes.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import threading
from dataclasses import dataclass

from engine.config.schema import TunerConfig
from engine.errors import UserError

log = logging.getLogger("tuner")


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" | "fp16" | "fp32"
    reason: str

    @property
    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]


def choose_precision(bf16: bool | None, fp16: bool | None, on_gpu: bool, bf16_supported: bool) -> Precision:
    """What was asked, adjusted to the hardware: never a crash because bf16 was asked where it cannot run."""
    if not on_gpu:
        asked = "bf16" if bf16 else "fp16" if fp16 else None
        why = f"{asked} was asked but there is no GPU" if asked else "no GPU"
        return Precision("fp32", f"{why}: training in fp32 on the CPU")
    if fp16:
        return Precision("fp16", "fp16 as asked")
    if bf16 is False:
        return Precision("fp16", "bf16 turned off: fp16 mixed precision")
    if bf16_supported:
        return Precision("bf16", "bf16 as asked" if bf16 else "bf16: the GPU supports it")
    return Precision("fp16", "this GPU has no bf16 support: fp16 mixed precision instead")


def choose_attention(flash_attn: str, on_gpu: bool, flash_attn_installed: bool, padding_free: bool = False,
                     torch_varlen: bool = False, varlen_blocker: str | None = None) -> tuple[str, str]:
    """The transformers ``attn_implementation`` for the asked ``flash_attn`` value, and why. Padding-free rows get
    an attention that reads the sample boundaries (flash-attention, else engine.models.attention's VARLEN)."""
    from engine.models.attention import VARLEN

    if flash_attn in ("sdpa", "eager"):
        dense = ": padding-free rows use a dense block-diagonal mask" if padding_free else ""
        return flash_attn, f"{flash_attn} as asked{dense}"
    if on_gpu and flash_attn_installed:
        return "flash_attention_2", "flash-attention-2: installed and a GPU is present"
    missing = "no GPU" if not on_gpu else "the flash-attn package is not installed (pip install flash-attn)"
    if padding_free and varlen_blocker:
        return "sdpa", f"{missing}, and {VARLEN} cannot serve this model ({varlen_blocker}): padding-free rows use " \
                       "SDPA with a dense block-diagonal mask"
    if padding_free:
        kernel = ("torch's variable-length attention (torch.nn.attention.varlen)" if on_gpu and torch_varlen
                  else "SDPA per sample, no mask")
        lead = "flash attention 2 was asked but " if flash_attn == "fa2" else ""
        return VARLEN, f"{lead}{missing}: padding-free rows through {kernel}"
    if flash_attn == "fa2":
        return "sdpa", f"flash attention 2 was asked but {missing}: using PyTorch SDPA"
    return "sdpa", f"PyTorch SDPA ({missing} for flash-attention-2)"


@dataclass(frozen=True)
class Hardware:
    on_gpu: bool
    bf16_supported: bool
    flash_attn_installed: bool
    device_name: str

    @classmethod
    def detect(cls) -> "Hardware":
        import torch

        on_gpu = torch.cuda.is_available()
        return cls(
            on_gpu=on_gpu,
            bf16_supported=on_gpu and torch.cuda.is_bf16_supported(),
            flash_attn_installed=importlib.util.find_spec("flash_attn") is not None,
            device_name=torch.cuda.get_device_name() if on_gpu else "cpu",
        )


_IMPORTING = threading.Lock()


def from_transformers(*names: str) -> tuple:
    """``from transformers import names``, one thread at a time: transformers' lazy module fails ("cannot import
    name") when two threads import from it for the first time together, as the TUI's workers may."""
    with _IMPORTING:
        import transformers

        return tuple(getattr(transformers, name) for name in names)


def transformers_module(name: str):
    """``import transformers.<name>``, one thread at a time (see from_transformers)."""
    with _IMPORTING:
        return importlib.import_module(f"transformers.{name}")


def load_tokenizer(model_path: str, cfg: TunerConfig):
    """The model's tokenizer, with a pad token (eos when it has none) so batches can be padded."""
    (AutoTokenizer,) = from_transformers("AutoTokenizer")

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.model_revision,
            token=cfg.model.hf_hub_token, cache_dir=cfg.model.cache_dir,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {model_path}: {_first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(cfg: TunerConfig, precision: Precision):
    """bitsandbytes settings for QLoRA: NF4 + double quantization computing in the training dtype, or 8-bit."""
    bits = cfg.model.quantization_bit
    if bits is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("quantization_bit needs the bitsandbytes package", "pip install bitsandbytes")
    (BitsAndBytesConfig,) = from_transformers("BitsAndBytesConfig")

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.model.quantization_type,
            bnb_4bit_use_double_quant=cfg.model.double_quantization, bnb_4bit_compute_dtype=precision.torch_dtype,
            bnb_4bit_quant_storage=precision.torch_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(model_path: str, cfg: TunerConfig, precision: Precision, attention: str, device_map=None):
    """The base model as transformers loads it (safetensors only), quantized when quantization_bit is set."""
    (AutoModelForCausalLM,) = from_transformers("AutoModelForCausalLM")
    from engine.models.attention import VARLEN, register_varlen_attention

    if attention == VARLEN:
        register_varlen_attention()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=precision.torch_dtype, attn_implementation=attention,
            quantization_config=quantization_config(cfg, precision), device_map=device_map,
            trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.model_revision,
            token=cfg.model.hf_hub_token, cache_dir=cfg.model.cache_dir, use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the model from {model_path}: {_first_line(exc)}") from None
    model.config.use_cache = False  # with a KV cache transformers builds no packed mask: samples would mix
    return model


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers LoRA can wrap: every ``nn.Linear`` (quantized ones too) but the output head
    and mixture-of-experts routers (found from the model, not a hard-coded list)."""
    import torch

    head = model.get_output_embeddings()
    experts = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None)
    names = set()
    for full_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if experts and module.out_features == experts:
            continue
        names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_targets(model, lora_target: str) -> list[str]:
    available = linear_module_names(model)
    if lora_target.strip() == "all":
        return available
    from engine.memory.estimate import asked_targets

    asked, missing = asked_targets(lora_target, available)
    if missing:
        raise UserError(f"lora_target {', '.join(missing)} not found in this model",
                        f"its linear layers are: {', '.join(available)}; or use lora_target all")
    return asked


def prepare_kbit_model(model) -> None:
    """PEFT's k-bit preparation (freeze the base, upcast the weights left unquantized to fp32 for stable training),
    except for fused mixture-of-experts tensors: bitsandbytes leaves those 16-bit, and in fp32 Mixtral's experts
    alone would take 180 GB."""
    import torch

    for param in model.parameters():
        param.requires_grad = False
        fused_experts = param.ndim >= 3
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit" \
                and not fused_experts:
            param.data = param.data.to(torch.float32)


def apply_lora(model, cfg: TunerConfig, gradient_checkpointing: bool):
    """Wrap the model with PEFT LoRA (after k-bit preparation for QLoRA), or load an adapter to keep training it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    f = cfg.finetune
    if cfg.model.quantization_bit is not None:
        prepare_kbit_model(model)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    if cfg.model.adapter_name_or_path:
        return PeftModel.from_pretrained(model, cfg.model.adapter_name_or_path, is_trainable=True)
    config = LoraConfig(
        r=f.lora_rank, lora_alpha=f.lora_alpha or 2 * f.lora_rank, lora_dropout=f.lora_dropout,
        target_modules=lora_targets(model, f.lora_target), use_rslora=f.use_rslora, use_dora=f.use_dora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def freeze_pattern(num_layers: int, trainable_layers: int, modules: str) -> re.Pattern:
    """Which parameter names train under ``freeze``: the last (or, negative, first) N decoder layers' modules."""
    count = min(abs(trainable_layers), num_layers)
    ids = range(num_layers - count, num_layers) if trainable_layers > 0 else range(count)
    layer = "|".join(str(i) for i in ids)
    names = [m.strip() for m in modules.split(",") if m.strip()]
    module = ".*" if names == ["all"] else "(?:.*\\.)?(?:" + "|".join(map(re.escape, names)) + ")\\."
    return re.compile(rf"(?:^|\.)layers\.(?:{layer})\.{module}")


def apply_freeze(model, cfg: TunerConfig, gradient_checkpointing: bool):
    """Train only the chosen layers; trainable weights kept in fp32 so the optimizer updates are not lost to rounding."""
    import torch

    pattern = freeze_pattern(model.config.num_hidden_layers, cfg.finetune.freeze_trainable_layers,
                             cfg.finetune.freeze_trainable_modules)
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad = bool(pattern.search(name))
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
            trainable += 1
    if trainable == 0:
        raise UserError(f"freeze_trainable_modules {cfg.finetune.freeze_trainable_modules} matches no parameter "
                        f"of the last {cfg.finetune.freeze_trainable_layers} layers",
                        "use module names such as mlp, self_attn, or all")
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def apply_full(model):
    import torch

    for param in model.parameters():
        param.requires_grad = True
        param.data = param.data.to(torch.float32)
    return model


def apply_method(model, cfg: TunerConfig, gradient_checkpointing: bool):
    method = cfg.finetune.finetuning_type
    if method == "lora":
        return apply_lora(model, cfg, gradient_checkpointing)
    if method == "freeze":
        return apply_freeze(model, cfg, gradient_checkpointing)
    return apply_full(model)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the parameters they stand for, not their packed bytes."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2 * getattr(param, "element_size", lambda: 1)()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
