"""The start-of-run check of the fast path: before a run trusts the path its speed plan chose (padding-free rows,
a fused or variable-length attention kernel, a fused loss), its first micro-batch goes through that path and through
the classic one (the same samples padded, PyTorch SDPA, plain cross-entropy over the logits), on the same weights.
When the fast path raises, or its loss or gradients differ beyond the tolerance, the run goes on with the classic
path and says so in one line and in its start event. It costs one extra forward and backward.

What it cannot separate: Liger's element-wise kernels (RMSNorm, RoPE, SwiGLU), patched into the model's modules,
run on both sides; ``tuner doctor --gpu`` checks them against the reference on a model without them.

The gradients are compared through a fingerprint: per trainable tensor its norm and its projection on a fixed random
direction, so a full fine-tune's gradients are never held twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace

from engine.config.schema import TunerConfig
from engine.train.loss import IGNORE_INDEX

log = logging.getLogger("tuner")

# Relative differences the fast path may show against the classic one: half precision reorders sums in every kernel.
TOLERANCE = {"half": {"loss": 2e-2, "grads": 1e-1}, "fp32": {"loss": 1e-3, "grads": 1e-2}}


@dataclass(frozen=True)
class PathCheck:
    """What the check found; ``to_json`` is what the start event records."""

    checked: bool
    why: str
    path: str = ""  # the fast path, in words
    passed: bool = True
    loss_diff: float | None = None
    grads_diff: float | None = None
    error: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.checked and not self.passed

    def line(self) -> str:
        if not self.checked:
            return f"fast-path check: not run ({self.why})"
        if self.error:
            return f"fast-path check: {self.path} failed ({self.error}); going on with the classic path"
        diffs = f"loss differs by {self.loss_diff:.1e}, gradients by {self.grads_diff:.1e} (relative)"
        if self.passed:
            return f"fast-path check: {self.path} agrees with the classic path ({diffs})"
        return f"fast-path check: {self.path} disagrees with the classic path ({diffs}, {self.why}); going on with " \
               "the classic path"

    def feature(self) -> dict:
        """The check as one of the speed plan's features (the start event's ``speed``, the log's speed lines)."""
        value = ("not run" if not self.checked else "passed" if self.passed else "failed: classic path")
        diffs = "" if self.loss_diff is None else f"loss {self.loss_diff:.1e}, gradients {self.grads_diff:.1e}; "
        return {**self.to_json(), "feature": "fast-path check", "on": self.checked, "value": value,
                "why": f"{self.path + ': ' if self.path else ''}{diffs}{self.error or self.why}"}

    def to_json(self) -> dict:
        return {"checked": self.checked, "passed": self.passed, "fell_back": self.fell_back, "path": self.path,
                "why": self.why, "loss_diff": self.loss_diff, "grads_diff": self.grads_diff, "error": self.error}


def fast_path(plan) -> str | None:
    """The fast features of a speed plan, in words; None when it already is the classic path."""
    parts = []
    if plan.padding_free:
        parts.append("padding-free rows")
    if plan.attention not in ("sdpa", "eager"):
        parts.append(f"{plan.attention} attention")
    if plan.loss in ("liger", "trl"):
        parts.append("Liger's fused loss" if plan.loss == "liger" else "TRL's tiled LM head")
    return " + ".join(parts) or None


def why_not(cfg: TunerConfig, plan, on_gpu: bool, pairs: bool, processes: int) -> str | None:
    """Why the check does not run in this run, or None when it does."""
    asked = cfg.train.check_fast_path
    if asked is False:
        return "check_fast_path false"
    if pairs:
        return "a preference or reward stage: TRL's trainer pads its batches itself"
    if fast_path(plan) is None:
        return "the run takes the classic path already"
    if processes > 1 or cfg.train.deepspeed or cfg.train.fsdp or cfg.train.strategy != "ddp":
        return "several processes or a sharded model: `tuner doctor --gpu` checks the kernels on this card"
    if asked is None and not on_gpu:
        return "no GPU (check_fast_path true runs it on a CPU too)"
    return None


