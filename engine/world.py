"""Which processes a run trains with, and which of them this one is: the launch plan (nproc_per_node, nnodes,
node_rank, master_addr, master_port from the config, Slurm's environment under ``srun`` and the GPUs this machine
shows) and the variables torchrun / accelerate set in each process they start. Nothing here starts a process:
``engine.runs.supervise`` does, with the command line ``engine.runs.distributed`` writes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from engine.config.schema import TunerConfig
from engine.errors import UserError

DEFAULT_MASTER_PORT = 29500  # torchrun's own default: every machine of a multi-node run must name the same port
LOCAL_ADDR = "127.0.0.1"
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")  # torchrun / accelerate set these in every process they start


@dataclass(frozen=True)
class LaunchPlan:
    """The processes of one run: ``nproc_per_node`` on each of ``nnodes`` machines, this one being ``node_rank``."""

    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int | None  # None: one machine, a free port chosen at launch
    source: str = ""  # where nnodes / node_rank / master_addr came from when not from the config ("Slurm")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main_node(self) -> bool:
        """Node 0 holds global rank 0, which writes the run directory."""
        return self.node_rank == 0

    def describe(self) -> str:
        where = (f", {self.nproc_per_node} on each of {self.nnodes} machines, this one node {self.node_rank}"
                 if self.nnodes > 1 else " on this machine")
        port = f":{self.master_port}" if self.master_port else ""
        via = f" (from {self.source})" if self.source else ""
        return f"{self.world_size} processes{where}; rendezvous at {self.master_addr}{port}{via}"


def in_launched_process(env=None) -> bool:
    """Whether this process is one that torchrun (or accelerate, or srun with torch's variables) started."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def launch_plan(cfg: TunerConfig, env=None, gpu_count: int | None = None) -> LaunchPlan:
    """The run's processes from the config, Slurm's environment (``srun``) for what it leaves unset, and this
    machine's GPUs for nproc_per_node (``gpu_count``: how many CUDA shows; probed when None)."""
    env = os.environ if env is None else env
    t = cfg.train
    slurm = slurm_values(env)
    nnodes = t.nnodes if t.nnodes is not None else slurm.get("nnodes", 1)
    node_rank = t.node_rank if t.node_rank is not None else slurm.get("node_rank", 0)
    master_addr = t.master_addr or slurm.get("master_addr") or LOCAL_ADDR
    used_slurm = any(getattr(t, key) is None and key in slurm for key in ("nnodes", "node_rank", "master_addr"))
    if t.nproc_per_node is not None:
        nproc = t.nproc_per_node
    elif slurm.get("gpus_on_node"):
        nproc = slurm["gpus_on_node"]
    else:
        nproc = max(1, _visible_gpu_count() if gpu_count is None else gpu_count)
    port = t.master_port if t.master_port is not None else (DEFAULT_MASTER_PORT if nnodes > 1 else None)
    plan = LaunchPlan(nproc, nnodes, node_rank, master_addr, port, "Slurm" if used_slurm else "")
    check_plan(plan)
    return plan


def planned_world_size(cfg: TunerConfig, env=None) -> int:
    """How many processes the run trains with: WORLD_SIZE inside one of them, else what launch_plan says (1 when the
    plan itself is wrong: its own check says why)."""
    env = os.environ if env is None else env
    if in_launched_process(env):
        return int(env["WORLD_SIZE"])
    try:
        return launch_plan(cfg, env).world_size
    except UserError:
        return 1


def check_plan(plan: LaunchPlan) -> None:
    """One line for a plan no launcher could run."""
    if plan.nproc_per_node < 1:
        raise UserError(f"nproc_per_node must be at least 1, got {plan.nproc_per_node}")
    if plan.nnodes < 1:
        raise UserError(f"nnodes must be at least 1, got {plan.nnodes}")
    if not 0 <= plan.node_rank < plan.nnodes:
        raise UserError(f"node_rank {plan.node_rank} is not one of the run's {plan.nnodes} machines, numbered 0 to "
                        f"{plan.nnodes - 1}", "give each machine its own node_rank, node 0 the one with master_addr")
    if plan.master_port is not None and not 0 < plan.master_port < 65536:
        raise UserError(f"master_port must be a port number (1 to 65535), got {plan.master_port}")


def under_slurm(env=None) -> bool:
    """Whether this process runs in a Slurm job step (``srun``), whose end Slurm signals to every process of it."""
    env = os.environ if env is None else env
    return "SLURM_JOB_ID" in env and env.get("SLURM_STEP_ID", "").isdigit()


def slurm_values(env) -> dict:
    """What a Slurm job step (``srun``, one task per node) says about the run's machines; {} outside one (a batch
    script itself runs on the first node only, so its variables do not describe the run's machines)."""
    if not under_slurm(env) or "SLURM_NODEID" not in env:
        return {}
    values: dict = {}
    nnodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if nnodes:
        values["nnodes"] = _slurm_int(env, "SLURM_NNODES" if env.get("SLURM_NNODES") else "SLURM_JOB_NUM_NODES")
    values["node_rank"] = _slurm_int(env, "SLURM_NODEID")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        values["master_addr"] = first_host(nodelist)
    tasks = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE")
    if tasks and tasks.split("(")[0].isdigit() and int(tasks.split("(")[0]) > 1:
        raise UserError(f"Slurm starts {tasks.split('(')[0]} tasks on each node and tuner starts the node's "
                        "processes itself", "run one task per node: srun --ntasks-per-node=1 tuner train ...")
    gpus = env.get("SLURM_GPUS_ON_NODE")
    if gpus and gpus.isdigit() and int(gpus) > 0:
        values["gpus_on_node"] = int(gpus)
    return values


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``gpu-[03-04,07],cpu1`` -> ``gpu-03`` (what ``scontrol show hostnames``
    prints first)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"cannot read Slurm's host list {nodelist!r}", "give master_addr")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_int(env, name: str) -> int:
    value = env[name]
    if not value.isdigit():
        raise UserError(f"Slurm's {name} is {value!r}, not a number", "give nnodes / node_rank yourself")
    return int(value)


def _visible_gpu_count() -> int:
    from engine.hardware import probe

    return len(probe().gpus)


def rank_tag(env=None) -> str:
    """"rank N" in a process of a multi-process run (the tag its train.log lines carry), else ""."""
    env = os.environ if env is None else env
    if not in_launched_process(env) or int(env.get("WORLD_SIZE", "1")) < 2:
        return ""
    return f"rank {env.get('RANK', env['LOCAL_RANK'])}"


def is_main_process() -> bool:
    """Under torchrun / accelerate every process trains, but only rank 0 writes the run directory's files."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """How many processes train as one run with this one (1 outside a launched run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def several_processes() -> bool:
    """Whether this process is one of several training as one run."""
    return world_size() > 1


def local_rank() -> int:
    """This process's place on its machine (its GPU), 0 outside a launched run."""
    return int(os.environ.get("LOCAL_RANK", "0"))
