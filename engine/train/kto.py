"""Kahneman-Tversky optimisation, a stage on the shared runner (engine.train.runner): replies marked desirable or not
(LLaMA-Factory's kto_tag), tokenized through the template as LLaMA-Factory's feedback processor does
(engine.data.pairs), trained by TRL's KTOTrainer with LLaMA-Factory's keys: pref_beta (beta), kto_chosen_weight and
kto_rejected_weight (TRL's desirable_weight and undesirable_weight).

KTO's KL term compares each prompt with the reply of another sample of its batch: TRL pairs them in a fixed order,
so it reads the data in order, and tuner shuffles the samples once, with the run's seed, before it does. The
reference is the model as it starts, as for DPO (engine.train.dpo): with LoRA, a frozen copy of the adapter; for a
full or freeze fine-tune, the model loaded again as tuner loads it.
"""

from __future__ import annotations

from engine.config.schema import TunerConfig
from engine.train.arguments import build_trainer, training_arguments
from engine.train.dpo import adapter_copied_plainly, reference_model
from engine.train.stage import Stage, TrainerParts


def datasets(cfg: TunerConfig, tokenizer, catalog_template: str | None, stop_wait):
    from engine.data.pairs import build_pair_datasets

    return build_pair_datasets(cfg, tokenizer, catalog_template, stop_wait, kind="feedback")


def trainer(parts: TrainerParts, plan):
    """KTOTrainer on the tokenized samples (cut to cutoff_len already: TRL cuts nothing again)."""
    from trl import KTOConfig

    f = parts.cfg.finetune
    args = training_arguments(
        KTOConfig, parts, plan, beta=f.pref_beta, desirable_weight=f.kto_chosen_weight,
        undesirable_weight=f.kto_rejected_weight, max_length=None, precompute_ref_log_probs=f.precompute_ref_log_probs,
        dataset_num_proc=parts.cfg.data.preprocessing_num_workers, include_num_input_tokens_seen="no",
    )
    train = parts.datasets.train.shuffle(seed=parts.cfg.train.seed, keep_in_memory=True)  # not into the cache
    with adapter_copied_plainly(parts.model):
        return build_trainer(pretokenized_kto_trainer(), parts, args, train_dataset=train,
                             eval_dataset=parts.datasets.eval, ref_model=reference_model(parts, plan))


def pretokenized_kto_trainer():
    """TRL's KTOTrainer taking rows tokenized already (``prompt_ids``, ``completion_ids``, ``label``): of its own
    preparation only the KL completions are made, as TRL makes them (each sample's reply moved to the next sample of
    its batch of per_device_train_batch_size); its collator and loss are TRL's, unchanged."""
    from trl import KTOTrainer

    class PretokenizedKTOTrainer(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not self.calculate_KL:
                return dataset

            def with_kl_completions(batch: dict) -> dict:
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            return dataset.map(with_kl_completions, batched=True, batch_size=args.per_device_train_batch_size,
                               keep_in_memory=True)  # not into the cache entry the rows were loaded from

    PretokenizedKTOTrainer.__name__ = PretokenizedKTOTrainer.__qualname__ = "KTOTrainer"
    return PretokenizedKTOTrainer


KTO = Stage("kto", datasets, trainer, pairs=True, perplexity=False, plots=("loss", "rewards/chosen", "eval_loss"))
