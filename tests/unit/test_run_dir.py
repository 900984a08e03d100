"""The run directory's owner (engine.runs): status read back typed or "unreadable", strict JSON events, the reader
against torn, hostile and huge input, the index, the newest whole checkpoint, the lock, process identity, text made
safe for a terminal, and the config a run reads back."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from engine.cli import main
from engine.config.schema import build_config
from engine.errors import UserError
from engine.rundir.checkpoints import discard_incomplete, last_complete
from engine.rundir.events import Event, EventReader, EventWriter, read_events
from engine.rundir.files import open_append, printable
from engine.rundir.index import entries, index_path, register
from engine.process_usage import ProcessReading, UsageReading, cpu_percent
from engine.rundir.jobs import clock, effective_state, elapsed_s, find_job, list_jobs, stop_job
from engine.runs.launch import saved_config
from engine.rundir.lock import RunLock
from engine.rundir.process import is_run_process, signal_run
from engine.rundir.series import History, remaining_s
from engine.rundir.process import pid_start_time
from engine.rundir.status import RunStatus, read_status, write_status
from engine.runs.stop import StopRequest
from engine.rundir.watch import RunWatcher

OSC_TITLE = "\x1b]2;pwned\x1b\\"


@pytest.fixture
def state_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path


def a_run(path, **fields) -> RunStatus:
    path.mkdir(parents=True, exist_ok=True)
    status = RunStatus(id=fields.pop("id", path.name), name=fields.pop("name", path.name), output_dir=str(path),
                       **fields)
    write_status(path, status)
    register(path, status.id)
    return status


@pytest.mark.parametrize("text", ["[1, 2]", '{"id": "x", "name": "x", "state": "running", "step": "5"}',
                                  "not json", '{"id": "x", "name": "x", "state": "exploded"}', "\xff\xfe",
                                  '{"id": "x", "name": "x", "state": "running", "loss": NaN}', "[" * 100000,
                                  '{"id": "x", "name": "x", "state": "running", "loss": 1' + "0" * 400 + "}",
                                  '{"id": "x", "name": "x", "state": "running", "started_at": ""}',
                                  '{"id": "x", "name": "x", "state": "running", "started_at": "2024-01-01T00:00:00"}',
                                  '{"id": "x\u001b]2;t\u0007", "name": "x", "state": "running",'
                                  ' "started_at": "2024-01-01T00:00:00+00:00"}'],
                         ids=["list", "string-step", "not-json", "unknown-state", "not-utf8", "nan", "deep", "huge-int",
                              "no-start", "no-zone", "escape-in-id"])
def test_a_malformed_status_is_unreadable_for_that_run_alone(state_home, text, capsys):
    good = a_run(state_home / "good", state="completed", step=3, total_steps=3)
    bad = state_home / "bad"
    a_run(bad)
    (bad / "status.json").write_bytes(text.encode("utf-8", errors="surrogateescape") if text != "\xff\xfe"
                                      else b"\xff\xfe")
    assert read_status(bad).state == "unreadable"
    states = {job.id: job.state for job in list_jobs()}
    assert states == {good.id: "completed", "bad": "unreadable"}
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and "bad/status.json" in out
    assert main(["resume", str(bad)]) == 2
    assert "cannot be resumed" in capsys.readouterr().err


def test_malformed_index_lines_are_skipped(state_home, capsys):
    a_run(state_home / "one", state="completed")
    with open(index_path(), "ab") as file:
        file.write(b"[]\n\xff\xfe garbage\n{\"id\": 3, \"dir\": []}\n" + b"{" * 50000 + b"\n")
    a_run(state_home / "two", state="completed")
    assert [run_id for run_id, _ in entries()] == ["one", "two"]
    assert main(["runs", "--json"]) == 0
    assert [job["id"] for job in json.loads(capsys.readouterr().out)] in (["one", "two"], ["two", "one"])


def test_events_are_strict_json_and_never_hold_nan(tmp_path):
    writer = EventWriter(tmp_path)
    writer.emit(Event.LOG, step=1, loss=math.nan, grad_norm=math.inf, nested={"x": -math.inf})
    writer.close()
    line = (tmp_path / "events.jsonl").read_text()
    event = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in events.jsonl"))
    assert event["loss"] is None and event["grad_norm"] is None and event["nested"] == {"x": None}
    assert event["type"] == "log"


def test_the_reader_survives_torn_hostile_and_huge_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    reader = EventReader(path, max_line_bytes=1000)
    with open(path, "wb") as file:
        file.write(b'{"type": "start"}\n' + b"x" * 5000)  # a huge line still being written
    assert reader.read()[0] == [{"type": "start"}]
    with open(path, "ab") as file:
        file.write(b"y" * 5000 + b'\n{"type": "log", "loss": NaN}\n[1]\n"text"\n{"no": "type"}\n\xff\n'
                   b'{"type": "log", "step": 2, "loss": 1.5}\n{"type": "end"')
    assert reader.read()[0] == [{"type": "log", "step": 2, "loss": 1.5}]
    with open(path, "ab") as file:
        file.write(b"}\n")
    assert reader.read()[0] == [{"type": "end"}]
    assert [e["type"] for e in read_events(tmp_path)] == ["start", "log", "end"]


def test_hostile_numbers_are_folded_out_of_the_series_and_clocks(tmp_path):
    huge = {"type": "log", "step": 3, "total_steps": 1e308, "loss": 2.0, "epoch": 1e308, "learning_rate": 1e308,
            "tokens_per_s": 1e308, "elapsed_s": 1e308, "remaining_s": 1e308, "time": 1e308}
    history = History()
    for event in ({"type": "start", "time": -1e308}, huge, {"type": "log", "step": 4, "loss": 1e308},
                  {"type": "log", "step": "5", "loss": 1.0}, {"type": "log", "step": 2**80, "loss": 1.0},
                  {"type": "eval", "step": 4, "eval_loss": -1e308}, {"type": "checkpoint", "step": True},
                  {"type": "end", "runtime_s": 1e308}):
        history.add(event)
    progress = history.progress(status_step=3, status_total=None, alive=True, now=100.0, elapsed_s=1e308)
    loss, rates = history.series()
    assert loss.steps == (3,) and loss.losses == (2.0,) and rates == (0.0,)
    assert loss.eval_steps == () and history.checkpoints == {}
    assert progress.elapsed_s is None and progress.remaining_s is None and progress.total_steps is None
    assert progress.learning_rate is None and progress.epoch is None and progress.tokens_per_s is None


def test_elapsed_is_the_runs_wall_clock_from_its_start_to_its_end_or_now_or_when_last_heard_of():
    start = 1735689600.0  # 2025-01-01 00:00:00 UTC
    ended = RunStatus(id="r", name="r", state="completed", started_at="2025-01-01T00:00:00+00:00",
                      ended_at="2025-01-01T00:03:36+00:00")
    assert elapsed_s(ended, "completed", last_seen=start + 999, now=start + 9999) == 216.0
    running = RunStatus(id="r", name="r", state="running", started_at="2025-01-01T00:00:00+00:00")
    assert elapsed_s(running, "running", last_seen=start + 10, now=start + 229.5) == 229.5
    assert elapsed_s(running, "failed", last_seen=start + 10, now=start + 229.5) == 10.0  # died without an end
    assert elapsed_s(running, "failed", last_seen=None, now=start + 229.5) is None
    assert [clock(s) for s in (216.0, 229.9, 90061.0, None)] == ["0:03:36", "0:03:49", "25:01:01", ""]


def test_the_eta_takes_the_pace_of_recent_logs_and_never_the_warm_up_before_the_first():
    assert remaining_s([(5, 100.0)], 20) is None  # the first log's time holds the warm-up: no pace yet
    assert remaining_s([(5, 100.0), (10, 110.0), (15, 118.0)], 20) == 9.0  # 18 s over 10 steps, 5 steps left
    slow_start = [(0, 0.0), (1, 10.0), (2, 20.0)] + [(step, 18.0 + step) for step in range(3, 13)]
    assert remaining_s(slow_start, 20) == 8.0  # the last 10 intervals, 1 s a step
    assert remaining_s([(10, 100.0), (20, 110.0)], 20) == 0.0
    assert remaining_s([(10, 100.0), (10, 110.0)], 20) is None


def test_a_run_process_trees_cpu_share_counts_what_each_process_gained():
    def reading(time, *processes):
        return UsageReading(time, tuple(ProcessReading(*p) for p in processes), 4 << 30, 16 << 30, 2)

    before = reading(100.0, (1, 50.0, 10.0, 1 << 30), (2, 60.0, 5.0, 0), (3, 70.0, 1.0, 0))
    after = reading(102.0, (1, 50.0, 12.0, 1 << 30), (2, 60.0, 6.0, 0), (4, 101.0, 0.5, 0), (5, 90.0, 30.0, 0))
    # 1 and 2 gained 2 s and 1 s; 4 started in between (0.5 s); 3 ended; 5 joined the tree but is older: left out
    assert cpu_percent(before, after) == 175.0
    assert after.rss_bytes == 1 << 30
    assert cpu_percent(after, after) is None


def test_a_hangup_ignored_by_nohup_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        stop = StopRequest().install()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop.uninstall()
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_printable_removes_escape_sequences_and_control_characters():
    assert printable(f"run{OSC_TITLE}\x1b[2J\x07\x9b1m name") == "run name"
    assert printable("two\nlines\tand a tab") == "two\nlines\tand a tab"
    assert printable("run-\u202eexe.txt \u2067isolated\u2069\u200f") == "run-exe.txt isolated"  # bidi: not reordered


def test_runs_and_logs_never_pass_terminal_escapes_through(state_home, capsys):
    run = state_home / "escapes"
    a_run(run, id="esc-run", name=f"evil{OSC_TITLE}[/]\u202etxt.exe", state="failed", model=f"m{OSC_TITLE}[bold]")
    (run / "train.log").write_text(f"role {OSC_TITLE}assistant\x1b[31m is not\u202e allowed\n")
    assert main(["runs"]) == 0
    assert main(["runs", "--json"]) == 0
    assert main(["logs", "esc-run"]) == 0
    shown = capsys.readouterr().out
    runs_table, logs = shown.split("[", 1)[0], shown.rsplit("}", 1)[-1]
    assert "\x1b" not in runs_table and "\x1b" not in logs and "\x07" not in logs
    assert "\u202e" not in runs_table and "\u202e" not in logs
    assert "role assistant is not allowed" in logs
    snapshot = RunWatcher(run).sample()
    assert "\x1b" not in snapshot.name and not any("\x1b" in line for line in snapshot.log_tail)
    assert "\u202e" not in snapshot.name and not any("\u202e" in line for line in snapshot.log_tail)


def test_stop_never_signals_a_process_that_is_not_the_runs(state_home, sleeper, capsys):
    here = socket.gethostname()
    a_run(state_home / "reused", id="reused", state="running", pid=sleeper.pid, host=here,
          pid_started_at=pid_start_time(sleeper.pid) - 100)
    a_run(state_home / "everyone", id="everyone", state="running", pid=-1, host=here)
    a_run(state_home / "legacy", id="legacy", state="running", pid=sleeper.pid, host=here)
    for run_id in ("reused", "everyone", "legacy"):
        assert main(["stop", run_id]) == 2
        assert capsys.readouterr().err == f"tuner: error: run {run_id} is failed, not running\n"
        assert effective_state(find_job(run_id).status) == "failed"
        with pytest.raises(UserError, match="is not running: nothing was signalled"):
            signal_run(find_job(run_id).status)
    assert sleeper.poll() is None, "the unrelated process was left alone"


def test_a_run_whose_process_matches_pid_and_start_time_is_alive(state_home):
    """Stopped, a run finishes its step first: its process outlives the signal a while, as this one does."""
    (state_home / "alive").mkdir()
    run = subprocess.Popen([sys.executable, "-c", "import signal, time\nfrom engine.rundir.lock import RunLock\n"
                            f"lock = RunLock.acquire({str(state_home / 'alive')!r})\n"
                            "signal.signal(signal.SIGTERM, lambda *_: print('SIGTERM', flush=True))\n"
                            "print('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert run.stdout.readline() == "ready\n"
    status = a_run(state_home / "alive", state="running", pid=run.pid, host=socket.gethostname(),
                   pid_started_at=pid_start_time(run.pid))
    assert is_run_process(status) and effective_state(status) == "running"
    assert stop_job(find_job("alive")) == "stopping"
    assert run.stdout.readline() == "SIGTERM\n"
    run.kill()
    run.wait()


def test_stop_never_signals_a_live_process_a_crafted_status_names_with_its_true_start_time(state_home, sleeper):
    """pid and start time can be read off any process: the run's own also holds the directory's lock."""
    status = a_run(state_home / "crafted", state="running", pid=sleeper.pid, host=socket.gethostname(),
                   pid_started_at=pid_start_time(sleeper.pid))
    RunLock.acquire(state_home / "crafted").release()  # the lock file is there, and nobody holds it
    assert is_run_process(status)
    with pytest.raises(UserError, match=f"process {sleeper.pid}, which run crafted's status.json names, does not "
                                        "hold the run's lock .*: it is not the run's, and nothing was signalled"):
        stop_job(find_job("crafted"))
    assert sleeper.poll() is None, "the unrelated process was left alone"


def test_a_run_that_ended_unreaped_under_the_process_that_started_it_is_not_alive(state_home):
    """A run started from the wizard is the TUI's child: killed, it stays a zombie until the TUI reaps it."""
    child = subprocess.Popen(["sleep", "60"])
    status = a_run(state_home / "zombie", state="running", pid=child.pid, host=socket.gethostname(),
                   pid_started_at=pid_start_time(child.pid))
    os.kill(child.pid, signal.SIGKILL)
    while not open(f"/proc/{child.pid}/stat").read().rsplit(") ", 1)[1].startswith("Z"):  # killed: a zombie soon
        pass
    assert not is_run_process(status) and effective_state(status) == "failed"
    child.wait()


