"""Direct preference optimisation, a stage on the shared runner (engine.train.runner): ranking pairs tokenized
through the template as LLaMA-Factory's pairwise processor does (engine.data.pairs), TRL's DPOTrainer with
LLaMA-Factory's keys: pref_beta (beta), pref_loss (sigmoid, hinge, ipo), pref_ftx (TRL's "sft" loss on the chosen
replies, weighted).

The reference is the model as it starts, never a second copy when it can be avoided: with LoRA, TRL keeps a frozen
copy of the adapter as it starts (a fresh adapter: the base model itself; one continued from an SFT run: that run's
model); a full or freeze fine-tune loads the model again as the reference, the way tuner loaded the policy (its
precision, attention, rope scaling), frozen.
"""

from __future__ import annotations

import contextlib

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
    with _adapter_copied_plainly(parts.model):
        return build_trainer(pretokenized_dpo_trainer(), parts, args, train_dataset=parts.datasets.train,
                             eval_dataset=parts.datasets.eval, ref_model=_reference(parts, plan))


def _reference(parts: TrainerParts, plan):
    """None with LoRA (TRL copies the adapter); else the model loaded again as tuner loads it, frozen, in eval mode."""
    if parts.cfg.finetune.finetuning_type == "lora":
        return None
    if parts.reference is None:
        from engine.models.loading import load_model
        from engine.train.setup import device_map

        reference = load_model(parts.model_path, parts.cfg, parts.precision, plan.attention,
                               device_map(parts.cfg, parts.hardware))
        reference.requires_grad_(False)
        parts.reference = reference.eval()
    return parts.reference


@contextlib.contextmanager
def _adapter_copied_plainly(model):
    """TRL makes the reference adapter with the trained adapter's config: one initialised by PiSSA would run PiSSA's
    SVD again and change the base weights under both. The copy is made with plain initialisation (its weights are
    then copied from the adapter's), as engine.train.pissa saves one."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or getattr(config, "init_lora_weights", True) is True:
        yield
        return
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        yield
    finally:
        config.init_lora_weights = init


def pretokenized_dpo_trainer():
    """TRL's DPOTrainer taking rows already tokenized as its own preparation leaves them (``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``): its collator and loss are TRL's, unchanged."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    PretokenizedDPOTrainer.__name__ = PretokenizedDPOTrainer.__qualname__ = "DPOTrainer"
    return PretokenizedDPOTrainer


DPO = Stage("dpo", datasets, trainer, pairs=True, perplexity=False)
