"""Starting several training processes as one run: torchrun's command line for a launch plan (``engine.world``),
a free port for a one-machine rendezvous, the line each other machine types, and where a rank leaves its last word.
Nothing here starts a process: ``engine.runs.supervise`` does.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from engine.world import DEFAULT_MASTER_PORT, LOCAL_ADDR, LaunchPlan


def free_port(host: str = LOCAL_ADDR) -> int:
    """A port nothing listens on now, for a one-machine rendezvous (two runs on one machine never share one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def torchrun_argv(plan: LaunchPlan, worker_args: list[str], port: int) -> list[str]:
    """PyTorch's launcher (``torch.distributed.run``, what ``torchrun`` runs, through ``engine.runs.torchrun``, which
    keeps a loopback rendezvous on the loopback interface) starting this machine's processes, each ``python -m
    engine.runs.rank WORKER_ARGS``. Static rendezvous at master_addr:port: every machine names the same address and
    port, node 0 listens."""
    return [sys.executable, "-m", "engine.runs.torchrun", "--nproc_per_node", str(plan.nproc_per_node),
            "--nnodes", str(plan.nnodes), "--node_rank", str(plan.node_rank), "--master_addr", plan.master_addr,
            "--master_port", str(port), "--max_restarts", "0", "-m", "engine.runs.rank", *worker_args]


def other_node_commands(plan: LaunchPlan, command: list[str]) -> list[str]:
    """The command each other machine of a multi-node run types: ``command`` (the `tuner train` line of node 0)
    with its own node_rank and node 0's address and port."""
    if plan.nnodes < 2:
        return []
    base = _without_options(command, ("--node_rank", "--master_addr", "--master_port", "--nnodes", "--detach"))
    addr = plan.master_addr if plan.master_addr not in (LOCAL_ADDR, "localhost") else socket.gethostname()
    return [" ".join([*base, "--nnodes", str(plan.nnodes), "--node_rank", str(rank), "--master_addr", addr,
                      "--master_port", str(plan.master_port or DEFAULT_MASTER_PORT)])
            for rank in range(plan.nnodes) if rank != plan.node_rank]


def _without_options(command: list[str], names: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for index, word in enumerate(command):
        if skip:
            skip = False
            continue
        name = word.split("=", 1)[0]
        if name in names:
            skip = "=" not in word and name != "--detach" and index + 1 < len(command)
            continue
        out.append(word)
    return out


def rank_file(run_dir: Path, rank: int) -> Path:
    """Where a rank of a supervised run leaves its last word (how it ended) for the supervisor."""
    return Path(run_dir) / "ranks" / f"rank{rank}.json"
