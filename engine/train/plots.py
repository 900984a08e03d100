"""``plot_loss``: the loss curves of a finished run as PNG files in its directory, drawn as LLaMA-Factory's
extras/ploting.py draws them (its smoothing, title, labels, colours, size and file names: training_loss.png,
training_eval_loss.png; stage dpo's training_rewards_accuracies.png, kto's training_rewards_chosen.png, rm's
training_eval_accuracy.png), so a migrated user finds them where they were."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.rundir import Event, read_events
from engine.rundir.series import ema
from engine.rundir.files import read_json

log = logging.getLogger("tuner")

KEYS = ("loss", "eval_loss")


def smooth(values: list[float]) -> list[float]:
    """LLaMA-Factory's smoothing: TensorBoard's EMA with a weight that grows with the series' length, the same the
    dashboard draws (engine.rundir.series.ema)."""
    return list(ema(values))


def log_history(run_dir: Path) -> list[dict]:
    """The Trainer's log_history from the run's trainer_state.json (what LLaMA-Factory plots); in a directory
    without one, the run's log and eval events, which carry the same step and loss keys."""
    state = Path(run_dir) / "trainer_state.json"
    if state.is_file():
        history = read_json(state, max_bytes=1 << 30, nan=True).get("log_history", [])  # regular files only
        return [entry for entry in history if isinstance(entry, dict)] if isinstance(history, list) else []
    return [event for event in read_events(run_dir) if event["type"] in (Event.LOG, Event.EVAL)]


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The steps and values of ``key`` through the history (entries without it, or with it empty, left out)."""
    entries = [entry for entry in history if entry.get(key) is not None]
    return [entry["step"] for entry in entries], [entry[key] for entry in entries]


def plot_loss(run_dir: Path, keys: tuple[str, ...] = KEYS) -> list[Path]:
    """Draw each of ``keys`` the run logged; returns the files written. Never raises: the run it draws is finished,
    and a failure to draw it is a warning in the log."""
    run_dir = Path(run_dir)
    try:
        history = log_history(run_dir)
        written = []
        for key in keys:
            steps, values = series(history, key)
            if not values:
                log.info("plot_loss: no %s to plot", key)
                continue
            written.append(draw(run_dir, key, steps, values))
            log.info("figure saved at %s", written[-1])
        return written
    except Exception as exc:  # matplotlib missing, a full disk, an unreadable state: the run itself stands
        log.warning("plot_loss: no loss plot drawn: %s: %s", type(exc).__name__, exc)
        return []


def draw(run_dir: Path, key: str, steps: list[int], values: list[float]) -> Path:
    """One figure as LLaMA-Factory draws it, rendered by Agg (no display needed, pyplot's global state untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure()
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
    axes.plot(steps, smooth(values), color="#1f77b4", label="smoothed")
    axes.set_title(f"training {key} of {run_dir}")
    axes.set_xlabel("step")
    axes.set_ylabel(key)
    axes.legend()
    path = run_dir / f"training_{key.replace('/', '_')}.png"
    figure.savefig(path, format="png", dpi=100)
    return path
