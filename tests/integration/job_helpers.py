"""What the tests of runs as jobs share: a state home of their own, `tuner` as a subprocess, waiting on a condition."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

RUN = ["--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--per_device_train_batch_size", "8",
       "--logging_steps", "5", "--learning_rate", "1e-3"]


def tuner(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180, **kwargs)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def runs_json(cwd: Path) -> list[dict]:
    result = tuner("runs", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def start_detached(home: Path, name: str, *extra: str) -> tuple[Path, str]:
    work = home / "project"
    work.mkdir(exist_ok=True)
    result = tuner("train", *RUN, "--output_dir", name, "--detach", *extra, cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("started run ")
    run_id = result.stdout.split()[2]
    return work / name, run_id
