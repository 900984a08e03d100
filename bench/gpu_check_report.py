"""The lines bench/gpu_check.sh writes to its results file, one JSON object each, and its closing summary.

    python3 bench/gpu_check_report.py card                        # the card's name as a file name part ("h200")
    python3 bench/gpu_check_report.py header --command "..."      # card, versions, date, command
    python3 bench/gpu_check_report.py doctor DOCTOR_JSON EXIT     # a line per path of `tuner doctor --gpu --json`
    python3 bench/gpu_check_report.py estimates MEMORY_JSONL      # the VRAM estimate against each measured peak
    python3 bench/gpu_check_report.py summary RESULTS_JSONL       # a table of it all; exit 1 when a check failed
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ESTIMATE_GOAL = 0.10  # every estimate within 10% of the measured peak (issue 24's goal)


def card_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("nvidia").strip()).strip("-") or "unknown"


def header(command: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "liger-kernel",
                    "flash-attn", "datasets"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    import torch

    return {"kind": "header", "card": card_name(), "cuda": torch.version.cuda, "versions": versions,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command}


def doctor_lines(path: Path, exit_code: int) -> list[dict]:
    """One line per path and geometry; a doctor that printed nothing usable is one failed line with its exit code."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return [{"kind": "doctor", "state": "failed", "path": "tuner doctor --gpu", "exit_code": exit_code,
                 "detail": f"no result: {exc}"}]
    lines = [{"kind": "doctor-devices", "cuda": found.get("cuda"), "devices": found.get("devices", []),
              "message": found.get("message"), "exit_code": exit_code}]
    return lines + [{"kind": "doctor", **outcome} for outcome in found.get("outcomes", [])]


def estimate_lines(path: Path) -> list[dict]:
    """bench/gpu_memory.py's measured runs against the estimate `tuner estimate` gives for the same flags."""
    from bench.calibration import shape_of
    from engine.memory.estimate import estimate
    from engine.models.catalog import lookup

    lines = []
    for text in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(text)
        measured = row.get("peak_allocated_gib")
        line = {"kind": "estimate", "config": row["config"], "geometry": row["geometry"], "device": row.get("device"),
                "measured_allocated_gib": measured, "nvml_used_gib": row.get("nvml_used_gib"),
                "tokens_per_s": row.get("tokens_per_s_median"), "exit_code": row.get("exit_code"),
                "error": row.get("error")}
        if measured:
            e = estimate(shape_of(row, lookup(row["geometry"]).geometry))
            line |= {"estimate_allocated_gib": round(e.peak_allocated_gib, 3),
                     "estimate_total_gib": round(e.total_gib, 3), "ratio": round(e.peak_allocated_gib / measured, 3),
                     "within_goal": abs(e.peak_allocated_gib / measured - 1) <= ESTIMATE_GOAL}
        lines.append(line)
    return lines


def summary(path: Path) -> tuple[list[str], bool]:
    """A line per result and whether every check passed (doctor paths, speed runs, estimates measured)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out, ok = [], True
    for row in rows:
        kind = row.get("kind")
        if kind == "doctor-devices":
            out.append(row.get("message") or f"doctor   devices: {row.get('devices')}")
        elif kind == "header":
            out.append(f"card {row['card']}, CUDA {row['cuda']}, {row['date']}: {row['command']}")
        elif kind == "doctor":
            ok &= row["state"] != "failed"
            out.append(f"doctor   {row['state']:<13} {row['path']} ({row.get('geometry', '')}) "
                       f"{row.get('detail') or ''}")
        elif kind == "estimate":
            if row.get("exit_code") or row.get("error"):
                ok = False
                out.append(f"estimate {row['config']}: the run failed ({(row.get('error') or '')[:200]})")
            elif row.get("ratio") is None:
                out.append(f"estimate {row['config']}: no GPU peak to compare (ran on {row.get('device')})")
            else:
                out.append(f"estimate {row['config']}: {row['estimate_allocated_gib']:.2f} GiB vs measured "
                           f"{row['measured_allocated_gib']:.2f} (x{row['ratio']:.3f}"
                           f"{'' if row['within_goal'] else ', outside 10%'})")
        elif kind is None and "side" in row:  # bench/speed.py's lines
            out.append(f"speed    {row.get('case')} {row['side']}: {row.get('tokens_per_s')} tokens/s, peak "
                       f"{row.get('peak_allocated_gib')} GiB, MFU {row.get('mfu')}, ratio {row.get('ratio')}")
    return out, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("card", "header", "doctor", "estimates", "summary"))
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--command", default="")
    args = parser.parse_args()
    if args.what == "card":
        print(card_slug(card_name()))
    elif args.what == "header":
        print(json.dumps(header(args.command)))
    elif args.what == "doctor":
        for line in doctor_lines(Path(args.paths[0]), int(args.paths[1])):
            print(json.dumps(line))
    elif args.what == "estimates":
        for line in estimate_lines(Path(args.paths[0])):
            print(json.dumps(line))
    else:
        lines, ok = summary(Path(args.paths[0]))
        print("\n".join(lines))
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, KeyError) as exc:  # a results file missing, cut short or not ours
        print(f"gpu_check_report: {exc}: run bench/gpu_check.sh, which writes these files", file=sys.stderr)
        sys.exit(2)
