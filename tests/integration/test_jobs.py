"""Runs as jobs: detached in their own session, listed from anywhere, stopped, killed, resumed with steps continuing.

Each test follows one run through several of these moments: a detached run is a process of its own, and starting one
costs ten seconds of imports on this machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

from job_helpers import RUN, logged, runs_json, start_detached, tuner, wait_for

from engine.rundir import read_events, read_status
from engine.rundir.checkpoints import checkpoints


def test_a_detached_run_outlives_its_terminal_is_listed_from_anywhere_and_goes_missing_with_its_directory(home):
    work = home / "project"
    work.mkdir()
    launcher = subprocess.Popen(  # a terminal's shell: a session and process group of its own
        [sys.executable, "-m", "engine.cli", "train", *RUN, "--output_dir", "detached", "--max_steps", "20",
         "--save_strategy", "no", "--detach"], cwd=work, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    started, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 0 and started.startswith("started run ")
    run_dir, run_id = work / "detached", started.split()[2]
    wait_for(lambda: read_status(run_dir) and read_status(run_dir).pid, 30, "the run's pid")
    pid = read_status(run_dir).pid
    assert os.getsid(pid) == pid != launcher.pid, "the run leads a session of its own"
    try:  # the terminal closing: SIGHUP to everything in the launcher's process group
        os.killpg(launcher.pid, signal.SIGHUP)
    except ProcessLookupError:
        pass

    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    listed = runs_json(elsewhere)
    assert [job["id"] for job in listed] == [run_id] and listed[0]["dir"] == str(run_dir.resolve())
    wait_for(lambda: runs_json(elsewhere)[0]["state"] == "completed", 120, "the run to complete, hangup or not")
    assert (run_dir / "adapter_model.safetensors").is_file()
    logs = tuner("logs", run_id, cwd=elsewhere)
    assert "completed" in logs.stdout and "step 20/20" in logs.stdout

    shutil.rmtree(run_dir)
    assert runs_json(home)[0]["state"] == "missing"
    result = tuner("logs", "nope", cwd=home)
    assert result.returncode == 2 and result.stderr.strip() == \
        "tuner: error: no run 'nope' (`tuner runs` lists them)"


def test_kill_9_shows_failed_and_resume_skips_checkpoints_cut_short_or_damaged_continuing_the_step_count(home):
    run_dir, run_id = start_detached(home, "killed", "--max_steps", "60", "--save_steps", "5")
    wait_for(lambda: (run_dir / "checkpoint-20" / "trainer_state.json").is_file() and logged(run_dir, 25), 120,
             "four checkpoints and more steps")
    os.kill(read_status(run_dir).pid, signal.SIGKILL)
    wait_for(lambda: runs_json(home)[0]["state"] == "failed", 20, "the dead run to show as failed")
    last_lines = runs_json(home)[0]["log_tail"]
    assert len(last_lines) == 3 and "step" in last_lines[-1]  # what the run said last, from its train.log
    listed = tuner("runs", cwd=home, env={"COLUMNS": "120"}).stdout
    assert f"{run_id} failed; the end of {run_dir.resolve() / 'train.log'}:" in listed
    assert last_lines[-1] in listed

    newest, truncated, garbled, previous = checkpoints(run_dir)[-4:][::-1]
    (newest / "trainer_state.json").unlink(missing_ok=True)  # a save cut short: the Trainer writes this file last
    weights = truncated / "adapter_model.safetensors"  # a copy cut short: its header promises more than is there
    os.truncate(weights, weights.stat().st_size - 100)
    state = json.loads((garbled / "trainer_state.json").read_text())  # a hand edit: not the Trainer's log
    (garbled / "trainer_state.json").write_text(json.dumps({**state, "log_history": "oops"}))
    result = tuner("resume", run_id, cwd=home)  # at once: the killed run's lock is let go a moment after it ends
    assert result.returncode == 0 and result.stdout.startswith(f"resumed run {run_id}"), result.stderr
    wait_for(lambda: runs_json(home)[0]["state"] == "completed", 120, "the resumed run to complete")
    events = read_events(run_dir)
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] == str(previous)
    log = (run_dir / "train.log").read_text()
    assert all(f"{skipped} is not whole" in log for skipped in (newest, truncated, garbled))
    after = [e["step"] for e in events[events.index(starts[1]):] if e["type"] == "log"]
    assert after[0] > int(previous.name.rsplit("-", 1)[1]) >= 5 and after[-1] == 60
    assert read_status(run_dir).step == 60
