"""Keypress-to-redraw latency of the run dashboard while a run trains at full speed on the same host, against the
same dashboard on an idle host (the baseline, measured in the same invocation). Prints both and their ratio.

    python3 bench/tui_latency.py [--presses 60]

A press is the `l` key (log scale toggle, which redraws the loss chart); its latency is the time from sending the key
through Textual's Pilot until the app has handled it and refreshed the screen (headless, 100x30).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def start_run(home: Path, steps: int) -> Path:
    run_dir = home / "run"
    subprocess.run([sys.executable, "-m", "engine.cli", "train", "--model_name_or_path", "tiny-llama", "--dataset",
                    "demo_alpaca", "--output_dir", str(run_dir), "--max_steps", str(steps), "--logging_steps", "5",
                    "--save_steps", "100000", "--detach"], check=True, capture_output=True, cwd=home)
    return run_dir


async def latencies(run_dir: Path, presses: int) -> list[float]:
    from engine.hardware import HardwareState
    from tuner_tui.monitor import MonitorApp

    app = MonitorApp(run_dir, probe=lambda: HardwareState(gpus=[], message="no GPU (benchmark)"))
    found = []
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(2.0)  # let the samplers read the history first
        for _ in range(presses):
            start = time.perf_counter()
            await pilot.press("l")
            await pilot.pause()
            found.append((time.perf_counter() - start) * 1000)
            await pilot.pause(0.05)
    return found


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    return f"median {statistics.median(ordered):6.1f} ms   p95 {ordered[int(0.95 * (len(ordered) - 1))]:6.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["XDG_STATE_HOME"] = str(home / "state")
        from engine.jobs import find_job, stop_job
        from engine.runs import read_status

        for name in ("idle", "busy"):
            (home / name).mkdir()
        finished = start_run(home / "idle", 20)
        while read_status(finished) is None or read_status(finished).state not in ("completed", "failed"):
            time.sleep(0.5)
        idle = asyncio.run(latencies(finished, args.presses))

        busy_dir = start_run(home / "busy", 100000)
        while read_status(busy_dir) is None or read_status(busy_dir).state != "running":
            time.sleep(0.5)
        time.sleep(5)  # training at full speed
        busy = asyncio.run(latencies(busy_dir, args.presses))
        stop_job(find_job(str(busy_dir)), wait_s=30)

    print(f"idle host      : {summary(idle)}")
    print(f"run training   : {summary(busy)}")
    print(f"ratio (median) : {statistics.median(busy) / statistics.median(idle):.2f}x; "
          f"p95 while training {'under' if sorted(busy)[int(0.95 * (len(busy) - 1))] < 100 else 'OVER'} 100 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
