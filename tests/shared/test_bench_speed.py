"""bench/speed.py in its CI-sized form on its CPU data, LLaMA-Factory's alpaca_en_demo: both recipes run on the same
rows, the ratio is printed, the curves agree.
(Timing itself is the benchmark's business, never a test's.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_speed_benchmark_runs_in_ci_size_and_prints_the_ratio(shared_data, tiny_models, tmp_path):
    out = tmp_path / "speed.jsonl"
    proc = subprocess.run([sys.executable, "bench/speed.py", "--samples", "24", "--rounds", "1",
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio" in proc.stdout and "tokens/s" in proc.stdout
    result = json.loads(out.read_text().splitlines()[0])
    assert result["config"] == "lora-alpaca" and result["data"] == "alpaca_en_demo" and result["samples"] == 24
    assert result["ratio"] > 0 and result["plain_tokens_per_s"] > 0 and result["tuner_tokens_per_s"] > 0
    assert result["loss"]["relative_difference"] < 0.01 and result["loss"]["steps"] == [3, 3]
    features = {f["feature"]: f["on"] for f in result["tuner_speed"]}
    assert features["padding-free batches"] and not features["gradient checkpointing"]
    assert result["versions"]["torch"] and result["command"].startswith("python3 bench/speed.py")
