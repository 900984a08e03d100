"""The run dashboard (`tuner monitor`) on real run directories, with GPU states recorded on real machines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from textual.widgets import Static
from tui_helpers import recorded, shown, until

from engine.cli import main
from engine.errors import UserError
from engine.rundir.events import read_events
from engine.rundir.jobs import find_job, job_row
from engine.rundir.process import pid_start_time
from engine.rundir.series import remaining_s
from engine.rundir import RunStatus, read_status, write_status
from tuner_tui.confirm import ConfirmScreen
from tuner_tui.dashboard.screen import DashboardScreen
from tuner_tui.dashboard.widgets import (CheckpointList, ConfigView, GpuPanel, LearningRate, LogView, LossChart,
                                         StateBanner)
from tuner_tui.monitor import MonitorApp, monitor_app

FAST = {"interval_s": 0.1, "gpu_interval_s": 0.1}


def dashboard(run_dir: Path, machine: str = "a100-80gb", **kwargs) -> MonitorApp:
    return MonitorApp(run_dir, probe=kwargs.pop("probe", recorded(machine)), **{**FAST, **kwargs})


def sampled(app: MonitorApp):
    screen = app.screen
    return lambda: isinstance(screen, DashboardScreen) and screen.run is not None and \
        screen.query_one(GpuPanel).gpus is not None


def stats(app: MonitorApp) -> str:
    return shown(app.screen.query_one("#stats", Static))


def append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(text)


def log_event(step: int, loss: float, total: int = 30) -> str:
    return json.dumps({"time": time.time(), "type": "log", "step": step, "total_steps": total, "epoch": step / 50,
                       "loss": loss, "learning_rate": 1e-5, "grad_norm": 1.0, "tokens_per_s": 2500.0,
                       "elapsed_s": 9.0, "remaining_s": 1.0, "memory": None})


def running_run(tmp_path: Path, pid: int, run_id: str = "20250101-000000-abcdef") -> Path:
    run_dir = tmp_path / "live"
    run_dir.mkdir(exist_ok=True)
    write_status(run_dir, RunStatus(id=run_id, name="live", state="running", pid=pid, pid_started_at=pid_start_time(pid),
                                    output_dir=str(run_dir),
                                    model="tiny-llama", method="lora", total_steps=100))
    return run_dir


@pytest.fixture
def sleeper(tmp_path):
    """A harmless process standing in for the trainer of the run ``running_run`` writes: it holds that directory's
    lock, as a run's own process does (`tuner stop` signals nothing else), and sleeps."""
    (tmp_path / "live").mkdir()
    process = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                                "print('ready', flush=True)\ntime.sleep(60)", str(tmp_path / "live" / ".tuner.lock")],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


async def test_finished_real_run_shows_progress_losses_checkpoints_and_gpu(finished_run):
    app = dashboard(finished_run)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        screen = app.screen
        banner = shown(screen.query_one(StateBanner))
        assert banner.startswith("✔ COMPLETED") and read_status(finished_run).id in banner
        assert "step 20/20" in stats(app) and "epoch 0.40" in stats(app)
        series = screen.query_one(LossChart).series
        assert series.steps == (5, 10, 15, 20) and len(series.losses) == 4 and len(series.smoothed) == 4
        assert len(screen.query_one(LearningRate).rates) == 4
        checkpoints = shown(screen.query_one(CheckpointList))
        assert "checkpoint-10" in checkpoints and "checkpoint-20" in checkpoints
        gpus = shown(screen.query_one(GpuPanel))
        assert "A100-SXM4-80GB" in gpus and "0.5/80 GiB" in gpus and "31 °C" in gpus
        assert "step 20/20" in shown(screen.query_one(LogView))
        assert "model_name_or_path: tiny-llama" in shown(screen.query_one(ConfigView))

        await pilot.press("l")
        chart = screen.query_one(LossChart)
        assert chart.log_scale and "log scale" in str(chart.border_title)
        await pilot.pause()
        await pilot.press("l")
        assert not chart.log_scale


async def test_events_appended_while_watching_appear_and_a_torn_line_waits_for_its_end(run_copy):
    app = dashboard(run_copy)
    events = run_copy / "events.jsonl"
    async with app.run_test(size=(120, 40)) as pilot:
        chart = app.screen.query_one(LossChart)
        await until(pilot, lambda: len(chart.series.losses) == 4, "the run's history")

        append(events, log_event(25, 6.5) + "\n")
        await until(pilot, lambda: len(chart.series.losses) == 5, "the appended log event")
        assert "step 25/30" in stats(app)

        line = log_event(30, 6.25)
        append(events, line[:40])
        await pilot.pause(0.3)
        assert len(chart.series.losses) == 5 and not app._notifications
        append(events, line[40:] + "\n")
        append(events, json.dumps({"time": time.time(), "type": "checkpoint", "step": 30,
                                   "path": str(run_copy / "checkpoint-30")}) + "\n")
        append(run_copy / "train.log", "2025-01-01 00:00:00 WARNING tuner: loss spiked\n")
        await until(pilot, lambda: len(chart.series.losses) == 6, "the completed torn line")
        assert chart.series.steps[-2:] == (25, 30) and chart.series.losses[-1] == 6.25
        await until(pilot, lambda: "checkpoint-30" in shown(app.screen.query_one(CheckpointList)), "the checkpoint")
        log = app.screen.query_one(LogView)
        await until(pilot, lambda: "loss spiked" in shown(log), "the new log line")
        assert any(span.style == "$text-warning" for span in log.render().spans)


