"""Supervised fine-tuning, a stage on the shared runner (engine.train.runner): conversations tokenized through the
template with the prompt masked (engine.data.tokenize), TRL's SFTTrainer (or its lean-loss subclass,
engine.train.loss) over rows packed or padding-free as the speed plan says."""

from __future__ import annotations

from engine.config.schema import TunerConfig
from engine.train.arguments import build_trainer, training_arguments
from engine.train.stage import Stage, TrainerParts


def datasets(cfg: TunerConfig, tokenizer, catalog_template: str | None, stop_wait):
    from engine.data.tokenize import build_datasets

    return build_datasets(cfg, tokenizer, catalog_template, stop_wait)


def trainer(parts: TrainerParts, plan):
    """SFTTrainer on the tokenized data: TRL prepares nothing again (tokenized, cut and packed by the engine)."""
    from trl import SFTConfig

    from engine.train.loss import trainer_class

    from engine.errors import UserError

    d = parts.cfg.data
    try:
        rows = training_rows(parts.datasets.train, parts.cfg, plan)
    except ValueError as exc:  # TRL's packing refusing the rows
        raise UserError(f"the trainer refused the settings: {str(exc).strip().splitlines()[0]}") from None
    args = training_arguments(
        SFTConfig, parts, plan, packing=False, padding_free=plan.padding_free,
        max_length=None if plan.padding_free else d.cutoff_len, dataset_num_proc=d.preprocessing_num_workers,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    return build_trainer(trainer_class(plan.loss), parts, args, train_dataset=rows, eval_dataset=parts.datasets.eval)


def training_rows(train, cfg: TunerConfig, plan):
    """The training set as the trainer takes it: packed into rows of up to T tokens (auto-fit's layout, or
    cutoff_len with ``packing``) by TRL's best-fit-decreasing packing, each sample whole and kept apart by the
    padding-free collator; else one sample a row. Evaluation data is never packed, nor cut again."""
    tokens = plan.packed_tokens or (cfg.data.cutoff_len if cfg.data.packing else None)
    if tokens is None:
        return train
    from trl import pack_dataset

    return pack_dataset(train, tokens, strategy="bfd", map_kwargs={"keep_in_memory": True})  # not into the cache


SFT = Stage("sft", datasets, trainer)
