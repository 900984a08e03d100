"""Direct preference optimisation, a stage on the shared runner (engine.train.runner): ranking pairs tokenized
through the template as LLaMA-Factory's pairwise processor does (engine.data.pairs), TRL's DPOTrainer with
LLaMA-Factory's keys: pref_beta (beta), pref_loss (sigmoid, hinge, ipo), pref_ftx (TRL's "sft" loss on the chosen
replies, weighted).

The reference is the model as it starts, never a second copy when it can be avoided: with LoRA, TRL keeps a frozen
copy of the adapter as it starts (a fresh adapter: the base model itself; one continued from an SFT run: that run's
model); a full or freeze fine-tune loads the model again as the reference.
"""

from __future__ import annotations

from engine.config.schema import TunerConfig
from engine.train.arguments import build_trainer, training_arguments
from engine.train.stage import Stage, TrainerParts


def datasets(cfg: TunerConfig, tokenizer, catalog_template: str | None, stop_wait):
    from engine.data.pairs import build_pair_datasets

    return build_pair_datasets(cfg, tokenizer, catalog_template, stop_wait)


def trainer(parts: TrainerParts, plan):
    """DPOTrainer on the tokenized pairs: tuner cut them to cutoff_len already, so TRL cuts nothing again."""
    from trl import DPOConfig

    f = parts.cfg.finetune
    losses = [f.pref_loss] + (["sft"] if f.pref_ftx else [])
    args = training_arguments(
        DPOConfig, parts, plan, beta=f.pref_beta, loss_type=losses,
        loss_weights=[1.0, f.pref_ftx] if f.pref_ftx else None, max_length=None, padding_free=False,
        dataset_num_proc=parts.cfg.data.preprocessing_num_workers, include_num_input_tokens_seen="no",
    )
    return build_trainer(pretokenized_dpo_trainer(), parts, args, train_dataset=parts.datasets.train,
                         eval_dataset=parts.datasets.eval)


def pretokenized_dpo_trainer():
    """TRL's DPOTrainer taking rows already tokenized as its own preparation leaves them (``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``): its collator and loss are TRL's, unchanged."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    PretokenizedDPOTrainer.__name__ = PretokenizedDPOTrainer.__qualname__ = "DPOTrainer"
    return PretokenizedDPOTrainer


DPO = Stage("dpo", datasets, trainer, pairs=True)