async def test_failed_run_shows_its_error_first(run_copy):
    status = read_status(run_copy)
    status.state, status.exit_code = "failed", 1
    status.error = "CUDA out of memory: lower per_device_train_batch_size or use qlora"
    write_status(run_copy, status)
    append(run_copy / "events.jsonl", json.dumps({"time": time.time(), "type": "error", "message": status.error})
           + "\n" + json.dumps({"time": time.time(), "type": "end", "state": "failed"}) + "\n")
    app = dashboard(run_copy)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        banner = app.screen.query_one(StateBanner)
        assert banner.region.y == 0 and banner.has_class("-failed")
        lines = shown(banner).splitlines()
        assert lines[0].startswith("✖ FAILED") and lines[1] == f"error: {status.error}"


async def test_run_whose_process_died_without_an_end_shows_as_failed(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    app = dashboard(running_run(tmp_path, gone.pid))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        banner = shown(app.screen.query_one(StateBanner))
        assert banner.startswith("✖ FAILED") and f"pid {gone.pid}) is gone without writing an end event" in banner
        assert shown(app.screen.query_one(LossChart)) == "the run ended before it logged a loss (every logging_steps steps)"


async def test_stop_asks_first_then_sends_sigterm_to_the_run(tmp_path, sleeper):
    app = dashboard(running_run(tmp_path, sleeper.pid))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: sampled(app)() and app.screen.run.active, "the running run")
        assert "RUNNING" in shown(app.screen.query_one(StateBanner))

        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert isinstance(app.screen, DashboardScreen)
        await pilot.pause(0.2)
        assert sleeper.poll() is None

        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: sleeper.poll() is not None, "the signal to arrive")
        assert sleeper.returncode == -signal.SIGTERM
        await until(pilot, lambda: any(n.title == "stop requested" for n in app._notifications), "the confirmation")


async def test_stop_from_the_command_palette_asks_too(tmp_path, sleeper):
    app = dashboard(running_run(tmp_path, sleeper.pid), interval_s=1.0, gpu_interval_s=2.0)  # typing waits for idle
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: sampled(app)() and app.screen.run.active, "the running run")
        titles = [command.title for command in app.get_system_commands(app.screen)]
        assert {"Stop run", "Toggle log scale", "Quit"} <= set(titles)
        await pilot.press("ctrl+p")
        await pilot.press(*"stop run")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation modal")
        await pilot.press("escape")
        assert sleeper.poll() is None


@pytest.mark.parametrize("key", ["q", "ctrl+c"])
async def test_quitting_leaves_the_run_alone(tmp_path, sleeper, key):
    app = dashboard(running_run(tmp_path, sleeper.pid))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        await pilot.press(key)
        await pilot.pause()
        assert not app.is_running
    assert sleeper.poll() is None


async def test_stop_on_a_finished_run_only_says_so(finished_run):
    app = dashboard(finished_run)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        await pilot.press("s")
        assert isinstance(app.screen, DashboardScreen)
        assert [n.message for n in app._notifications] == ["the run is completed: there is nothing to stop"]


async def test_no_gpu_shows_the_machines_memory_and_the_probe_message(finished_run):
    app = dashboard(finished_run, machine="none")
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        lines = shown(app.screen.query_one(GpuPanel)).splitlines()
        assert lines[:2] == ["no process of the run", f"machine · {psutil.cpu_count()} cores"]
        assert lines[2].startswith("mem ") and lines[2].endswith(f"/{psutil.virtual_memory().total / 2**30:.0f} GiB")
        assert lines[3].startswith("no NVIDIA GPU found (NVML Shared Library Not Found)")
        assert app.screen.query_one("#gpus").border_title == "CPU and memory"


@pytest.fixture
def process_tree():
    """A live stand-in for a run's trainer with two worker processes of its own."""
    process = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    yield process
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


