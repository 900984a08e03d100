"""Direct preference optimisation, a stage on the shared runner (engine.train.runner): ranking pairs tokenized
through the template as LLaMA-Factory's pairwise processor does (engine.data.pairs), TRL's DPOTrainer with
LLaMA-Factory's keys: pref_beta (beta), pref_loss (sigmoid, hinge, ipo; orpo and simpo through
engine.train.reference_free), pref_ftx (TRL's "sft" loss on the chosen replies, weighted), dpo_label_smoothing and
pref_bco_weight (loss_terms), ld_alpha (TRL's LD-DPO weighting).

The reference is the model as it starts, never a second copy when it can be avoided: with LoRA, TRL keeps a frozen
copy of the adapter as it starts (a fresh adapter: the base model itself; one continued from an SFT run: that run's
model); a full or freeze fine-tune loads the model again as the reference, the way tuner loaded the policy (its
precision, attention, rope scaling), frozen. ref_model (with ref_model_adapters, in ref_model_quantization_bit
bits) replaces either, as LLaMA-Factory's does.
"""

from __future__ import annotations

import contextlib
import logging

from engine.config.schema import REFERENCE_FREE, TunerConfig
from engine.errors import UserError
from engine.train.arguments import build_trainer, training_arguments
from engine.train.stage import Stage, TrainerParts

log = logging.getLogger("tuner")


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
        label_smoothing=f.dpo_label_smoothing, ld_alpha=f.ld_alpha, max_length=None, padding_free=False,
        precompute_ref_log_probs=f.precompute_ref_log_probs,
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
    """ref_model when given (with ref_model_adapters, in ref_model_quantization_bit bits); else None with LoRA (TRL
    copies the adapter) or precompute_ref_log_probs (TRL scores the data with the model before it trains), or the
    model loaded again as tuner loads it. Frozen, in eval mode, loaded once (a rebuild
    after a back-off reuses it)."""
    f = parts.cfg.finetune
    if f.ref_model is None and (f.finetuning_type == "lora" or f.precompute_ref_log_probs):
        if f.precompute_ref_log_probs:  # TRL computes them with the model as it starts, before the first step
            log.info("reference: its log-probabilities computed once before training (precompute_ref_log_probs), "
                     "no second model held")
        return None
    if parts.reference is None:
        from engine.models.loading import load_adapters, load_model
        from engine.train.setup import device_map

        path, cfg = parts.model_path, parts.cfg
        if f.ref_model is not None:
            path, cfg = reference_source(parts)
        reference = load_model(path, cfg, parts.precision, plan.attention, device_map(cfg, parts.hardware))
        if f.ref_model_adapters:  # merged in whole: TRL's fused LM head patches the model itself, not a wrapper
            reference = load_adapters(reference, f.ref_model_adapters, f.ref_model_quantization_bit is not None)
            reference = reference.merge_and_unload()
        if f.ref_model is not None:
            _same_vocabulary(parts.model, reference, f.ref_model)
            log.info("reference: %s%s%s", f.ref_model, f" with adapters {f.ref_model_adapters}"
                     if f.ref_model_adapters else "", f", {f.ref_model_quantization_bit}-bit"
                     if f.ref_model_quantization_bit else "")
        reference.requires_grad_(False)
        parts.reference = reference.eval()
    return parts.reference


def reference_source(parts: TrainerParts):
    """Where ref_model loads from, and the config it loads with: the run's, its model section that of ref_model
    (its adapters given apart, quantized in ref_model_quantization_bit bits, LLaMA-Factory's ref_model_* keys)."""
    import dataclasses

    from engine.models.resolve import resolve_configured

    f = parts.cfg.finetune
    model = dataclasses.replace(parts.cfg.model, model_name_or_path=f.ref_model, adapter_name_or_path=None,
                                quantization_bit=f.ref_model_quantization_bit)
    resolved = resolve_configured(model)
    if resolved.plan is not None:  # the config's check said so before the run; the cache may have changed since
        raise UserError(f"ref_model {f.ref_model} is not downloaded", f"tuner download {f.ref_model}")
    return resolved.path, dataclasses.replace(parts.cfg, model=model)


def _same_vocabulary(model, reference, name: str) -> None:
    """The reference scores the policy's token ids: its vocabulary must be the same size (the same tokenizer)."""
    mine = model.get_input_embeddings().weight.shape[0]
    theirs = reference.get_input_embeddings().weight.shape[0]
    if mine != theirs:
        raise UserError(f"ref_model {name} has a vocabulary of {theirs} tokens and the model trained {mine}: the "
                        "reference must score the same token ids", "give a ref_model of the same family and tokenizer")


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
