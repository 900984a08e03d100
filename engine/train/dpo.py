"""Direct preference optimisation, a stage on the shared runner (engine.train.runner): ranking pairs tokenized
through the template as LLaMA-Factory's pairwise processor does (engine.data.pairs), TRL's DPOTrainer with
LLaMA-Factory's keys: pref_beta (beta), pref_loss (sigmoid, hinge, ipo; orpo and simpo through
engine.train.reference_free), pref_ftx (TRL's "sft" loss on the chosen replies, weighted), dpo_label_smoothing and
pref_bco_weight (loss_terms).

The reference is the model as it starts, never a second copy when it can be avoided: with LoRA, TRL keeps a frozen
copy of the adapter as it starts (a fresh adapter: the base model itself; one continued from an SFT run: that run's
model); a full or freeze fine-tune loads the model again as the reference, the way tuner loaded the policy (its
precision, attention, rope scaling), frozen.
"""

from __future__ import annotations

import contextlib

from engine.config.schema import REFERENCE_FREE, TunerConfig
from engine.train.arguments import build_trainer, training_arguments
from engine.train.stage import Stage, TrainerParts


def datasets(cfg: TunerConfig, tokenizer, catalog_template: str | None, stop_wait):
    from engine.data.pairs import build_pair_datasets

    return build_pair_datasets(cfg, tokenizer, catalog_template, stop_wait)


def trainer(parts: TrainerParts, plan):
    """DPOTrainer on the tokenized pairs: tuner cut them to cutoff_len already, so TRL cuts nothing again. ORPO and
    SimPO, which need no reference, train through TRL's trainers for them (engine.train.reference_free)."""
    from trl import DPOConfig

    f = parts.cfg.finetune
    if f.pref_loss in REFERENCE_FREE:
        from engine.train import reference_free

        return reference_free.trainer(parts, plan)
    losses, weights = loss_terms(f)
    args = training_arguments(
        DPOConfig, parts, plan, beta=f.pref_beta, loss_type=losses, loss_weights=weights,
        label_smoothing=f.dpo_label_smoothing, max_length=None, padding_free=False,
        dataset_num_proc=parts.cfg.data.preprocessing_num_workers, include_num_input_tokens_seen="no",
    )
    with adapter_copied_plainly(parts.model):
        return build_trainer(pretokenized_dpo_trainer(), parts, args, train_dataset=parts.datasets.train,
                             eval_dataset=parts.datasets.eval, ref_model=reference_model(parts, plan))


def loss_terms(f) -> tuple[list[str], list[float]]:
    """LLaMA-Factory's preference loss as TRL's weighted loss terms (DPOConfig's loss_type and loss_weights):

    - pref_loss itself; with dpo_label_smoothing e, conservative DPO, -(1 - e) log s(x) - e log s(-x) (s: sigmoid,
      x: the reward margin), which TRL 1.16 has no term for but is its sigmoid term (-log s(x)) x 2(1 - e) plus its
      robust term ((-(1 - e) log s(x) + e log s(-x)) / (1 - 2e)) x -(1 - 2e);
    - pref_bco_weight w: (that + w x TRL's bco_pair) / (1 + w), as LLaMA-Factory mixes them (TRL's BCO term has no
      running-mean baseline);
    - pref_ftx: plus pref_ftx x the supervised loss on the chosen replies (TRL's sft term).
    """
    e, w = f.dpo_label_smoothing, f.pref_bco_weight
    terms = [("sigmoid", 2 * (1 - e)), ("robust", -(1 - 2 * e))] if e else [(f.pref_loss, 1.0)]
    if w:
        terms = [(name, weight / (1 + w)) for name, weight in terms] + [("bco_pair", w / (1 + w))]
    if f.pref_ftx:
        terms.append(("sft", f.pref_ftx))
    return [name for name, _ in terms], [weight for _, weight in terms]


def reference_model(parts: TrainerParts, plan):
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
def adapter_copied_plainly(model):
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


DPO = Stage("dpo", datasets, trainer, pairs=True, perplexity=False, plots=("loss", "rewards/accuracies", "eval_loss"))