async def test_without_a_gpu_the_panel_shows_the_cpu_and_memory_of_the_runs_processes(tmp_path, process_tree):
    app = dashboard(running_run(tmp_path, process_tree.pid), machine="none")
    async with app.run_test(size=(120, 40)) as pilot:
        panel = app.screen.query_one(GpuPanel)
        await until(pilot, lambda: "this run · 3 processes" in shown(panel) and " %" in shown(panel),
                    "two readings of the run's three processes")
        lines = shown(panel).splitlines()
        assert lines[0] == "this run · 3 processes"
        assert lines[1].startswith("cpu ") and lines[1].endswith(" %")
        assert lines[2].startswith("rss ") and lines[2].endswith(" MiB")  # three sleeps hold a few MiB
        assert lines[3] == f"machine · {psutil.cpu_count()} cores" and lines[4].startswith("mem ")
        assert lines[5].startswith("no NVIDIA GPU found")
        host = panel.gpus.host
        assert host.cpu_pct is not None and 0 < host.rss_gib < 1


@pytest.mark.parametrize("ending", ["completed", "died"])
async def test_the_dashboard_and_tuner_runs_show_the_same_elapsed_time(run_copy, ending):
    if ending == "died":  # its process is gone without an end: both stop its clock at its last event
        status = read_status(run_copy)
        gone = subprocess.Popen(["true"])
        gone.wait()
        status.state, status.ended_at, status.pid = "running", None, gone.pid
        write_status(run_copy, status)
    row = job_row(find_job(str(run_copy)))
    assert row["state"] == ("completed" if ending == "completed" else "failed") and row["elapsed"]
    app = dashboard(run_copy)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        assert f"{row['elapsed']} elapsed" in stats(app)


async def test_tuner_runs_prints_the_elapsed_time_the_dashboard_shows(finished_run, state_home, capsys):
    assert main(["runs"]) == 0
    run_id = read_status(finished_run).id
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(run_id))
    app = dashboard(finished_run)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        elapsed = stats(app).split(" elapsed")[0].rsplit(" ", 1)[-1]
    assert row.split()[-1] == elapsed


async def test_the_eta_comes_with_the_second_log_at_the_pace_since_the_first(finished_run, tmp_path, sleeper):
    logs = [event for event in read_events(finished_run) if event["type"] == "log"]
    assert logs[0]["remaining_s"] is None  # until the first log: the first step's warm-up, no pace to go by
    pace = remaining_s([(event["step"], event["time"]) for event in logs[:2]], 20)
    assert logs[1]["remaining_s"] == pytest.approx(pace, abs=0.2)

    run_dir = running_run(tmp_path, sleeper.pid)
    now = time.time()
    first = json.loads(log_event(10, 6.8, total=100)) | {"time": now, "remaining_s": None}
    append(run_dir / "events.jsonl", json.dumps(first) + "\n")
    app = dashboard(run_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: "step 10/100" in stats(app), "the first log")
        assert "ETA" not in stats(app)
        second = json.loads(log_event(20, 6.7, total=100)) | {"time": time.time(), "remaining_s": 80.0}
        append(run_dir / "events.jsonl", json.dumps(second) + "\n")
        await until(pilot, lambda: "ETA 0:01:" in stats(app), "the ETA from the second log")


async def test_a_failing_probe_is_one_notification_and_the_rest_keeps_updating(run_copy):
    calls = []

    def broken_probe():
        calls.append(1)
        raise RuntimeError("NVML: [driver] not loaded")

    app = dashboard(run_copy, probe=broken_probe)
    async with app.run_test(size=(120, 40)) as pilot:
        chart = app.screen.query_one(LossChart)
        await until(pilot, lambda: len(calls) >= 3 and len(chart.series.losses) == 4, "several samples")
        append(run_copy / "events.jsonl", log_event(25, 6.5) + "\n")
        await until(pilot, lambda: len(chart.series.losses) == 5, "the run sampler to go on")
        assert [(n.title, n.message) for n in app._notifications] == \
            [("reading the GPUs failed", "RuntimeError: NVML: [driver] not loaded")]


