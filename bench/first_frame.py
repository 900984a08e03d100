"""Time from a fresh Python process to the wizard's first frame (headless), against a bare Textual app with one
widget measured the same way in the same invocation. Prints both and their ratio.

    python3 bench/first_frame.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

PROGRAM = """
import time
start = time.perf_counter()
import asyncio
{imports}

async def main():
    app = {app}
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        print(time.perf_counter() - start)

asyncio.run(main())
"""

WIZARD = PROGRAM.format(imports="from engine.hardware import HardwareState\nfrom tuner_tui.wizard.app import WizardApp",
                        app="WizardApp(probe=lambda: HardwareState(gpus=[], message='no GPU'))")
BARE = PROGRAM.format(imports="from textual.app import App\nfrom textual.widgets import Static\n"
                              "class Bare(App):\n    def compose(self):\n        yield Static('hello')",
                      app="Bare()")


def measure(program: str, runs: int) -> list[float]:
    return [float(subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                                 check=True).stdout.split()[-1]) for _ in range(runs)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    bare, wizard = measure(BARE, runs), measure(WIZARD, runs)
    print(f"bare Textual app : median {statistics.median(bare):.3f} s")
    print(f"tuner wizard     : median {statistics.median(wizard):.3f} s")
    print(f"ratio            : {statistics.median(wizard) / statistics.median(bare):.2f}x; "
          f"{'under' if statistics.median(wizard) < 1 else 'OVER'} one second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
