"""What a run decides on this machine once its data is ready and before its model loads: the speed plan (padding-free
batches, attention, Liger, the batch layout; a resumed run keeps its layout), the multi-GPU strategy and its files,
where quantized weights go, and the memory estimate recorded beside the measured peaks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from engine.config.schema import TunerConfig
from engine.errors import UserError
from engine.rundir.run import RunDir
from engine.world import local_rank, several_processes, world_size

log = logging.getLogger("tuner")

def speed_plan(cfg: TunerConfig, hardware, model_path: str, datasets, run: RunDir, pairs: bool = False):
    """Padding-free batches, attention, Liger and the batch layout for this run (engine.train.speed). A resumed
    run keeps the layout it trained with, so its steps, schedule and position in the data stay the same."""
    import psutil
    import torch

    from engine.memory.recommend import model_geometry, shape_from_config
    from engine.models.attention import torch_varlen_available
    from engine.models.kernels import liger_model_types
    from engine.train.speed import Machine, plan_speed

    free_gib = None
    if hardware.on_gpu:
        free_gib = memory_for_fit(torch)
    machine = Machine(on_gpu=hardware.on_gpu, flash_attn_installed=hardware.flash_attn_installed,
                      torch_varlen=torch_varlen_available(),
                      liger_model_types=liger_model_types() if hardware.on_gpu else None, free_gib=free_gib,
                      available_ram_gib=psutil.virtual_memory().available / 1024**3)
    try:
        geometry = model_geometry(model_path)
        shape = shape_from_config(cfg, geometry, num_gpus=world_size())
    except (OSError, ValueError, KeyError, UserError):
        shape = None
    plan = plan_speed(cfg, machine, datasets.lengths, model_traits(model_path, cfg), shape, pairs=pairs)
    if run.resume_from and cfg.train.auto_fit:
        from dataclasses import replace

        from engine.memory.autofit import user_fit

        t = cfg.train
        earlier = layout_trained_with(run) or user_fit(
            t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing,
            "resumed from a checkpoint whose layout is not recorded: the batch as given, so the steps line up")
        plan = replace(plan, fit=earlier)
    return plan


def layout_trained_with(run: RunDir):
    """The batch layout of this run's last start event, when it resumes its own checkpoint."""
    from engine.memory.autofit import Fit
    from engine.rundir.events import newest_events

    if Path(run.resume_from).parent != run.path:
        return None
    batch = next((e["batch"] for e in newest_events(run.path, types=("start",), max_bytes=None)
                  if isinstance(e.get("batch"), dict)), None)
    if batch is None:
        return None
    try:
        return Fit(int(batch["per_device_train_batch_size"]), int(batch["gradient_accumulation_steps"]),
                   bool(batch["gradient_checkpointing"]),
                   int(batch["packed_tokens"]) if batch.get("packed_tokens") else None,
                   reason="resumed: the layout this run trained with, so its steps and schedule stay the same")
    except (KeyError, TypeError, ValueError):
        return None


def memory_for_fit(torch) -> float:
    """This GPU's free memory. Under several processes every rank must pick the same layout (the ranks of a step
    agree on its micro-batches), and free memory differs from rank to rank and moment to moment: there the GPU's
    total memory counts, which identical cards share (other processes' use is then not seen)."""
    if several_processes():
        return torch.cuda.get_device_properties(local_rank()).total_memory / 1024**3
    return torch.cuda.mem_get_info(local_rank())[0] / 1024**3


def model_traits(model_path: str, cfg: TunerConfig):
    """The model's type, whether transformers dispatches its attention (and packed masks) through AttentionInterface,
    and what would keep VARLEN from serving it, from its config.json."""
    import json

    import transformers

    from engine.models.attention import varlen_blocker
    from engine.train.speed import ModelTraits

    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return ModelTraits(None, attention_backend=False)
    classes = [getattr(transformers, name, None) for name in config.get("architectures") or []]
    backend = bool(classes) and all(getattr(c, "_supports_attention_backend", False) for c in classes)
    return ModelTraits(config.get("model_type"), backend, varlen_blocker(config, cfg.data.cutoff_len))


def estimate_for(cfg: TunerConfig, model_path: str, world_size: int) -> dict | None:
    """The VRAM estimate for this run, recorded beside the measured peaks so each GPU run calibrates the estimator."""
    from engine.memory.estimate import estimate
    from engine.memory.recommend import model_geometry, shape_from_config

    try:
        geometry = model_geometry(model_path)
    except (OSError, ValueError, UserError):
        return None
    result = estimate(shape_from_config(cfg, geometry, num_gpus=world_size))
    return {"peak_allocated_gib": result.peak_allocated_gib, "total_gib": result.total_gib}


def device_map(cfg: TunerConfig, hardware) -> dict | None:
    """Quantized models must be placed on this process's GPU at load time; others are moved by the Trainer, and a
    sharding strategy (FSDP, ZeRO-3) places the shards itself."""
    from engine.memory.recommend import sharding_of

    if cfg.model.quantization_bit is None or not hardware.on_gpu or sharding_of(cfg) == "zero3":
        return None  # zero3: the strategy's fsdp* / zero3*, or the user's own ZeRO-3 file or FSDP full shard
    return {"": local_rank()}


def strategy_for(cfg: TunerConfig, run: RunDir, model_path: str, precision, plan):
    """The run's strategy (engine.train.strategy), its DeepSpeed / accelerate files written in every process (the
    machines of a run need not share a disk)."""
    from engine.train.strategy import World, prepare_strategy

    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_WORLD_SIZE", size))
    port = env.get("MASTER_PORT")
    world = World(size, max(1, size // max(local, 1)), int(env.get("GROUP_RANK", "0")),
                  env.get("MASTER_ADDR", "127.0.0.1"), int(port) if port and port.isdigit() else None)
    strategy = prepare_strategy(cfg, run.path, model_path, precision.name, world, plan.fit.gradient_checkpointing)
    if cfg.train.strategy != "ddp":
        log.info("%s", strategy.describe())
    return strategy
