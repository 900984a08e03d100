"""Which method to use on these GPUs: every method's estimate for this model and settings, the VRAM table of
LLaMA-Factory's README beside it, the method recommended (see ``recommend``) and what would fit when nothing does."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.models.catalog import ModelGeometry, list_models, lookup, model_geometry_from_config, param_count
from engine.config.schema import TunerConfig, has_reference
from engine.errors import UserError
from engine.memory.estimate import METHODS, Estimate, RunShape, estimate, method_of
from engine.paths import PRESETS_DIR

SAFETY_MARGIN = 0.10  # keep 10% of the GPU's memory free: estimates are within ~15%, and other processes come and go
LABELS = {"full": "Full (16-bit)", "freeze": "Freeze (16-bit)", "lora": "LoRA (16-bit)",
          "qlora-8bit": "QLoRA 8-bit", "qlora-4bit": "QLoRA 4-bit"}
# Recommended in this order, the first that fits: LoRA, then QLoRA (8-bit, then 4-bit). Full and freeze are never
# recommended (see ``recommend``); the table shows whether they fit.
RECOMMENDED, QUANTIZED = ("lora", "qlora-8bit", "qlora-4bit"), ("qlora-8bit", "qlora-4bit")
# The strategies a multi-GPU run is offered, cheapest in communication and host memory first: (sharding, offload).
STRATEGY_ORDER = {"ddp": ("ddp", False), "zero2": ("zero2", False), "zero3": ("zero3", False),
                  "zero3_offload": ("zero3", True)}
STRATEGY_LABELS = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "FSDP or ZeRO-3", "zero2_offload": "ZeRO-2 with CPU offload",
                   "zero3_offload": "FSDP or ZeRO-3 with CPU offload"}


@functools.cache
def llamafactory_table() -> dict:
    """The VRAM table of LLaMA-Factory's README (GB per method and model size), shown beside the estimate."""
    import yaml

    return yaml.safe_load((PRESETS_DIR / "vram_table.yaml").read_text())


def llamafactory_column(geometry: ModelGeometry) -> int:
    """The LLaMA-Factory table's column closest to this model (the 8x7B column for mixtures of experts)."""
    table = llamafactory_table()
    if geometry.num_local_experts:
        return table["sizes"].index("8x7B")
    billions = param_count(geometry) / 1e9
    dense = [i for i, size in enumerate(table["sizes"]) if "x" not in size]
    return min(dense, key=lambda i: abs(table["billions"][i] - billions))


def llamafactory_size(geometry: ModelGeometry) -> tuple[str, bool]:
    """The LLaMA-Factory table's model size for this model ("7B"), and whether it is close enough to this model's
    size to compare with (within a factor of two)."""
    column, table = llamafactory_column(geometry), llamafactory_table()
    ratio = param_count(geometry) / (table["billions"][column] * 1e9)
    return table["sizes"][column], 0.5 <= ratio <= 2


def llamafactory_caption(size: str, close: bool) -> str:
    """What the LLaMA-Factory column is, or why it is left out (its figures are for another model size)."""
    if close:
        return (f"LLaMA-Factory GB: the VRAM table in LLaMA-Factory's README for {size} models, for comparison (it "
                "does not change with batch or cutoff_len)")
    return f"LLaMA-Factory's README VRAM table left out: its nearest figures are for {size} models, not this one"


def model_geometry(name_or_path: str, model=None) -> ModelGeometry:
    """The geometry from the catalog, a local directory's config.json, or the hub's config.json (no weights); with
    ``model`` (a config's model section) the hub is asked with its token, revision and cache directory."""
    spec = lookup(name_or_path)
    if spec:
        return spec.geometry
    from engine.models.resolve import resolve_configured, resolve_model

    # an estimate reads config.json, not the weights: no room needed on the disk
    resolved = resolve_configured(model, check_room=False) if model is not None else \
        resolve_model(name_or_path, check_room=False)
    if resolved.spec:
        return resolved.spec.geometry
    if resolved.source == "hub":
        from huggingface_hub import hf_hub_download

        plan = resolved.plan  # the hub answered for this commit, at this endpoint, into this cache
        config_path = Path(hf_hub_download(plan.hub_id, "config.json", revision=plan.commit, cache_dir=plan.cache_dir,
                                           endpoint=plan.endpoint, token=model.hf_hub_token if model else None))
    else:
        config_path = Path(resolved.path) / "config.json"
    return model_geometry_from_config(json.loads(config_path.read_text()))


