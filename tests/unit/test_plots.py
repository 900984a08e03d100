"""plot_loss: LLaMA-Factory's smoothing, its figures from trainer_state.json or else our events, and a failure that
stays a warning."""

from __future__ import annotations

import json
import logging

import pytest

from engine.rundir import Event, EventWriter
from engine.train.plots import plot_loss, smooth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > len(PNG_SIGNATURE)


@pytest.fixture
def tuner_log():
    """The tuner logger's records (a handler of its own: a run in this process may have stopped propagation)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tuner")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_smoothing_is_llamafactorys_sigmoid_weighted_moving_average():
    assert smooth([]) == []
    assert smooth([1.0, 2.0, 3.0]) == pytest.approx([1.0, 1.9326262783812507, 2.92808706001649], abs=1e-12)
    assert smooth([5.0] * 40) == pytest.approx([5.0] * 40)


def test_plots_come_from_trainer_state_when_the_run_saved_one(tmp_path):
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7},
               {"step": 2, "train_loss": 1.75, "train_runtime": 1.0}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    written = plot_loss(tmp_path)
    assert written == [tmp_path / "training_loss.png", tmp_path / "training_eval_loss.png"]
    assert all(is_png(path) for path in written)


def test_plots_come_from_the_events_without_trainer_state(tmp_path, tuner_log):
    events = EventWriter(tmp_path)
    for step, loss in ((5, 2.0), (10, 1.4), (15, None)):  # a non-finite loss is written as null: left out
        events.emit(Event.LOG, step=step, loss=loss)
    events.close()
    assert plot_loss(tmp_path) == [tmp_path / "training_loss.png"]
    assert is_png(tmp_path / "training_loss.png") and not (tmp_path / "training_eval_loss.png").exists()
    assert "plot_loss: no eval_loss to plot" in [record.getMessage() for record in tuner_log]


def test_a_plot_that_cannot_be_written_is_a_warning_not_an_error(tmp_path, tuner_log):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 2.0}]}))
    (tmp_path / "training_loss.png").mkdir()
    assert plot_loss(tmp_path) == []
    warnings = [record for record in tuner_log if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("plot_loss: no loss plot drawn: ")
