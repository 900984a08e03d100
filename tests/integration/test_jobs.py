"""Runs as jobs: detached in their own session, listed from anywhere, stopped, killed, resumed with steps continuing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


from engine.runs import read_events, read_status

from job_helpers import RUN, runs_json, start_detached, tuner, wait_for


def test_detached_run_is_listed_from_another_directory_and_completes(home):
    run_dir, run_id = start_detached(home, "detached", "--max_steps", "20", "--save_strategy", "no")
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    listed = runs_json(elsewhere)
    assert [job["id"] for job in listed] == [run_id] and listed[0]["dir"] == str(run_dir.resolve())
    wait_for(lambda: runs_json(elsewhere)[0]["state"] == "completed", 120, "the run to complete")
    assert (run_dir / "adapter_model.safetensors").is_file()
    logs = tuner("logs", run_id, cwd=elsewhere)
    assert "completed" in logs.stdout and "step 20/20" in logs.stdout


def test_run_lives_in_its_own_session_so_a_hangup_does_not_reach_it(home):
    work = home / "project"
    work.mkdir()
    launcher = subprocess.Popen(  # a terminal's shell: a session and process group of its own
        [sys.executable, "-m", "engine.cli", "train", *RUN, "--output_dir", "hup", "--max_steps", "400",
         "--save_steps", "1000", "--detach"], cwd=work, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    launcher.communicate(timeout=60)
    assert launcher.returncode == 0
    run_dir = work / "hup"
    wait_for(lambda: read_status(run_dir) and read_status(run_dir).pid, 30, "the run's pid")
    pid = read_status(run_dir).pid
    assert os.getsid(pid) == pid != launcher.pid, "the run leads a session of its own"
    try:  # the terminal closing: SIGHUP to everything in the launcher's process group
        os.killpg(launcher.pid, signal.SIGHUP)
    except ProcessLookupError:
        pass
    wait_for(lambda: any(e["type"] == "log" for e in read_events(run_dir)), 60, "training to go on")
    assert runs_json(home)[0]["state"] == "running"
    result = tuner("stop", cwd=home)
    assert result.returncode == 0 and "stopped" in result.stdout


def test_kill_9_shows_failed_then_resume_continues_the_step_count(home):
    run_dir, run_id = start_detached(home, "killed", "--max_steps", "120", "--save_steps", "20")
    wait_for(lambda: (run_dir / "checkpoint-20").is_dir() and any(
        e["type"] == "log" and e["step"] >= 25 for e in read_events(run_dir)), 120, "a checkpoint and more steps")
    os.kill(read_status(run_dir).pid, signal.SIGKILL)
    wait_for(lambda: runs_json(home)[0]["state"] == "failed", 20, "the dead run to show as failed")
    last_lines = runs_json(home)[0]["log_tail"]
    assert len(last_lines) == 3 and "step" in last_lines[-1]  # what the run said last, from its train.log
    listed = tuner("runs", cwd=home, env={**os.environ, "COLUMNS": "120"}).stdout
    assert f"{run_id} failed; the end of {run_dir.resolve() / 'train.log'}:" in listed
    assert last_lines[-1] in listed

    result = tuner("resume", run_id, cwd=home)
    assert result.returncode == 0 and result.stdout.startswith(f"resumed run {run_id}")
    wait_for(lambda: runs_json(home)[0]["state"] == "completed", 120, "the resumed run to complete")
    events = read_events(run_dir)
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"].startswith(str(run_dir.resolve() / "checkpoint-"))
    resumed_at = int(starts[1]["resumed_from"].rsplit("-", 1)[1])
    after = [e["step"] for e in events[events.index(starts[1]):] if e["type"] == "log"]
    assert after[0] > resumed_at >= 20 and after[-1] == 120


def test_graceful_stop_saves_a_checkpoint(home):
    run_dir, run_id = start_detached(home, "stopped", "--max_steps", "2000", "--save_steps", "5000")
    wait_for(lambda: any(e["type"] == "log" for e in read_events(run_dir)), 60, "training to start")
    result = tuner("stop", run_id, cwd=home)
    assert result.returncode == 0 and result.stdout.startswith(f"run {run_id}: stopped")
    end = [e for e in read_events(run_dir) if e["type"] == "end"][-1]
    assert end["state"] == "stopped" and (run_dir / f"checkpoint-{end['step']}").is_dir()
    assert tuner("stop", run_id, cwd=home).stderr.strip() == f"tuner: error: run {run_id} is stopped, not running"


def test_deleted_run_directory_is_listed_as_missing_and_unknown_runs_are_one_line(home):
    run_dir, run_id = start_detached(home, "gone", "--max_steps", "2", "--save_strategy", "no")
    wait_for(lambda: runs_json(home)[0]["state"] == "completed", 60, "the run to complete")
    import shutil

    shutil.rmtree(run_dir)
    assert runs_json(home)[0]["state"] == "missing"
    result = tuner("logs", "nope", cwd=home)
    assert result.returncode == 2 and result.stderr.strip() == \
        "tuner: error: no run 'nope' (`tuner runs` lists them)"
