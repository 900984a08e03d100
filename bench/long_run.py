"""`tuner runs`, `tuner logs` and the dashboard on a run that logged every step for a long time (1M log lines, a
~300 MB events.jsonl), against the same commands on a run of 1,000 lines in the same invocation. Each figure is a
fresh process: wall-clock seconds, and for the dashboard the peak resident memory once its first frame with the
loss chart is drawn. Prints both, their ratio, and whether the goals (runs <= 0.5 s, dashboard <= 2 s and <= 200 MB)
are met.

    python3 bench/long_run.py [--lines 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.rundir.index import register  # noqa: E402
from engine.rundir.status import RunStatus, write_status  # noqa: E402

EVAL_EVERY = 1000
SAVE_EVERY = 5000

DASHBOARD = """
import asyncio, resource, sys, time
start = time.perf_counter()
from engine.hardware import HardwareState
from tuner_tui.monitor import monitor_app

async def main():
    app = monitor_app(sys.argv[1], probe=lambda: HardwareState(gpus=[], message="no GPU"))
    async with app.run_test(size=(120, 40)) as pilot:
        while getattr(app.screen, "run", None) is None:
            await pilot.pause(0.01)
        await pilot.pause()
        elapsed = time.perf_counter() - start
        points = len(app.screen.run.loss.steps)
    print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, points)

asyncio.run(main())
"""


def write_run(run_dir: Path, run_id: str, lines: int) -> None:
    """A completed LoRA run that logged every step: events as the training process writes them."""
    run_dir.mkdir(parents=True)
    started = time.time() - lines * 0.5
    status = RunStatus(id=run_id, name=run_id, state="completed", pid=None, output_dir=str(run_dir),
                       model="meta-llama/Llama-2-7b-hf", method="lora", step=lines, total_steps=lines, loss=1.2345)
    status.ended_at = status.started_at
    write_status(run_dir, status)
    (run_dir / "config.yaml").write_text("model_name_or_path: meta-llama/Llama-2-7b-hf\nlogging_steps: 1\n")
    with open(run_dir / "events.jsonl", "w", encoding="utf-8") as file:
        file.write(json.dumps({"time": started, "type": "start", "model": status.model, "method": "lora",
                               "device": "cuda", "estimate": {"total_gib": 14.2}}) + "\n")
        for step in range(1, lines + 1):
            now = started + step * 0.5
            loss = 2.0 / (1 + step / 1000) + 0.05 * ((step * 7919) % 100) / 100
            file.write(f'{{"time": {now}, "type": "log", "step": {step}, "total_steps": {lines}, '
                       f'"epoch": {step / lines * 3:.6f}, "loss": {loss:.4f}, '
                       f'"learning_rate": {2e-4 * (1 - step / lines)}, '
                       f'"grad_norm": 0.{step % 997:03d}1234, "tokens_per_s": 4123.4, "tokens_seen": {step * 4096}, '
                       f'"elapsed_s": {step * 0.5:.2f}, "remaining_s": {(lines - step) * 0.5:.1f}, '
                       f'"memory": {{"allocated_gib": 13.91, "reserved_gib": 15.02}}}}\n')
            if step % EVAL_EVERY == 0:
                file.write(json.dumps({"time": now, "type": "eval", "step": step, "eval_loss": loss + 0.1}) + "\n")
            if step % SAVE_EVERY == 0:
                file.write(json.dumps({"time": now, "type": "checkpoint", "step": step,
                                       "path": str(run_dir / f"checkpoint-{step}")}) + "\n")
        file.write(json.dumps({"time": started + lines * 0.5, "type": "end", "state": "completed"}) + "\n")
    with open(run_dir / "train.log", "w", encoding="utf-8") as file:
        for step in range(max(1, lines - 200), lines + 1):
            file.write(f"step {step}/{lines}  loss 1.2345  lr 2e-05\n")
    register(run_dir, run_id)


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def median_of(repeat: int, measure) -> float:
    return statistics.median(measure() for _ in range(repeat))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        env = {**os.environ, "XDG_STATE_HOME": str(home / "state"), "PYTHONPATH": str(ROOT)}
        os.environ["XDG_STATE_HOME"] = env["XDG_STATE_HOME"]
        tuner = [sys.executable, "-m", "engine.cli"]
        write_run(home / "short", "20260101-000000-aaaaaa", 1000)
        short_runs = median_of(options.repeat, lambda: timed([*tuner, "runs"], env))
        begun = time.perf_counter()
        write_run(home / "long", "20260101-000001-bbbbbb", options.lines)
        size = (home / "long" / "events.jsonl").stat().st_size
        print(f"wrote {options.lines:,} log lines ({size / 1e6:.0f} MB events.jsonl) in "
              f"{time.perf_counter() - begun:.1f} s")
        long_runs = median_of(options.repeat, lambda: timed([*tuner, "runs"], env))
        logs_short = median_of(options.repeat, lambda: timed([*tuner, "logs", "20260101-000000-aaaaaa"], env))
        dash = {}
        for name in ("short", "long"):
            results = [subprocess.run([sys.executable, "-c", DASHBOARD, str(home / name)], env=env, check=True,
                                      capture_output=True, text=True).stdout.split() for _ in range(options.repeat)]
            dash[name] = (statistics.median(float(r[0]) for r in results), max(float(r[1]) for r in results),
                          int(results[0][2]))
    print(f"tuner runs                 : {short_runs:.3f} s with the short run alone, {long_runs:.3f} s with the long "
          f"one too ({long_runs / short_runs:.2f}x); goal 0.5 s: {'met' if long_runs <= 0.5 else 'NOT met'}")
    print(f"tuner logs <short run>     : {logs_short:.3f} s with the long run indexed")
    for name, (seconds, mib, points) in dash.items():
        print(f"dashboard, {name:5} run      : first frame {seconds:.3f} s, peak {mib:.0f} MiB, {points} chart points")
    seconds, mib, _ = dash["long"]
    print(f"dashboard long / short     : {seconds / dash['short'][0]:.2f}x time, {mib / dash['short'][1]:.2f}x memory; "
          f"goals 2 s and 200 MB: {'met' if seconds <= 2 and mib * 1.048576 <= 200 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
