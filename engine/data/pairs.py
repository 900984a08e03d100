"""Preference data to token ids, as LLaMA-Factory's pairwise and feedback processors make them.

A pair (stage dpo): the prompt (every turn before the last reply, through the template) and the chosen and rejected
replies, each reply closed as the template closes a turn; the three cut together to cutoff_len (``infer_seqlen`` of
the prompt and the longer reply). Rows of ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, as TRL's DPOTrainer
trains on them.

A feedback sample (stage kto): the prompt and the last reply, marked desirable or not (LLaMA-Factory's kto_tag), cut
the same way. Rows of ``prompt_ids``, ``completion_ids``, ``label``, as TRL's KTOTrainer trains on them.

tuner renders and tokenizes the data itself, as for supervised fine-tuning, so a sample is cut and templated as
LLaMA-Factory would.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from engine.config.schema import TunerConfig
from engine.data.loaders import load_conversations
from engine.data.stats import Lengths
from engine.data.tokenize import (PreparationStopped, TrainingData, cached, choose_template, samples_key,
                                  training_template, write_meta)
from engine.templates import AUTO, encode_many, get_template, infer_seqlen, template_mismatch

log = logging.getLogger("tuner")

BATCH = 1000  # pairs tokenized in one call between looks for a stop


def encode_pairs(pairs: list[dict], tokenizer, template_name: str, cutoff_len: int,
                 default_system: str | None = None) -> tuple[list[dict], Counter, list[int], int]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` rows, the pairs dropped by reason, every pair's length before
    truncation (prompt and longer reply) and how many were cut."""
    template = training_template(template_name, default_system)
    tools = [pair.get("tools") for pair in pairs]
    chosen = encode_many(tokenizer, template, [p["messages"] + [_reply(p["chosen"])] for p in pairs], tools)
    rejected = encode_many(tokenizer, template, [p["messages"] + [_reply(p["rejected"])] for p in pairs], tools)
    rows, dropped, lengths, truncated = [], Counter(), [], 0
    for good, bad in zip(chosen, rejected):
        if good is None or bad is None:
            dropped["no reply to learn"] += 1
            continue
        prompt, chosen_ids = _one_turn(good)
        _, rejected_ids = _one_turn(bad)
        if good.eos_id is not None:  # efficient_eos: one eos closes the reply, learned
            chosen_ids, rejected_ids = chosen_ids + [good.eos_id], rejected_ids + [good.eos_id]
        longer = max(len(chosen_ids), len(rejected_ids))
        lengths.append(len(prompt) + longer)
        source_len, target_len = infer_seqlen(len(prompt), longer, cutoff_len)
        truncated += len(prompt) + longer > cutoff_len
        if target_len == 0:
            dropped[f"no reply left within cutoff_len={cutoff_len}"] += 1
            continue
        rows.append({"prompt_ids": prompt[:source_len], "chosen_ids": chosen_ids[:target_len],
                     "rejected_ids": rejected_ids[:target_len]})
    return rows, dropped, lengths, truncated


def encode_feedback(samples: list[dict], tokenizer, template_name: str, cutoff_len: int,
                    default_system: str | None = None) -> tuple[list[dict], Counter, list[int], int]:
    """KTO's rows, as LLaMA-Factory's feedback processor makes them: ``{"prompt_ids", "completion_ids", "label"}``,
    the prompt (every turn before the last reply, through the template) and the last reply, cut together to
    cutoff_len (``infer_seqlen``); the label True for a desirable reply. Also the samples dropped by reason, every
    sample's length before truncation and how many were cut. (TRL pairs each prompt with another sample's reply for
    KTO's KL term itself, where LLaMA-Factory pairs it with the reply of the sample at the mirrored place.)"""
    template = training_template(template_name, default_system)
    encoded = encode_many(tokenizer, template, [sample["messages"] for sample in samples],
                          [sample.get("tools") for sample in samples])
    rows, dropped, lengths, truncated = [], Counter(), [], 0
    for sample, turns in zip(samples, encoded):
        if turns is None:
            dropped["no reply to learn"] += 1
            continue
        prompt, completion = _one_turn(turns)
        if turns.eos_id is not None:  # efficient_eos: one eos closes the reply, learned
            completion = completion + [turns.eos_id]
        lengths.append(len(prompt) + len(completion))
        source_len, target_len = infer_seqlen(len(prompt), len(completion), cutoff_len)
        truncated += len(prompt) + len(completion) > cutoff_len
        if target_len == 0:
            dropped[f"no reply left within cutoff_len={cutoff_len}"] += 1
            continue
        rows.append({"prompt_ids": prompt[:source_len], "completion_ids": completion[:target_len],
                     "label": bool(sample["label"])})
    return rows, dropped, lengths, truncated


