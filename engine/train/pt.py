"""Continued pre-training, a stage on the shared runner (engine.train.runner): raw text joined and cut into blocks
of cutoff_len tokens as LLaMA-Factory does (engine.data.texts), every token learned, through the supervised stage's
trainer (TRL's SFTTrainer taking the blocks as they are)."""

from __future__ import annotations

from engine.config.schema import TunerConfig
from engine.train.sft import trainer
from engine.train.stage import Stage


def datasets(cfg: TunerConfig, tokenizer, catalog_template: str | None, stop_wait):
    from engine.data.texts import build_text_datasets

    return build_text_datasets(cfg, tokenizer, catalog_template, stop_wait)


PT = Stage("pt", datasets, trainer)
