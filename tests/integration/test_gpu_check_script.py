"""bench/gpu_check.sh dry-run on the CPU, as a GPU machine runs it at full size: the header (card, versions, date,
command), `tuner doctor --gpu`'s answer, bench/speed.py's GPU path (a catalog geometry with random weights, QLoRA
4-bit, fixed 512-token samples, a line per side) and the estimator against bench/gpu_memory.py's measured run, in one
results file, and a summary. (Timing itself is the benchmark's business, never a test's.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_dry_runs_on_a_cpu_and_writes_every_step_to_one_results_file(tiny_models, tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(tmp_path / "results")], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = (tmp_path / "results").glob("gpu-cpu-*.jsonl")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    header, devices = rows[0], rows[1]
    assert header["kind"] == "header" and header["card"] == "cpu" and header["versions"]["torch"]
    assert header["command"].startswith("bash bench/gpu_check.sh") and header["date"]
    assert devices["kind"] == "doctor-devices" and devices["cuda"] is False and devices["exit_code"] == 0
    plain, tuner = (row for row in rows if "side" in row)
    assert (plain["side"], tuner["side"]) == ("plain", "tuner")
    for side in (plain, tuner):
        assert (side["case"], side["method"], side["lengths"], side["card"]) == (
            "qlora4-fixed512", "qlora-4bit", "fixed-512", "cpu")
        assert side["optimizer"] == "adamw_torch" and side["warmup_steps"] == 1 and side["mfu"] is None
        # two steps of 8 samples, the first untimed: the second's 8 x 512 tokens, counted on each side alike
        assert side["timed"][0]["steps"] == 1 and side["timed"][0]["tokens"] == 8 * 512
        assert side["tokens_per_s"] > 0 and side["ratio"] == round(tuner["tokens_per_s"] / plain["tokens_per_s"], 2)
        assert side["flops_formula"].startswith("6N") and side["versions"]["torch"]
    (estimate,) = (row for row in rows if row.get("kind") == "estimate")
    assert estimate["config"] == "lora-b1-s512" and estimate["exit_code"] == 0 and estimate["error"] is None
    assert "no CUDA device here" in proc.stdout  # the summary: what the doctor said, the speed lines, the estimate
    assert "speed    qlora4-fixed512 tuner" in proc.stdout and "estimate lora-b1-s512: no GPU peak" in proc.stdout


def test_on_a_cpu_the_full_check_is_refused_in_one_line_and_writes_nothing(tmp_path):
    """Without --dry-run the script would build a 7B model on a CPU: it says how to run it here instead."""
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "results")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "bench/gpu_check.sh: no CUDA device here; on a CPU run it as: bash bench/gpu_check.sh --dry-run OUT"]
    assert not (tmp_path / "results").exists()