def _reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _one_turn(turns) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's ``encode_oneturn``: everything before the last reply is the prompt, the last reply the
    answer (text a template puts after it is not part of either)."""
    last = max(i for i, (_, target) in enumerate(turns.pairs) if target)
    prompt = [token for source, target in turns.pairs[:last] for token in source + target]
    return prompt + turns.pairs[last][0], list(turns.pairs[last][1])


def build_pair_datasets(cfg: TunerConfig, tokenizer, catalog_template: str | None = None,
                        stop_wait: Callable[[float], bool] | None = None, kind: str = "pairs") -> TrainingData:
    """The configured datasets as tokenized preference data (``datasets.Dataset``): ranking pairs for stage dpo
    (``kind`` pairs), or samples with a desirable or undesirable reply for stage kto (``kind`` feedback); from the
    cache when the same data was tokenized before (engine.data.tokenize.cached; overwrite_cache prepares it again).
    A stop while they are tokenized ends that at the next batch (PreparationStopped)."""
    d = cfg.data
    loaded = load_conversations(d.dataset, d.dataset_dir, max_samples=d.max_samples, val_size=d.val_size,
                                eval_dataset=d.eval_dataset, seed=cfg.train.seed, kind=kind)
    template = choose_template(cfg, tokenizer, catalog_template)
    warning = template_mismatch(get_template(template), tokenizer) if template != AUTO else None
    if warning:
        log.warning(warning)
    key = samples_key(kind, loaded.train, loaded.eval, tokenizer, template=template, cutoff_len=d.cutoff_len,
                      definition=repr(training_template(template, d.default_system)))

    def build(folder: Path) -> None:
        _build(folder, key, loaded, tokenizer, template, cfg, kind, stop_wait)

    return cached(key, build, loaded.report.lines(), d.overwrite_cache, stop_wait)


def _build(folder: Path, key: str, loaded, tokenizer, template: str, cfg: TunerConfig, kind: str,
           stop_wait: Callable[[float], bool] | None) -> None:
    """Tokenize both splits into ``folder`` (engine.data.tokenize's layout: ``train``, ``eval``, META)."""
    from datasets import Dataset

    d = cfg.data
    encode, noun = (encode_pairs, "pairs") if kind == "pairs" else (encode_feedback, "samples")
    summaries, lengths = [], None
    for split, samples in (("train", loaded.train), ("eval", loaded.eval)):
        if samples is None:
            continue
        rows, dropped, split_lengths, truncated = [], Counter(), [], 0
        for start in range(0, len(samples), BATCH):
            if stop_wait is not None and stop_wait(0):
                raise PreparationStopped("stopped while the data was being prepared")
            part = encode(samples[start:start + BATCH], tokenizer, template, d.cutoff_len, d.default_system)
            rows += part[0]
            dropped += part[1]
            split_lengths += part[2]
            truncated += part[3]
        if split == "train" and not rows:
            raise_empty(dropped, d.cutoff_len, noun)
        if rows:
            Dataset.from_list(rows).save_to_disk(str(folder / split))
        if split == "train":
            lengths = Lengths.of([min(length, d.cutoff_len) for length in split_lengths])
        text = f"{split}: {len(rows)} {noun} tokenized with template {template}"
        if kind == "feedback":
            desirable = sum(row["label"] for row in rows)
            text += f" ({desirable} desirable)"
            if split == "train" and desirable in (0, len(rows)):
                log.warning("stage kto: every sample's reply is %s: KTO learns from desirable and undesirable "
                            "replies both", "desirable" if desirable else "undesirable")
        text += f"; {truncated} longer than cutoff_len={d.cutoff_len} were truncated" if truncated else ""
        text += "".join(f"; dropped {count} with {reason}" for reason, count in dropped.items())
        summaries.append(text)
    write_meta(folder, key, template, summaries, lengths)


def raise_empty(dropped: Counter, cutoff_len: int, noun: str = "pairs") -> None:
    from engine.errors import UserError

    reasons = ", ".join(f"{count} with {reason}" for reason, count in dropped.items())
    what = "preference pair" if noun == "pairs" else "sample"
    raise UserError(f"no {what} is left to train on ({reasons})", hint=f"raise cutoff_len ({cutoff_len})")
