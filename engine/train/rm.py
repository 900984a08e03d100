"""Reward modelling, a stage on the shared runner (engine.train.runner): a model that scores a reply to a prompt,
trained on ranking pairs to score the chosen reply above the rejected one, as LLaMA-Factory's stage rm.

The pairs are tokenized as for DPO (engine.data.pairs, LLaMA-Factory's pairwise processor); the reward model reads
each whole conversation, prompt and reply, and scores it at its last token. The model is the language model's
decoder under a one-output score head (transformers' *ForSequenceClassification, loaded so by the runner), trained
by TRL's RewardTrainer: loss -log sigmoid(score chosen - score rejected), with its accuracy and margin logged. With
LoRA the score head trains whole and is saved with the adapter (PEFT's task SEQ_CLS); a full or freeze run saves
the whole reward model.
"""

from __future__ import annotations

from engine.config.schema import TunerConfig
from engine.train.arguments import build_trainer, training_arguments
from engine.train.stage import Stage, TrainerParts


def datasets(cfg: TunerConfig, tokenizer, catalog_template: str | None, stop_wait):
    from engine.data.pairs import build_pair_datasets

    return build_pair_datasets(cfg, tokenizer, catalog_template, stop_wait)


def trainer(parts: TrainerParts, plan):
    """RewardTrainer on the pairs as whole conversations (cut to cutoff_len already: TRL cuts nothing again)."""
    from trl import RewardConfig, RewardTrainer

    args = training_arguments(RewardConfig, parts, plan, max_length=None, disable_dropout=False,  # as LF's rm
                              dataset_num_proc=parts.cfg.data.preprocessing_num_workers)
    train, evaluation = parts.datasets.train, parts.datasets.eval
    return build_trainer(RewardTrainer, parts, args, train_dataset=conversations(train),
                         eval_dataset=conversations(evaluation) if evaluation is not None else None)


def conversations(pairs):
    """Rows of ``chosen_ids`` and ``rejected_ids``, each the prompt followed by that reply, as TRL's RewardTrainer
    reads them (kept in memory, not written into the cache the pairs came from)."""
    def whole(row: dict) -> dict:
        return {"chosen_ids": row["prompt_ids"] + row["chosen_ids"],
                "rejected_ids": row["prompt_ids"] + row["rejected_ids"]}

    return pairs.map(whole, remove_columns=["prompt_ids"], keep_in_memory=True)


RM = Stage("rm", datasets, trainer, pairs=True, perplexity=False, plots=("loss", "eval_loss", "eval_accuracy"),
           reward=True)
