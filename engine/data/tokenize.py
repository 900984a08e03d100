"""Conversations to token ids and labels through the chosen template: what the trainer and the preview both see."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from engine.config.schema import TunerConfig
from engine.data.loaders import load_conversations
from engine.errors import UserError
from engine.templates import IGNORE_INDEX, AUTO, NoLearnedTokens, encode, get_template, template_mismatch

log = logging.getLogger("tuner")


def choose_template(cfg: TunerConfig, tokenizer, catalog_template: str | None = None) -> str:
    """The asked template, else the catalog's for this model, else the tokenizer's own, else ``default``."""
    if cfg.model.template:
        return cfg.model.template
    if catalog_template:
        return catalog_template
    return AUTO if getattr(tokenizer, "chat_template", None) else "default"


@dataclass
class Encoded:
    rows: list[dict]
    dropped: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0


def encode_conversations(conversations: list[dict], tokenizer, template_name: str, cutoff_len: int,
                         train_on_prompt: bool = False) -> Encoded:
    """``{"input_ids", "labels"}`` rows; conversations whose replies lie beyond cutoff_len are dropped and counted."""
    template = get_template(template_name)
    encoded = Encoded(rows=[])
    for conversation in conversations:
        try:
            sample = encode(tokenizer, template, conversation["messages"])
        except NoLearnedTokens:
            encoded.dropped["no reply to learn"] += 1
            continue
        encoded.lengths.append(len(sample.input_ids))
        first_learned = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
        if first_learned >= cutoff_len:
            encoded.dropped[f"the reply beyond cutoff_len={cutoff_len}"] += 1
            continue
        encoded.truncated += len(sample.input_ids) > cutoff_len
        ids = sample.input_ids[:cutoff_len]
        labels = list(ids) if train_on_prompt else sample.labels[:cutoff_len]
        encoded.rows.append({"input_ids": ids, "labels": labels})
    return encoded


@dataclass
class TrainingData:
    train: object  # datasets.Dataset
    eval: object | None
    template: str
    report: list[str]


def build_datasets(cfg: TunerConfig, tokenizer, catalog_template: str | None = None) -> TrainingData:
    """Load, render and tokenize the configured datasets into ``datasets.Dataset`` objects TRL trains on as they are."""
    from datasets import Dataset

    d = cfg.data
    loaded = load_conversations(d.dataset, d.dataset_dir, max_samples=d.max_samples, val_size=d.val_size,
                                eval_dataset=d.eval_dataset, seed=cfg.train.seed)
    template = choose_template(cfg, tokenizer, catalog_template)
    report = list(loaded.report.lines())
    warning = template_mismatch(get_template(template), tokenizer) if template != AUTO else None
    if warning:
        log.warning(warning)
    train = encode_conversations(loaded.train, tokenizer, template, d.cutoff_len, d.train_on_prompt)
    report.append(_summary("train", template, train, d.cutoff_len))
    if not train.rows:
        raise UserError(f"no training sample is left after tokenization ({_drops(train)})",
                        "raise cutoff_len or check the dataset's replies")
    evaluation = None
    if loaded.eval:
        encoded_eval = encode_conversations(loaded.eval, tokenizer, template, d.cutoff_len, d.train_on_prompt)
        report.append(_summary("eval", template, encoded_eval, d.cutoff_len))
        evaluation = Dataset.from_list(encoded_eval.rows) if encoded_eval.rows else None
    return TrainingData(Dataset.from_list(train.rows), evaluation, template, report)


def _summary(split: str, template: str, encoded: Encoded, cutoff_len: int) -> str:
    text = f"{split}: {len(encoded.rows)} samples tokenized with template {template}"
    if encoded.truncated:
        text += f"; {encoded.truncated} longer than cutoff_len={cutoff_len} were truncated"
    drops = _drops(encoded)
    return text + (f"; {drops}" if drops else "")


def _drops(encoded: Encoded) -> str:
    return "; ".join(f"dropped {count} with {reason}" for reason, count in encoded.dropped.items())
