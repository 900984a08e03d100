"""What a run survives, on the real tiny-model pipeline: a second run into its directory, its own resume from
elsewhere, divergence, a full disk, the terminal closing, a stop in its first moments, a crafted run directory, and
where its secrets (never) go. (A half-written checkpoint: test_jobs.py, after a kill -9.)"""

from __future__ import annotations

import gc
import json
import math
import os
import pty
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from job_helpers import RUN, logged, runs_json, start_detached, tuner, wait_for

from engine.rundir import read_events, read_status
from engine.rundir.checkpoints import checkpoints


def strict_events(run_dir: Path) -> list[dict]:
    """events.jsonl parsed by a strict JSON parser: NaN or Infinity fail the test."""
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in events.jsonl")) for line in lines]


def test_a_live_run_owns_its_directory_and_its_token_is_never_on_disk_nor_on_a_command_line(home):
    secret = "hf_NeverOnDiskOrInArgv123"
    run_dir, run_id = start_detached(home, "owned", "--max_steps", "3000", "--save_steps", "5000",
                                     "--hf_hub_token", secret)
    pid = read_status(run_dir).pid
    assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert f"HF_TOKEN={secret}" in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    wait_for(lambda: logged(run_dir), 60, "training to start")
    for extra in ((), ("--detach",), ("--overwrite_output_dir",)):
        second = tuner("train", *RUN, "--output_dir", str(run_dir), "--max_steps", "2", *extra, cwd=home)
        assert second.returncode == 2
        assert second.stderr == (f"tuner: error: {run_dir} is in use by a run that is still alive (run {run_id}, pid "
                                 f"{pid}) (choose another output_dir, or `tuner stop` that run first)\n")
    status = read_status(run_dir)
    assert (status.id, status.state, status.pid) == (run_id, "running", pid)
    assert [e["type"] for e in read_events(run_dir)].count("start") == 1
    assert tuner("stop", run_id, cwd=home).returncode == 0
    for path in [*run_dir.rglob("*"), *(home / "state").rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the token is in {path}"


def test_a_stopped_run_resumes_from_elsewhere_keeping_its_checkpoints_and_never_imports_a_module_planted_in_it(home):
    work = home / "project"
    work.mkdir()
    records = json.loads((Path(__file__).parents[2] / "presets" / "data" / "demo_alpaca.json").read_text())[:64]
    (work / "mine.json").write_text(json.dumps(records))
    (work / "again").mkdir()
    (work / "again" / "old.txt").write_text("a previous attempt")
    started = tuner("train", "--model_name_or_path", "tiny-llama", "--dataset", "mine.json", "--output_dir", "again",
                    "--overwrite_output_dir", "--max_steps", "60", "--save_steps", "10", "--logging_steps", "5",
                    "--detach", cwd=work)
    assert started.returncode == 0, started.stderr
    run_dir, run_id = work / "again", started.stdout.split()[2]
    wait_for(lambda: (run_dir / "checkpoint-20").is_dir() and logged(run_dir, 25), 120, "two checkpoints")
    stopped = tuner("stop", cwd=home)  # no RUN: the latest
    assert stopped.returncode == 0 and stopped.stdout.startswith(f"run {run_id}: stopped"), stopped.stderr
    end = [e for e in read_events(run_dir) if e["type"] == "end"][-1]
    assert end["state"] == "stopped" and (run_dir / f"checkpoint-{end['step']}").is_dir(), "the stop saved its step"
    assert tuner("stop", run_id, cwd=home).stderr.strip() == f"tuner: error: run {run_id} is stopped, not running"
    saved = (run_dir / "config.yaml").read_text()
    assert "overwrite_output_dir: false" in saved and f"dataset: {work / 'mine.json'}" in saved
    kept = [p.name for p in checkpoints(run_dir)]

    marker = home / "planted-code-ran"
    (run_dir / "engine").mkdir()
    (run_dir / "engine" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    assert tuner("resume", run_id, cwd=elsewhere).returncode == 0
    wait_for(lambda: runs_json(home)[0]["state"] == "completed", 120, "the resumed run to complete")
    assert set(kept) <= {p.name for p in checkpoints(run_dir)}, "its own resume deleted nothing"
    starts = [e for e in read_events(run_dir) if e["type"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] == str(run_dir / kept[-1])
    assert not marker.exists(), "the run directory's own module ran"


@pytest.mark.parametrize("saving", [("--save_steps", "1"), ("--save_strategy", "epoch")], ids=["steps", "epoch"])
def test_divergence_fails_the_run_at_its_step_and_keeps_the_last_good_checkpoint(home, saving):
    result = tuner("train", *RUN, "--finetuning_type", "full", "--learning_rate", "1e4", "--max_steps", "30",
                   *saving, "--logging_steps", "1", "--output_dir", "diverged", cwd=home)
    run_dir = home / "diverged"
    assert result.returncode == 2
    assert "learning_rate 10000 is far above what full runs are usually given (1e-06 to 0.0001)" in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("tuner: error: training diverged at step 2: the gradient norm is nan; ")
    kept = ["checkpoint-1"] if saving[0] == "--save_steps" else []
    assert (f"{run_dir / 'checkpoint-1'} is the last good checkpoint" if kept else
            "no checkpoint was saved before it") in message
    status = read_status(run_dir)
    assert status.state == "failed" and status.exit_code == 2 and "diverged at step 2" in status.error
    assert [p.name for p in checkpoints(run_dir)] == kept, "nothing that diverged was saved"
    assert not (run_dir / "model.safetensors").exists(), "no diverged weights saved as the result"
    events = strict_events(run_dir)
    assert events[-1] == {"time": events[-1]["time"], "type": "end", "state": "failed", "step": 2}
    for line in (run_dir / "trainer_log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in trainer_log.jsonl"))


def test_a_collapsed_run_fails_with_its_step_and_a_hint_instead_of_completing(home, tiny_models):
    """Weights a far too high learning rate wrecked learn nothing more: here a base whose final norm is all zeros
    (what such a run left), so every logit is 0, the loss pinned at ln(vocabulary) and every gradient exactly 0."""
    from safetensors.torch import load_file, save_file

    wrecked = home / "wrecked"
    shutil.copytree(tiny_models["tiny-llama"], wrecked)
    weights = load_file(wrecked / "model.safetensors")
    weights["model.norm.weight"].zero_()
    save_file(weights, wrecked / "model.safetensors", metadata={"format": "pt"})
    result = tuner("train", *RUN, "--model_name_or_path", str(wrecked), "--max_steps", "30", "--logging_steps", "1",
                   "--output_dir", "collapsed", cwd=home)
    assert result.returncode == 2
    vocabulary = json.loads((wrecked / "config.json").read_text())["vocab_size"]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"tuner: error: training collapsed at step 3: the gradient norm has been exactly 0 and "
                              f"the loss stuck at {math.log(vocabulary):.4f} for the last 3 logged steps"), message
    assert "Lower learning_rate (LoRA usually 1e-5 to 1e-3" in message
    status = read_status(home / "collapsed")
    assert status.state == "failed" and "collapsed at step 3" in status.error


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB filesystem of its own (tmpfs), mostly filled: a checkpoint of the tiny model no longer fits."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)], check=True)
    with open(mount / "filler", "wb") as file:
        file.write(b"\0" * (24 << 20))
    yield mount
    gc.collect()  # the save that failed left its open file to a traceback's frames: freed with them, by the collector
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_under_the_tokenized_cache_is_named_and_nothing_of_the_data_is_left_on_it(home, small_disk,
                                                                                              tiny_models):
    """The case as found: the message named the run directory's disk (73 GB free), and a partial .building-*
    directory kept the cache's disk full."""
    with open(small_disk / "filler", "ab") as file:  # a few kilobytes left: the tokenized demo data does not fit
        file.write(b"\0" * ((30 << 20) - (24 << 20) - (16 << 10)))
    tokenized = small_disk / "tuner-tui" / "tokenized"
    result = tuner("train", *RUN, "--model_name_or_path", str(tiny_models["tiny-llama"]), "--max_steps", "2",
                   "--output_dir", "elsewhere", cwd=home, env={"XDG_CACHE_HOME": str(small_disk)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"tuner: error: disk full: no space left on the device that holds {tokenized} (")
    assert "for the tokenized data; what was written of it was removed" in result.stderr
    assert [p.name for p in tokenized.iterdir() if p.is_dir()] == [], "no partial .building-* left"
    assert read_status(home / "elsewhere").state == "failed"


def test_a_full_disk_ends_the_run_in_one_line_naming_the_cause_and_the_path(home, small_disk):
    run_dir = small_disk / "run"
    result = tuner("train", *RUN, "--finetuning_type", "full", "--max_steps", "30", "--save_steps", "3",
                   "--output_dir", str(run_dir), cwd=home)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tuner: error: disk full: no space left on the device that holds {run_dir} (")
    assert "the unfinished checkpoint-3 was removed" in last
    status = read_status(run_dir)
    assert status.state == "failed" and status.error.startswith("disk full")
    assert checkpoints(run_dir) == [] and not list(run_dir.glob(".*.tmp"))
    assert runs_json(home)[0]["state"] == "failed"


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT], ids=["terminal-closed", "ctrl-c"])
def test_a_foreground_run_signalled_stops_with_a_checkpoint_and_says_so_in_its_exit_code(home, sig):
    """In a real terminal (a pty): closing it hangs up the run, whose writes to it would fail from then on."""
    run_dir = home / "foreground"
    terminal, run_side = pty.openpty()
    drained = threading.Thread(target=_drain, args=(terminal,), daemon=True)
    drained.start()
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "train", *RUN, "--max_steps", "3000",
                                "--save_steps", "5000", "--output_dir", str(run_dir)], cwd=home,
                               stdin=subprocess.DEVNULL, stdout=run_side, stderr=run_side, start_new_session=True)
    os.close(run_side)
    wait_for(lambda: logged(run_dir), 60, "training to start")
    if sig == signal.SIGHUP:
        os.close(terminal)
    process.send_signal(sig)
    process.wait(timeout=60)
    if sig != signal.SIGHUP:
        os.close(terminal)
    assert process.returncode == 128 + sig
    status = read_status(run_dir)
    assert status.state == "stopped" and status.exit_code == 128 + sig
    end = strict_events(run_dir)[-1]
    assert end["type"] == "end" and end["state"] == "stopped" and end["signal"] == signal.Signals(sig).name
    assert (run_dir / f"checkpoint-{end['step']}" / "trainer_state.json").is_file()


