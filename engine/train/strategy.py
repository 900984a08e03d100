"""The library configuration behind a run's ``strategy``: FSDP settings for TrainingArguments, or a DeepSpeed JSON in
the run directory, and in both cases an ``accelerate launch --config_file`` YAML beside it that a user can reuse.

``prepare_strategy`` writes the files and returns a ``Strategy``; the trainer asks it for TrainingArguments keywords,
for what to tell the model about activation checkpointing, and calls ``before_model_load`` before ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.config.schema import TunerConfig
from engine.rundir.files import write_text_atomic

DEEPSPEED_FILE = "deepspeed.json"
ACCELERATE_FILE = "accelerate_config.yaml"

# What each strategy is, for train.log and the TUI.
TITLES = {
    "ddp": "DDP, a whole copy of the model in each process",
    "fsdp": "PyTorch FSDP full shard",
    "fsdp_offload": "PyTorch FSDP full shard, weights and optimizer states offloaded to CPU memory",
    "zero2": "DeepSpeed ZeRO-2",
    "zero2_offload": "DeepSpeed ZeRO-2, optimizer states offloaded to CPU memory",
    "zero3": "DeepSpeed ZeRO-3",
    "zero3_offload": "DeepSpeed ZeRO-3, weights and optimizer states offloaded to CPU memory",
}

# Our precision names (engine.models.loading.choose_precision) as accelerate's mixed_precision.
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class World:
    """The processes of the run as accelerate's launch config names them."""

    num_processes: int
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int | None = None  # None: one machine, a free port chosen at launch

    @classmethod
    def from_plan(cls, plan) -> "World":
        """From engine.runs.distributed's ``LaunchPlan``."""
        return cls(plan.world_size, plan.nnodes, plan.node_rank, plan.master_addr, plan.master_port)


@dataclass(frozen=True)
class Strategy:
    """What a run's strategy asks of the trainer. ``deepspeed_path`` / ``fsdp_config`` / ``accelerate_path`` are set
    only for the strategies that generate them."""

    name: str
    world: World
    precision: str
    deepspeed_path: Path | None = None
    fsdp_config: dict | None = None
    accelerate_path: Path | None = None
    max_grad_norm: float = 1.0
    ddp_timeout: int = 1800
    _kept: list = field(default_factory=list, compare=False, repr=False)

    @property
    def fsdp(self) -> bool:
        return self.fsdp_config is not None

    @property
    def zero_stage(self) -> int | None:
        return {"zero2": 2, "zero2_offload": 2, "zero3": 3, "zero3_offload": 3}.get(self.name)

    def training_kwargs(self, gradient_checkpointing: bool = False) -> dict:
        """TrainingArguments / SFTConfig keywords: FSDP on with its config (which checkpoints activations itself when
        ``gradient_checkpointing``), or the DeepSpeed file; nothing for ddp, where the user's deepspeed / fsdp keys
        pass through as they are."""
        if self.fsdp:
            return {"fsdp": True, "fsdp_config": {**self.fsdp_config, "activation_checkpointing": gradient_checkpointing}}
        if self.deepspeed_path is not None:
            return {"deepspeed": str(self.deepspeed_path)}
        return {}

    def checkpointing(self, gradient_checkpointing: bool) -> bool:
        """What the model (``gradient_checkpointing_enable``) and TrainingArguments' own activation_checkpointing
        should be told: off under FSDP, whose activation checkpointing (``training_kwargs``) replaces it; the
        Trainer refuses both at once, and transformers' own would all-gather each layer a second time."""
        return gradient_checkpointing and not self.fsdp

    def before_model_load(self, micro_batch: int, accumulation: int):
        """Call right before ``from_pretrained`` and keep what it returns alive until the trainer exists.

        ZeRO-3: starts DeepSpeed's process group (zero.Init parses the config before starting one itself, and would
        count one process, refusing the batch size), then returns transformers' ``HfTrainerDeepSpeedConfig`` with the
        batch "auto"s filled: transformers holds it by a weak reference only (this Strategy keeps it too), and while it
        lives ``from_pretrained`` builds the model under ``deepspeed.zero.Init``, each process allocating its shard
        only. The TrainingArguments built later replace it with their own. FSDP: sets
        ACCELERATE_USE_FSDP and FSDP_CPU_RAM_EFFICIENT_LOADING and starts the process group (accelerate's
        PartialState), which transformers' ``is_fsdp_enabled`` needs at load time so processes other than the first
        skip initialising weights that rank 0 broadcasts. Returns None when nothing must be kept.
        """
        if self.fsdp:
            from datetime import timedelta

            from accelerate import PartialState
            from accelerate.utils import enable_fsdp_ram_efficient_loading

            enable_fsdp_ram_efficient_loading()
            PartialState(cpu=not _cuda_available(), timeout=timedelta(seconds=self.ddp_timeout))
            return None
        if self.zero_stage != 3:
            return None
        from datetime import timedelta

        import deepspeed
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        deepspeed.init_distributed(auto_mpi_discovery=False, timeout=timedelta(seconds=self.ddp_timeout))
        ds = HfTrainerDeepSpeedConfig(str(self.deepspeed_path))
        ds.trainer_config_process(_BatchArgs(self.world.num_processes, micro_batch, accumulation, self.max_grad_norm,
                                             self.precision == "fp16", self.precision == "bf16"))
        self._kept.append(ds)
        return ds

    def describe(self) -> str:
        """One line for train.log."""
        processes = f"{self.world.num_processes} process{'es' if self.world.num_processes != 1 else ''}"
        where = (f", config {self.deepspeed_path}" if self.deepspeed_path
                 else f", accelerate config {self.accelerate_path}" if self.accelerate_path else "")
        return f"strategy {self.name}: {TITLES[self.name]} over {processes}{where}"


