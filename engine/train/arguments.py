"""Trainer arguments from our config, shared by every stage: the TrainingArguments fields tuner sets (schedule,
optimizer, precision, saving, logging, sharding, checkpointing), the user's passed-through fields over them, LoRA+'s
optimizer, and the trainer built with what transformers refuses said in one line. A stage adds its own config class's
fields and its data (engine.train.sft: SFTConfig's)."""

from __future__ import annotations

import dataclasses
import logging

from engine.config.schema import TunerConfig
from engine.errors import UserError
from engine.train.stage import TrainerParts

log = logging.getLogger("tuner")


def training_arguments(config_class, parts: TrainerParts, plan, **stage_fields):
    """``config_class`` (TrainingArguments or a TRL stage's subclass) from our config and the choices made at start,
    ``stage_fields`` (the stage's own) and then the user's passed-through fields; the strategy's FSDP or DeepSpeed
    settings, else the user's own deepspeed / fsdp keys. What transformers refuses is one line."""
    from transformers import Trainer

    cfg, fit, strategy = parts.cfg, plan.fit, parts.strategy
    t = cfg.train
    sharding = (strategy.training_kwargs(fit.gradient_checkpointing)
                or {"deepspeed": t.deepspeed, "fsdp": t.fsdp or None})
    chosen = dict(
        output_dir=str(parts.run.path), per_device_train_batch_size=fit.micro_batch,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=fit.accumulation, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps or t.warmup_ratio,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps, optim=t.optim, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, save_strategy=t.save_strategy, save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy=t.eval_strategy, eval_steps=t.eval_steps or t.logging_steps,
        bf16=parts.precision.name == "bf16", fp16=parts.precision.name == "fp16", use_cpu=not parts.hardware.on_gpu,
        **checkpointing_args(config_class, strategy.checkpointing(fit.gradient_checkpointing)), seed=t.seed,
        report_to=t.report_to, run_name=t.run_name, dataloader_num_workers=t.dataloader_num_workers, **sharding,
        ddp_timeout=t.ddp_timeout, neftune_noise_alpha=cfg.finetune.neftune_noise_alpha,
        disable_tqdm=True, include_num_input_tokens_seen="non_padding", use_liger_kernel=False,
        ddp_find_unused_parameters=has_experts(parts.model),
    ) | stage_fields
    fields = with_passthrough(chosen, cfg, parts.model)
    known = {field.name for field in dataclasses.fields(config_class)}
    foreign = sorted(set(fields) - known)  # a supervised setting passed through that this stage's TRL config lacks
    if foreign:
        raise UserError(f"{', '.join(foreign)}: not a setting of TRL's {config_class.__name__}, which trains stage "
                        f"{cfg.finetune.stage} here", hint=f"leave {', '.join(foreign)} out")
    try:
        args = config_class(**fields)
        Trainer.get_optimizer_cls_and_kwargs(args, parts.model)  # an optimizer's missing package, now, not at step 0
    except (ValueError, ImportError) as exc:  # what transformers refuses that engine.config.validation did not catch
        raise UserError(f"transformers refused the training arguments: {str(exc).splitlines()[0]}") from None
    return args


def build_trainer(trainer_class, parts: TrainerParts, args, **inputs):
    """``trainer_class`` (watched for a diverging loss) on the model, with the run's callbacks, the tokenizer and
    LoRA+'s optimizer when asked for; ``inputs``: the stage's datasets (and whatever else its trainer takes). The
    Trainer's own checks of the settings together are one line."""
    from transformers import PrinterCallback, Trainer

    try:
        trainer = parts.divergence.watching(trainer_class)(
            model=parts.model, args=args, processing_class=parts.tokenizer, callbacks=parts.callbacks,
            optimizers=optimizers(parts.cfg, parts.model, args, Trainer), **inputs,
        )
    except ValueError as exc:  # fields passed through included
        raise UserError(f"the trainer refused the settings: {str(exc).strip().splitlines()[0]}") from None
    trainer.remove_callback(PrinterCallback)
    if parts.cfg.model.quantization_bit is not None and not parts.cfg.train.pure_bf16:
        from engine.models.loading import whole_modules_in_fp32

        whole_modules_in_fp32(trainer.model)  # TRL cast a quantized model's trainable weights to bfloat16
    return trainer


def optimizers(cfg: TunerConfig, model, args, Trainer) -> tuple:
    """(optimizer, scheduler) for the Trainer: LoRA+ (PEFT's create_loraplus_optimizer, the lora_B matrices at
    learning_rate x loraplus_lr_ratio) with the optim asked for; else (None, None), the Trainer's own."""
    ratio = cfg.finetune.loraplus_lr_ratio
    if not ratio or cfg.finetune.finetuning_type != "lora":
        return None, None
    from peft.optimizers import create_loraplus_optimizer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    optimizer = create_loraplus_optimizer(model, optimizer_cls, lr=args.learning_rate, loraplus_lr_ratio=ratio,
                                          loraplus_lr_embedding=cfg.finetune.loraplus_lr_embedding,
                                          loraplus_weight_decay=args.weight_decay, **kwargs)
    log.info("LoRA+: lora_B matrices learn at %g (learning_rate %g x loraplus_lr_ratio %g), %s", args.learning_rate
             * ratio, args.learning_rate, ratio, optimizer_cls.__name__)
    return optimizer, None


CHECKPOINTING_KWARGS = ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")


def with_passthrough(chosen: dict, cfg: TunerConfig, model) -> dict:
    """``chosen`` overlaid with the TrainingArguments / SFTConfig fields the user gave that are not tuner's own.

    The user's checkpointing keywords replace the engine's under the name this transformers reads (it ignores the old
    name when the new one is set); the router loss of LLaMA-Factory's moe_aux_loss_coef applies to mixture-of-experts
    models only, as there.
    """
    fields = dict(cfg.passthrough)
    engine_name = next(name for name in CHECKPOINTING_KWARGS if name in chosen)
    for name in CHECKPOINTING_KWARGS:
        if name in fields:
            chosen[engine_name] = fields.pop(name)
    if "router_aux_loss_coef" in fields and not has_experts(model):
        fields.pop("router_aux_loss_coef")
        log.warning("router_aux_loss_coef (moe_aux_loss_coef) left out: %s is not a mixture-of-experts model",
                    cfg.model.model_name_or_path)
    return {**chosen, **fields}


def has_experts(model) -> bool:
    """Mixture-of-experts layers may leave experts unused in a step, which DDP must be told to expect."""
    config = model.config
    return bool(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None))


def checkpointing_args(config_class, enabled: bool) -> dict:
    """transformers renamed gradient_checkpointing to activation_checkpointing in 5.2x; speak whichever it knows."""
    known = {f.name for f in dataclasses.fields(config_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}
