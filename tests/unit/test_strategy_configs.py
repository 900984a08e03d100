"""The files and TrainingArguments keywords behind `strategy`, read back by the libraries' own parsers (transformers,
accelerate, DeepSpeed), and the validation lines that guard them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from engine.config.schema import build_config
from engine.config.validation import problems_in
from engine.train.strategy import World, prepare_strategy

RUN = {"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca"}
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID", "SLURM_NODEID", "ACCELERATE_USE_FSDP",
              "FSDP_CPU_RAM_EFFICIENT_LOADING", "ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_USE_DEEPSPEED")


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    """Neither a launcher's variables nor what transformers / accelerate set while parsing leak between tests."""
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def strategy(name, tmp_path, model, precision="bf16", world=World(2), **keys):
    return prepare_strategy(build_config({"strategy": name, **keys}), tmp_path, str(model), precision, world)


def sft_config(tmp_path, **kwargs):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                     activation_checkpointing=False, **kwargs)


def test_ddp_generates_nothing_and_leaves_a_users_deepspeed_file_to_pass_through(tmp_path, tiny_models):
    chosen = strategy("ddp", tmp_path, tiny_models["tiny-llama"], deepspeed="/my/ds.json", fsdp="full_shard")
    assert chosen.training_kwargs(True) == {}
    assert chosen.checkpointing(True) is True
    assert chosen.before_model_load(4, 2) is None
    assert list(tmp_path.iterdir()) == []
    assert chosen.describe() == "strategy ddp: DDP, a whole copy of the model in each process over 2 processes"


@pytest.mark.parametrize("model, layer", [("tiny-llama", "LlamaDecoderLayer"), ("tiny-mixtral", "MixtralDecoderLayer")])
def test_fsdp_wraps_one_unit_per_decoder_layer_of_the_model(tmp_path, tiny_models, model, layer):
    kwargs = strategy("fsdp", tmp_path, tiny_models[model]).training_kwargs()
    assert kwargs == {"fsdp": True, "fsdp_config": {
        "version": 2, "reshard_after_forward": True, "cpu_offload": False, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": True, "state_dict_type": "FULL_STATE_DICT", "transformer_layer_cls_to_wrap": [layer],
        "activation_checkpointing": False}}


@pytest.mark.parametrize("name", ["fsdp", "fsdp_offload"])
def test_fsdp_keywords_are_accepted_by_sft_config_and_accelerates_plugin(tmp_path, tiny_models, name):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy, StateDictType

    chosen = strategy(name, tmp_path, tiny_models["tiny-mixtral"])
    args = sft_config(tmp_path, **chosen.training_kwargs(gradient_checkpointing=True))
    assert args.fsdp is True
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_cls_names_to_wrap":
        "MixtralDecoderLayer", "cpu_ram_efficient_loading": True, "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": True, "reshard_after_forward": True, **({"cpu_offload": True} if "offload" in name
                                                                           else {})}
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.transformer_cls_names_to_wrap == ["MixtralDecoderLayer"]
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT and plugin.state_dict_config.rank0_only
    assert plugin.activation_checkpointing and plugin.cpu_ram_efficient_loading
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == (name == "fsdp_offload")


def test_under_fsdp_activation_checkpointing_is_fsdps_own_not_the_models(tmp_path, tiny_models):
    fsdp = strategy("fsdp", tmp_path, tiny_models["tiny-llama"])
    assert fsdp.checkpointing(True) is False and fsdp.checkpointing(False) is False
    assert fsdp.training_kwargs(True)["fsdp_config"]["activation_checkpointing"] is True
    (tmp_path / "z").mkdir()
    assert strategy("zero3", tmp_path / "z", tiny_models["tiny-llama"]).checkpointing(True) is True


@pytest.mark.parametrize("name, stage, offload_optimizer, offload_param", [
    ("zero2", 2, "none", "none"), ("zero2_offload", 2, "cpu", "none"),
    ("zero3", 3, "none", "none"), ("zero3_offload", 3, "cpu", "cpu")])