def _drain(fd: int) -> None:
    """Read what the run shows in its terminal, as a terminal would, until the terminal closes."""
    while True:
        try:
            if not os.read(fd, 65536):
                return
        except OSError:
            return


def test_a_stop_in_the_first_moments_of_a_detached_run_is_a_stop(home):
    run_dir, run_id = start_detached(home, "early", "--max_steps", "3000")
    result = tuner("stop", run_id, cwd=home)
    assert result.returncode == 0 and result.stdout.startswith(f"run {run_id}: stopped at step 0")
    status = read_status(run_dir)
    assert status.state == "stopped" and status.exit_code == 128 + signal.SIGTERM and status.error is None
    assert strict_events(run_dir)[-1]["state"] == "stopped"


def test_follow_ups_and_resume_never_inherit_trust_remote_code_from_a_run_directory(home, tiny_models):
    run_dir = home / "crafted"
    shutil.copytree(tiny_models["tiny-llama"], run_dir)
    marker = home / "code-ran"
    (run_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                     "from transformers import LlamaConfig as EvilConfig\n")
    config = json.loads((run_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "config.yaml").write_text(f"model_name_or_path: {run_dir}\nfinetuning_type: full\n"
                                         "trust_remote_code: true\ntemplate: llama2\ndataset: demo_alpaca\n")
    (run_dir / "status.json").write_text(json.dumps({"id": "crafted-run", "name": "crafted", "state": "completed",
                                                       "started_at": "2026-01-01T00:00:00+00:00"}))
    result = tuner("predict", "--run", str(run_dir), "--max_samples", "1", "--max_new_tokens", "2",
                   "--output_dir", str(home / "predicted"), cwd=home)
    assert result.returncode == 0, result.stderr
    assert ("tuner: warning: run crafted-run was trained with trust_remote_code; it is not carried over from a "
            "run's files") in result.stderr
    assert not marker.exists(), "the run directory's own Python file ran"

    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "state": "stopped"}))
    resumed = tuner("resume", str(run_dir), cwd=home)  # nor does a resume, which would train with it in the dark
    assert resumed.returncode == 2 and resumed.stderr.strip() == (
        "tuner: error: run crafted-run's config.yaml turns on trust_remote_code: the Python code that ships with its "
        "model would run, and tuner never takes that from a run directory's files (`tuner resume crafted-run "
        "--trust_remote_code true` if you trust that code)")
    refused = tuner("resume", str(run_dir), "--trust_remote_code", "false", cwd=home)
    assert refused.returncode == 2 and "a run resumes with its own config, and run crafted-run's turns it on" in \
        refused.stderr
    assert not marker.exists(), "the run directory's own Python file ran"


