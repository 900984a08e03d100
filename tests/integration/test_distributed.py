"""`tuner train --nproc_per_node 2` (and two "nodes" on this machine) is one synchronised training through torchrun on
the CPU (gloo): one run directory written by rank 0, stop and resume, and a dying rank that fails the run cleanly."""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import subprocess
import sys
import time

import psutil

from engine.rundir import read_events, read_status
from job_helpers import RUN, start_detached, tuner, wait_for

TWO = ("--nproc_per_node", "2")


def events_of(run_dir, kind):
    return [e for e in read_events(run_dir) if e["type"] == kind]


def rank_processes(supervisor_pid: int) -> dict[int, psutil.Process]:
    found = {}
    for child in psutil.Process(supervisor_pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            found[int(rank)] = child
    return found


def run_tree(pid: int) -> list[psutil.Process]:
    supervisor = psutil.Process(pid)
    return [supervisor, *supervisor.children(recursive=True)]


def test_two_processes_train_as_one_run_that_stops_and_resumes(home):
    run_dir, run_id = start_detached(home, "ddp", *TWO, "--max_steps", "100", "--save_steps", "5000")
    wait_for(lambda: events_of(run_dir, "log"), 120, "the first logged step")
    assert len(rank_processes(read_status(run_dir).pid)) == 2, "the run's own process supervises both ranks"
    listening = [(process.name(), c.laddr) for process in run_tree(read_status(run_dir).pid)
                 for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(ipaddress.ip_address(address.ip).is_loopback for _, address in listening), \
        f"a run on one machine listens on its loopback interface alone (torch's store, gloo): {listening}"
    result = tuner("stop", run_id, cwd=home)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: read_status(run_dir).state == "stopped", 60, "the run to stop")
    wait_for(lambda: read_status(run_dir).exit_code == 128 + signal.SIGTERM, 60,
             "the stop's exit code: `tuner stop` is SIGTERM, 143 as README says, though the ranks were sent SIGINT")
    end = events_of(run_dir, "end")[-1]
    assert end["state"] == "stopped" and (run_dir / f"checkpoint-{end['step']}").is_dir(), \
        "both ranks stopped after the same step and saved it"

    result = tuner("resume", run_id, cwd=home)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: events_of(run_dir, "end")[-1:] and len(events_of(run_dir, "end")) == 2, 240,
             "the resumed run to end")
    status = read_status(run_dir)
    assert status.state == "completed", status.error
    starts = events_of(run_dir, "start")
    assert [s["world_size"] for s in starts] == [2, 2]
    assert starts[1]["resumed_from"] == str(run_dir.resolve() / f"checkpoint-{end['step']}")
    steps = [e["step"] for e in events_of(run_dir, "log")]
    assert steps == sorted(set(steps)) and steps[-1] == 100, "one loss per logged step: rank 0 alone records"
    last = events_of(run_dir, "end")[-1]
    digests = last["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "both ranks hold the same weights after training"
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert "INFO rank 0 tuner: " in (run_dir / "train.log").read_text()


def test_two_nodes_on_one_machine_train_as_one(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    out = tmp_path / "two-nodes"
    node = [sys.executable, "-m", "engine.cli", "train", *RUN, "--output_dir", str(out), "--max_steps", "6",
            "--save_strategy", "no", "--nproc_per_node", "1", "--nnodes", "2", "--master_addr", "127.0.0.1",
            "--master_port", port]
    with open(tmp_path / "node1.out", "w+") as out1, open(tmp_path / "node0.out", "w+") as out0:
        first = subprocess.Popen([*node, "--node_rank", "1"], stdout=out1, stderr=subprocess.STDOUT, cwd=tmp_path)
        zero = subprocess.Popen([*node, "--node_rank", "0"], stdout=out0, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            launcher, mapped = psutil.Process(first.pid), set()
            wait_for(lambda: launcher.children(), 60, "node 1 to start its ranks")
            while first.poll() is None:  # for as long as node 1's own process lives
                try:
                    mapped |= {m.path for m in launcher.memory_maps() if "libtorch" in m.path}
                except psutil.Error:
                    break
                time.sleep(0.5)
            zero.wait(timeout=300)
            first.wait(timeout=120)
        finally:
            for process in (first, zero):
                if process.poll() is None:
                    process.kill()
        other = (tmp_path / "node1.out").read_text()
        assert zero.returncode == 0, (tmp_path / "node0.out").read_text()[-3000:]
        assert first.returncode == 0, other[-3000:]
        assert not mapped, "a node's own process only launches and supervises: torch is loaded by its ranks"
    assert "node 1 of 2: 2 processes, 1 on each of 2 machines, this one node 1" in other
    assert events_of(out, "start")[0]["world_size"] == 2
    assert read_status(out).state == "completed" and (out / "adapter_model.safetensors").is_file()
    digests = events_of(out, "end")[0]["weight_digests"]
    assert digests[0] == digests[1]


def test_a_killed_rank_fails_the_run_on_every_rank(home):
    run_dir, run_id = start_detached(home, "killed-rank", *TWO, "--max_steps", "2000", "--save_steps", "5")
    wait_for(lambda: (run_dir / "checkpoint-5").is_dir(), 120, "the first checkpoint")
    supervisor = read_status(run_dir).pid
    ranks = rank_processes(supervisor)
    everyone = [psutil.Process(supervisor), *psutil.Process(supervisor).children(recursive=True)]
    ranks[1].send_signal(signal.SIGKILL)
    wait_for(lambda: read_status(run_dir).state == "failed", 90, "the run to be marked failed")
    status = read_status(run_dir)
    assert status.error == "rank 1 failed: its process ended without a word (killed: by a signal, or out of memory)"
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in everyone), 60,
             "every process of the run to end")
    errors = events_of(run_dir, "error")
    assert errors[-1]["message"] == status.error and errors[-1]["rank"] == 1
    assert events_of(run_dir, "end")[-1]["state"] == "failed"
    assert (run_dir / "checkpoint-5").is_dir() and (run_dir / "train.log").is_file(), "nothing the run wrote is lost"
    listed = tuner("runs", cwd=home, env={"COLUMNS": "160"}).stdout
    assert "rank 1 failed" in listed


def test_zero3_through_tuner_writes_its_configs_and_saves_the_whole_adapter(home, tiny_models):
    """DeepSpeed ZeRO-3 runs on the CPU with gloo (FSDP does not: accelerate shards only GPU process groups)."""
    from safetensors.torch import load_file

    out = home / "zero3"
    result = tuner("train", *RUN, "--output_dir", str(out), *TWO, "--strategy", "zero3", "--max_steps", "4",
                   "--save_strategy", "no", cwd=home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_status(out).state == "completed"
    assert events_of(out, "start")[0]["world_size"] == 2
    log = (out / "train.log").read_text()
    assert f"strategy zero3: DeepSpeed ZeRO-3 over 2 processes, config {out / 'deepspeed.json'}" in log
    assert (out / "deepspeed.json").is_file() and (out / "accelerate_config.yaml").is_file()
    hidden = json.loads((tiny_models["tiny-llama"] / "config.json").read_text())["hidden_size"]
    shapes = {tuple(t.shape) for t in load_file(out / "adapter_model.safetensors").values()}
    assert (8, hidden) in shapes and all(len(shape) == 2 and 8 in shape and 0 not in shape for shape in shapes), \
        "the adapter gathered whole from its shards"


def test_a_deepspeed_config_in_a_run_of_one_process_trains_without_a_launcher(home):
    """LLaMA-Factory's ZeRO-3 example given to a run of one process (no torchrun, as `qwen3_lora_sft_ds3.yaml` on one
    GPU): DeepSpeed, finding no launcher's RANK, asked MPI who it was and failed with `No module named 'mpi4py'`.
    The run gives it a process group of one held in memory; its own process, since the group lives in it."""
    (home / "ds_z3.json").write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}))
    out = home / "one"
    result = subprocess.run([sys.executable, "-m", "engine.cli", "train", *RUN, "--output_dir", str(out), "--deepspeed",
                             "ds_z3.json", "--max_steps", "2", "--save_strategy", "no"], cwd=home, capture_output=True,
                            text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_status(out).state == "completed" and events_of(out, "start")[0]["world_size"] == 1
    assert (out / "adapter_model.safetensors").is_file()


def test_the_preference_and_reward_stages_train_as_one_run_of_two_processes(home, tmp_path):
    """DPO, KTO and a reward model under torchrun (gloo): rank 0 alone records, and both ranks end with the same
    weights."""
    from test_dpo import write_pairs
    from test_kto import write_feedback

    pairs, feedback = write_pairs(tmp_path / "pairs", count=16), write_feedback(tmp_path / "feedback", count=16)
    for stage, data, dataset in (("dpo", pairs, "pairs_alpaca"), ("kto", feedback, "feedback"),
                                 ("rm", pairs, "pairs_alpaca")):
        out = tmp_path / stage
        done = tuner("train", "--stage", stage, "--model_name_or_path", "tiny-llama", "--dataset", dataset,
                     "--dataset_dir", str(data), "--template", "llama2", "--cutoff_len", "64",
                     "--per_device_train_batch_size", "2", "--logging_steps", "1", "--max_steps", "3",
                     "--output_dir", str(out), *TWO, cwd=home)
        assert done.returncode == 0, done.stdout + done.stderr
        assert read_status(out).state == "completed" and events_of(out, "start")[0]["world_size"] == 2
        assert [e["step"] for e in events_of(out, "log")] == [1, 2, 3]
        digests = events_of(out, "end")[-1]["weight_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], stage
