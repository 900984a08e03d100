"""Loading the tokenizer and model (precision, attention kernel, quantization) and applying LoRA, freeze or full tuning.

The choices (``choose_precision``, ``choose_attention``) are plain functions of what was asked and what the hardware
has, so they test without a GPU; the loaders are the only places that touch transformers, peft and bitsandbytes.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.config.schema import TunerConfig
from engine.errors import UserError

log = logging.getLogger("tuner")


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" | "fp16" | "fp32" | "pure_bf16" (bfloat16 weights, no mixed precision)
    reason: str

    @property
    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16, "fp16": torch.float16,
                "fp32": torch.float32}[self.name]


def choose_precision(bf16: bool | None, fp16: bool | None, on_gpu: bool, bf16_supported: bool,
                     pure_bf16: bool = False) -> Precision:
    """What was asked, adjusted to the hardware: never a crash because bf16 was asked where it cannot run. Only
    ``pure_bf16`` is refused where bfloat16 cannot run (a GPU without it), since it changes what is trained."""
    if pure_bf16:
        return _pure_bf16(fp16, on_gpu, bf16_supported)
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


def _pure_bf16(fp16: bool | None, on_gpu: bool, bf16_supported: bool) -> Precision:
    if fp16:
        raise UserError("pure_bf16 and fp16 are both set: pure_bf16 trains in bfloat16 without mixed precision",
                        "drop fp16, or drop pure_bf16 for fp16 mixed precision")
    if on_gpu and not bf16_supported:
        raise UserError("pure_bf16 needs bfloat16, which this GPU does not support",
                        "drop pure_bf16 (fp16 mixed precision is used instead)")
    where = "" if on_gpu else " on the CPU"
    return Precision("pure_bf16", f"pure_bf16: weights and training in bfloat16{where}, no mixed precision")


def choose_attention(flash_attn: str, on_gpu: bool, flash_attn_installed: bool, padding_free: bool = False,
                     torch_varlen: bool = False, varlen_blocker: str | None = None) -> tuple[str, str]:
    """The transformers ``attn_implementation`` for the asked ``flash_attn`` value, and why. Padding-free rows get
    an attention that reads the sample boundaries (flash-attention, else engine.models.attention's VARLEN)."""
    from engine.models.attention import VARLEN

    if flash_attn in ("sdpa", "eager"):
        dense = ": padding-free rows use a dense block-diagonal mask" if padding_free else ""
        return flash_attn, f"{flash_attn} as asked{dense}"
    if flash_attn == "fa3":  # check_requests has refused it where the package is missing
        if not on_gpu:
            raise flash_attention_3_refusal(on_gpu=False, installed=False)
        return "flash_attention_3", "flash-attention-3 as asked"
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


def flash_attention_3_refusal(on_gpu: bool, installed: bool) -> UserError | None:
    """Why ``flash_attn fa3`` cannot run here, or None: it needs a GPU and the FlashAttention-3 package."""
    if not on_gpu:
        return UserError("flash_attn fa3 needs a GPU, and there is none", "use flash_attn sdpa (or auto)")
    if not installed:
        return UserError("flash_attn fa3 needs FlashAttention-3 (the flash_attn_interface module), which is not "
                         "installed", "build it from flash-attention's hopper/ directory for a Hopper GPU, or use "
                         "flash_attn fa2 (pip install flash-attn) or sdpa")
    return None


@dataclass(frozen=True)
class Hardware:
    on_gpu: bool
    bf16_supported: bool
    flash_attn_installed: bool
    device_name: str
    flash_attn3_installed: bool = False

    @classmethod
    def detect(cls) -> "Hardware":
        import torch

        on_gpu = torch.cuda.is_available()
        return cls(
            on_gpu=on_gpu,
            bf16_supported=on_gpu and torch.cuda.is_bf16_supported(),
            flash_attn_installed=importlib.util.find_spec("flash_attn") is not None,
            device_name=torch.cuda.get_device_name() if on_gpu else "cpu",
            flash_attn3_installed=importlib.util.find_spec("flash_attn_interface") is not None,
        )


def check_attention(cfg: TunerConfig, hardware: Hardware) -> None:
    """Refuse flash_attn fa3 where it cannot run, before any model loads."""
    if cfg.model.flash_attn == "fa3":
        refusal = flash_attention_3_refusal(hardware.on_gpu, hardware.flash_attn3_installed)
        if refusal:
            raise refusal


def check_requests(cfg: TunerConfig, hardware: Hardware) -> None:
    """Refuse, before any model loads, what this machine cannot do (the config's own collisions are validation's)."""
    from engine.hardware import check_machine

    check_attention(cfg, hardware)
    check_machine(cfg.train.strategy, hardware.on_gpu)


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


def rope_parameters(rope_scaling: str, current: dict, cutoff_len: int,
                    max_positions: int | None) -> tuple[dict, int] | None:
    """LLaMA-Factory's RoPE stretch: the model config's new ``rope_parameters`` and ``max_position_embeddings`` for
    samples of ``cutoff_len`` tokens, factor ceil(cutoff_len / max_position_embeddings); None when they fit. Dynamic
    NTK keeps the model's length, from which it scales at run time."""
    if not max_positions or cutoff_len <= max_positions:
        return None
    params = {**current, "rope_type": rope_scaling, "factor": float(math.ceil(cutoff_len / max_positions))}
    if rope_scaling in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = max_positions
    if rope_scaling == "llama3":
        params.update(LLAMA3_ROPE)
    return params, max_positions if rope_scaling == "dynamic" else cutoff_len


LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama 3.1's own values


def model_config(model_path: str, cfg: TunerConfig):
    """The model's config with ``rope_scaling`` applied (transformers 5's ``rope_parameters``); None when nothing
    changes, so the model loads its own."""
    if cfg.model.rope_scaling is None:
        return None
    (AutoConfig,) = from_transformers("AutoConfig")
    m = cfg.model
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=m.trust_remote_code,
                                            revision=m.model_revision, token=m.hf_hub_token, cache_dir=m.cache_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the model's config from {model_path}: {_first_line(exc)}") from None
    current = getattr(config, "rope_parameters", None)
    if not isinstance(current, dict) or not current or "rope_type" not in current:
        log.warning("rope_scaling %s ignored: this model's config has no single RoPE setting to stretch",
                    m.rope_scaling)
        return None
    positions = getattr(config, "max_position_embeddings", None)
    stretched = rope_parameters(m.rope_scaling, current, cfg.data.cutoff_len, positions)
    if stretched is None:
        log.info("rope scaling: none needed, cutoff_len %d fits the model's %s positions", cfg.data.cutoff_len,
                 positions)
        return None
    config.rope_parameters, config.max_position_embeddings = stretched
    config.validate_rope()
    log.info("rope scaling: %s, factor %s, for cutoff_len %d over the model's %d positions%s", m.rope_scaling,
             config.rope_parameters["factor"], cfg.data.cutoff_len, positions,
             " (dynamic NTK may not suit fine-tuning: transformers PR 24653)" if m.rope_scaling == "dynamic" else "")
    return config


def load_model(model_path: str, cfg: TunerConfig, precision: Precision, attention: str, device_map=None,
               reward: bool = False):
    """The base model as transformers loads it (safetensors only), quantized when quantization_bit is set, its RoPE
    stretched when rope_scaling asks for it. ``reward``: as a reward model, the language model's decoder under a
    one-output score head (transformers' *ForSequenceClassification, num_labels 1, as TRL's RewardTrainer trains it);
    the head starts random unless the checkpoint is a reward model already."""
    from engine.models.attention import VARLEN, register_varlen_attention

    if attention == VARLEN:
        register_varlen_attention()
    config = model_config(model_path, cfg)
    architecture = reward_architecture(model_path, cfg.model)
    if architecture and not reward:
        raise UserError(f"{model_path} is a reward model ({architecture}): it scores replies and writes none",
                        "train stage rm on it, or start from a language model")
    kwargs = dict(config=config, dtype=precision.torch_dtype, attn_implementation=attention,
                  quantization_config=quantization_config(cfg, precision), device_map=device_map,
                  trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.model_revision,
                  token=cfg.model.hf_hub_token, cache_dir=cfg.model.cache_dir, use_safetensors=True)
    try:
        with loading_experts(cfg):
            if reward:
                (AutoModel,) = from_transformers("AutoModelForSequenceClassification")
                from trl.trainer.reward_trainer import suppress_seqcls_warning

                with suppress_seqcls_warning():  # the language model's head unused, the score head new: as intended
                    model = AutoModel.from_pretrained(model_path, num_labels=1, **kwargs)
            else:
                (AutoModel,) = from_transformers("AutoModelForCausalLM")
                model = AutoModel.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the model from {model_path}: {_first_line(exc)}") from None
    model.config.use_cache = False  # with a KV cache transformers builds no packed mask: samples would mix
    quantize_experts(model, cfg)
    return model


REWARD_SUFFIX = "ForSequenceClassification"  # transformers' class of a model with a score head


def reward_architecture(model_path: str, model=None) -> str | None:
    """The architecture a model's config.json names when it is a reward model (a stage rm run's full or freeze
    output, or one exported or on the hub), else None. A hub id not downloaded yet is asked for its config.json alone
    (``model``: the config's model section, for its revision, token and cache)."""
    import json

    config = Path(model_path) / "config.json"
    if not config.is_file():
        if Path(model_path).expanduser().exists():
            return None
        from transformers.utils import cached_file

        try:
            found = cached_file(model_path, "config.json", revision=getattr(model, "model_revision", None),
                                token=getattr(model, "hf_hub_token", None), cache_dir=getattr(model, "cache_dir", None))
        except (OSError, ValueError):
            return None
        if found is None:
            return None
        config = Path(found)
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (ValueError, OSError, AttributeError):
        return None
    return next((name for name in architectures if isinstance(name, str) and name.endswith(REWARD_SUFFIX)), None)


def reward_adapter(path: str) -> bool:
    """Whether a LoRA adapter was trained for a reward model (PEFT's task SEQ_CLS: its score head saved with it)."""
    import json

    config = Path(path) / "adapter_config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("task_type") == "SEQ_CLS"
    except (ValueError, OSError, AttributeError):
        return False


def is_reward_model(model_path: str, adapters: str | None, model=None) -> bool:
    """Whether a trained model is a reward model: its last adapter is one (a LoRA stage rm run), or the model itself
    (a full or freeze one, or a reward model from the hub; ``model``: the config's model section)."""
    last = [p.strip() for p in (adapters or "").split(",") if p.strip()][-1:]
    return reward_adapter(last[0]) if last else reward_architecture(model_path, model) is not None


def scores(model) -> bool:
    """Whether a loaded model (PEFT-wrapped or not) is a reward model with a score head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith(REWARD_SUFFIX)


def loading_experts(cfg: TunerConfig):
    """What the model loads within: under quantization_bit 4, fused mixture-of-experts weights (which bitsandbytes'
    nn.Linear swap skips) quantized as they load, one at a time, so the whole model's experts are never on the GPU in
    16-bit (engine.models.moe_quant)."""
    import contextlib

    from engine.models import moe_quant

    return moe_quant.quantizing_experts_while_loading() if cfg.model.quantization_bit == 4 else \
        contextlib.nullcontext()


def quantize_experts(model, cfg: TunerConfig) -> None:
    """Once loaded, the fused mixture-of-experts weights: under quantization_bit 4, any the load left in 16-bit
    quantized too and all of them reported; under 8-bit, left in the load dtype and said so."""
    from engine.models import moe_quant

    experts = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None)
    if cfg.model.quantization_bit == 4 and experts and cfg.train.strategy.startswith(("fsdp", "zero3")):
        raise UserError(f"QLoRA 4-bit quantizes this model's fused expert weights on each process, which strategy "
                        f"{cfg.train.strategy} shards (or holds on one process only) as it loads",
                        "use strategy ddp or zero2 with quantization_bit 4, or LoRA (16-bit) under "
                        f"{cfg.train.strategy}")
    if cfg.model.quantization_bit == 4:
        moe_quant.quantize_fused_experts(model, cfg.model.quantization_type, cfg.model.double_quantization)
    elif cfg.model.quantization_bit == 8:
        moe_quant.note_unquantized_experts(model)


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers LoRA can wrap: every ``nn.Linear`` (quantized ones too) but the output head
    (a reward model's score head) and mixture-of-experts routers (found from the model, not a hard-coded list)."""
    import torch

    head = model.get_output_embeddings() if not scores(model) else getattr(model, "score", None)  # trains whole
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
    except for fused mixture-of-experts tensors: 16-bit under 8-bit (in fp32 Mixtral's experts alone would take
    180 GB), packed 4-bit storage under 4-bit (engine.models.moe_quant)."""
    import torch

    for param in model.parameters():
        param.requires_grad = False
        fused_experts = param.ndim >= 3
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit" \
                and not fused_experts:
            param.data = param.data.to(torch.float32)


def apply_lora(model, cfg: TunerConfig, gradient_checkpointing: bool):
    """Wrap the model with PEFT LoRA (after k-bit preparation for QLoRA). With adapter_name_or_path, as in
    LLaMA-Factory: all but the last given adapter are merged into the base and the last trains further, or, with
    create_new_adapter, all are merged and a new adapter trains on top. A reward model trains a language model's
    adapter (an SFT run's) no further: it is merged, and a new adapter trains with the score head."""
    from peft import PeftModel, get_peft_model

    if cfg.model.quantization_bit is not None:
        prepare_kbit_model(model)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    adapters, resume = adapters_trained_on(cfg.model.adapter_name_or_path, cfg.finetune.create_new_adapter,
                                           scores(model))
    if adapters and scores(model) and not resume:
        log.info("stage rm: the given adapters are merged and a new one trains with the score head (a language "
                 "model's adapter has no head to train further)")
    if adapters:
        model = _merge_adapters(model, adapters, cfg.model.quantization_bit is not None)
    if resume:
        check_adapter_task(model, resume)
        log.info("training the adapter %s further (create_new_adapter false)", resume)
        model = PeftModel.from_pretrained(model, resume, is_trainable=True)
    else:
        if adapters:
            log.info("training a new adapter over the merged %s: predict and export with adapter_name_or_path "
                     "%s,<this run>", ",".join(adapters), ",".join(adapters))
        model = get_peft_model(model, lora_config(model, cfg), autocast_adapter_dtype=not cfg.train.pure_bf16)
    if not cfg.train.pure_bf16:
        whole_modules_in_fp32(model)
    return model


def whole_modules_in_fp32(model) -> None:
    """Modules trained whole beside LoRA (additional_target, a reward model's score head) in fp32, as PEFT keeps the
    LoRA matrices (autocast_adapter_dtype) and tuner the weights of a full fine-tune: PEFT copies them in the load
    dtype, where an optimizer loses small updates to bfloat16's rounding and fp16 gradients cannot be unscaled.
    Also after TRL, which casts a quantized model's trainable weights to bfloat16: a plain layer, unlike LoRA's,
    does not cast its input to match."""
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" not in name and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.to(torch.float32)


def adapters_trained_on(given: str | None, create_new_adapter: bool, reward: bool) -> tuple[list[str], str | None]:
    """What a run makes of adapter_name_or_path: the adapters it merges into its base, and the one it trains further
    (None: a new one). The last trains further unless create_new_adapter, or a reward model is given a language
    model's adapter (no head to train on). A follow-up of the run loads the merged ones, then the run's own."""
    adapters = [p.strip() for p in (given or "").split(",") if p.strip()]
    continues = not create_new_adapter and (not reward or bool(adapters) and reward_adapter(adapters[-1]))
    if adapters and continues:
        return adapters[:-1], adapters[-1]
    return adapters, None


def _merge_adapters(model, adapters: list[str], quantized: bool):
    merged = load_adapters(model, ",".join(adapters), quantized).merge_and_unload()
    log.info("merged %d adapter(s) into the base: %s", len(adapters), ",".join(adapters))
    return merged


def load_adapters(model, adapters: str | None, quantized: bool):
    """Apply a comma list of LoRA adapters: all but the last merged in (into a quantized base's weights too, as a
    run that merged them trained on), the last kept."""
    if not adapters:
        return model
    from peft import PeftModel

    paths = [p.strip() for p in adapters.split(",") if p.strip()]
    if quantized and len(paths) > 1:
        log.info("merging %s into the quantized base, as the run trained on it", ",".join(paths[:-1]))
    for index, path in enumerate(paths):
        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"{path} is not a LoRA adapter (no adapter_config.json)",
                            "a freeze or full fine-tune output is a whole model: pass it as model_name_or_path")
        check_adapter_task(model, path)
        try:
            model = PeftModel.from_pretrained(model, path, config=_lm_adapter_on_reward_model(model, path))
        except RuntimeError as exc:
            if "size mismatch" not in str(exc):
                raise
            raise UserError(f"the adapter {path} was trained on another base model than "
                            f"{getattr(model, 'name_or_path', 'this one')} (its weight shapes differ)",
                            "pass the base it was trained on as model_name_or_path (see its adapter_config.json)"
                            ) from None
        if index < len(paths) - 1:
            model = model.merge_and_unload()
    return model


def check_adapter_task(model, path: str) -> None:
    """A reward model's adapter (its score head with it) goes on a reward model only."""
    if reward_adapter(path) and not scores(model):
        raise UserError(f"the adapter {path} is a reward model's (stage rm): it scores replies and writes none",
                        "train stage rm on it, or give a language model's adapter")


def _lm_adapter_on_reward_model(model, path: str):
    """A language model's adapter (an SFT run's) on a reward model, to be merged into its decoder: its config without
    the task, which would wrap the model for generation; None otherwise (the adapter's own config)."""
    if not scores(model) or reward_adapter(path):
        return None
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(path)
    config.task_type = None
    return config


def lora_config(model, cfg: TunerConfig):
    """PEFT's LoraConfig from our keys: PiSSA initialisation and fully trained extra modules included."""
    from peft import LoraConfig

    f = cfg.finetune
    return LoraConfig(
        r=f.lora_rank, lora_alpha=f.lora_alpha or 2 * f.lora_rank, lora_dropout=f.lora_dropout,
        target_modules=lora_targets(model, f.lora_target), use_rslora=f.use_rslora, use_dora=f.use_dora,
        modules_to_save=additional_targets(model, f.additional_target), init_lora_weights=lora_init(f),
        task_type="SEQ_CLS" if scores(model) else "CAUSAL_LM",  # SEQ_CLS: the score head trains whole, saved with it
    )


def lora_init(f) -> bool | str:
    """PEFT's ``init_lora_weights``: the default, or PiSSA by exact SVD (pissa_iter -1) or N fast-SVD iterations."""
    if not f.pissa_init:
        return True
    return "pissa" if f.pissa_iter == -1 else f"pissa_niter_{f.pissa_iter}"


def additional_targets(model, additional_target: str | None) -> list[str] | None:
    """The modules trained in full and saved with the adapter (PEFT's modules_to_save), checked against the model."""
    asked = [name.strip() for name in (additional_target or "").split(",") if name.strip()]
    if not asked:
        return None
    available = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    missing = [name for name in asked if name not in available]
    if missing:
        raise UserError(f"additional_target {', '.join(missing)} not found in this model",
                        "name modules as the model does, e.g. embed_tokens,lm_head")
    return asked


def freeze_pattern(num_layers: int, trainable_layers: int, modules: str) -> re.Pattern:
    """Which parameter names train under ``freeze``: the last (or, negative, first) N decoder layers' modules."""
    count = min(abs(trainable_layers), num_layers)
    ids = range(num_layers - count, num_layers) if trainable_layers > 0 else range(count)
    layer = "|".join(str(i) for i in ids)
    names = [m.strip() for m in modules.split(",") if m.strip()]
    module = ".*" if names == ["all"] else "(?:.*\\.)?(?:" + "|".join(map(re.escape, names)) + ")\\."
    return re.compile(rf"(?:^|\.)layers\.(?:{layer})\.{module}")


def apply_freeze(model, cfg: TunerConfig, gradient_checkpointing: bool):
    """Train only the chosen layers (and a reward model's score head); trainable weights kept in fp32 so the optimizer
    updates are not lost to rounding (in bfloat16 under pure_bf16)."""
    import torch

    pattern = freeze_pattern(model.config.num_hidden_layers, cfg.finetune.freeze_trainable_layers,
                             cfg.finetune.freeze_trainable_modules)
    trainable, head = 0, scores(model)
    for name, param in model.named_parameters():
        in_layers = bool(pattern.search(name))
        param.requires_grad = in_layers or (head and name.startswith("score."))
        if param.requires_grad and not cfg.train.pure_bf16:
            param.data = param.data.to(torch.float32)
        trainable += in_layers
    if trainable == 0:
        raise UserError(f"freeze_trainable_modules {cfg.finetune.freeze_trainable_modules} matches no parameter "
                        f"of the last {cfg.finetune.freeze_trainable_layers} layers",
                        "use module names such as mlp, self_attn, or all")
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def apply_full(model, pure_bf16: bool = False):
    """Train every weight, in fp32 (in bfloat16 under pure_bf16)."""
    import torch

    for param in model.parameters():
        param.requires_grad = True
        if not pure_bf16:
            param.data = param.data.to(torch.float32)
    return model


def apply_method(model, cfg: TunerConfig, gradient_checkpointing: bool):
    method = cfg.finetune.finetuning_type
    if method == "lora":
        return apply_lora(model, cfg, gradient_checkpointing)
    if method == "freeze":
        return apply_freeze(model, cfg, gradient_checkpointing)
    return apply_full(model, cfg.train.pure_bf16)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the parameters they stand for, not their packed bytes."""
    from engine.models.moe_quant import quant_state, quantized_parameters

    packed_experts = quantized_parameters(model) if getattr(model.config, "quantization_config", None) else {}
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2 * getattr(param, "element_size", lambda: 1)()
        elif id(param) in packed_experts:
            n = math.prod(quant_state(*packed_experts[id(param)]).shape)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