def test_a_lock_outliving_its_ended_run_a_moment_is_waited_for_and_a_live_runs_is_refused_at_once(state_home):
    """The kernel lets a killed process's lock go a moment after it has ended (and forked workers later still)."""
    run_dir = state_home / "ended"
    ended = subprocess.Popen(["true"])
    ended.wait()
    a_run(run_dir, state="running", pid=ended.pid, host=socket.gethostname(), pid_started_at=time.time() - 60)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom engine.rundir.lock import RunLock\n"
                               f"lock = RunLock.acquire({str(run_dir)!r})\nprint('held', flush=True)\n"
                               "sys.stdin.readline()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        started = time.monotonic()
        threading.Timer(0.5, holder.stdin.close).start()  # the holder ends, and its lock goes, half a second on
        with RunLock.acquire(run_dir):
            assert time.monotonic() - started >= 0.5, "acquired once the holder had let go"

        holder = subprocess.Popen(holder.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "held\n"
        a_run(run_dir, id="live", state="running", pid=holder.pid, host=socket.gethostname(),
              pid_started_at=pid_start_time(holder.pid))
        started = time.monotonic()
        with pytest.raises(UserError, match=r"still alive \(run live, pid "):
            RunLock.acquire(run_dir)
        assert time.monotonic() - started < 1, "a live run's lock is refused at once"
    finally:
        holder.kill()
        holder.wait()


def test_the_newest_whole_checkpoint_is_the_one_resumed(tmp_path):
    for step in (5, 10, 15):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "adapter_model.safetensors").write_bytes(b"\x02" + bytes(7) + b"{}")  # safetensors, no tensor
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-15" / "trainer_state.json").write_text('{"global_step": 1')  # cut short
    (tmp_path / "checkpoint-20").mkdir()  # the save had not written its weights yet
    assert last_complete(tmp_path).name == "checkpoint-10"
    whole = tmp_path / "checkpoint-10"
    for damage, undo in (("adapter_model.safetensors", b"\x02" + bytes(7) + b"{"),  # a header cut short
                         ("adapter_model.safetensors", b"\x40" + bytes(7) + b'{"w": {"data_offsets": [0, 64]}}'),
                         ("optimizer.pt", b"PK\x03\x04 a zip archive cut short"),
                         ("trainer_state.json", b'{"global_step": 10, "log_history": "oops"}')):
        kept = (whole / damage).read_bytes() if (whole / damage).exists() else None
        (whole / damage).write_bytes(undo)
        assert last_complete(tmp_path).name == "checkpoint-5", damage
        (whole / damage).unlink() if kept is None else (whole / damage).write_bytes(kept)
    assert last_complete(tmp_path).name == "checkpoint-10"
    assert sorted(p.name for p in discard_incomplete(tmp_path)) == ["checkpoint-15", "checkpoint-20"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-5"]


def test_a_directory_is_locked_for_the_life_of_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom engine.rundir.lock import RunLock\n"
                               f"lock = RunLock.acquire({str(tmp_path)!r})\nprint('held', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match="is in use by a run that is still alive"):
            RunLock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    RunLock.acquire(tmp_path).release()  # the kernel dropped the lock with its holder


def test_no_write_goes_through_a_planted_symlink(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    (tmp_path / "train.log").symlink_to(target)
    with pytest.raises(UserError, match="is a symbolic link"):
        open_append(tmp_path / "train.log")
    (tmp_path / f".status.json.{os.getpid()}.tmp").symlink_to(target)
    write_status(tmp_path, RunStatus(id="r", name="r"))
    assert target.read_text() == "precious\n"
    assert read_status(tmp_path).id == "r"


def test_the_saved_config_has_absolute_paths_and_no_one_shot_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.json").write_text("[]")
    (tmp_path / "model").mkdir()
    cfg = build_config({"model_name_or_path": "model", "dataset": "demo_alpaca,data.json",
                        "overwrite_output_dir": True, "resume_from_checkpoint": "true", "overwrite_cache": True,
                        "hf_hub_token": "hf_secret"})
    saved = saved_config(cfg, tmp_path / "run")
    assert saved.model.model_name_or_path == str(tmp_path / "model")
    assert saved.data.dataset == f"demo_alpaca,{tmp_path / 'data.json'}"
    assert not saved.train.overwrite_output_dir and saved.train.resume_from_checkpoint is None
    assert not saved.data.overwrite_cache and saved.train.output_dir == str(tmp_path / "run")
    assert "hf_secret" not in saved.to_yaml()


@pytest.mark.parametrize("args", [["logs", "done", "--bogus", "extra"], ["logs", "--bogus"], ["stop", "done", "x"],
                                  ["resume", "done", "extra"], ["resume", "done", "--max_steps", "5"]])
def test_logs_stop_and_resume_refuse_what_they_do_not_use_in_one_line(state_home, capsys, args):
    a_run(state_home / "done", state="stopped", step=3, total_steps=60)
    assert main(args) == 2
    err = capsys.readouterr().err
    refused = next(a for a in args[2:] if a != "done") if args[1] == "done" else args[1]
    assert err.count("\n") == 1 and f"`tuner {args[0]}` takes no argument '{refused}'" in err
    if refused.startswith("--") and args[0] == "resume":
        assert "a run resumes with the config it started with" in err
    assert read_status(state_home / "done").state == "stopped", "nothing was started or stopped"