def check(trainer, model, plan, precision: str, pad_token_id: int) -> PathCheck:
    """The first micro-batch through the plan's fast path and through the classic path, compared. Out of memory in
    the check, it is not run (the first training step will show whether the layout fits, with its back-off)."""
    import torch

    path = fast_path(plan)
    fast_batch, classic_batch = batches(trainer, plan, pad_token_id)
    learned = int((fast_batch["labels"][..., 1:] != IGNORE_INDEX).sum())
    kept = _trainer_state(trainer)
    _checkpointing_as_training_will(trainer, model)
    try:
        with _no_dropout(model), _no_router_loss(trainer, model):
            fast = _attempt(lambda: _loss_and_fingerprint(
                model, [fast_batch], trainer.args.device, precision,
                lambda b: trainer.compute_loss(model, b, num_items_in_batch=learned)))
            if isinstance(fast, Exception):  # whatever the fast kernel raises: the classic path is the answer to it
                return PathCheck(True, "it raised", path, False, error=_describe(fast))
            with _attention_as(model, "sdpa"):  # one sample at a time: no more memory than a training step
                classic = _attempt(lambda: _loss_and_fingerprint(
                    model, _rows(classic_batch), trainer.args.device, precision,
                    lambda b: _classic_loss(model, b, learned)))
            if isinstance(classic, Exception):  # nothing to compare with: the run keeps its path, unchecked
                return PathCheck(False, f"the classic path raised {_describe(classic)}", path)
    except torch.OutOfMemoryError:
        return PathCheck(False, "out of memory during the check: the first step shows whether the layout fits",
                         path)
    finally:
        model.zero_grad(set_to_none=True)
        _restore_trainer_state(trainer, kept)
    return compare(path, fast, classic, precision)


def _attempt(work):
    """``work``'s result, or the exception it raised; an out-of-memory error is raised on (no kernel's fault)."""
    import torch

    try:
        return work()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        return exc


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"


def batches(trainer, plan, pad_token_id: int) -> tuple[dict, dict]:
    """The first micro-batch as the trainer collates it, and the same samples as the classic batch. Padded, a packed
    row's samples can take several times the row's memory, so only the first samples whose padded batch is no larger
    than the row are taken (at least one), on both sides."""
    rows = [trainer.train_dataset[i] for i in range(min(plan.fit.micro_batch, len(trainer.train_dataset)))]
    fast = trainer.data_collator(rows)
    if "cu_seq_lens_q" not in fast:
        return fast, fast
    spans = _spans(fast)
    budget, kept = fast["input_ids"].shape[1], 1
    while kept < len(spans) and (kept + 1) * max(end - start for start, end in spans[:kept + 1]) <= budget:
        kept += 1
    if kept < len(spans):
        fast = trainer.data_collator([{"input_ids": fast["input_ids"][0, start:end].tolist(),
                                       "labels": fast["labels"][0, start:end].tolist()}
                                      for start, end in spans[:kept]])
    return fast, padded(fast, pad_token_id)


def compare(path: str, fast: tuple[float, list[float]], classic: tuple[float, list[float]],
            precision: str) -> PathCheck:
    """Relative differences of the loss and of the gradients' fingerprints, against the tolerance."""
    tolerance = TOLERANCE["fp32" if precision == "fp32" else "half"]
    (fast_loss, fast_print), (classic_loss, classic_print) = fast, classic
    loss_diff = abs(fast_loss - classic_loss) / max(abs(classic_loss), 1e-6)
    norm = math.sqrt(sum(x * x for x in classic_print)) or 1e-12
    grads_diff = math.sqrt(sum((a - b) ** 2 for a, b in zip(fast_print, classic_print))) / norm
    if not all(math.isfinite(x) for x in (fast_loss, loss_diff, grads_diff)):
        return PathCheck(True, "its loss or gradients are not finite", path, False, loss_diff, grads_diff)
    failed = [f"{what} over {tolerance[what]:.0e}" for what, diff in (("loss", loss_diff), ("grads", grads_diff))
              if diff > tolerance[what]]
    why = ", ".join(failed) if failed else f"within {tolerance['loss']:.0e} (loss) and {tolerance['grads']:.0e} " \
                                           "(gradients)"
    return PathCheck(True, why, path, not failed, loss_diff, grads_diff)


def classic_plan(plan, cfg: TunerConfig, check_result: PathCheck):
    """The plan the run goes on with after a failed check: padded batches, SDPA, plain cross-entropy over the
    logits. Packed rows need the fast path's boundaries, so a packed layout becomes the batch as given, with
    checkpointing unless it was turned off."""
    from engine.memory.autofit import user_fit

    why = f"the fast path ({check_result.path}) failed its check at the start: classic path"
    fit = plan.fit
    if fit.tokens is not None:
        t = cfg.train
        fit = user_fit(t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing, why)
    return replace(plan, padding_free=False, padding_free_why=why, attention="sdpa", attention_why=why,
                   loss="model", loss_why=why, fit=fit, check=check_result)