async def test_multi_gpu_panel_lists_each_gpu_and_the_estimate(run_copy):
    events = [json.loads(line) for line in (run_copy / "events.jsonl").read_text().splitlines()]
    events[0]["estimate"] = {"peak_allocated_gib": 9.1, "total_gib": 11.4}  # what a GPU run's start records
    (run_copy / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    app = dashboard(run_copy, machine="8x-h100")
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        panel = app.screen.query_one(GpuPanel)
        text = shown(panel)
        assert len(panel.gpus.gpus) == 8 and text.count("H100") == 8 and "estimate 11.4 GiB" in text


async def test_screenshot_at_80x24_renders_the_run(finished_run, tmp_path):
    app = dashboard(finished_run, machine="2x-rtx-4090")
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        await pilot.pause()
        path = Path(app.save_screenshot("dashboard.svg", path=str(tmp_path)))
    svg = path.read_text()
    assert read_status(finished_run).id in svg and "COMPLETED" in svg


def test_monitor_app_finds_the_run_by_prefix_or_as_the_latest(state_home, finished_run):
    run_id = read_status(finished_run).id
    assert monitor_app(run_id[:10]).run_dir == finished_run.resolve()
    assert monitor_app(None).run_dir == finished_run.resolve()
    assert monitor_app(str(finished_run)).run_dir == finished_run
    with pytest.raises(UserError, match="no run 'nope'"):
        monitor_app("nope")


async def test_a_llama_factory_directory_is_shown_read_only(run_copy):
    for name in ("status.json", "events.jsonl"):
        (run_copy / name).unlink()  # what is left is what LLaMA-Factory writes: trainer_log.jsonl, checkpoints
    app = monitor_app(str(run_copy), probe=recorded("a100-80gb"))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        assert shown(app.screen.query_one(StateBanner)).startswith(f"✔ COMPLETED  llama-factory:{run_copy.name}")
        assert app.screen.query_one(LossChart).series.steps == (5, 10, 15, 20)
        assert "step 20/20" in stats(app)


async def test_hostile_events_and_escapes_are_shown_safely(run_copy):
    status = read_status(run_copy)
    status.name = "evil\x1b]2;pwned\x1b\\name"
    write_status(run_copy, status)
    huge = dict.fromkeys(("total_steps", "loss", "epoch", "learning_rate", "grad_norm", "tokens_per_s",
                          "elapsed_s", "remaining_s"), 1e308)
    append(run_copy / "events.jsonl", json.dumps({"time": 1e308, "type": "log", "step": 26, **huge}) + "\n" +
           json.dumps({"time": time.time(), "type": "log", "step": 27, "loss": 6.4, "remaining_s": 1e308}) + "\n" +
           json.dumps({"time": time.time(), "type": "eval", "step": 27, "eval_loss": -1e308}) + "\n")
    append(run_copy / "train.log", "role \x1b]2;pwned\x1b\\assistant \x1b[2J is unknown\n")
    app = dashboard(run_copy)
    async with app.run_test(size=(120, 40)) as pilot:
        chart = app.screen.query_one(LossChart)
        await until(pilot, lambda: chart.series.steps and chart.series.steps[-1] == 27, "the events")
        await pilot.pause()
        assert 1e308 not in chart.series.losses and chart.series.eval_losses == ()
        assert shown(app.screen.query_one(StateBanner)).split()[3] == "evilname"
        await until(pilot, lambda: "role assistant  is unknown" in shown(app.screen.query_one(LogView)), "the log")
        assert not app._notifications


async def test_a_dpo_runs_metrics_are_charted_one_by_one_with_m(tiny_models, tmp_path, monkeypatch):
    """A real DPO run (demo_pairs, held-out pairs evaluated): m charts rewards/accuracies, rewards/chosen, ... with
    their evaluations, then the loss again; an SFT run has no metrics of its stage and no m."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    run_dir = tmp_path / "dpo"
    assert main(["train", "--stage", "dpo", "--model_name_or_path", "tiny-llama", "--dataset", "demo_pairs",
                 "--output_dir", str(run_dir), "--max_steps", "4", "--logging_steps", "1", "--val_size", "8",
                 "--eval_strategy", "steps", "--eval_steps", "2", "--per_device_train_batch_size", "4"]) == 0
    app = dashboard(run_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        screen, chart = app.screen, app.screen.query_one(LossChart)
        assert chart.series.name == "loss" and screen.check_action("next_metric", ()) is True
        assert list(screen.run.metrics)[:2] == ["rewards/accuracies", "rewards/chosen"]
        await pilot.press("m")
        assert chart.series.name == "rewards/accuracies" and "rewards/accuracies" in str(chart.border_title)
        assert chart.series.steps == (1, 2, 3, 4) and chart.series.eval_steps == (2, 4)
        for _ in screen.run.metrics:
            await pilot.press("m")
        assert chart.series.name == "loss" and chart.series.steps == (1, 2, 3, 4)


async def test_an_sft_run_has_no_metric_key(finished_run):
    app = dashboard(finished_run)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        assert app.screen.run.metrics == {} and app.screen.check_action("next_metric", ()) is False


async def test_a_metric_name_that_is_markup_or_odd_text_is_not_charted(run_copy):
    """Events are untrusted: a metric named like markup, with control characters or too long is left out."""
    names = {"a[": 1.0, "[$primary]x": 2.0, "bad\nname": 3.0, "x" * 80: 4.0, "rewards/margins": 0.5}
    append(run_copy / "events.jsonl", json.dumps({**json.loads(log_event(21, 1.0, 30)), "metrics": names}) + "\n")
    app = dashboard(run_copy)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, sampled(app), "the first samples")
        assert list(app.screen.run.metrics) == ["rewards/margins"]
        await pilot.press("m")
        assert app.screen.query_one(LossChart).series.name == "rewards/margins"