def test_deepspeed_file_is_filled_by_training_arguments_and_parsed_by_deepspeed(tmp_path, tiny_models, name, stage,
                                                                                 offload_optimizer, offload_param):
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import AutoModelForCausalLM

    chosen = strategy(name, tmp_path, tiny_models["tiny-llama"], precision="fp32")
    assert chosen.training_kwargs() == {"deepspeed": str(tmp_path / "deepspeed.json")}
    written = json.loads((tmp_path / "deepspeed.json").read_text())
    assert written["zero_optimization"]["stage"] == stage and "optimizer" not in written
    assert written["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)

    model = AutoModelForCausalLM.from_pretrained(tiny_models["tiny-llama"])  # before ZeRO-3's config is live
    args = sft_config(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2, max_grad_norm=0.5,
                      **chosen.training_kwargs())
    ds = args.hf_deepspeed_config  # transformers' HfTrainerDeepSpeedConfig after trainer_config_process(args)
    ds.trainer_config_finalize(args, model, num_training_steps=10)
    assert "auto" not in json.dumps(ds.config)
    assert (ds.config["train_micro_batch_size_per_gpu"], ds.config["gradient_accumulation_steps"],
            ds.config["train_batch_size"], ds.config["gradient_clipping"]) == (3, 2, 6, 0.5)
    assert ds.config["zero_optimization"]["reduce_bucket_size"] == model.config.hidden_size ** 2

    parsed = DeepSpeedConfig(ds.config)
    assert parsed.zero_optimization_stage == stage and parsed.train_batch_size == 6
    assert not parsed.bfloat16_config.enabled and not parsed.float16_config.enabled  # fp32 on the CPU
    assert parsed.zero_force_ds_cpu_optimizer == ("offload" not in name)  # offload keeps the Trainer's optimizer
    plugin = DeepSpeedPlugin(hf_ds_config=str(tmp_path / "deepspeed.json"))
    assert (plugin.zero_stage, plugin.offload_optimizer_device, plugin.offload_param_device,
            plugin.zero3_init_flag) == (stage, offload_optimizer, offload_param, stage == 3)


@pytest.mark.parametrize("name, section", [("fsdp_offload", "fsdp_config"), ("zero3", "deepspeed_config")])
def test_accelerate_config_loads_into_accelerates_cluster_config(tmp_path, tiny_models, monkeypatch, name, section):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    world = World(num_processes=16, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29500)
    chosen = strategy(name, tmp_path, tiny_models["tiny-llama"], world=world)
    assert chosen.accelerate_path == tmp_path / "accelerate_config.yaml"
    loaded = load_config_from_file(str(chosen.accelerate_path))
    assert isinstance(loaded, ClusterConfig)
    assert (loaded.num_processes, loaded.num_machines, loaded.machine_rank, loaded.main_process_ip,
            loaded.main_process_port) == (16, 2, 1, "10.0.0.1", 29500)
    if section == "fsdp_config":
        assert loaded.distributed_type == DistributedType.FSDP and loaded.mixed_precision == "bf16"
        assert loaded.fsdp_config == {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": True, "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_activation_checkpointing": False,
            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}
        assert chosen.describe() == (f"strategy fsdp_offload: PyTorch FSDP full shard, weights and optimizer states "
                                     f"offloaded to CPU memory over 16 processes, accelerate config "
                                     f"{chosen.accelerate_path}")
    else:
        assert loaded.distributed_type == DistributedType.DEEPSPEED and loaded.mixed_precision is None
        assert loaded.deepspeed_config == {"deepspeed_config_file": str(tmp_path / "deepspeed.json"),
                                           "deepspeed_multinode_launcher": "standard", "zero3_init_flag": True}
        # What `accelerate launch` hands its processes from this file; DeepSpeedPlugin refuses a file beside
        # settings the file should hold (mixed_precision among them).
        monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", ",".join(loaded.deepspeed_config))
        assert DeepSpeedPlugin(hf_ds_config=loaded.deepspeed_config["deepspeed_config_file"]).zero_stage == 3
        assert chosen.describe() == (f"strategy zero3: DeepSpeed ZeRO-3 over 16 processes, config "
                                     f"{tmp_path / 'deepspeed.json'}")


def test_world_comes_from_the_launch_plan():
    from engine.world import launch_plan

    plan = launch_plan(build_config({"nproc_per_node": 4, "nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1"}),
                       env={})
    assert World.from_plan(plan) == World(8, 2, 1, "10.0.0.1", 29500)


def run_in_launched_process(code: str, port: int) -> str:
    """``code`` in a fresh process that looks like torchrun's only worker (its process group is its own)."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_before_model_load_makes_from_pretrained_build_zero3_partitions(tmp_path, tiny_models):
    """The first run on a machine JIT-builds DeepSpeed's CPU comm op (about a minute); later runs take seconds."""
    from engine.runs.distributed import free_port

    assert run_in_launched_process(f"""
        from engine.config.schema import build_config
        from engine.train.strategy import World, prepare_strategy
        from transformers import AutoModelForCausalLM
        chosen = prepare_strategy(build_config({{"strategy": "zero3"}}), {str(tmp_path)!r}, {str(tiny_models["tiny-llama"])!r},
                                  "fp32", World(1))
        kept = chosen.before_model_load(micro_batch=2, accumulation=1)
        weight = AutoModelForCausalLM.from_pretrained({str(tiny_models["tiny-llama"])!r}).lm_head.weight
        print(type(kept).__name__, tuple(weight.shape), tuple(weight.ds_shape))
    """, free_port()).startswith("HfTrainerDeepSpeedConfig (0,) (")


def test_before_model_load_turns_on_fsdp_ram_efficient_loading_for_transformers(tmp_path, tiny_models):
    from engine.runs.distributed import free_port

    assert run_in_launched_process(f"""
        import torch.distributed
        from transformers.integrations.fsdp import is_fsdp_enabled
        from engine.config.schema import build_config
        from engine.train.strategy import World, prepare_strategy
        chosen = prepare_strategy(build_config({{"strategy": "fsdp"}}), {str(tmp_path)!r},
                                  {str(tiny_models["tiny-llama"])!r}, "fp32", World(1))
        before = is_fsdp_enabled()
        chosen.before_model_load(micro_batch=2, accumulation=1)
        print(before, is_fsdp_enabled(), torch.distributed.get_backend())
    """, free_port()) == "False True gloo"


def launch_problems(monkeypatch, **keys) -> list[str]:
    return [p for p in problems_in(build_config({**RUN, **keys})) if not p.startswith(("lr_scheduler", "optim"))]


def test_a_sharding_strategy_needs_several_processes(monkeypatch):
    assert launch_problems(monkeypatch, strategy="fsdp") == [
        "strategy fsdp shards the model across processes and this run has one: set nproc_per_node 2 or more (or "
        "nnodes 2 or more)"]
    assert launch_problems(monkeypatch, strategy="fsdp", nproc_per_node=2) == []
    assert launch_problems(monkeypatch, strategy="zero2", nnodes=2, node_rank=1, master_addr="10.0.0.1") == []
    assert launch_problems(monkeypatch, fsdp="full_shard") == [
        "fsdp full_shard shards the model across processes and this run has one: set nproc_per_node 2 or more (or "
        "nnodes 2 or more)"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")  # inside torchrun's worker: its WORLD_SIZE counts
    assert launch_problems(monkeypatch, fsdp="full_shard") == []


def test_strategy_with_a_users_deepspeed_or_fsdp_key_is_refused(tmp_path, monkeypatch):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert launch_problems(monkeypatch, strategy="zero3", nproc_per_node=2, deepspeed=str(user), fsdp="full_shard") == [
        "deepspeed and fsdp are both set: choose one",
        "strategy zero3 and deepspeed collide: the strategy writes its own DeepSpeed config; leave out deepspeed, or "
        "set strategy ddp to use yours",
        "strategy zero3 and fsdp collide: the strategy writes its own FSDP config; leave out fsdp, or set strategy "
        "ddp to use yours"]


def test_zero_strategies_without_deepspeed_installed_say_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    assert launch_problems(monkeypatch, strategy="zero3", nproc_per_node=2) == [
        "strategy zero3 uses DeepSpeed, which is not installed: pip install 'tuner-tui[deepspeed]', or choose "
        "strategy fsdp"]
    assert launch_problems(monkeypatch, strategy="fsdp", nproc_per_node=2) == []


def test_what_deepspeed_and_fsdp_refuse_applies_to_the_generated_strategies_too(monkeypatch):
    assert launch_problems(monkeypatch, strategy="zero3_offload", nproc_per_node=2, pure_bf16=True,
                           pissa_init=True) == [
        "pure_bf16 does not work with DeepSpeed ZeRO-3: use bf16 (mixed precision), or ZeRO-2",
        "pissa_init cannot initialise from weights that DeepSpeed ZeRO-3 shards: leave out pissa_init, or use ZeRO-2"]
    assert launch_problems(monkeypatch, strategy="zero2", nproc_per_node=2, pure_bf16=True, pissa_init=True) == []
    assert launch_problems(monkeypatch, strategy="fsdp_offload", nproc_per_node=2, loraplus_lr_ratio=16) == [
        "loraplus_lr_ratio cannot be used with strategy fsdp_offload (the Trainer refuses an optimizer made before "
        "FSDP wraps the model): choose strategy zero2 or zero3, or leave out loraplus_lr_ratio"]
    assert launch_problems(monkeypatch, strategy="zero3", nproc_per_node=2, loraplus_lr_ratio=16) == []


def test_pissa_under_fsdp_is_refused_before_the_run(monkeypatch):
    assert launch_problems(monkeypatch, strategy="fsdp", nproc_per_node=2, pissa_init=True) == [
        "pissa_init saves its adapter from the first process alone, which FSDP's sharded weights would keep waiting: "
        "leave out pissa_init, or use strategy ddp or zero2"]
