"""Checks a ``TunerConfig`` before anything loads and reports every problem at once, one line each."""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

from engine.config.schema import REFERENCE_FREE, REPORTERS, TrainArgs, TunerConfig, has_reference
from engine.errors import ConfigError, UserError

# Longest sample accepted (2**20 tokens), far beyond any model's context; a larger one is a typo.
MAX_CUTOFF_LEN = 1_048_576
MAX_STEPS = 10**9  # a billion optimizer steps: more is a typo, and clocks and ETAs overflow long before torch does
FLOAT32_MAX = 3.4e38  # the optimizer's state and step are float32: a larger learning rate overflows at the first step

# The directory each command writes into, and what it holds (for the message when it names a file).
TARGETS = {"train": ("output_dir", "the run"), "predict": ("output_dir", "the predictions"),
           "export": ("export_dir", "the exported model")}

# What each command needs before it can start.
REQUIRED = {
    "train": ("model_name_or_path", "dataset"),
    "predict": ("model_name_or_path", "dataset|eval_dataset"),
    "export": ("model_name_or_path", "export_dir"),
    "preview": ("model_name_or_path", "dataset"),
    "estimate": ("model_name_or_path",),
    "chat": ("model_name_or_path",),
}


def validate(cfg: TunerConfig, command: str = "train") -> None:
    """Raise ``ConfigError`` listing every problem found in ``cfg`` for ``command``; return quietly when it is sound."""
    problems = problems_in(cfg, command)
    if problems:
        raise ConfigError(problems)


def problems_in(cfg: TunerConfig, command: str = "train") -> list[str]:
    """Every problem found in ``cfg`` for ``command``, one line each."""
    problems = _missing(cfg, command) + _ranges(cfg) + _targets(cfg, command) + _collisions(cfg) + _names(cfg) + \
        _adapters(cfg)
    if command == "train":
        problems += _optimizer(cfg) + _scheduler(cfg) + _trackers(cfg) + _launch(cfg)
    return problems


# The learning rates runs of each kind are usually given (LLaMA-Factory's examples, PEFT's and TRL's docs): a value
# ten times beyond them either way is almost always a typo (1e4 for 1e-4) and gets a warning before the run.
USUAL_LEARNING_RATES = {"lora": (1e-5, 1e-3), "freeze": (1e-6, 1e-4), "full": (1e-6, 1e-4)}


def learning_rate_warning(cfg: TunerConfig) -> str | None:
    """One line when ``learning_rate`` is far outside what runs of this method are usually given; None when not."""
    low, high = USUAL_LEARNING_RATES.get(cfg.finetune.finetuning_type, USUAL_LEARNING_RATES["lora"])
    rate = cfg.train.learning_rate
    if low / 10 <= rate <= high * 10:
        return None
    effect = ("the first steps may wreck the weights: the run then ends failed, diverged or collapsed"
              if rate > high else "the weights will barely move")
    return (f"learning_rate {rate:g} is far {'above' if rate > high else 'below'} what {cfg.finetune.finetuning_type} "
            f"runs are usually given ({low:g} to {high:g}): {effect}")


def _adapters(cfg: TunerConfig) -> list[str]:
    """An adapter given as a local path (absolute, ./, ../ or ~) must be one: a directory with adapter_config.json.
    A name like user/adapter is a hub id, looked for when the model loads."""
    problems = []
    for key, adapters in (("adapter_name_or_path", cfg.model.adapter_name_or_path),
                          ("ref_model_adapters", cfg.finetune.ref_model_adapters)):
        for given in (adapters or "").split(","):
            given = given.strip()
            if not given.startswith(("/", "./", "../", "~")):
                continue
            path = Path(given).expanduser()
            if not path.exists():
                problems.append(f"{key} {given}: no such directory (a LoRA adapter, as training saves one)")
            elif not (path / "adapter_config.json").is_file():
                problems.append(f"{given} is not a LoRA adapter (no adapter_config.json): a freeze or full fine-tune "
                                "output is a whole model, pass it as model_name_or_path")
    return problems


