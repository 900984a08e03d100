"""The model download step against a stand-in hub on localhost: the plan, progress, resume after an interruption,
gated and private models and a disk too small refused before anything starts, and a run that downloads then trains."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import job_helpers
import pytest
from job_helpers import wait_for

from engine.cli import main
from engine.errors import UserError
from engine.models import download as downloads
from engine.models.download import (
    DISK_MARGIN_BYTES,
    DownloadStopped,
    download,
    plan_download,
)
from engine.models.resolve import resolve_model
from engine.rundir import read_events, read_status

RUN_FILES = ["chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "model.safetensors", "config.json"]
WEIGHTS = "model.safetensors"
TRAIN = ["--dataset", "demo_alpaca", "--finetuning_type", "lora", "--max_steps", "2", "--max_samples", "16",
         "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_steps", "100000"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plan_lists_the_files_a_run_needs_with_the_hubs_sizes(hub, tiny_models, tmp_path):
    plan = plan_download("org/tiny")
    assert [f.name for f in plan.files] == RUN_FILES  # the demo marker is no file a run loads; config.json last
    sizes = {f.name: f.size for f in plan.files}
    assert sizes == {name: (tiny_models["tiny-llama"] / name).stat().st_size for name in RUN_FILES}
    assert plan.total_bytes == plan.missing_bytes == sum(sizes.values())
    assert plan.cache_dir == tmp_path / "hf" / "hub" and plan.free_bytes > 0
    assert plan.commit == hub.repos["org/tiny"].commit


def test_download_reports_progress_up_to_the_total_and_the_cache_then_holds_the_model(hub, tiny_models):
    plan = plan_download("org/tiny")
    seen = []
    snapshot = download(plan, seen.append)
    assert seen[-1].done_bytes == seen[-1].total_bytes == plan.total_bytes and seen[-1].eta_s == 0
    assert [p.done_bytes for p in seen] == sorted(p.done_bytes for p in seen)
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(RUN_FILES)
    for name in RUN_FILES:
        assert sha256(snapshot / name) == sha256(tiny_models["tiny-llama"] / name), name
    assert plan_download("org/tiny").missing_bytes == 0
    resolved = resolve_model("org/tiny")
    assert (resolved.source, resolved.path, resolved.plan) == ("hub-cache", str(snapshot), None)


def test_a_dropped_connection_is_resumed_from_the_bytes_received(hub, tiny_models):
    size = (tiny_models["tiny-llama"] / WEIGHTS).stat().st_size
    hub.drop_after[("org/tiny", WEIGHTS)] = size // 2
    snapshot = download(plan_download("org/tiny"))
    assert sha256(snapshot / WEIGHTS) == sha256(tiny_models["tiny-llama"] / WEIGHTS)
    starts = [start for repo, name, start in hub.ranges if name == WEIGHTS]
    assert starts[0] == 0 and 0 < starts[1] <= size // 2  # the second request asked only for the rest


def test_a_stopped_download_continues_later_fetching_only_the_rest(hub, tiny_models, monkeypatch):
    monkeypatch.setattr(downloads, "CHUNK_BYTES", 256 << 10)
    monkeypatch.setattr(downloads, "PROGRESS_EVERY_S", 0.0)  # every chunk reported: the stop lands mid-file
    size = (tiny_models["tiny-llama"] / WEIGHTS).stat().st_size
    plan = plan_download("org/tiny")
    before_weights = sum(f.size for f in plan.files[:RUN_FILES.index(WEIGHTS)])
    seen = []
    with pytest.raises(DownloadStopped):
        download(plan, seen.append, stop=lambda: bool(seen) and seen[-1].done_bytes > before_weights + size // 3)
    kept = plan.total_bytes - plan_download("org/tiny").missing_bytes - before_weights
    assert size // 3 < kept < size
    snapshot = download(plan_download("org/tiny"))
    assert hub.ranges[-2][1:] == (WEIGHTS, kept)
    assert hub.served_from[("org/tiny", WEIGHTS, kept)] == size - kept
    assert sha256(snapshot / WEIGHTS) == sha256(tiny_models["tiny-llama"] / WEIGHTS)


def test_a_download_the_hub_breaks_off_ends_in_one_line_that_says_it_continues(hub):
    plan = plan_download("org/tiny")
    hub.fail[("org/tiny", WEIGHTS)] = 503
    with pytest.raises(UserError) as error:
        download(plan)
    assert error.value.message.startswith("the download of org/tiny broke off at model.safetensors: ")
    assert "503 Service Unavailable" in error.value.message
    assert error.value.hint == "`tuner download org/tiny` or `tuner resume RUN` continues from what was fetched"
    del hub.fail[("org/tiny", WEIGHTS)]
    assert (download(plan_download("org/tiny")) / WEIGHTS).is_file()


@pytest.mark.parametrize("token, status", [(None, 401), ("hf_refused", 403)])
def test_gated_model_says_to_accept_its_licence(hub, monkeypatch, token, status):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(UserError) as error:
        plan_download("org/gated")
    assert error.value.message == ("org/gated is gated" if token is None else
                                   f"org/gated is gated; the token found was refused ({status}): its account has no "
                                   "access yet")
    assert error.value.hint == f"accept its licence at {hub.url}/org/gated, then `hf auth login` or set HF_TOKEN"


def test_gated_model_with_a_granted_token_downloads(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    assert (download(plan_download("org/gated")) / WEIGHTS).is_file()


def test_estimate_of_a_gated_model_asks_with_the_configs_token(hub, capsys):
    assert main(["estimate", "--model_name_or_path", "org/gated", "--hf_hub_token", "hf_granted", "--json"]) == 0
    assert "recommendation" in json.loads(capsys.readouterr().out)
    assert main(["estimate", "--model_name_or_path", "org/gated", "--json"]) == 2
    assert capsys.readouterr().err.startswith("tuner: error: org/gated is gated")


def test_a_file_over_the_plain_http_limit_is_refused_before_anything_moves(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "MAX_HTTP_DOWNLOAD_SIZE", 1_000_000)  # the tiny model's weights are 2.6 MB
    with pytest.raises(UserError) as error:
        plan_download("org/tiny")
    assert error.value.message == ("org/tiny's model.safetensors is 2.6 MB, over huggingface_hub's 1.0 MB limit for "
                                   "a plain HTTP download")
    assert error.value.hint == ("fetch it with `hf download org/tiny --revision main` (hf_xet), then run again: the "
                                "cache is used")
    monkeypatch.setattr(constants, "MAX_HTTP_DOWNLOAD_SIZE", 50_000_000_000)
    download(plan_download("org/tiny"))
    monkeypatch.setattr(constants, "MAX_HTTP_DOWNLOAD_SIZE", 1_000_000)
    assert plan_download("org/tiny").missing_bytes == 0  # what the cache holds needs no plain HTTP download


def test_private_model_without_a_token_names_it_and_says_it_needs_one(hub):
    with pytest.raises(UserError) as error:
        plan_download("org/private")
    assert error.value.message == "org/private is not a model on the Hugging Face hub, or it is private"
    assert "`hf auth login` or set HF_TOKEN" in error.value.hint


@pytest.mark.parametrize("token", [None, "hf_refused"])
def test_train_of_a_gated_model_is_refused_before_a_run_directory_exists(hub, home, monkeypatch, capsys, token):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    out = home / "out"
    assert main(["train", "--model_name_or_path", "org/gated", *TRAIN, "--output_dir", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("tuner: error: org/gated is gated") and "accept its licence" in line
    assert not out.exists()


def test_disk_too_small_is_refused_before_anything_starts_and_just_enough_passes(hub, home, monkeypatch, capsys):
    missing = plan_download("org/tiny").missing_bytes
    free = [missing + DISK_MARGIN_BYTES - 1]
    monkeypatch.setattr(downloads.shutil, "disk_usage", lambda path: SimpleNamespace(total=0, used=0, free=free[0]))
    out = home / "out"
    assert main(["train", "--model_name_or_path", "org/tiny", *TRAIN, "--output_dir", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("tuner: error: org/tiny needs 1 B more: ") and "free at " in line
    assert "HF_HOME/HF_HUB_CACHE" in line and not out.exists() and not hub.served
    free[0] += 1
    assert plan_download("org/tiny").free_bytes == missing + DISK_MARGIN_BYTES


def test_train_of_a_hub_model_downloads_it_with_progress_events_then_trains(hub, home):
    out = home / "out"
    assert main(["train", "--model_name_or_path", "org/tiny", *TRAIN, "--output_dir", str(out)]) == 0
    events = read_events(out)
    downloads_seen = [e for e in events if e["type"] == "download"]
    assert downloads_seen and downloads_seen[-1]["done"] == downloads_seen[-1]["total"]
    assert {"file", "done", "total", "speed", "eta_s"} <= set(downloads_seen[-1])
    kinds = [e["type"] for e in events]
    assert kinds.index("download") < kinds.index("start")
    start = next(e for e in events if e["type"] == "start")
    assert Path(start["model_path"]) == plan_download("org/tiny").snapshot_dir
    assert read_status(out).state == "completed" and read_status(out).step == 2
    log = (out / "train.log").read_text()
    assert "downloading org/tiny (main): 6 files" in log and "downloaded model.safetensors (2.6 MB)" in log
    assert "downloaded org/tiny in " in log


def tuner(*args: str) -> subprocess.CompletedProcess:
    return job_helpers.tuner(*args, cwd=Path.cwd())


def test_download_command_prints_the_plan_progress_and_the_snapshot_then_needs_nothing(hub):
    first = tuner("download", "org/tiny")
    assert first.returncode == 0, first.stderr
    snapshot = plan_download("org/tiny").snapshot_dir
    assert first.stdout.splitlines() == [str(snapshot)]
    assert "org/tiny (main, commit " in first.stderr and "6 files, 2.7 MB" in first.stderr
    assert " free at " in first.stderr and "model.safetensors" in first.stderr
    assert "config.json  2.7 MB / 2.7 MB (100%)" in first.stderr
    again = tuner("download", "org/tiny")
    assert again.returncode == 0 and again.stdout.strip() == str(snapshot)
    assert again.stderr.strip() == "org/tiny needs no download: already in the Hugging Face cache"
    as_json = tuner("download", "org/tiny", "--json")
    assert json.loads(as_json.stdout) == {"model": "org/tiny", "source": "hub-cache", "path": str(snapshot),
                                          "downloaded_bytes": 0}


def test_download_command_interrupted_keeps_the_part_and_the_next_one_fetches_the_rest(hub, tiny_models, tmp_path):
    size = (tiny_models["tiny-llama"] / WEIGHTS).stat().st_size
    part = tmp_path / "hf" / "hub" / "models--org--tiny" / "blobs" / f"{hub.repos['org/tiny'].etag(WEIGHTS)}.incomplete"
    hub.bytes_per_s = 250_000
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "download", "org/tiny"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: part.is_file() and part.stat().st_size >= 1 << 20, 60, "a first MiB of the weights on disk")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stdout == ""
    assert stderr.strip().splitlines()[-1].startswith("tuner: download interrupted at ")
    assert "the part fetched is kept: `tuner download org/tiny` again continues it" in stderr
    kept = part.stat().st_size
    assert 0 < kept < size
    hub.bytes_per_s = None
    assert tuner("download", "org/tiny").returncode == 0
    assert hub.served_from[("org/tiny", WEIGHTS, kept)] == size - kept and not part.exists()


def test_download_command_refuses_a_gated_model_in_one_line(hub):
    result = tuner("download", "org/gated")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tuner: error: org/gated is gated")


def test_run_stopped_during_its_download_is_resumed_with_its_token_and_fetches_only_the_rest(hub, home,
                                                                                              tiny_models):
    size = (tiny_models["tiny-llama"] / WEIGHTS).stat().st_size
    hub.bytes_per_s = 100_000  # the weights take 26 seconds: time to stop the run in the middle
    out = home / "out"
    started = tuner("train", "--model_name_or_path", "org/gated", "--hf_hub_token", "hf_granted", *TRAIN,
                    "--output_dir", str(out), "--detach")
    assert started.returncode == 0, started.stderr

    def weights_started() -> bool:
        return any(e["type"] == "download" and e["file"] == WEIGHTS and e["done"] > 0 for e in read_events(out))

    wait_for(weights_started, 120, "the download of the weights")
    assert tuner("stop", str(out)).returncode == 0
    wait_for(lambda: read_status(out).state == "stopped", 60, "the run to stop")
    assert [e["state"] for e in read_events(out) if e["type"] == "end"] == ["stopped"]
    assert "`tuner resume " in (out / "train.log").read_text()
    assert "hf_granted" not in (out / "config.yaml").read_text()

    hub.bytes_per_s = None
    refused = tuner("resume", str(out))  # config.yaml keeps no token: the gated model asks for one again
    assert refused.returncode == 2 and refused.stderr.startswith("tuner: error: org/gated is gated"), refused.stderr
    assert tuner("resume", str(out), "--hf_hub_token", "hf_granted").returncode == 0
    wait_for(lambda: read_status(out).state in ("completed", "failed"), 180, "the resumed run to end")
    assert read_status(out).state == "completed", (out / "train.log").read_text()
    resumed_at = [start for _, name, start in hub.ranges if name == WEIGHTS][-1]
    assert 0 < resumed_at < size and hub.served_from[("org/gated", WEIGHTS, resumed_at)] == size - resumed_at


def test_the_branch_is_recorded_so_the_cache_finds_the_snapshot_by_its_name(hub):
    plan = plan_download("org/tiny")
    snapshot = download(plan)
    ref = plan.cache_dir / "models--org--tiny" / "refs" / "main"
    assert ref.read_text() == plan.commit and snapshot.name == plan.commit
    assert resolve_model("org/tiny").source == "hub-cache"


def test_a_stop_is_answered_while_another_process_holds_a_files_lock(hub):
    plan = plan_download("org/tiny")
    first = plan.files[0]
    lock = plan.cache_dir / ".locks" / "models--org--tiny" / f"{first.blob}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)",
                               str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        stop_at = time.monotonic() + 2  # unheld, the whole download takes a fraction of that
        with pytest.raises(DownloadStopped):
            download(plan, stop=lambda: time.monotonic() > stop_at)
        assert not (plan.snapshot_dir / first.name).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_machines_other_processes_wait_for_the_whole_snapshot_not_a_lone_config(hub, monkeypatch):
    import threading

    from engine.config.schema import build_config
    from engine.memory.recommend import model_geometry
    from engine.train.runner import _downloaded

    model_geometry("org/tiny")  # what an estimate leaves in the snapshot: config.json alone
    plan = plan_download("org/tiny")
    assert (plan.snapshot_dir / "config.json").is_file() and not (plan.snapshot_dir / WEIGHTS).exists()
    monkeypatch.setenv("LOCAL_RANK", "1")
    seen = {}

    def other_process() -> None:
        resolved = _downloaded(build_config({"model_name_or_path": "org/tiny"}), None, None,
                               SimpleNamespace(requested=None))
        seen["path"], seen["weights"] = resolved.path, (Path(resolved.path) / WEIGHTS).is_file()

    waiter = threading.Thread(target=other_process)
    waiter.start()
    download(plan)
    waiter.join(60)
    assert seen == {"path": str(plan.snapshot_dir), "weights": True}

    stopped = SimpleNamespace(requested="SIGTERM")
    (plan.snapshot_dir / WEIGHTS).unlink()
    assert _downloaded(build_config({"model_name_or_path": "org/tiny"}), None, None, stopped) is None


def test_download_command_takes_a_revision_and_refuses_one_the_repo_lacks(hub):
    commit = hub.repos["org/tiny"].commit
    fetched = tuner("download", "org/tiny", "--revision", commit)
    assert fetched.returncode == 0 and fetched.stdout.strip().endswith(f"snapshots/{commit}"), fetched.stderr
    assert f"org/tiny ({commit}, commit {commit[:12]})" in fetched.stderr
    refused = tuner("download", "org/tiny", "--revision", "v9")
    assert refused.returncode == 2
    assert refused.stderr == ("tuner: error: org/tiny has no revision v9 (model_revision takes a branch, a tag or a "
                              "commit of the repo)\n")