@contextlib.contextmanager
def one_process_group(deepspeed: str | None, timeout_s: int):
    """While a run of one process given a DeepSpeed config (``deepspeed: ds_z2.json`` with no launcher) trains: its
    process group of one, the rendezvous kept in memory and the backend's own socket on the loopback interface.
    Without it DeepSpeed, finding no launcher's RANK and MASTER_ADDR, asks MPI (mpi4py) who it is and fails; a
    launcher's env:// rendezvous would listen on a TCP port of every interface for nobody. Nothing for any other run.
    """
    if not deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    told = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",  # what a launcher tells
            "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}  # a group of one talks to nobody else
    added = [name for name in told if name not in os.environ]
    os.environ.update({name: told[name] for name in added})
    try:
        dist.init_process_group("nccl" if _cuda_available() else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, timeout=timedelta(seconds=timeout_s))
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for name in added:
            os.environ.pop(name, None)


def prepare_strategy(cfg: TunerConfig, run_dir: Path, model_path: str, precision_name: str, world: World,
                     gradient_checkpointing: bool = False) -> Strategy:
    """The run's strategy, its files written into ``run_dir``: nothing for ddp (a user's own ``deepspeed`` file or
    ``fsdp`` string passes through untouched); for fsdp* the FSDP config, for zero* ``deepspeed.json``, and for every
    non-ddp one ``accelerate_config.yaml`` (``gradient_checkpointing`` goes into the FSDP one as FSDP's own)."""
    name, run_dir = cfg.train.strategy, Path(run_dir)
    common = dict(name=name, world=world, precision=precision_name, max_grad_norm=cfg.train.max_grad_norm,
                  ddp_timeout=cfg.train.ddp_timeout)
    if name == "ddp":
        return Strategy(**common)
    accelerate_path = run_dir / ACCELERATE_FILE
    if name.startswith("fsdp"):
        fsdp_config = fsdp_settings(model_path, offload=name.endswith("_offload"))
        write_text_atomic(accelerate_path, accelerate_yaml(
            world, "FSDP", {"fsdp_config": _accelerate_fsdp(fsdp_config, gradient_checkpointing)},
            MIXED_PRECISION.get(precision_name, "no")))
        return Strategy(**common, fsdp_config=fsdp_config, accelerate_path=accelerate_path)
    stage = 3 if name.startswith("zero3") else 2
    deepspeed_path = run_dir / DEEPSPEED_FILE
    write_text_atomic(deepspeed_path, json.dumps(deepspeed_settings(stage, name.endswith("_offload")), indent=2) + "\n")
    ds_section = {"deepspeed_config_file": str(deepspeed_path), "deepspeed_multinode_launcher": "standard"}
    if stage == 3:
        ds_section["zero3_init_flag"] = True
    # No mixed_precision beside a DeepSpeed file: accelerate refuses it there (the file's bf16/fp16 decide).
    write_text_atomic(accelerate_path, accelerate_yaml(world, "DEEPSPEED", {"deepspeed_config": ds_section}, None))
    return Strategy(**common, deepspeed_path=deepspeed_path, accelerate_path=accelerate_path)


