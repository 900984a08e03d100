"""The speed features a run uses, decided once at its start from the config, the hardware, the model and the data:
padding-free batches, the attention kernel, Liger's fused kernels and the auto-fitted batch layout.

``plan_speed`` is a plain function of what it is given (no GPU needed to test it); ``SpeedPlan.features`` is what the
start event records and the log prints: every feature, on or off, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.config.schema import TunerConfig, has_reference
from engine.data.stats import Lengths
from engine.memory.autofit import Fit, fit_checkpointing, fit_cpu, fit_gpu, fit_pairs, user_fit
from engine.memory.estimate import RunShape
from engine.models.kernels import LigerChoice, choose_liger
from engine.models.loading import choose_attention


@dataclass(frozen=True)
class Machine:
    """What the plan needs to know of where it runs."""

    on_gpu: bool
    flash_attn_installed: bool
    torch_varlen: bool  # torch's fused variable-length attention (CUDA, torch >= 2.10)
    liger_model_types: frozenset[str] | None  # engine.models.kernels.liger_model_types
    free_gib: float | None  # this process's GPU, before the model loads
    available_ram_gib: float


@dataclass(frozen=True)
class ModelTraits:
    """What the plan needs to know of the model."""

    model_type: str | None
    attention_backend: bool = True  # dispatches through transformers' AttentionInterface and its packed masks
    varlen_blocker: str | None = None  # engine.models.attention.varlen_blocker


@dataclass(frozen=True)
class SpeedPlan:
    padding_free: bool
    padding_free_why: str
    attention: str
    attention_why: str
    liger: LigerChoice
    fit: Fit
    auto_fit: bool
    longest_sample: int
    loss: str  # "liger" (fused linear cross-entropy), "trl" (TRL's tiled LM head) or "model" (the model's own)
    loss_why: str
    check: object = None  # engine.train.path_check.PathCheck, once the start-of-run check ran (or was left out)
    shape: RunShape | None = None  # the estimator's view of the run, which the out-of-memory back-off weighs

    @property
    def packed_tokens(self) -> int | None:
        """Rows of at most this many tokens (auto-fit's packing), or None."""
        return self.fit.tokens

    def features(self) -> list[dict]:
        return [
            {"feature": "padding-free batches", "on": self.padding_free, "why": self.padding_free_why},
            {"feature": "attention", "on": True, "value": self.attention, "why": self.attention_why},
            {"feature": "liger kernels", "on": self.liger.on, "why": self.liger.why},
            {"feature": "loss", "on": True, "value": LOSSES[self.loss], "why": self.loss_why},
            {"feature": "auto-fit", "on": self.auto_fit, "value": self.fit.describe(), "why": self.fit.reason},
            {"feature": "gradient checkpointing", "on": self.fit.gradient_checkpointing, "why": self.fit.reason},
        ] + ([self.check.feature()] if self.check is not None else [])

    def lines(self) -> list[str]:
        lines = []
        for f in self.features():
            state = f.get("value") or ("on" if f["on"] else "off")
            lines.append(f"{f['feature']}: {state} ({f['why']})")
        return lines


def plan_speed(cfg: TunerConfig, machine: Machine, lengths: Lengths, model: ModelTraits,
               shape: RunShape | None, pairs: bool = False) -> SpeedPlan:
    """Every speed decision of a run. ``shape`` is the estimator's view of the run (None when the model's geometry
    is unknown: auto-fit then keeps the batch as given). ``pairs``: a preference or reward stage's run (TRL's trainer
    pads each batch of pairs, computes its loss itself, and auto-fit chooses among padded layouts: fit_pairs)."""
    d, t = cfg.data, cfg.train
    padding_free, why = (False, PAIRS_PAD) if pairs else _padding_free(cfg, model)
    attention, attention_why = choose_attention(cfg.model.flash_attn, machine.on_gpu, machine.flash_attn_installed,
                                                padding_free, machine.torch_varlen, model.varlen_blocker)
    liger = (LigerChoice(False, "a preference or reward stage: TRL's trainer computes its loss itself")
             if pairs else
             choose_liger(t.enable_liger_kernel, machine.on_gpu, machine.liger_model_types, model.model_type))
    mb, ga, gc = t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing
    if pairs:
        if not t.auto_fit:
            fit = user_fit(mb, ga, gc, "auto_fit false: the batch settings as given")
        elif shape is None:
            fit = user_fit(mb, ga, gc, "the model's geometry is unknown, so nothing can be estimated: the batch as "
                                       "given")
        elif machine.on_gpu and machine.free_gib is not None:
            fit = fit_pairs(_with_speed(shape, attention, False), lengths, mb, ga, gc, machine.free_gib)
        else:
            fit = fit_cpu(shape, mb, ga, gc, machine.available_ram_gib)
        f = cfg.finetune
        how = ("TRL's tiled LM head over each reply and its KL sample, against the reference" if f.stage == "kto"
               else "the score head at the last token of each conversation, chosen against rejected"
               if f.stage == "rm"
               else "the model's logits over both replies, no reference" if not has_reference(f)
               else "TRL's tiled LM head over both replies, against the reference")
        return SpeedPlan(False, PAIRS_PAD, attention, attention_why, liger, fit, t.auto_fit, lengths.longest,
                         "reward" if f.stage == "rm" else "preference", how, shape=shape)
    if not t.auto_fit:
        fit = user_fit(mb, ga, gc, "auto_fit false: the batch settings as given")
    elif shape is None:
        fit = user_fit(mb, ga, gc, "the model's geometry is unknown, so nothing can be estimated: the batch as given")
    elif machine.on_gpu and machine.free_gib is not None:
        shape = _with_speed(shape, attention, liger.on)
        if padding_free and not d.packing:
            fit = fit_gpu(shape, lengths, mb, ga, gc, machine.free_gib)
        else:
            fit = fit_checkpointing(shape, mb, ga, gc, machine.free_gib,
                                    "packing as asked" if d.packing else "padded batches")
    else:
        fit = fit_cpu(shape, mb, ga, gc, machine.available_ram_gib)
    loss, loss_why = _choose_loss(liger.on, machine.on_gpu)
    return SpeedPlan(padding_free, why, attention, attention_why, liger, fit, t.auto_fit, lengths.longest, loss,
                     loss_why, shape=shape)


def _padding_free(cfg: TunerConfig, model: ModelTraits) -> tuple[bool, str]:
    d = cfg.data
    if d.packing:
        return True, "packing joins samples into rows"
    if not d.padding_free:
        return False, "padding_free false: each batch padded to its longest sample"
    if not model.attention_backend:
        return False, ("this architecture builds its own attention masks, which would let joined samples see each "
                       "other: padded batches")
    if cfg.finetune.neftune_noise_alpha:
        return False, ("NEFTune scales its noise by the length of the row: padded batches keep what "
                       "neftune_noise_alpha means")
    return True, "default: no padding computed, samples kept apart"


PAIRS_PAD = ("TRL's preference and reward trainers pad each batch of pairs (DPO's padding-free path is off in TRL "
             "1.16)")
LOSSES = {"liger": "Liger's fused linear cross-entropy", "trl": "TRL's tiled LM head",
          "model": "the model's own cross-entropy", "preference": "TRL's preference loss",
          "reward": "TRL's reward loss (chosen scored above rejected)"}


def _choose_loss(liger: bool, on_gpu: bool) -> tuple[str, str]:
    """How the loss is computed. TRL's SFTTrainer projects through the LM head in tiles (no full logits in memory)
    and computes entropy and top-1 accuracy with a host sync at every step: worth it on a GPU without Liger, but on a
    CPU those metrics are ~40% of a step (bench/speed.py)."""
    if liger:
        return "liger", "no full logits in memory, with Liger's kernels"
    if on_gpu:
        return "trl", "no full logits in memory (Liger is off)"
    return "model", "CPU: TRL's per-step entropy and accuracy metrics would cost ~40% of each step"


def _with_speed(shape: RunShape, attention: str, liger: bool) -> RunShape:
    return replace(shape, attention="eager" if attention == "eager" else "sdpa", fused_loss=liger)
