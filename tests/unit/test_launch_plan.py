"""How many processes a run has and where they meet: the config's launch keys, Slurm's variables under srun, the
GPUs this machine shows; torchrun's command line and the other machines' commands."""

from __future__ import annotations

import sys

import pytest

from engine.config.schema import build_config
from engine.errors import UserError
from engine.runs.distributed import other_node_commands, torchrun_argv
from engine.world import first_host, launch_plan, planned_world_size, rank_tag

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu-[07-10]",
         "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}


def plan(env=None, gpus=1, **keys):
    return launch_plan(build_config(keys), env or {}, gpus)


def test_one_process_per_visible_gpu_by_default_and_one_without_a_gpu():
    assert plan(gpus=4).nproc_per_node == 4 and plan(gpus=4).world_size == 4
    assert plan(gpus=0).world_size == 1 and not plan(gpus=0).distributed
    assert plan(gpus=4, nproc_per_node=2).world_size == 2


def test_several_machines_meet_at_node_0_on_torchruns_port():
    p = plan(gpus=8, nnodes=2, node_rank=1, master_addr="10.0.0.5")
    assert (p.world_size, p.node_rank, p.master_addr, p.master_port, p.main_node) == (16, 1, "10.0.0.5", 29500, False)
    assert p.describe() == "16 processes, 8 on each of 2 machines, this one node 1; rendezvous at 10.0.0.5:29500"
    assert plan(gpus=2).master_port is None, "one machine: a free port chosen at launch"


def test_slurm_gives_the_nodes_the_node_rank_and_the_first_host_as_master():
    p = plan(SLURM)
    assert (p.nnodes, p.node_rank, p.master_addr, p.nproc_per_node, p.source) == (4, 2, "gpu-07", 8, "Slurm")
    assert plan(SLURM, nnodes=4, node_rank=3, master_addr="head").source == ""
    assert plan(SLURM, master_port=6000).master_port == 6000
    assert plan({k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}, gpus=1).nnodes == 1, "outside a job: no Slurm"
    assert plan({**SLURM, "SLURM_STEP_ID": "batch"}, gpus=1).nnodes == 1, "the batch script is no srun step"


def test_slurm_host_lists_name_their_first_host():
    assert first_host("gpu-[03-04,07],cpu1") == "gpu-03"
    assert first_host("node17") == "node17"
    assert first_host("a[1,5-6]") == "a1"


@pytest.mark.parametrize("env, message", [
    ({**SLURM, "SLURM_NTASKS_PER_NODE": "8"}, "Slurm starts 8 tasks on each node and tuner starts the node's "
                                              "processes itself (run one task per node: srun --ntasks-per-node=1 "
                                              "tuner train ...)"),
    ({**SLURM, "SLURM_NODEID": "x"}, "Slurm's SLURM_NODEID is 'x', not a number (give nnodes / node_rank yourself)"),
])
def test_slurm_steps_tuner_cannot_use_are_one_line(env, message):
    with pytest.raises(UserError) as error:
        plan(env)
    assert str(error.value) == message


@pytest.mark.parametrize("keys, message", [
    ({"nnodes": 2, "node_rank": 2}, "node_rank 2 is not one of the run's 2 machines, numbered 0 to 1 (give each machine its "
                                    "own node_rank, node 0 the one with master_addr)"),
    ({"nproc_per_node": 0}, "nproc_per_node must be at least 1, got 0"),
    ({"master_port": 70000}, "master_port must be a port number (1 to 65535), got 70000"),
])
def test_plans_no_launcher_could_run_are_one_line(keys, message):
    with pytest.raises(UserError) as error:
        plan(**keys)
    assert str(error.value) == message


def test_inside_a_launched_process_the_world_size_is_the_launchers():
    cfg = build_config({"nproc_per_node": 2})
    assert planned_world_size(cfg, {"LOCAL_RANK": "0", "WORLD_SIZE": "8", "RANK": "3"}) == 8
    assert planned_world_size(build_config({"nproc_per_node": 2, "nnodes": 2, "node_rank": 0}), {}) == 4
    assert rank_tag({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "RANK": "1"}) == "rank 1"
    assert rank_tag({}) == ""


def test_torchrun_runs_each_rank_with_a_static_rendezvous():
    argv = torchrun_argv(plan(gpus=1, nnodes=2, node_rank=1, master_addr="head"), ["/runs/a", "--config", "c"], 29500)
    assert argv == [sys.executable, "-m", "engine.runs.torchrun", "--nproc_per_node", "1", "--nnodes", "2",
                    "--node_rank", "1", "--master_addr", "head", "--master_port", "29500", "--max_restarts", "0",
                    "-m", "engine.runs.rank", "/runs/a", "--config", "c"]


def test_the_other_machines_type_node_0s_command_with_their_own_rank():
    p = plan(gpus=8, nnodes=3, node_rank=0, master_addr="head", master_port=6000)
    command = ["tuner", "train", "run.yaml", "--nnodes", "3", "--node_rank=0", "--detach", "--master_addr", "head"]
    assert other_node_commands(p, command) == [
        "tuner train run.yaml --nnodes 3 --node_rank 1 --master_addr head --master_port 6000",
        "tuner train run.yaml --nnodes 3 --node_rank 2 --master_addr head --master_port 6000"]
    assert other_node_commands(plan(gpus=8), command) == []


def test_a_resume_pins_the_gpus_the_run_held_only_when_they_are_this_hosts_and_enough():
    import socket

    from engine.runs.launch import _gpus_of
    from engine.rundir.status import RunStatus

    held = RunStatus(id="r", name="r", host=socket.gethostname(), gpus=["GPU-aaa", "GPU-bbb"])
    two = build_config({"nproc_per_node": 2})
    assert _gpus_of(held, two) == "GPU-aaa,GPU-bbb"
    assert _gpus_of(RunStatus(id="r", name="r", host="elsewhere", gpus=held.gpus), two) is None
    assert _gpus_of(RunStatus(id="r", name="r", host=held.host, gpus=["GPU-aaa", "gpu-1"]), two) is None
    assert _gpus_of(held, build_config({"nproc_per_node": 4})) is None
    assert _gpus_of(None, two) is None


def test_a_run_over_several_machines_must_name_its_output_dir_foreground_or_not(tmp_path, monkeypatch):
    """Each machine would stamp a default directory of its own: refused before anything starts, whether `tuner
    train` resolves the directory first (foreground, for --do_predict) or start_run does."""
    from engine.cli import main
    from engine.runs.launch import with_run_directory

    keys = {"model_name_or_path": "tiny-llama", "nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1"}
    with pytest.raises(UserError, match="needs output_dir"):
        with_run_directory(build_config(keys))
    given = with_run_directory(build_config({**keys, "output_dir": str(tmp_path / "shared")}))
    assert given.train.output_dir == str(tmp_path / "shared")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--dataset", "demo_alpaca", *(f"--{k}={v}" for k, v in keys.items())]
    assert main(argv) == 2 and not (tmp_path / "saves").exists()