def _missing(cfg: TunerConfig, command: str) -> list[str]:
    flat = cfg.to_dict()
    missing = []
    for required in REQUIRED.get(command, ()):
        keys = required.split("|")
        if not any(flat.get(key) for key in keys):
            missing.append(f"{' or '.join(keys)} is required for `tuner {command}`")
    return missing


def _ranges(cfg: TunerConfig) -> list[str]:
    d, f, t, g = cfg.data, cfg.finetune, cfg.train, cfg.generate
    checks = [
        (d.max_samples is not None and d.max_samples < 1, f"max_samples must be at least 1, got {d.max_samples}"),
        (d.cutoff_len < 1, f"cutoff_len must be at least 1, got {d.cutoff_len}"),
        (d.cutoff_len > MAX_CUTOFF_LEN, f"cutoff_len must be at most {MAX_CUTOFF_LEN} tokens, got {d.cutoff_len}"),
        (d.val_size < 0, f"val_size must be a fraction between 0 and 1 or a number of samples, got {d.val_size}"),
        (d.val_size >= 1 and not float(d.val_size).is_integer(),
         f"val_size {d.val_size} is neither a fraction below 1 nor a whole number of samples"),
        (d.preprocessing_num_workers is not None and d.preprocessing_num_workers < 1,
         f"preprocessing_num_workers must be at least 1, got {d.preprocessing_num_workers}"),
        (f.lora_rank < 1, f"lora_rank must be at least 1, got {f.lora_rank}"),
        (f.lora_alpha is not None and f.lora_alpha <= 0, f"lora_alpha must be positive, got {f.lora_alpha}"),
        (not 0 <= f.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {f.lora_dropout}"),
        (f.freeze_trainable_layers == 0, "freeze_trainable_layers must not be 0 (nothing would train)"),
        (f.neftune_noise_alpha is not None and f.neftune_noise_alpha < 0,
         f"neftune_noise_alpha must be positive, got {f.neftune_noise_alpha}"),
        (t.per_device_train_batch_size < 1,
         f"per_device_train_batch_size must be at least 1, got {t.per_device_train_batch_size}"),
        (t.per_device_eval_batch_size < 1,
         f"per_device_eval_batch_size must be at least 1, got {t.per_device_eval_batch_size}"),
        (t.gradient_accumulation_steps < 1,
         f"gradient_accumulation_steps must be at least 1, got {t.gradient_accumulation_steps}"),
        (t.learning_rate <= 0, f"learning_rate must be positive, got {t.learning_rate}"),
        (not t.learning_rate <= FLOAT32_MAX,  # also NaN
         f"learning_rate {t.learning_rate} cannot be held by the optimizer (float32, at most 3.4e38); usual values "
         "are 1e-6 to 1e-3"),
        (not 0 <= t.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {t.warmup_ratio}"),
        (t.warmup_steps < 0, f"warmup_steps must be at least 0, got {t.warmup_steps}"),
        (t.max_steps != -1 and t.max_steps < 1,
         f"max_steps must be at least 1, or -1 to train for num_train_epochs, got {t.max_steps}"),
        (t.max_steps <= 0 and t.num_train_epochs <= 0,
         "num_train_epochs must be positive when max_steps is not set"),
        *[(value is not None and value > MAX_STEPS, f"{name} must be at most {MAX_STEPS:,}, got {value}")
          for name, value in (("max_steps", t.max_steps), ("save_steps", t.save_steps),
                              ("logging_steps", t.logging_steps), ("eval_steps", t.eval_steps),
                              ("warmup_steps", t.warmup_steps))],
        (t.logging_steps < 1, f"logging_steps must be at least 1, got {t.logging_steps}"),
        (t.save_steps < 1, f"save_steps must be at least 1, got {t.save_steps}"),
        (t.save_total_limit is not None and t.save_total_limit < 1,
         f"save_total_limit must be at least 1, got {t.save_total_limit}"),
        (t.eval_steps is not None and t.eval_steps < 1, f"eval_steps must be at least 1, got {t.eval_steps}"),
        (t.weight_decay < 0, f"weight_decay must be at least 0, got {t.weight_decay}"),
        (not 0 <= t.adam_beta1 < 1, f"adam_beta1 must be in [0, 1), got {t.adam_beta1}"),
        (not 0 <= t.adam_beta2 < 1, f"adam_beta2 must be in [0, 1), got {t.adam_beta2}"),
        (t.adam_epsilon <= 0, f"adam_epsilon must be positive, got {t.adam_epsilon}"),
        (t.max_grad_norm < 0, f"max_grad_norm must be at least 0 (0 turns clipping off), got {t.max_grad_norm}"),
        (not 0 <= t.seed < 2**32, f"seed must be in [0, 2**32), got {t.seed}"),
        (t.dataloader_num_workers < 0, f"dataloader_num_workers must be at least 0, got {t.dataloader_num_workers}"),
        (t.ddp_timeout < 1, f"ddp_timeout must be at least 1 (seconds), got {t.ddp_timeout}"),
        (g.max_new_tokens < 1, f"max_new_tokens must be at least 1, got {g.max_new_tokens}"),
        (g.temperature <= 0, f"temperature must be positive, got {g.temperature}"),
        (not 0 < g.top_p <= 1, f"top_p must be in (0, 1], got {g.top_p}"),
        (g.top_k < 0, f"top_k must be at least 0, got {g.top_k}"),
        (g.repetition_penalty <= 0, f"repetition_penalty must be positive, got {g.repetition_penalty}"),
        (g.num_beams < 1, f"num_beams must be at least 1, got {g.num_beams}"),
        (cfg.export.export_size < 1, f"export_size must be at least 1 (GB), got {cfg.export.export_size}"),
        (f.loraplus_lr_ratio is not None and f.loraplus_lr_ratio <= 0,
         f"loraplus_lr_ratio must be positive, got {f.loraplus_lr_ratio}"),
        (f.loraplus_lr_embedding <= 0, f"loraplus_lr_embedding must be positive, got {f.loraplus_lr_embedding}"),
        (f.pissa_iter < -1 or f.pissa_iter == 0,
         f"pissa_iter must be at least 1, or -1 for the exact SVD, got {f.pissa_iter}"),
        (bool(set(_split(t.report_to)) - set(REPORTERS)),
         f"report_to: {', '.join(sorted(set(_split(t.report_to)) - set(REPORTERS)))} is not one of "
         f"{', '.join(REPORTERS)}"),
    ]
    return [message for failed, message in checks if failed]


def _targets(cfg: TunerConfig, command: str) -> list[str]:
    """The directory the command writes into must not be an existing file."""
    if command not in TARGETS:
        return []
    key, holds = TARGETS[command]
    target = cfg.to_dict()[key]
    if target and os.path.isfile(os.path.expanduser(target)):
        return [f"{key} {target} is a file, not a directory: choose a directory for {holds}"]
    return []


def _collisions(cfg: TunerConfig) -> list[str]:
    m, f, t, d = cfg.model, cfg.finetune, cfg.train, cfg.data
    checks = [
        (t.bf16 and t.fp16, "bf16 and fp16 are both set: choose one precision"),
        (t.pure_bf16 and t.fp16, "pure_bf16 and fp16 collide: pure_bf16 trains in bfloat16 without mixed precision"),
        (d.mask_history and d.train_on_prompt,
         "mask_history and train_on_prompt collide: mask_history learns only the last reply, train_on_prompt "
         "learns the prompts too"),
        *[(value and f.finetuning_type != "lora",
           f"{key} works only with finetuning_type lora, not {f.finetuning_type}")
          for key, value in (("loraplus_lr_ratio", f.loraplus_lr_ratio is not None), ("pissa_init", f.pissa_init),
                             ("additional_target", bool(f.additional_target)), ("use_dora", f.use_dora),
                             ("use_rslora", f.use_rslora), ("create_new_adapter", f.create_new_adapter))],
        (f.create_new_adapter and f.finetuning_type == "lora" and not m.adapter_name_or_path,
         "create_new_adapter trains a new adapter over the ones in adapter_name_or_path: give adapter_name_or_path, "
         "or leave create_new_adapter out"),
        (f.finetuning_type == "lora" and m.quantization_bit is not None and f.pissa_init,
         "pissa_init cannot initialise an adapter on a quantized model: leave out quantization_bit, or pissa_init"),
        (f.finetuning_type == "lora" and m.quantization_bit is not None and f.create_new_adapter
         and bool(m.adapter_name_or_path),
         "create_new_adapter merges the given adapter into the base, which cannot be done on a quantized model: "
         "leave out quantization_bit, or create_new_adapter to train the adapter further"),
        (f.pissa_convert and not f.pissa_init, "pissa_convert converts a PiSSA adapter, but pissa_init is off: set "
         "pissa_init true"),
        (f.loraplus_lr_ratio is not None and t.fsdp is not None,
         "loraplus_lr_ratio cannot be used with fsdp (the Trainer refuses an optimizer made before FSDP wraps the "
         "model): leave out fsdp, or loraplus_lr_ratio"),
        (f.loraplus_lr_ratio is not None and t.strategy.startswith("fsdp") and t.fsdp is None,
         f"loraplus_lr_ratio cannot be used with strategy {t.strategy} (the Trainer refuses an optimizer made before "
         "FSDP wraps the model): choose strategy zero2 or zero3, or leave out loraplus_lr_ratio"),
        (cfg.export.export_legacy_format,
         "export_legacy_format true would write .bin pickles: tuner writes safetensors only, leave it false"),
        (m.quantization_bit is not None and f.finetuning_type != "lora",
         f"quantization_bit {m.quantization_bit} works only with finetuning_type lora (QLoRA), "
         f"not {f.finetuning_type}"),
        (m.adapter_name_or_path is not None and f.finetuning_type != "lora",
         f"adapter_name_or_path is a LoRA adapter: it needs finetuning_type lora, not {f.finetuning_type}"),
        (t.resume_from_checkpoint is not None and t.overwrite_output_dir,
         "resume_from_checkpoint and overwrite_output_dir collide: resume, or start afresh, not both"),
        (t.deepspeed is not None and t.fsdp is not None, "deepspeed and fsdp are both set: choose one"),
        (t.eval_strategy != "no" and not (cfg.data.val_size or cfg.data.eval_dataset),
         f"eval_strategy {t.eval_strategy} needs evaluation data: set val_size or eval_dataset"),
        (t.do_eval and not (cfg.data.val_size or cfg.data.eval_dataset),
         "do_eval evaluates once training ends, on evaluation data: set val_size or eval_dataset"),
        (t.lr_scheduler_type == "reduce_lr_on_plateau" and t.eval_strategy == "no",
         "lr_scheduler_type reduce_lr_on_plateau lowers the rate when the eval loss stops falling: it needs "
         "eval_strategy steps or epoch, and val_size or eval_dataset"),
    ]
    return [message for failed, message in checks if failed] + _stage(cfg)


PREFERENCE_DEFAULTS = {"pref_beta": 0.1, "pref_ftx": 0.0, "pref_loss": "sigmoid", "pref_bco_weight": 0.0,
                       "dpo_label_smoothing": 0.0, "simpo_gamma": 0.5, "kto_chosen_weight": 1.0,
                       "kto_rejected_weight": 1.0, "ld_alpha": None, "ref_model": None, "ref_model_adapters": None,
                       "ref_model_quantization_bit": None, "precompute_ref_log_probs": False}
DPO_ONLY = ("pref_ftx", "pref_loss", "pref_bco_weight", "dpo_label_smoothing", "simpo_gamma", "ld_alpha")
KTO_ONLY = ("kto_chosen_weight", "kto_rejected_weight")


def _preference_keys_unused(f, keys=tuple(PREFERENCE_DEFAULTS)) -> list[str]:
    """A preference key given where it cannot act: each says the stage it acts in."""
    def stages(key: str) -> str:
        return "kto" if key in KTO_ONLY else "dpo" if key in DPO_ONLY else "dpo or kto"

    return [f"{key} {getattr(f, key)} acts in preference tuning: set stage {stages(key)}, or leave {key} out"
            for key in keys if getattr(f, key) != PREFERENCE_DEFAULTS[key]]


def _reference_checks(cfg: TunerConfig) -> list[tuple[bool, str]]:
    """ref_model and its adapters and bits: a reference to load, and only where the loss has one."""
    from engine.models.resolve import needs_hub

    f, m = cfg.finetune, cfg.model
    has_one = has_reference(f)
    return [
        (f.ref_model is not None and not has_one, f"ref_model: pref_loss {f.pref_loss} trains without a reference "
         "model: leave ref_model out"),
        (f.precompute_ref_log_probs and not has_one, f"precompute_ref_log_probs: pref_loss {f.pref_loss} trains "
         "without a reference model: leave it out"),
        (f.ref_model is None and (f.ref_model_adapters or f.ref_model_quantization_bit) is not None,
         "ref_model_adapters and ref_model_quantization_bit load ref_model: give ref_model too (without it the "
         "reference is the model as it starts)"),
        (f.ref_model is not None and has_one and needs_hub(f.ref_model, m.model_revision, m.cache_dir),
         f"ref_model {f.ref_model} is not downloaded: fetch it first with `tuner download {f.ref_model}`"),
    ]


def _stage(cfg: TunerConfig) -> list[str]:
    """What the chosen stage cannot act on, one line each."""
    f, d, t = cfg.finetune, cfg.data, cfg.train
    if f.stage == "pt":
        checks = [
            (cfg.model.template is not None, f"template {cfg.model.template}: stage pt trains on raw text, which no "
             "template wraps: leave template out"),
            (d.train_on_prompt, "train_on_prompt: stage pt learns every token of the text already: leave it out"),
            (d.mask_history, "mask_history: stage pt has no conversations: leave it out"),
            (d.default_system is not None, "default_system: stage pt wraps no text in a template, so there is no "
             "system prompt to put it in: leave it out"),
            (d.tokenized_path is not None, "tokenized_path keeps supervised samples, not blocks of text: leave it out "
             "with stage pt"),
            (t.do_predict, "do_predict after stage pt would generate from raw text: predict on a dataset of prompts "
             "afterwards (tuner predict --run RUN --dataset ...)"),
        ]
        return [message for failed, message in checks if failed] + _preference_keys_unused(f)
    if f.stage not in ("dpo", "kto", "rm"):
        return _preference_keys_unused(f)
    stage, what = f.stage, "sample" if f.stage == "kto" else "pair"
    checks = [
        (d.packing, f"packing joins samples into rows, and stage {stage} trains each {what} whole: leave out packing"),
        (d.train_on_prompt, f"train_on_prompt: stage {stage} judges the replies to a prompt, and learns no prompt: "
         "leave it out"),
        (d.mask_history, f"mask_history: stage {stage} learns from the last reply of each {what} only: leave it out"),
        (d.tokenized_path is not None, f"tokenized_path keeps supervised samples, not preference data: leave it out "
         f"with stage {stage}"),
        (t.do_predict and stage != "rm", f"do_predict after stage {stage} would generate from preference data: "
         "predict on a dataset of prompts afterwards (tuner predict --run RUN --dataset ...)"),
        (t.enable_liger_kernel is True, f"enable_liger_kernel: stage {stage} computes its loss through TRL's own "
         f"{'score' if stage == 'rm' else 'LM'} head, and tuner's Liger kernels come with Liger's fused loss: leave "
         "it out"),
    ]
    if stage == "rm":
        return [message for failed, message in checks if failed] + _preference_keys_unused(f)
    checks.append((f.finetuning_type == "lora" and f.lora_dropout > 0, f"lora_dropout {f.lora_dropout}: TRL's "
                   f"preference trainers turn dropout off (as LLaMA-Factory's stage {stage} does), so it would not "
                   "act: leave it out"))
    checks.append((f.pref_beta <= 0, f"pref_beta {f.pref_beta}: beta is more than 0 (0.1 is usual)"))
    checks += _reference_checks(cfg)  # dpo and kto
    if stage == "kto":
        checks += [
            (f.kto_chosen_weight <= 0, f"kto_chosen_weight {f.kto_chosen_weight}: a weight is more than 0"),
            (f.kto_rejected_weight <= 0, f"kto_rejected_weight {f.kto_rejected_weight}: a weight is more than 0"),
            (t.per_device_train_batch_size < 2, f"per_device_train_batch_size {t.per_device_train_batch_size}: KTO's "
             "KL term pairs each prompt with another sample's reply in the same batch (TRL's KTOTrainer): give 2 or "
             "more, and halve gradient_accumulation_steps to keep the batch"),
        ]
        return [message for failed, message in checks if failed] + [
            f"{key} {getattr(f, key)}: stage kto does not take it (TRL's KTOTrainer; it acts in stage dpo): leave "
            f"it out" for key in DPO_ONLY if getattr(f, key) != PREFERENCE_DEFAULTS[key]]
    checks += [
        (f.ld_alpha is not None and not 0 <= f.ld_alpha <= 1, f"ld_alpha {f.ld_alpha}: LD-DPO's alpha is between 0 "
         "and 1 (1: plain DPO)"),
        (f.ld_alpha is not None and f.pref_loss in REFERENCE_FREE, f"ld_alpha acts through TRL's DPOTrainer (pref_loss "
         f"sigmoid, hinge, ipo), not on pref_loss {f.pref_loss}: leave it out"),
        (f.pref_ftx < 0, f"pref_ftx {f.pref_ftx}: the weight of the supervised loss is 0 or more"),
        (f.pref_loss == "orpo" and f.pref_ftx > 0, f"pref_ftx {f.pref_ftx}: ORPO's loss holds the supervised loss on "
         "the chosen replies already (pref_beta weighs its odds-ratio part): leave pref_ftx out"),
        (f.pref_bco_weight < 0, f"pref_bco_weight {f.pref_bco_weight}: the weight of the BCO loss is 0 or more"),
        (f.pref_loss in REFERENCE_FREE and f.pref_bco_weight > 0, f"pref_bco_weight: the BCO loss compares the "
         f"model with its reference, and pref_loss {f.pref_loss} has none: leave it out"),
        (not 0 <= f.dpo_label_smoothing < 0.5, f"dpo_label_smoothing {f.dpo_label_smoothing}: the chance that a "
         "pair's labels are flipped is at least 0 and below 0.5"),
        (f.dpo_label_smoothing > 0 and f.pref_loss != "sigmoid", f"dpo_label_smoothing acts on the sigmoid (DPO) "
         f"loss only, not on pref_loss {f.pref_loss}: leave it out"),
        (f.simpo_gamma != PREFERENCE_DEFAULTS["simpo_gamma"] and f.pref_loss != "simpo", f"simpo_gamma "
         f"{f.simpo_gamma} is SimPO's target margin: set pref_loss simpo, or leave simpo_gamma out"),
    ]
    return [message for failed, message in checks if failed] + _preference_keys_unused(f, KTO_ONLY)


def _names(cfg: TunerConfig) -> list[str]:
    """Template and dataset names that do not exist, each with the known ones listed (closest first)."""
    from engine.data import resolve_dataset
    from engine.templates import template_names

    problems = []
    if cfg.model.template is not None and cfg.model.template not in template_names():
        problems.append(_unknown("template", cfg.model.template, template_names()))
    for key in ("dataset", "eval_dataset"):
        for name in _split(getattr(cfg.data, key)):
            try:
                resolve_dataset(name, cfg.data.dataset_dir)
            except UserError as exc:
                problems.append(f"{key}: {exc}")
    return problems


def _optimizer(cfg: TunerConfig) -> list[str]:
    """optim must be an optimizer the installed transformers knows, so a typo fails now, not after the model has
    loaded (the default needs no look-up, and no import)."""
    if cfg.train.optim == TrainArgs.optim:
        return []
    from engine.models.loading import transformers_module

    known = [name.value for name in transformers_module("training_args").OptimizerNames]
    if cfg.train.optim in known:
        return []
    close = difflib.get_close_matches(cfg.train.optim, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(known)}"
    return [f"optim '{cfg.train.optim}' is not an optimizer transformers knows: {hint}"]


# Learning-rate schedules whose transformers function needs a keyword that has no default, with what to write.
SCHEDULER_NEEDS = {
    "cosine_with_min_lr": (("min_lr", "min_lr_rate"), "lr_scheduler_kwargs: {min_lr_rate: 0.1}"),
    "warmup_stable_decay": (("num_decay_steps",), "lr_scheduler_kwargs: {num_decay_steps: 100}"),
}


def _scheduler(cfg: TunerConfig) -> list[str]:
    """The schedule's own keywords (lr_scheduler_kwargs): the ones it cannot start without, and no unknown ones."""
    kind = cfg.train.lr_scheduler_type
    kwargs = cfg.passthrough.get("lr_scheduler_kwargs") or {}
    if not isinstance(kwargs, dict):
        return [f"lr_scheduler_kwargs must be a mapping, got {kwargs!r}"]
    problems = []
    if kind in SCHEDULER_NEEDS:
        needs, example = SCHEDULER_NEEDS[kind]
        if not any(name in kwargs for name in needs):
            problems.append(f"lr_scheduler_type {kind} needs {' or '.join(needs)} in lr_scheduler_kwargs: e.g. "
                            f"{example}")
    if kwargs and kind != "reduce_lr_on_plateau":
        accepted = _scheduler_keywords(kind)
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            problems.append(f"lr_scheduler_kwargs: {', '.join(unknown)} not accepted by lr_scheduler_type {kind} "
                            f"(it takes {', '.join(sorted(accepted)) or 'none'})")
    return problems


def _scheduler_keywords(kind: str) -> set[str]:
    """The keywords the installed transformers' schedule function takes beyond what the Trainer passes itself."""
    import inspect

    from engine.models.loading import transformers_module

    optimization = transformers_module("optimization")
    function = optimization.TYPE_TO_SCHEDULER_FUNCTION[optimization.SchedulerType(kind)]
    passed = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    return {name for name in inspect.signature(function).parameters if name not in passed}


def _trackers(cfg: TunerConfig) -> list[str]:
    """Each tracker in report_to must be installed (transformers' own look-up); none asked, nothing imported."""
    asked = [name for name in _split(cfg.train.report_to) if name in REPORTERS and name not in ("none", "all")]
    if not asked:
        return []
    from engine.models.loading import transformers_module

    installed = transformers_module("integrations.integration_utils").get_available_reporting_integrations()
    return [f"report_to {name}: the {name} package is not installed (pip install {name}), or leave it out"
            for name in asked if name not in installed]


def _launch(cfg: TunerConfig) -> list[str]:
    """DeepSpeed needs its package (and a user's config file); sharding strategies and a user's fsdp need several
    processes; what DeepSpeed or FSDP refuse together with other settings."""
    t, problems = cfg.train, []
    deepspeed_installed = importlib.util.find_spec("deepspeed") is not None
    if t.deepspeed is not None:
        if not deepspeed_installed:
            problems.append(f"deepspeed {t.deepspeed}: the deepspeed package is not installed (pip install "
                            "deepspeed), or leave deepspeed out")
        elif not Path(t.deepspeed).is_file():
            problems.append(f"deepspeed config file {t.deepspeed} does not exist")
    if t.strategy != "ddp":
        if t.strategy.startswith("zero") and not deepspeed_installed:
            problems.append(f"strategy {t.strategy} uses DeepSpeed, which is not installed: pip install "
                            "'tuner-tui[deepspeed]', or choose strategy fsdp")
        for key, kind in (("deepspeed", "DeepSpeed"), ("fsdp", "FSDP")):
            if getattr(t, key) is not None:
                problems.append(f"strategy {t.strategy} and {key} collide: the strategy writes its own {kind} "
                                f"config; leave out {key}, or set strategy ddp to use yours")
    if t.strategy != "ddp" or t.fsdp is not None:
        from engine.world import planned_world_size

        if planned_world_size(cfg) < 2:
            what = f"strategy {t.strategy}" if t.strategy != "ddp" else f"fsdp {t.fsdp}"
            problems.append(f"{what} shards the model across processes and this run has one: set nproc_per_node 2 "
                            "or more (or nnodes 2 or more)")
    if cfg.finetune.pissa_init and (t.strategy.startswith("fsdp") or t.fsdp):
        problems.append("pissa_init saves its adapter from the first process alone, which FSDP's sharded weights "
                        "would keep waiting: leave out pissa_init, or use strategy ddp or zero2")
    user_file = t.deepspeed is not None and deepspeed_installed and Path(t.deepspeed).is_file()
    if user_file or t.strategy.startswith("zero3"):
        problems += _deepspeed_collisions(cfg)
    return problems


def _deepspeed_collisions(cfg: TunerConfig) -> list[str]:
    """What LLaMA-Factory refuses with DeepSpeed ZeRO-3 (a user's file of stage 3, or strategy zero3*), and LoRA+
    where a user's file has DeepSpeed build its own optimizer (the generated files have no optimizer section)."""
    import json

    ds: dict = {}
    if cfg.train.deepspeed is not None:
        from engine.errors import UserError
        from engine.rundir.files import read_user_text

        try:
            ds = json.loads(read_user_text(cfg.train.deepspeed, "deepspeed config file"))
        except UserError as exc:
            return [str(exc)]
        except ValueError as exc:
            return [f"deepspeed config file {cfg.train.deepspeed} is not JSON: {exc}"]
        if not isinstance(ds, dict):
            return [f"deepspeed config file {cfg.train.deepspeed} is not a JSON object"]
    zero3 = (ds.get("zero_optimization") or {}).get("stage") == 3 or cfg.train.strategy.startswith("zero3")
    f, problems = cfg.finetune, []
    if zero3 and cfg.train.pure_bf16:
        problems.append("pure_bf16 does not work with DeepSpeed ZeRO-3: use bf16 (mixed precision), or ZeRO-2")
    if zero3 and f.pissa_init:
        problems.append("pissa_init cannot initialise from weights that DeepSpeed ZeRO-3 shards: leave out pissa_init, "
                        "or use ZeRO-2")
    if f.loraplus_lr_ratio is not None and "optimizer" in ds:
        problems.append(f"loraplus_lr_ratio builds its own optimizer, and {cfg.train.deepspeed} has an \"optimizer\" "
                        "section that DeepSpeed would use instead: remove that section, or loraplus_lr_ratio")
    return problems


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _unknown(key: str, value: str, known: list[str]) -> str:
    close = difflib.get_close_matches(value, known, n=3, cutoff=0.5)
    listed = close + [k for k in sorted(known) if k not in close]
    return f"{key} '{value}' does not exist; known: {', '.join(listed)}"