def padded(batch: dict, pad_token_id: int) -> dict:
    """A padding-free row (its samples' boundaries in ``cu_seq_lens_q``) as the classic batch: one sample a row,
    padded on the right, with its attention mask."""
    import torch

    spans = _spans(batch)
    longest = max(end - start for start, end in spans)
    ids = torch.full((len(spans), longest), pad_token_id, dtype=batch["input_ids"].dtype)
    labels = torch.full((len(spans), longest), IGNORE_INDEX, dtype=batch["labels"].dtype)
    mask = torch.zeros((len(spans), longest), dtype=torch.long)
    for row, (start, end) in enumerate(spans):
        ids[row, :end - start] = batch["input_ids"][0, start:end]
        labels[row, :end - start] = batch["labels"][0, start:end]
        mask[row, :end - start] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _spans(batch: dict) -> list[tuple[int, int]]:
    bounds = batch["cu_seq_lens_q"].tolist()
    return [(start, end) for start, end in zip(bounds[:-1], bounds[1:]) if end > start]


def _checkpointing_as_training_will(trainer, model) -> None:
    """The Trainer turns checkpointing on when train() begins; the check's step must fit as a training step does."""
    args = trainer.args
    on = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False)
    if not on:
        return
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs",
                                                                              None)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def _no_dropout(model):
    """Dropout off (each nn.Dropout, and the attention dropout modules read from an attribute) while the model stays
    in train mode, where gradient checkpointing acts; put back after."""
    import torch

    kept = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            kept.append((module, "p", module.p))
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout:
            kept.append((module, "attention_dropout", module.attention_dropout))
            module.attention_dropout = 0.0
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        for module, name, value in kept:
            setattr(module, name, value)


def _classic_loss(model, batch: dict, learned: int):
    from engine.train.loss import learned_token_loss

    return learned_token_loss(model, batch, learned)[0]


def _loss_and_fingerprint(model, batches: list[dict], device, precision: str, loss_of) -> tuple[float, list[float]]:
    """The loss summed over ``batches`` (each divided by the whole micro-batch's learned tokens), its gradients
    accumulated, and their fingerprint."""
    import torch

    model.zero_grad(set_to_none=True)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    total = 0.0
    for batch in batches:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=half) if half else contextlib.nullcontext():
            loss = loss_of(batch)
        loss.backward()
        total += float(loss.detach().float())
    found = fingerprint(model)
    model.zero_grad(set_to_none=True)
    return total, found


def _rows(batch: dict) -> list[dict]:
    """A padded batch as batches of one sample each, its padding cut."""
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        rows.append({key: batch[key][i:i + 1, :length] for key in ("input_ids", "labels", "attention_mask")})
    return rows


def fingerprint(model) -> list[float]:
    """Each trainable tensor's gradient norm and its projection on a fixed random direction (seeded per tensor)."""
    import torch

    found = []
    for index, (_, param) in enumerate(sorted(model.named_parameters(), key=lambda item: item[0])):
        if not param.requires_grad:
            continue
        grad = param.grad
        if grad is None:
            found += [0.0, 0.0]
            continue
        generator = torch.Generator(device=grad.device).manual_seed(index)
        direction = torch.randn(grad.shape, generator=generator, device=grad.device, dtype=torch.float32)
        found += [float(grad.float().norm()), float((grad.float() * direction).sum()) / math.sqrt(grad.numel())]
    return found


@contextlib.contextmanager
def _attention_as(model, name: str):
    was = _base(model).config._attn_implementation
    set_attention(model, name)
    try:
        yield
    finally:
        set_attention(model, was)


def set_attention(model, name: str) -> None:
    _base(model).set_attn_implementation(name)


@contextlib.contextmanager
def _no_router_loss(trainer, model):
    """A mixture of experts' router loss left out on both sides: it averages over the batch as laid out (one row, or
    one sample at a time), so it would differ by construction; the router itself still runs."""
    config = _base(model).config
    router, aux = getattr(config, "output_router_logits", None), getattr(trainer, "aux_loss_enabled", None)
    if router:
        config.output_router_logits = False
    if aux:
        trainer.aux_loss_enabled = False
    try:
        yield
    finally:
        if router:
            config.output_router_logits = router
        if aux:
            trainer.aux_loss_enabled = aux


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _trainer_state(trainer):
    """TRL's SFTTrainer counts tokens and keeps per-step metrics (entropy, accuracy) in compute_loss: the check's
    batch is not a step, so they are put back as they were after it."""
    metrics = getattr(trainer, "_metrics", None)
    kept = {mode: {k: list(v) for k, v in values.items()} for mode, values in metrics.items()} \
        if isinstance(metrics, dict) else None
    return kept, getattr(trainer, "_total_train_tokens", None)


def _restore_trainer_state(trainer, kept) -> None:
    metrics, tokens = kept
    if metrics is not None:
        for mode, values in trainer._metrics.items():
            values.clear()
            values.update(metrics.get(mode, {}))
    if tokens is not None:
        trainer._total_train_tokens = tokens


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
