"""Print the VRAM estimator against every measured run in bench/results: estimate, measurement and their ratio.

    python3 bench/calibration.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.models.catalog import lookup  # noqa: E402
from engine.config.schema import parse_args  # noqa: E402
from engine.memory.estimate import RunShape, estimate  # noqa: E402
from engine.memory.recommend import shape_from_config  # noqa: E402


def shape_of(row: dict, geometry) -> RunShape:
    """The shape `tuner estimate` would compute for the flags the measured run was started with."""
    return shape_from_config(parse_args(row["flags"].split()), geometry)


def main() -> int:
    print("| file | config | card | estimate allocated GiB | measured | ratio | estimate total GiB | NVML used | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted((REPO / "bench" / "results").glob("gpu_memory-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            geometry = lookup(row["geometry"]).geometry
            if row["peak_allocated_gib"] is None:
                continue
            e = estimate(shape_of(row, geometry))
            print(f"| {path.name} | {row['config']} | {row['device']} | {e.peak_allocated_gib:.2f} | "
                  f"{row['peak_allocated_gib']:.2f} | {e.peak_allocated_gib / row['peak_allocated_gib']:.3f} | "
                  f"{e.total_gib:.2f} | {row['nvml_used_gib']:.2f} | {e.total_gib / row['nvml_used_gib']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
