"""What tuner reads of a run directory and of its index is untrusted: a FIFO, a device or a link to one planted in a
file's place (events.jsonl -> /dev/urandom, runs.jsonl a FIFO) is unreadable, never a read that blocks or never ends,
and a line longer than an entry can be is skipped, not printed. The commands that read every run (`tuner runs`, and
`logs`, `stop`, `resume` finding theirs) answer at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from engine.rundir.events import EventReader, read_events
from engine.errors import UserError
from engine.rundir.checkpoints import is_complete, last_complete
from engine.rundir.files import LogTail, lines_of, open_append, open_regular, read_json, read_text
from engine.rundir.foreign import llamafactory_events
from engine.rundir.index import entries, index_path, register
from engine.rundir.status import RunStatus, read_status, write_status

SECONDS = 20  # a read that has not answered by then would never have


def within(call):
    """``call()``'s result (or its exception), which must come while a hang would still be waiting."""
    outcome = []

    def run():
        try:
            outcome.append((call(), None))
        except BaseException as exc:
            outcome.append((None, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(SECONDS)
    assert not thread.is_alive(), f"still reading after {SECONDS} s"
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


@pytest.fixture
def state_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path


def a_run(path, state="completed") -> RunStatus:
    path.mkdir(parents=True, exist_ok=True)
    status = RunStatus(id=path.name, name=path.name, output_dir=str(path), state=state, step=10, total_steps=10)
    write_status(path, status)
    register(path, status.id)
    (path / "train.log").write_text(f"{path.name} trained\n")
    return status


def plant(path, kind: str) -> None:
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(kind)


def tuner(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`tuner ARGS` as a process of its own, so that a hang is a timeout this test reports, not a stuck worker."""
    limited = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
               "runpy.run_module('engine.cli', run_name='__main__')")  # reading a device for ever fails, not swaps
    try:
        return subprocess.run([sys.executable, "-c", limited, *args], capture_output=True, text=True,
                              timeout=SECONDS * 3, env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`tuner {' '.join(args)}` still running after {SECONDS * 3} s")


@pytest.fixture
def silent_writer():
    """Opens a FIFO for writing and never writes: a read of it would wait forever (and use no memory meanwhile)."""
    opened = []

    def hold(path):
        opened.append(os.open(path, os.O_RDWR))  # read-write: the open does not wait for a reader

    yield hold
    for fd in opened:
        os.close(fd)


@pytest.mark.parametrize("kind", ["fifo", "fifo with a silent writer", "/dev/null", "directory"])
def test_what_is_not_a_regular_file_is_unreadable_at_once(tmp_path, kind, silent_writer):
    """The endless devices (/dev/urandom, /dev/zero) are tried by the commands below, in processes of their own."""
    planted = tmp_path / "events.jsonl"
    if kind == "directory":
        planted.mkdir()
    elif kind == "fifo with a silent writer":
        plant(planted, "fifo")
        silent_writer(planted)
    else:
        plant(planted, kind)
    with pytest.raises(OSError, match="not a regular file"):
        within(lambda: open_regular(planted))
    assert within(lambda: EventReader(planted).read()) == ([], False)
    assert within(lambda: read_events(tmp_path)) == []
    assert within(lambda: LogTail(planted).read()) == ()
    assert within(lambda: read_text(planted)) is None
    with pytest.raises(OSError):
        within(lambda: read_json(planted))


def test_a_link_to_a_regular_file_is_read_through(tmp_path):
    real = tmp_path / "elsewhere.json"
    real.write_text('{"a": 1}')
    (tmp_path / "linked.json").symlink_to(real)
    assert read_json(tmp_path / "linked.json") == {"a": 1}


def test_a_status_or_trainer_log_planted_as_a_device_or_fifo_is_unreadable(tmp_path, silent_writer):
    run = tmp_path / "run"
    a_run(run)
    plant(run / "status.json", "/dev/zero")  # read_json reads a megabyte at most: bounded even if it were followed
    status = within(lambda: read_status(run))
    assert status.state == "unreadable" and "not a regular file but a device" in status.error
    plant(run / "trainer_log.jsonl", "fifo")
    silent_writer(run / "trainer_log.jsonl")
    assert within(lambda: llamafactory_events(run)) is None


def test_a_checkpoint_is_whole_though_its_trainer_state_logs_an_fp16_overflow(tmp_path, silent_writer):
    """transformers writes NaN and Infinity into trainer_state.json (an overflowed step's grad_norm): still whole."""
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "adapter_model.safetensors").write_bytes(b"\x02" + bytes(7) + b"{}")  # safetensors, no tensor
    (checkpoint / "trainer_state.json").write_text('{"global_step": 5, "log_history": [{"grad_norm": Infinity}, '
                                                  '{"grad_norm": NaN}]}')
    assert is_complete(checkpoint) and last_complete(tmp_path) == checkpoint
    plant(checkpoint / "trainer_state.json", "fifo")
    silent_writer(checkpoint / "trainer_state.json")
    assert not within(lambda: is_complete(checkpoint))


def test_appending_to_a_fifo_planted_as_the_index_or_a_log_is_refused_in_one_line(state_home, tmp_path,
                                                                                   silent_writer):
    index_path().parent.mkdir(parents=True)
    plant(index_path(), "fifo")  # nothing reads it: opening it to write would wait for a reader
    with pytest.raises(UserError, match="runs.jsonl is not a regular file"):
        within(lambda: register(tmp_path / "run", "20260101-000000-aaaaaa"))
    plant(tmp_path / "train.log", "fifo")
    silent_writer(tmp_path / "train.log")  # something holds it open: the open succeeds, and it is still no file
    with pytest.raises(UserError, match="train.log is not a regular file"):
        within(lambda: open_append(tmp_path / "train.log"))


def test_lines_longer_than_the_limit_are_skipped_without_being_held(tmp_path):
    path = tmp_path / "lines"
    path.write_bytes(b"first\n" + b"x" * 300_000 + b"\nsecond\n" + b"y" * 10 + b"\n" + b"z" * 300_000)
    with open(path, "rb") as file:
        assert list(lines_of(file, 1000, chunk=4096)) == [b"first", b"second", b"y" * 10]


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_an_index_that_is_not_a_file_lists_nothing(state_home, kind):
    index_path().parent.mkdir(parents=True)
    plant(index_path(), kind)
    assert within(entries) == []


def test_an_index_line_of_20_mb_is_skipped_and_the_runs_around_it_listed(state_home):
    a_run(state_home / "before")
    with open(index_path(), "a") as file:
        file.write('{"id": "20260101-000000-aaaaaa", "dir": "' + "x" * (20 << 20) + '"}\n')
    a_run(state_home / "after")
    assert [run_id for run_id, _ in entries()] == ["before", "after"]


def test_a_run_with_gigabytes_of_events_is_listed_from_their_end(state_home):
    """A run that logged every step for months: `tuner runs` and finding another run by name read its events.jsonl
    backwards from the end, never all of it (4 GB here, sparse so that it takes no disk; the commands have 2 GiB of
    address space, where reading it whole fails)."""
    env = {"XDG_STATE_HOME": str(state_home / "state"), "COLUMNS": "160"}
    a_run(state_home / "mine")
    long = state_home / "long"
    a_run(long)
    with open(long / "events.jsonl", "wb") as file:
        file.truncate(4 << 30)
        file.seek(4 << 30)
        file.write(b'\n{"time": 1700000000.5, "type": "log", "step": 10, "loss": 0.25}\n')
    listed = tuner("runs", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert {run["id"]: run["last_log"] for run in json.loads(listed.stdout)}["long"]["loss"] == 0.25
    logs = tuner("logs", "mine", env=env)
    assert logs.returncode == 0 and logs.stdout == "mine trained\n", logs.stderr


def test_commands_that_read_every_run_answer_when_one_run_is_planted_with_devices(state_home):
    """The case as found: another run's events.jsonl a link to /dev/urandom hung `tuner runs`, `logs`, `stop` and
    `resume`; a 20 MB index line was printed whole."""
    env = {"XDG_STATE_HOME": str(state_home / "state"), "COLUMNS": "160"}
    a_run(state_home / "mine", state="completed")
    hostile = state_home / "hostile"
    a_run(hostile, state="running")
    plant(hostile / "events.jsonl", "/dev/urandom")
    with open(index_path(), "a") as file:
        file.write('{"id": "20260101-000000-aaaaaa", "dir": "' + "x" * (20 << 20) + '"}\n')

    listed = tuner("runs", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "mine" in listed.stdout and "hostile" in listed.stdout and len(listed.stdout) < 10_000
    logs = tuner("logs", "mine", env=env)
    assert logs.returncode == 0 and logs.stdout == "mine trained\n", logs.stderr
    stopped = tuner("stop", "mine", env=env)
    assert stopped.returncode == 2 and "is completed, not running" in stopped.stderr, stopped.stderr
    resumed = tuner("resume", "mine", env=env)
    assert resumed.returncode == 2 and "nothing to resume" in resumed.stderr, resumed.stderr

    plant(index_path(), "fifo")
    assert tuner("runs", env=env).returncode == 0