def shape_from_config(cfg: TunerConfig, geometry: ModelGeometry, num_gpus: int = 1) -> RunShape:
    """The run's memory-relevant settings as the engine will apply them on a GPU."""
    t = cfg.train
    return RunShape(
        geometry=geometry, method=method_of(cfg.finetune.finetuning_type, cfg.model.quantization_bit),
        batch_size=t.per_device_train_batch_size, seq_len=cfg.data.cutoff_len,
        gradient_checkpointing=t.gradient_checkpointing is not False,  # unset: auto-fit may turn it off if it fits
        attention="eager" if cfg.model.flash_attn == "eager" else "sdpa",
        lora_rank=cfg.finetune.lora_rank, lora_target=cfg.finetune.lora_target,
        freeze_trainable_layers=cfg.finetune.freeze_trainable_layers, optim=t.optim,
        double_quantization=cfg.model.double_quantization, precision="pure_bf16" if t.pure_bf16 else "fp16" if t.fp16 else "bf16",
        num_gpus=num_gpus, sharding=sharding_of(cfg), offload=cfg.train.strategy.endswith("_offload"),
        pairs=cfg.finetune.stage in ("dpo", "rm"),  # kto's forward of the mismatched replies keeps no activations
        reference=has_reference(cfg.finetune), reward=cfg.finetune.stage == "rm",
        reference_model=has_reference(cfg.finetune) and cfg.finetune.ref_model is not None,
        reference_bits=cfg.finetune.ref_model_quantization_bit,
        reference_precomputed=cfg.finetune.precompute_ref_log_probs,
    )


def strategy_of(shape: RunShape) -> str:
    """The shape's sharding and offload as a strategy name (fsdp counts as zero3)."""
    return shape.sharding + ("_offload" if shape.offload and shape.sharding != "ddp" else "")


def sharding_of(cfg: TunerConfig) -> str:
    """The config's strategy (fsdp is full shard: zero3); under ddp, the ZeRO stage of the user's own DeepSpeed
    config file, or their FSDP mode; plain DDP otherwise."""
    strategy = cfg.train.strategy.removesuffix("_offload")
    if strategy != "ddp":
        return "zero3" if strategy == "fsdp" else strategy
    if cfg.train.fsdp:
        return "zero3" if "full_shard" in cfg.train.fsdp else "zero2"
    if cfg.train.deepspeed:
        path = Path(cfg.train.deepspeed)
        try:
            stage = json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0)
        except (OSError, ValueError) as exc:
            raise UserError(f"deepspeed config {path} cannot be read: {exc}") from None
        return {2: "zero2", 3: "zero3"}.get(int(stage), "ddp")
    return "ddp"


def memory_budget(gpus: list) -> float | None:
    """GiB one GPU can give the run: the least free memory among the chosen GPUs (others' processes count)."""
    if not gpus:
        return None
    return min(g.memory_free_gib if g.memory_free_gib is not None else g.memory_total_gib for g in gpus)


@dataclass
class MethodRow:
    method: str
    label: str
    estimate: Estimate
    llamafactory_gb: int  # the figure of LLaMA-Factory's README table for the closest model size
    fits: bool | None  # None: no GPU to compare with
    note: str = ""  # why this row's figure surprises, where it does