def test_a_symlink_planted_in_a_run_directory_is_not_written_through(home):
    """A log appended to, the model card (README.md) and a checkpoint-N directory the Trainer writes: a link planted
    in their place is refused before anything is written, on a resume and on overwrite_output_dir alike."""
    run_dir = home / "linked"
    run_dir.mkdir()
    precious = home / "precious.txt"
    precious.write_text("keep me\n")
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    (run_dir / "status.json").write_text(json.dumps({"id": "linked-run", "name": "linked", "state": "stopped",
                                                      "started_at": "2026-01-01T00:00:00+00:00"}))
    (run_dir / "latest").symlink_to("status.json")  # a link of the user's within the directory: never the refusal
    for planted, target, overwrite in (("train.log", precious, ()), ("README.md", precious, ()),
                                       ("checkpoint-2", elsewhere, ("--overwrite_output_dir", "true"))):
        (run_dir / planted).symlink_to(target)
        result = tuner("train", *RUN, "--max_steps", "2", "--output_dir", str(run_dir), *overwrite, cwd=home)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == (
            f"tuner: error: {run_dir / planted} is a symbolic link: tuner does not write through links in a run "
            "directory (remove the link)")
        (run_dir / planted).unlink()
    assert precious.read_text() == "keep me\n" and not any(elsewhere.iterdir())
    assert read_status(run_dir).state == "stopped"  # refused before the run claimed the directory: nothing changed


