"""LLaMA-Factory's results files in the run directory, as its workflows write them through transformers'
``Trainer.save_metrics``: ``train_results.json`` (runtime, samples and steps per second, total FLOPs, train loss,
epoch), ``eval_results.json`` (eval loss and its perplexity, runtime, speed) and ``all_results.json`` (both merged),
so scripts written for LLaMA-Factory's output directories keep working. Written atomically, never through a link."""

from __future__ import annotations

import json
import math
from pathlib import Path

from engine.rundir.files import read_json, write_text_atomic
from engine.rundir.status import finite

ALL = "all_results.json"


def save_results(run_dir: Path, split: str, metrics: dict) -> None:
    """``<split>_results.json`` and ``all_results.json`` updated with it (indented and sorted, as transformers
    writes them; a number JSON cannot hold is null)."""
    run_dir = Path(run_dir)
    metrics = finite(dict(metrics))
    try:
        merged = read_json(run_dir / ALL)
    except (OSError, ValueError):
        merged = {}
    merged = {**(merged if isinstance(merged, dict) else {}), **metrics}
    for name, data in ((f"{split}_results.json", metrics), (ALL, merged)):
        write_text_atomic(run_dir / name, json.dumps(data, indent=4, sort_keys=True, allow_nan=False) + "\n")


def with_perplexity(metrics: dict) -> dict:
    """LLaMA-Factory's ``perplexity``: exp of the eval loss (infinite when it overflows, written as null)."""
    loss = metrics.get("eval_loss")
    if not isinstance(loss, (int, float)):
        return metrics
    try:
        return {**metrics, "perplexity": math.exp(loss)}
    except OverflowError:
        return {**metrics, "perplexity": float("inf")}