@dataclass
class Recommendation:
    method: str | None
    reason: str  # the recommended method's figure against the budget, or why there is none
    rows: list[MethodRow]
    budget_gib: float | None
    suggestions: list[str] = field(default_factory=list)
    strategy: str | None = None  # the cheapest strategy the method fits under; None for one GPU or none
    why: str = ""  # one line: why this method rather than the others (the rule of ``recommend``)

    def to_json(self) -> dict:
        """``seed_table_gb`` is the LLaMA-Factory README's figure: the key keeps the name scripts already read."""
        return {
            "method": self.method, "strategy": self.strategy, "reason": self.reason, "why": self.why,
            "budget_gib": self.budget_gib, "suggestions": self.suggestions,
            "methods": {r.method: {"total_gib": r.estimate.total_gib, "peak_allocated_gib": r.estimate.peak_allocated_gib,
                                   "seed_table_gb": r.llamafactory_gb, "fits": r.fits, "note": r.note}
                        for r in self.rows},
        }


def recommend(shape: RunShape, gpu_memory_gib: float | None) -> Recommendation:
    """The method to train with on GPUs of ``gpu_memory_gib`` each: the first of LoRA (16-bit), QLoRA 8-bit and QLoRA
    4-bit whose estimate fits with the safety margin; on several GPUs, under the cheapest strategy it fits (DDP,
    ZeRO-2, ZeRO-3, then ZeRO-3 with CPU offload). ``rows`` are every method under the shape's own strategy.

    LoRA whenever it fits: it is LLaMA-Factory's default and the method most tutorials teach, its checkpoints are
    adapters of megabytes rather than copies of the model, and its quality is close to full fine-tuning's. Full and
    freeze fine-tuning are never recommended, only marked where they fit: they train whole layers, which a user
    chooses knowing why (more memory, whole-model checkpoints, more forgetting of what the model knew)."""
    budget = None if gpu_memory_gib is None else round(gpu_memory_gib * (1 - SAFETY_MARGIN), 2)
    rows = _rows(shape, budget)
    if budget is None:
        return Recommendation(None, "no NVIDIA GPU found: CPU training suits only small models such as the demo "
                                    "models", rows, None)
    per_gpu = f"{budget:g} GiB usable per GPU ({gpu_memory_gib:g} GiB less a {SAFETY_MARGIN:.0%} margin)"
    if shape.num_gpus <= 1:
        best = next((row for row in rows if row.method in RECOMMENDED and row.fits), None)
        if best:
            return Recommendation(best.method, _reason(best, per_gpu), rows, budget, why=_why(rows, best))
        return Recommendation(None, f"no method fits in {per_gpu}", rows, budget, _what_would_fit(shape, budget))
    rows_of = {strategy_of(shape): rows}
    for strategy, methods, passed in _tiers():
        sharding, offload = STRATEGY_ORDER[strategy]
        if strategy not in rows_of:
            rows_of[strategy] = _rows(dataclasses.replace(shape, sharding=sharding, offload=offload), budget)
        candidates = rows_of[strategy]
        best = next((row for row in candidates if row.method in methods and row.fits), None)
        if best:
            label = f"{STRATEGY_LABELS[strategy]} (strategy {strategy})"
            reason = _reason(best, f"{per_gpu} over {shape.num_gpus} GPUs", f" with {label}")
            return Recommendation(best.method, reason + (f"; {passed}" if passed else ""), rows, budget,
                                  strategy=strategy, why=_why(candidates, best))
    return Recommendation(None, f"no method fits in {per_gpu} over {shape.num_gpus} GPUs, with any strategy", rows,
                          budget, _what_would_fit(shape, budget))


def _tiers():
    """(strategy, methods, what did not fit before) in the order tried: LoRA (16-bit) under DDP, ZeRO-2, ZeRO-3; then
    QLoRA under the same; CPU offload only when nothing else fits (its optimizer step runs on the CPU)."""
    sharded = [s for s in STRATEGY_ORDER if not STRATEGY_ORDER[s][1]]
    for methods in (RECOMMENDED[:1], QUANTIZED):
        for index, strategy in enumerate(sharded):
            before = " or ".join(STRATEGY_LABELS[s] for s in sharded[:index])
            passed = f"LoRA (16-bit) does not fit with {before}" if before else ""
            if methods == QUANTIZED:
                passed = "LoRA (16-bit) does not fit without CPU offload" + (f", nor QLoRA with {before}" if before
                                                                            else "")
            yield strategy, methods, passed
    yield "zero3_offload", RECOMMENDED, "no method fits without CPU offload"


