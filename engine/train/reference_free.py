"""ORPO and SimPO: preference losses without a reference model, chosen as LLaMA-Factory chooses them (stage dpo with
pref_loss orpo or simpo), trained by TRL's own trainers for them (trl.experimental's ORPOTrainer, and CPOTrainer with
loss_type simpo) on the pairs tuner tokenized (engine.data.pairs), so no second model and no frozen adapter copy.

- orpo: the supervised loss on the chosen reply (minus its mean token log-probability, as LLaMA-Factory's, where
  TRL's own term also learns the prompt) plus pref_beta x the odds-ratio loss (on the replies' mean token
  log-probabilities);
- simpo: -log sigmoid(pref_beta x (mean log-prob of chosen - of rejected) - simpo_gamma), plus pref_ftx x the
  supervised loss on the chosen replies (TRL's cpo_alpha: the cross-entropy over all chosen reply tokens of the
  batch, where LLaMA-Factory means each reply first; equal when a batch holds one pair).
"""

from __future__ import annotations

import warnings

from engine.train.arguments import build_trainer, training_arguments
from engine.train.stage import TrainerParts

IGNORE = -100  # a label not learned (the prompt)


def trainer(parts: TrainerParts, plan):
    """ORPOTrainer (pref_loss orpo) or CPOTrainer with SimPO's loss (pref_loss simpo) on the tokenized pairs."""
    f, d = parts.cfg.finetune, parts.cfg.data
    orpo, cpo = _trl_classes()
    if f.pref_loss == "orpo":
        config_class, trainer_class, fields = orpo[0], orpo[1], {}
    else:
        config_class, trainer_class = cpo
        fields = {"loss_type": "simpo", "simpo_gamma": f.simpo_gamma, "cpo_alpha": f.pref_ftx}
    args = training_arguments(config_class, parts, plan, beta=f.pref_beta, max_length=d.cutoff_len,
                              dataset_num_proc=None, include_num_input_tokens_seen="no",  # its maps do nothing
                              remove_unused_columns=False, **fields)
    eval_rows = trl_rows(parts.datasets.eval) if parts.datasets.eval is not None else None
    return build_trainer(pretokenized(trainer_class), parts, args, train_dataset=trl_rows(parts.datasets.train),
                         eval_dataset=eval_rows)


def trl_rows(dataset):
    """tuner's pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) as TRL's ORPO and CPO trainers tokenize them
    themselves: the prompt, then each reply after the prompt with the prompt's labels ignored."""

    def row(pair: dict) -> dict:
        prompt = pair["prompt_ids"]
        out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            reply = pair[f"{side}_ids"]
            out[f"{side}_input_ids"] = prompt + reply
            out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
            out[f"{side}_labels"] = [IGNORE] * len(prompt) + reply
        return out

    return dataset.map(row, remove_columns=dataset.column_names, keep_in_memory=True)  # not into the cache


def pretokenized(trainer_class):
    """``trainer_class`` (TRL's ORPOTrainer or CPOTrainer) taking rows tokenized already (trl_rows): its own
    tokenization leaves them as they are; it logs the tokens trained on as ``num_tokens``, as TRL's DPOTrainer does,
    so the dashboard shows a throughput."""

    class Pretokenized(trainer_class):
        _tokens_seen = 0

        if trainer_class.__name__ == "ORPOTrainer":
            def concatenated_forward(self, model, batch):
                """TRL's, but ORPO's supervised term is LLaMA-Factory's: minus each chosen reply's mean token
                log-probability (TRL's own is the cross-entropy over the prompt and the reply), meaned over the
                batch."""
                out = super().concatenated_forward(model, batch)
                return (*out[:4], -out[0].mean(), *out[5:])

        def tokenize_row(self, feature, model=None) -> dict:
            return feature

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
                self._tokens_seen += int(self.accelerator.gather_for_metrics(tokens.reshape(1)).sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if "loss" in logs:
                logs["num_tokens"] = float(self._tokens_seen)
            return super().log(logs, start_time)

    Pretokenized.__name__ = Pretokenized.__qualname__ = trainer_class.__name__
    return Pretokenized


def _trl_classes():
    """(ORPOConfig, ORPOTrainer), (CPOConfig, CPOTrainer) from trl.experimental, without its import-time notice
    (tuner pins the TRL it was tested with)."""
    from trl.import_utils import TRLExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return (ORPOConfig, ORPOTrainer), (CPOConfig, CPOTrainer)
