"""A trained model ready to generate: base (quantized again for a QLoRA adapter) + adapter, the template it was
trained with, and batched, left-padded generation that stops at the template's stop words. Predict, chat and the
export's check all load through here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from engine.config.schema import TunerConfig
from engine.errors import UserError
from engine.rundir.layout import CONFIG

log = logging.getLogger("tuner")


@dataclass
class Inference:
    model: object
    tokenizer: object
    template: str
    device: str
    reward: bool = False  # a reward model: it scores conversations and generates nothing


def trained_template(run_dir: str | None) -> str | None:
    """The template a tuner run was trained with, from its config.yaml, so predict and chat format prompts alike."""
    if not run_dir:
        return None
    from engine.config.schema import read_config_file

    path = Path(run_dir.split(",")[-1].strip()) / CONFIG
    template = read_config_file(path).get("template") if path.is_file() else None
    return template if isinstance(template, str) else None


def load_for_inference(cfg: TunerConfig, scoring: bool = False) -> Inference:
    """The base model (quantized again when quantization_bit is set), the adapters on top, in eval mode. A reward
    model (a stage rm run's) loads with its score head when ``scoring``; for generation it is refused in one line."""
    from engine.models.resolve import resolve_configured
    from engine.data.tokenize import choose_template
    from engine.models.loading import (Hardware, check_attention, choose_attention, choose_precision,
                                       is_reward_model, load_adapters, load_model, load_tokenizer)

    resolved = resolve_configured(cfg.model)
    reward = is_reward_model(resolved.path, cfg.model.adapter_name_or_path, cfg.model)
    if reward and not scoring:
        raise UserError(f"{cfg.model.adapter_name_or_path or resolved.path} is a reward model (stage rm): it scores "
                        "replies and writes none", "score ranking pairs with it: tuner predict --run RUN")
    hardware = Hardware.detect()
    check_attention(cfg, hardware)
    precision = choose_precision(cfg.train.bf16, cfg.train.fp16, hardware.on_gpu, hardware.bf16_supported,
                                 cfg.train.pure_bf16)
    attention, _ = choose_attention(cfg.model.flash_attn, hardware.on_gpu, hardware.flash_attn_installed)
    tokenizer = load_tokenizer(resolved.path, cfg)
    tokenizer.padding_side = "left"
    device_map = {"": 0} if hardware.on_gpu else None
    model = load_model(resolved.path, cfg, precision, attention, device_map, reward=reward)
    if reward:
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # the score head: last token
    model = load_adapters(model, cfg.model.adapter_name_or_path, cfg.model.quantization_bit is not None)
    model.eval()
    if cfg.model.template is None:  # a tuner run (adapter, or a full / freeze output) knows its template
        cfg.model.template = trained_template(cfg.model.adapter_name_or_path) or trained_template(resolved.path)
    template = choose_template(cfg, tokenizer, resolved.spec.template if resolved.spec else None)
    return Inference(model, tokenizer, template, "cuda" if hardware.on_gpu else "cpu", reward)


def prompt_text(inference: Inference, messages: list[dict]) -> str:
    """The conversation so far, rendered through the template up to where the assistant's reply begins."""
    from engine.templates import get_template, render_text

    return render_text(get_template(inference.template), messages, inference.tokenizer, add_generation_prompt=True)


def generation_kwargs(cfg: TunerConfig, inference: Inference) -> dict:
    """Greedy unless do_sample; stops at eos and at the template's stop words."""
    from engine.templates import get_template

    g = cfg.generate
    kwargs = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample, "num_beams": g.num_beams,
              "repetition_penalty": g.repetition_penalty, "pad_token_id": inference.tokenizer.pad_token_id,
              "eos_token_id": inference.tokenizer.eos_token_id}
    if g.do_sample:
        kwargs.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    stops = list(get_template(inference.template).stop_words)
    if stops:
        kwargs.update(stop_strings=stops, tokenizer=inference.tokenizer)
    return kwargs


def generate(inference: Inference, conversations: list[list[dict]], kwargs: dict) -> list[str]:
    """One reply per conversation, generated as a left-padded batch; the stop words are cut from the text."""
    import torch

    tokenizer = inference.tokenizer
    prompts = [prompt_text(inference, messages) for messages in conversations]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(inference.model.device)
    with torch.inference_mode():
        output = inference.model.generate(**batch, **kwargs)
    replies = []
    stops = kwargs.get("stop_strings") or []
    for row in output[:, batch["input_ids"].shape[1]:]:
        text = tokenizer.decode(row, skip_special_tokens=True)
        for stop in stops:
            text = text.split(stop)[0]
        replies.append(text.strip())
    return replies
