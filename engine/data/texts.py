"""Raw text for continued pre-training (stage pt), as LLaMA-Factory's pre-training processor makes it: each text
closed with the tokenizer's eos token, all of them joined and cut into blocks of cutoff_len tokens (what is left
over at the end, shorter than a block, is dropped), every token learned. No template: the model reads the text as
it is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.config.schema import TunerConfig
from engine.data.loaders import load_conversations
from engine.data.stats import Lengths
from engine.data.tokenize import PreparationStopped, TrainingData, cached, samples_key, write_meta
from engine.errors import UserError
from engine.templates import tokenize_texts

BATCH = 1000  # texts tokenized in one call between looks for a stop


def text_blocks(texts: list[str], tokenizer, cutoff_len: int,
                stop_wait: Callable[[float], bool] | None = None) -> tuple[list[list[int]], int]:
    """The blocks of cutoff_len tokens, and how many tokens were left over at the end. A tokenizer that starts its
    inputs with bos starts each block with it, as LLaMA-Factory's pre-training processor does."""
    eos = tokenizer.eos_token or ""
    ids: list[int] = []
    for start in range(0, len(texts), BATCH):
        if stop_wait is not None and stop_wait(0):
            raise PreparationStopped("stopped while the data was being prepared")
        for tokens in tokenize_texts(tokenizer, [text + eos for text in texts[start:start + BATCH]]):
            ids += tokens
    whole = len(ids) // cutoff_len * cutoff_len
    blocks = [ids[i:i + cutoff_len] for i in range(0, whole, cutoff_len)]
    bos = tokenizer.bos_token_id
    if getattr(tokenizer, "add_bos_token", False) and bos is not None:
        blocks = [[bos, *block[1:]] for block in blocks]
    return blocks, len(ids) - whole


def build_text_datasets(cfg: TunerConfig, tokenizer, catalog_template: str | None = None,
                        stop_wait: Callable[[float], bool] | None = None) -> TrainingData:
    """The configured raw-text datasets as blocks (``datasets.Dataset`` of ``input_ids`` and ``labels``), from the
    cache when the same texts were cut before (engine.data.tokenize.cached; overwrite_cache cuts them again)."""
    d = cfg.data
    loaded = load_conversations(d.dataset, d.dataset_dir, max_samples=d.max_samples, val_size=d.val_size,
                                eval_dataset=d.eval_dataset, seed=cfg.train.seed, kind="text")
    key = samples_key("text", loaded.train, loaded.eval, tokenizer, cutoff_len=d.cutoff_len,
                      add_bos_token=getattr(tokenizer, "add_bos_token", None))

    def build(folder: Path) -> None:
        _build(folder, key, loaded, tokenizer, d.cutoff_len, stop_wait)

    data = cached(key, build, loaded.report.lines(), d.overwrite_cache, stop_wait)
    data.template = None  # no template: config.yaml keeps none
    return data


def _build(folder: Path, key: str, loaded, tokenizer, cutoff_len: int,
           stop_wait: Callable[[float], bool] | None) -> None:
    """Cut both splits into ``folder`` (engine.data.tokenize's layout: ``train``, ``eval``, META)."""
    from datasets import Dataset

    summaries = []
    for split, samples in (("train", loaded.train), ("eval", loaded.eval)):
        if samples is None:
            continue
        blocks, left = text_blocks([sample["text"] for sample in samples], tokenizer, cutoff_len, stop_wait)
        if split == "train" and not blocks:
            raise UserError(f"the {len(samples)} texts hold fewer tokens than one block of cutoff_len={cutoff_len}",
                            hint="lower cutoff_len, or give more text")
        if blocks:
            Dataset.from_list([{"input_ids": block, "labels": block} for block in blocks]).save_to_disk(
                str(folder / split))
        summaries.append(f"{split}: {len(samples)} texts joined into {len(blocks)} blocks of {cutoff_len} tokens"
                         + (f"; the last {left} tokens, short of a block, left out" if left else ""))
    write_meta(folder, key, "", summaries, Lengths(cutoff_len, cutoff_len))  # "": no template
