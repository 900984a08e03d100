"""Auto-fit: the batch layout with the highest throughput that fits the memory at hand, keeping the user's
effective batch (samples per optimizer step) within 10% on average.

On a GPU the micro-batch is a packed row of at most ``tokens`` tokens (TRL's best-fit-decreasing packing, padding-free:
samples never attend to each other), so memory is bounded by tokens rather than by the longest sample times the
batch. The choice stands on the VRAM estimator (engine.memory.estimate): every candidate (rows of T tokens,
accumulation A, gradient checkpointing on/off) is estimated, those that fit the GPU's free memory less a margin are
kept, and the one the throughput model ranks highest wins. The throughput model is deliberately simple: a GPU's
tokens/s grows with the tokens of a micro-batch and saturates (T / (T + SATURATION_TOKENS)), and checkpointing costs
one more forward pass (x 0.75).

A preference or reward stage's batch is padded by TRL (no packing, no padding-free rows): there auto-fit chooses the
micro-batch among the divisors of the user's samples per step (the rest accumulated, so the batch stays exactly the
user's) and checkpointing, each candidate estimated at its worst, micro-batch x the longest pair (``fit_pairs``).

On a CPU memory is rarely the limit: the user's micro-batch and accumulation are kept and checkpointing is off when
the estimated activations take less than a quarter of the available RAM.

``backoff`` gives the next, smaller layout after an out-of-memory error in the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from engine.data.stats import Lengths
from engine.memory.estimate import RunShape, dequantized_expert_bytes, estimate

MARGIN = 0.10  # of the free memory, kept free
BATCH_TOLERANCE = 0.10  # samples per optimizer step may differ from the user's by this much on average
PACKING_FILL = 0.97  # best-fit-decreasing fills rows this well on SFT data (measured on alpaca lengths)
SATURATION_TOKENS = 1024
CHECKPOINTING_SPEED = 0.75
CPU_RAM_SHARE = 0.25


@dataclass(frozen=True)
class Fit:
    """A batch layout. ``tokens`` set: each micro-batch is one packed row of at most that many tokens; None: a
    micro-batch is ``micro_batch`` samples joined padding-free."""

    micro_batch: int
    accumulation: int
    gradient_checkpointing: bool
    tokens: int | None = None
    estimate_gib: float | None = None
    reason: str = ""

    def describe(self) -> str:
        unit = f"rows of up to {self.tokens} tokens" if self.tokens else f"micro-batch {self.micro_batch}"
        memory = f", estimated {self.estimate_gib:.1f} GiB" if self.estimate_gib is not None else ""
        return (f"{unit} x accumulation {self.accumulation}, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}{memory}")


def user_fit(micro_batch: int, accumulation: int, checkpointing: bool | None, reason: str) -> Fit:
    return Fit(micro_batch, accumulation, True if checkpointing is None else checkpointing, reason=reason)


def fit_gpu(shape: RunShape, lengths: Lengths, micro_batch: int, accumulation: int, checkpointing: bool | None,
            free_gib: float) -> Fit:
    """The fastest layout that fits ``free_gib`` (less the margin): packed rows of T tokens with accumulation A
    (A * T holding the user's samples per step), or the user's own micro-batch joined padding-free (its memory
    counted for its worst case, micro_batch x the longest sample). When nothing fits, the user's layout with
    checkpointing, so the run fails, if it must, the way the user asked for it."""
    samples_per_step = micro_batch * accumulation
    budget = free_gib * (1 - MARGIN)
    options = [checkpointing] if checkpointing is not None else [False, True]
    candidates = []  # (tokens the estimate must hold, tokens a micro-batch holds on average, micro-batch, A, packed)
    for accumulate in range(1, samples_per_step + 1):
        tokens = math.ceil(samples_per_step * lengths.mean / (accumulate * PACKING_FILL))
        if tokens < lengths.longest:
            break  # a row must hold the longest sample
        candidates.append((tokens, tokens * PACKING_FILL, 1, accumulate, True))
    candidates.append((micro_batch * lengths.longest, micro_batch * lengths.mean, micro_batch, accumulation, False))
    best, best_score = None, -1.0
    reason = _gpu_reason(samples_per_step, lengths, free_gib)
    for worst, typical, mb, accumulate, packed in candidates:
        for on in options:
            needed = estimate(replace(shape, batch_size=1, seq_len=worst, gradient_checkpointing=on)).total_gib
            if needed > budget:
                continue
            score = (CHECKPOINTING_SPEED if on else 1.0) * typical / (typical + SATURATION_TOKENS)
            if score > best_score:
                best_score = score
                best = Fit(mb, accumulate, on, worst if packed else None, needed, reason)
    if best is not None:
        return best
    on = True if checkpointing is None else checkpointing
    needed = estimate(replace(shape, gradient_checkpointing=on)).total_gib
    return Fit(micro_batch, accumulation, on, None, needed,
               f"no layout's estimate fits {budget:.1f} GiB (free {free_gib:.1f} GiB less {MARGIN:.0%}): "
               "the batch as given")


def _gpu_reason(samples_per_step: int, lengths: Lengths, free_gib: float) -> str:
    return (f"{samples_per_step} samples per optimizer step as asked (mean {lengths.mean:.0f} tokens, longest "
            f"{lengths.longest}), the fastest layout whose estimate fits {free_gib:.1f} GiB free less {MARGIN:.0%}")


def fit_pairs(shape: RunShape, lengths: Lengths, micro_batch: int, accumulation: int, checkpointing: bool | None,
              free_gib: float) -> Fit:
    """The fastest padded layout of a preference or reward stage that fits ``free_gib`` (less the margin): a
    micro-batch m dividing the user's samples per step, accumulation the rest, checkpointing on or off, each
    estimated with m samples of the longest pair's length (TRL pads a batch to its longest). When nothing fits, the
    user's layout with checkpointing."""
    samples_per_step = micro_batch * accumulation
    budget = free_gib * (1 - MARGIN)
    options = [checkpointing] if checkpointing is not None else [False, True]
    per_sample = lengths.mean * (2 if shape.pairs else 1)  # a pair's two conversations go through in one forward
    best, best_score = None, -1.0
    for m in (m for m in range(samples_per_step, 0, -1) if samples_per_step % m == 0):
        for on in options:
            needed = estimate(replace(shape, batch_size=m, seq_len=lengths.longest, gradient_checkpointing=on))
            if needed.total_gib > budget:
                continue
            typical = m * per_sample
            score = (CHECKPOINTING_SPEED if on else 1.0) * typical / (typical + SATURATION_TOKENS)
            if score > best_score:
                best_score = score
                best = Fit(m, samples_per_step // m, on, None, needed.total_gib,
                           f"{samples_per_step} samples per optimizer step as asked (longest {lengths.longest} "
                           f"tokens), padded: the fastest layout whose estimate fits {free_gib:.1f} GiB free less "
                           f"{MARGIN:.0%}")
    if best is not None:
        return best
    on = True if checkpointing is None else checkpointing
    needed = estimate(replace(shape, seq_len=lengths.longest, gradient_checkpointing=on)).total_gib
    return Fit(micro_batch, accumulation, on, None, needed,
               f"no layout's estimate fits {budget:.1f} GiB (free {free_gib:.1f} GiB less {MARGIN:.0%}): "
               "the batch as given")


def fit_checkpointing(shape: RunShape, micro_batch: int, accumulation: int, checkpointing: bool | None,
                      free_gib: float, layout: str) -> Fit:
    """The user's own layout (packing as asked, or padded batches) on a GPU: only checkpointing is chosen, off when
    the estimate without it fits."""
    if checkpointing is not None:
        return user_fit(micro_batch, accumulation, checkpointing, f"{layout}: the batch and checkpointing as given")
    needed = estimate(replace(shape, gradient_checkpointing=False)).total_gib
    if needed <= free_gib * (1 - MARGIN):
        return Fit(micro_batch, accumulation, False, None, needed,
                   f"{layout}: without checkpointing the estimate fits {free_gib:.1f} GiB free")
    return Fit(micro_batch, accumulation, True, None, estimate(shape).total_gib,
               f"{layout}: without checkpointing the estimate ({needed:.1f} GiB) exceeds {free_gib:.1f} GiB free")


def fit_cpu(shape: RunShape, micro_batch: int, accumulation: int, checkpointing: bool | None,
            available_gib: float) -> Fit:
    """The user's batch; checkpointing off unless asked for, or the activations would crowd the RAM."""
    if checkpointing is not None:
        return user_fit(micro_batch, accumulation, checkpointing, "CPU: the batch and checkpointing as given")
    activations = estimate(replace(shape, precision="fp32", gradient_checkpointing=False)).components
    needed = (activations.get("activations", 0.0) + activations.get("logits_and_loss", 0.0)
              + activations.get("dequantized_experts", 0.0))
    if needed <= available_gib * CPU_RAM_SHARE:
        return Fit(micro_batch, accumulation, False, None, None,
                   f"CPU: activations need ~{needed:.1f} GiB of {available_gib:.1f} GiB available RAM, "
                   "so no checkpointing (it recomputes every forward pass)")
    return Fit(micro_batch, accumulation, True, None, None,
               f"CPU: activations would need ~{needed:.1f} GiB of {available_gib:.1f} GiB available RAM: "
               "checkpointing on")


def backoff(fit: Fit, longest: int, shape: RunShape | None = None) -> Fit | None:
    """After an out-of-memory error: half the tokens per micro-batch (twice the accumulation), down to the longest
    sample, then checkpointing on; None when nothing smaller is left. Checkpointing comes first where ``shape`` (the
    estimator's view of the run) shows memory that fewer tokens leave untouched and checkpointing frees: every
    layer's dequantized 4-bit experts kept for the backward pass (a mixture of experts under QLoRA)."""
    if not fit.gradient_checkpointing and shape is not None and _keeps_every_layers_experts(shape):
        return replace(fit, gradient_checkpointing=True, estimate_gib=None,
                       reason="backed off after running out of memory: gradient checkpointing on, so only one "
                              "layer's dequantized experts are held at a time")
    if fit.tokens and fit.tokens // 2 >= longest:
        return replace(fit, tokens=fit.tokens // 2, accumulation=fit.accumulation * 2, estimate_gib=None,
                       reason="backed off after running out of memory: half the tokens per micro-batch")
    if fit.tokens is None and fit.micro_batch > 1:
        half = fit.micro_batch // 2
        return replace(fit, micro_batch=half, accumulation=fit.accumulation * fit.micro_batch // half,
                       estimate_gib=None, reason="backed off after running out of memory: half the micro-batch")
    if not fit.gradient_checkpointing:
        return replace(fit, gradient_checkpointing=True, estimate_gib=None,
                       reason="backed off after running out of memory: gradient checkpointing on")
    return None


def _keeps_every_layers_experts(shape: RunShape) -> bool:
    return dequantized_expert_bytes(replace(shape, gradient_checkpointing=False)) > \
        dequantized_expert_bytes(replace(shape, gradient_checkpointing=True))