def _rows(shape: RunShape, budget: float | None) -> list[MethodRow]:
    column = llamafactory_column(shape.geometry)
    rows = []
    for method in METHODS:
        result = estimate(dataclasses.replace(shape, method=method))
        fits = None if budget is None else result.total_gib <= budget
        rows.append(MethodRow(method, LABELS[method], result, llamafactory_table()["methods"][method][column], fits))
    lora, eight = rows[METHODS.index("lora")], rows[METHODS.index("qlora-8bit")]
    kept, above = eight.estimate.components["int8_kept_inputs"], eight.estimate.total_gib - lora.estimate.total_gib
    if above > 0 and kept >= max(above / 2, 0.05):  # said where those inputs are most of why, never of a few MiB
        eight.note = (f"above LoRA (16-bit) at this batch: the layer inputs its 8-bit matmul keeps for the backward "
                      f"pass take {kept:.1f} GiB at {shape.batch_size} x {shape.seq_len} tokens")
    return rows


def _reason(best: MethodRow, per_gpu: str, strategy: str = "") -> str:
    """The recommended method's figure against the budget."""
    return f"{best.label}{strategy} is recommended: {best.estimate.total_gib:g} GiB of {per_gpu}"


def _why(rows: list[MethodRow], best: MethodRow) -> str:
    """One line: the rule that picked ``best`` (see ``recommend``), with the figures that decided it."""
    if best.method == "lora":
        whole = [row.label.split(" (")[0] for row in rows if row.method in ("full", "freeze") and row.fits]
        why = "why: LoRA whenever it fits (LLaMA-Factory's default: small adapters, quality close to full fine-tuning)"
        if whole:
            why += f"; {' and '.join(whole)} also fit{'s' if len(whole) == 1 else ''}, to train whole layers"
        return why
    earlier = [row for row in rows if row.method in RECOMMENDED[:RECOMMENDED.index(best.method)]]
    needs = ", ".join(f"{row.label} {'needs ' if not i else ''}{row.estimate.total_gib:.1f} GiB"
                      for i, row in enumerate(earlier))
    return f"why: {needs}; {best.label} trains the same LoRA adapters over quantized weights"


def _what_would_fit(shape: RunShape, budget: float) -> list[str]:
    """Concrete changes that bring QLoRA 4-bit under the budget: shorter sequences, a smaller batch, more GPUs,
    a smaller model."""
    base = dataclasses.replace(shape, method="qlora-4bit")
    ideas = []
    if shape.batch_size > 1:
        smaller = dataclasses.replace(base, batch_size=1)
        if estimate(smaller).total_gib <= budget:
            ideas.append(f"per_device_train_batch_size 1 with gradient_accumulation_steps {shape.batch_size} "
                         f"(same effective batch): QLoRA 4-bit needs {estimate(smaller).total_gib:g} GiB")
    seq = shape.seq_len
    while seq > 128:
        seq //= 2
        shorter = dataclasses.replace(base, seq_len=seq, batch_size=1)
        if estimate(shorter).total_gib <= budget:
            ideas.append(f"cutoff_len {seq} at batch 1: QLoRA 4-bit needs {estimate(shorter).total_gib:g} GiB")
            break
    for gpus in (g for g in (2, 4, 8, 16) if g > shape.num_gpus):
        sharded = dataclasses.replace(base, num_gpus=gpus, sharding="zero3", offload=False, batch_size=1)
        if estimate(sharded).total_gib <= budget:
            ideas.append(f"{gpus} such GPUs with DeepSpeed ZeRO-3 (strategy zero3): {estimate(sharded).total_gib:g} "
                         "GiB per GPU")
            break
    fitting = [spec for spec in list_models() if not spec.demo and param_count(spec) < param_count(shape.geometry)
               and estimate(dataclasses.replace(base, geometry=spec.geometry)).total_gib <= budget]
    if fitting:
        biggest = max(fitting, key=param_count)
        ideas.append(f"a smaller model such as {biggest.name} ({param_count(biggest) / 1e9:.1f}B) with QLoRA 4-bit")
    return ideas
