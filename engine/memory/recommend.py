"""Which method to use on these GPUs: every method's estimate for this model and settings, the familiar seed table
beside it, the highest-quality method that fits with a safety margin, and what would fit when nothing does."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.models.catalog import ModelGeometry, list_models, lookup, model_geometry_from_config, param_count
from engine.config.schema import TunerConfig
from engine.errors import UserError
from engine.memory.estimate import METHODS, Estimate, RunShape, estimate, method_of, offloads
from engine.paths import PRESETS_DIR

SAFETY_MARGIN = 0.10  # keep 10% of the GPU's memory free: estimates are within ~15%, and other processes come and go
LABELS = {"full": "Full (16-bit)", "freeze": "Freeze (16-bit)", "lora": "LoRA (16-bit)",
          "qlora-8bit": "QLoRA 8-bit", "qlora-4bit": "QLoRA 4-bit"}
SIXTEEN_BIT, QUANTIZED = METHODS[:3], METHODS[3:]
# The strategies a multi-GPU run is offered, cheapest in communication and host memory first: (sharding, offload).
STRATEGY_ORDER = {"ddp": ("ddp", False), "zero2": ("zero2", False), "zero3": ("zero3", False),
                  "zero3_offload": ("zero3", True)}
STRATEGY_LABELS = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "FSDP or ZeRO-3", "zero2_offload": "ZeRO-2 with CPU offload",
                   "zero3_offload": "FSDP or ZeRO-3 with CPU offload"}


@functools.cache
def seed_table() -> dict:
    import yaml

    return yaml.safe_load((PRESETS_DIR / "vram_table.yaml").read_text())


def seed_column(geometry: ModelGeometry) -> int:
    """The seed table's column closest to this model (the 8x7B column for mixtures of experts)."""
    table = seed_table()
    if geometry.num_local_experts:
        return table["sizes"].index("8x7B")
    billions = param_count(geometry) / 1e9
    dense = [i for i, size in enumerate(table["sizes"]) if "x" not in size]
    return min(dense, key=lambda i: abs(table["billions"][i] - billions))


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
    seed_gb: int
    fits: bool | None  # None: no GPU to compare with


@dataclass
class Recommendation:
    method: str | None
    reason: str
    rows: list[MethodRow]
    budget_gib: float | None
    suggestions: list[str] = field(default_factory=list)
    strategy: str | None = None  # the cheapest strategy the method fits under; None for one GPU or none

    def to_json(self) -> dict:
        return {
            "method": self.method, "strategy": self.strategy, "reason": self.reason, "budget_gib": self.budget_gib,
            "suggestions": self.suggestions,
            "methods": {r.method: {"total_gib": r.estimate.total_gib, "peak_allocated_gib": r.estimate.peak_allocated_gib,
                                   "seed_table_gb": r.seed_gb, "fits": r.fits} for r in self.rows},
        }


def recommend(shape: RunShape, gpu_memory_gib: float | None) -> Recommendation:
    """The highest-quality method whose estimate fits ``gpu_memory_gib`` (per GPU) with the safety margin; on several
    GPUs, under the cheapest strategy that fits any method (DDP, ZeRO-2, ZeRO-3, then ZeRO-3 with CPU offload).
    ``rows`` are every method under the shape's own strategy."""
    budget = None if gpu_memory_gib is None else round(gpu_memory_gib * (1 - SAFETY_MARGIN), 2)
    rows = _rows(shape, budget)
    if budget is None:
        return Recommendation(None, "no NVIDIA GPU found: CPU training suits only small models such as the demo "
                                    "models", rows, None)
    per_gpu = f"{budget:g} GiB usable per GPU ({gpu_memory_gib:g} GiB less a {SAFETY_MARGIN:.0%} margin)"
    if shape.num_gpus <= 1:
        best = next((row for row in rows if row.fits), None)
        if best:
            return Recommendation(best.method, _reason(rows, best, per_gpu), rows, budget)
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
            reason = _reason(candidates, best, f"{per_gpu} over {shape.num_gpus} GPUs", f" with {label}")
            return Recommendation(best.method, reason + (f"; {passed}" if passed else ""), rows, budget,
                                  strategy=strategy)
    return Recommendation(None, f"no method fits in {per_gpu} over {shape.num_gpus} GPUs, with any strategy", rows,
                          budget, _what_would_fit(shape, budget))


def _tiers():
    """(strategy, methods, what did not fit before) in the order tried: the 16-bit methods under DDP, ZeRO-2, ZeRO-3;
    then QLoRA under the same; CPU offload only when nothing else fits (its optimizer step runs on the CPU)."""
    sharded = [s for s in STRATEGY_ORDER if not STRATEGY_ORDER[s][1]]
    for methods, kind in ((SIXTEEN_BIT, "16-bit"), (QUANTIZED, "quantized")):
        for index, strategy in enumerate(sharded):
            before = " or ".join(STRATEGY_LABELS[s] for s in sharded[:index])
            passed = f"no {kind} method fits with {before}" if before else ""
            if kind == "quantized":
                passed = "no 16-bit method fits without CPU offload" + (f", nor QLoRA with {before}" if before else "")
            yield strategy, methods, passed
    yield "zero3_offload", METHODS, "no method fits without CPU offload"


def _rows(shape: RunShape, budget: float | None) -> list[MethodRow]:
    column = seed_column(shape.geometry)
    rows = []
    for method in METHODS:
        result = estimate(dataclasses.replace(shape, method=method))
        fits = None if budget is None else result.total_gib <= budget
        rows.append(MethodRow(method, LABELS[method], result, seed_table()["methods"][method][column], fits))
    return rows


def _reason(rows: list[MethodRow], best: MethodRow, per_gpu: str, strategy: str = "") -> str:
    """Why ``best``: its figure against the budget, and what the next better method needs."""
    better = rows[:rows.index(best)]
    beyond = "; ".join(f"{r.label} needs {r.estimate.total_gib:g}" for r in better[-1:])
    reason = f"{best.label}{strategy} is the best method that fits: {best.estimate.total_gib:g} GiB of {per_gpu}"
    return reason + (f"; {beyond}" if beyond else "")


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
