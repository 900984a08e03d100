"""The predict and export screens while their process runs and after: progress with a total and an ETA, the export
of a full fine-tune; the chat screen letting a reply go when it is left. (A finished predict's result, shown once with
its units: test_dashboard_followups.)"""

from __future__ import annotations

import dataclasses
import os

from textual.widgets import Input, Static
from tui_helpers import recorded, shown, until

from engine.cli import main
from engine.infer.predict import score_line
from engine.runs.tasks import PredictProgress, TaskResult, read_task
from tuner_tui.dashboard.screen import DashboardScreen
from tuner_tui.followup.tasks import ExportScreen, PredictScreen, TaskState, progress_text, short_duration
from tuner_tui.monitor import MonitorApp

FAST = {"interval_s": 0.1, "gpu_interval_s": 0.1}


def monitor(run_dir) -> MonitorApp:
    return MonitorApp(run_dir, probe=recorded("a100-80gb"), **FAST)


async def open_form(pilot, app, key: str):
    """The dashboard's form behind ``key``, once the run has filled it."""
    await until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.run is not None, "the run")
    await pilot.press(key)
    screen = app.screen
    await until(pilot, lambda: not screen.query_one("#start").disabled, "the form")
    return screen


async def predict_form(pilot, app) -> PredictScreen:
    return await open_form(pilot, app, "p")


async def export_form(pilot, app) -> ExportScreen:
    return await open_form(pilot, app, "e")


def test_predict_progress_is_recorded_in_the_result_file_with_the_total_and_time_left(tmp_path, capsys):
    path = tmp_path / "predict.result.json"
    progress = PredictProgress(path, TaskResult("predict", "running", os.getpid()))
    progress(0, 40)
    assert read_task(path).total == 40 and read_task(path).done == 0
    progress(8, 40)
    recorded_now = read_task(path)
    assert (recorded_now.done, recorded_now.total) == (8, 40) and recorded_now.remaining_s is not None
    assert "predicting 40 samples" in capsys.readouterr().out  # the task's log hears of it too


def test_progress_reads_done_of_total_with_an_eta():
    task = TaskResult("predict", "running", done=8, total=40, remaining_s=72.4)
    assert progress_text(task) == "8 of 40 done · ETA 1m 12s"
    assert progress_text(dataclasses.replace(task, done=40, remaining_s=0.0)) == "40 of 40 done"
    assert progress_text(TaskResult("export", "running")) == ""
    assert [short_duration(s) for s in (8, 72, 3900)] == ["8s", "1m 12s", "1h 5m"]


def test_the_score_line_gives_runtime_and_speed_their_units():
    line = score_line({"predict_bleu-4": 1.0, "predict_rouge-1": 2.0, "predict_samples": 4,
                       "predict_runtime": 476.96, "predict_samples_per_second": 0.084})
    assert line.endswith("runtime 476.96 s  0.08 samples/s")


async def test_a_running_predict_shows_how_far_it_is_of_the_total(run_copy, state_home):
    app = monitor(run_copy)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await predict_form(pilot, app)
        screen.started = TaskResult("predict", "running", os.getpid())
        screen.target = run_copy / "predict-x"
        from engine.rundir.files import LogTail

        screen._tail = LogTail(screen.target / "predict.log")
        screen.show(TaskState(True, None, ("model loaded: predicting 40 samples",),
                              TaskResult("predict", "running", os.getpid(), done=8, total=40, remaining_s=72.0)))
        status = shown(screen.query_one("#status", Static))
        assert "8 of 40 done · ETA 1m 12s" in status and str(screen.target / "predict.log") in status


async def test_leaving_the_chat_stops_its_reply_at_the_next_piece(run_copy, state_home):
    from tuner_tui.followup.chat import ChatScreen, ReplyAbandoned, Turn

    app = monitor(run_copy)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.run is not None, "the run")
        chat = ChatScreen(run_copy, max_new_tokens=1500)  # minutes of CPU if it ran to the end
        app.push_screen(chat)
        await until(pilot, lambda: chat.session is not None, "the model to load")
        ended, reply = [], chat.session.reply

        def observed(*args, **kwargs):
            try:
                return reply(*args, **kwargs)
            except BaseException as exc:
                ended.append(exc)
                raise

        chat.session.reply = observed
        await pilot.press(*"hello", "enter")
        await until(pilot, lambda: len(chat.query(Turn)) == 2 and chat.query(Turn)[1].text, "the first piece")
        await pilot.press("escape")
        assert isinstance(app.screen, DashboardScreen)
        await until(pilot, lambda: ended, "the reply to stop")
        assert isinstance(ended[0], ReplyAbandoned)


async def test_the_export_form_of_a_lora_run_says_its_adapter_is_merged(run_copy, state_home):
    app = monitor(run_copy)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await export_form(pilot, app)
        assert shown(screen.query_one("#note", Static)).startswith("the LoRA adapter is merged into its base")
        assert "merge" not in shown(screen.query_one("#title", Static))


async def test_the_export_of_a_full_fine_tune_says_there_is_no_adapter_and_saves_the_model(tiny_models, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    run_dir, exported = tmp_path / "full", tmp_path / "exported"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--output_dir",
                 str(run_dir), "--finetuning_type", "full", "--max_steps", "2", "--logging_steps", "1"]) == 0
    app = monitor(run_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await export_form(pilot, app)
        note = shown(screen.query_one("#note", Static))
        assert note.startswith("a full or freeze fine-tune has no adapter to merge: the trained model is saved again")
        assert "merge" not in shown(screen.query_one("#title", Static))
        screen.query_one("#export_dir", Input).value = str(exported)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: shown(screen.query_one("#status", Static)).startswith("finished"),
                    "the export to finish", timeout=120)
        assert "match the fine-tuned model within" in shown(screen.query_one("#result", Static))
    log = next(run_dir.glob("export-*.log")).read_text()
    assert "no adapter to merge (a full or freeze fine-tune, or any whole model), so it is saved again" in log
    assert "with adapter" not in log and (exported / "model.safetensors").is_file()