def fsdp_settings(model_path: str, offload: bool) -> dict:
    """TrainingArguments' ``fsdp_config`` for FSDP2 (transformers 5's default): one unit per decoder layer, full
    state dicts so ``save_model`` writes whole weights (PEFT's save keeps the adapter's), weights loaded once by rank
    0 and broadcast. use_orig_params and sync_module_states are FSDP1's: FSDP2 always keeps the original parameters,
    so LoRA's frozen and trainable ones share a unit."""
    settings = {"version": 2, "reshard_after_forward": True, "cpu_offload": offload,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "cpu_ram_efficient_loading": True,
                "state_dict_type": "FULL_STATE_DICT"}
    layers = decoder_layers(model_path)
    if layers:
        settings["transformer_layer_cls_to_wrap"] = layers
    return settings


def decoder_layers(model_path: str) -> list[str]:
    """The model's decoder layer classes (``_no_split_modules`` of its config.json architecture), e.g.
    ``["LlamaDecoderLayer"]``; empty for an architecture transformers does not ship (the wrap policy then falls
    back to the loaded model's own ``_no_split_modules``)."""
    try:
        architectures = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return []
    from engine.models.loading import from_transformers

    for architecture in architectures:
        try:
            (model_class,) = from_transformers(architecture)
        except (AttributeError, ImportError):
            continue
        if getattr(model_class, "_no_split_modules", None):
            return list(model_class._no_split_modules)
    return []


def deepspeed_settings(stage: int, offload: bool) -> dict:
    """A DeepSpeed config in the style of transformers' integration: "auto" wherever TrainingArguments knows the
    value (batch, accumulation, clipping, precision) or the model's hidden size does (bucket sizes). Offload keeps
    the Trainer's optimizer on the CPU copies (zero_force_ds_cpu_optimizer false) rather than needing DeepSpeed's
    compiled CPU Adam, so ``optim`` and LoRA+ still apply."""
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=500_000_000, reduce_scatter=True)
    else:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_max_live_parameters=1_000_000_000, stage3_max_reuse_distance=1_000_000_000,
                    sub_group_size=1_000_000_000, stage3_gather_16bit_weights_on_model_save=True)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    settings = {
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "zero_optimization": zero,
    }
    if offload:
        settings["zero_force_ds_cpu_optimizer"] = False
    return settings


def accelerate_yaml(world: World, distributed_type: str, section: dict, mixed_precision: str | None) -> str:
    """The ``accelerate launch --config_file`` YAML for these processes (accelerate's ClusterConfig fields)."""
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": distributed_type, **section,
              "num_processes": world.num_processes, "num_machines": world.num_machines,
              "machine_rank": world.machine_rank, "main_process_ip": world.main_process_ip,
              "rdzv_backend": "static", "same_network": True, "use_cpu": False, "debug": False}
    if world.main_process_port is not None:
        config["main_process_port"] = world.main_process_port
    if mixed_precision is not None:
        config["mixed_precision"] = mixed_precision
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def _accelerate_fsdp(settings: dict, gradient_checkpointing: bool) -> dict:
    """TrainingArguments' fsdp_config in accelerate's spelling (fsdp_ prefixes, offload_params, a comma string)."""
    section = {"fsdp_version": settings["version"], "fsdp_auto_wrap_policy": settings["auto_wrap_policy"],
               "fsdp_reshard_after_forward": settings["reshard_after_forward"],
               "fsdp_offload_params": settings["cpu_offload"],
               "fsdp_cpu_ram_efficient_loading": settings["cpu_ram_efficient_loading"],
               "fsdp_state_dict_type": settings["state_dict_type"],
               "fsdp_activation_checkpointing": gradient_checkpointing}
    if settings.get("transformer_layer_cls_to_wrap"):
        section["fsdp_transformer_layer_cls_to_wrap"] = ",".join(settings["transformer_layer_cls_to_wrap"])
    return section


@dataclass(frozen=True)
class _BatchArgs:
    """The TrainingArguments fields ``HfTrainerDeepSpeedConfig.trainer_config_process`` reads, before the real
    TrainingArguments exist (the optimizer fields only fill an "optimizer" section, which ours has not)."""

    world_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    max_grad_norm: float
    fp16: bool
    bf16: bool
    fp16_full_eval: bool = False
    bf16_full_eval: bool = False
    save_on_each_node: bool = False
    learning_rate: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
