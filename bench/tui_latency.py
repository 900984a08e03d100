"""Keypress-to-redraw latency of the run dashboard, as a terminal sees it, while a run trains at full speed on the
same host, against the same dashboard on an idle host (the baseline, measured in the same invocation).

    python3 bench/tui_latency.py [--presses 60]

`tuner monitor RUN` runs in a pseudo-terminal (100x30), as it would under SSH or tmux. A press writes the `l` key
(log-scale toggle, which redraws the whole loss chart) to the terminal; its latency is the time until the redrawn
chart title ("loss · log scale", or back to "loss  raw") comes out of the terminal: input parsing, the action,
the chart's render and the screen update, all in the real app. The network of an SSH link comes on top.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ANSI = re.compile(rb"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")
COLUMNS, ROWS = 100, 30


def start_run(home: Path, steps: int) -> Path:
    run_dir = home / "run"
    subprocess.run([sys.executable, "-m", "engine.cli", "train", "--model_name_or_path", "tiny-llama", "--dataset",
                    "demo_alpaca", "--output_dir", str(run_dir), "--max_steps", str(steps), "--logging_steps", "5",
                    "--save_steps", "100000", "--detach"], check=True, capture_output=True, cwd=home)
    return run_dir


class Terminal:
    """The dashboard in a pseudo-terminal; what it writes is read back with the escape codes taken out."""

    def __init__(self, run_dir: Path):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(ROWS)}
        self.process = subprocess.Popen([sys.executable, "-c", "from engine.cli import tuner; tuner()", "monitor", str(run_dir)],
                                        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return b""
        try:
            return os.read(self.master, 1 << 16)
        except OSError:
            return b""

    def wait_for(self, marker: bytes, timeout: float) -> float | None:
        """Seconds until ``marker`` is in the (escape-free) output, None when it did not come."""
        start, seen = time.perf_counter(), b""
        while time.perf_counter() - start < timeout:
            seen += self.read(0.01)
            if marker in ANSI.sub(b"", seen):
                return time.perf_counter() - start
        return None

    def drain(self, quiet_s: float = 0.05) -> None:
        while self.read(quiet_s):
            pass

    def press(self, key: bytes) -> None:
        os.write(self.master, key)

    def close(self) -> None:
        self.press(b"q")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self.master)


def latencies(run_dir: Path, presses: int) -> list[float]:
    terminal = Terminal(run_dir)
    try:
        if terminal.wait_for(b"tok/s", 30) is None:
            raise SystemExit("the dashboard did not draw its first frame in 30 s")
        time.sleep(2.0)  # the samplers have read the history
        found = []
        for n in range(presses):
            terminal.drain()
            terminal.press(b"l")
            took = terminal.wait_for(b"loss \xc2\xb7 log scale" if n % 2 == 0 else b"loss  raw", 5)
            if took is None:
                raise SystemExit(f"press {n + 1}: no redraw within 5 s")
            found.append(took * 1000)
            time.sleep(0.1)
        return found
    finally:
        terminal.close()


def p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))]


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):6.1f} ms   p95 {p95(values):6.1f} ms   max {max(values):6.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["XDG_STATE_HOME"] = str(home / "state")
        from engine.rundir.jobs import find_job, stop_job
        from engine.rundir import read_status

        for name in ("idle", "busy"):
            (home / name).mkdir()
        finished = start_run(home / "idle", 20)
        while read_status(finished) is None or read_status(finished).state not in ("completed", "failed"):
            time.sleep(0.5)
        idle = latencies(finished, args.presses)

        busy_dir = start_run(home / "busy", 100000)
        while read_status(busy_dir) is None or read_status(busy_dir).state != "running":
            time.sleep(0.5)
        time.sleep(5)  # training at full speed
        try:
            busy = latencies(busy_dir, args.presses)
        finally:
            stop_job(find_job(str(busy_dir)), wait_s=30)

    print(f"cores {os.cpu_count()}, {args.presses} presses each")
    print(f"idle host      : {summary(idle)}")
    print(f"run training   : {summary(busy)}")
    print(f"ratio (median) : {statistics.median(busy) / statistics.median(idle):.2f}x; "
          f"p95 while training {'under' if p95(busy) < 100 else 'OVER'} 100 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