def test_runs_in_one_process_close_their_log_files(home):
    from engine.cli import main

    for name in ("first", "second"):
        assert main(["train", *RUN, "--max_steps", "2", "--save_strategy", "no", "--output_dir",
                     str(home / name)]) == 0
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    for name in ("first", "second"):
        for file in ("train.log", "events.jsonl", "trainer_log.jsonl", ".tuner.lock"):
            assert str(home / name / file) not in open_files, f"{name}/{file} is still open"
    import logging

    from engine.train.logs import LOGGERS, RunLogHandler

    assert not [h for name in LOGGERS for h in logging.getLogger(name).handlers if isinstance(h, RunLogHandler)]


def test_a_run_directory_that_cannot_be_made_is_one_line(home):
    (home / "a-file").write_text("not a directory")
    result = tuner("train", *RUN, "--max_steps", "2", "--output_dir", str(home / "a-file" / "run"), cwd=home)
    assert result.returncode == 2
    assert result.stderr == (f"tuner: error: cannot write the run directory {home / 'a-file' / 'run'}: "
                             "Not a directory\n")


def test_a_foreground_run_shows_what_it_quotes_without_obeying_it(home):
    """A dataset's role and an output_dir that hold a terminal's title sequence and a bidi override: the lines the
    terminal gets (the error, the log lines the run echoes) show them, never pass them on."""
    (home / "chat.json").write_text(json.dumps([{"conversations": [
        {"from": "\x1b]2;pwned\x07human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]))
    out = home / "out\u202etxt.exe\x1b]2;pwned\x07"
    result = tuner("train", "--model_name_or_path", "tiny-llama", "--dataset", "chat.json", "--max_steps", "2",
                   "--output_dir", str(out), cwd=home)
    assert result.returncode == 2 and "role 'human'" in result.stderr
    for seen in (result.stdout, result.stderr):
        assert "\x1b" not in seen and "\x07" not in seen and "\u202e" not in seen, seen
    assert "role '\x1b]2;pwned\x07human'" in (out / "train.log").read_text()  # the log keeps what was there


def test_a_stop_while_the_data_is_tokenized_ends_it_at_once_and_keeps_nothing_of_it(home, tiny_models):
    """The case as found: a stop during the tokenization of 60k samples waited for all of it (~40 s here), and a
    second stop failed the run with a TimeoutError and a traceback, leaving a .building-* directory in the cache.
    100k samples take a minute or more to tokenize on this machine; the stop must end the run well before."""
    records = [{"instruction": f"Reverse the word {i}", "input": "", "output": str(i)[::-1]} for i in range(100_000)]
    (home / "big.json").write_text(json.dumps(records))
    cache = home / "cache"
    started = tuner("train", "--model_name_or_path", str(tiny_models["tiny-llama"]), "--dataset", "big.json",
                    "--max_steps", "5", "--output_dir", "big", "--detach", cwd=home, env={"XDG_CACHE_HOME": str(cache)})
    assert started.returncode == 0, started.stderr
    run_id, run_dir, tokenized = started.stdout.split()[2], home / "big", cache / "tuner-tui" / "tokenized"
    wait_for(lambda: list(tokenized.glob("*.building-*")), 120, "the tokenization to start")
    stopped = tuner("stop", run_id, cwd=home)
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: read_status(run_dir).state == "stopped", 30, "the stop to end the data's preparation")
    status = read_status(run_dir)
    assert status.exit_code == 128 + signal.SIGTERM and status.step == 0
    assert [p.name for p in tokenized.iterdir() if p.is_dir()] == [], "nothing of the tokenized data was kept"
    log = (run_dir / "train.log").read_text()
    assert "stopped while the data was being prepared: nothing of it was kept" in log
    assert log.count("SIGTERM received") == 1, "the tokenizing workers end without a stop of their own"
