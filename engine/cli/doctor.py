"""``tuner doctor [--full]``: the machine's findings, one line each, with the fix under each problem; exit 1 on a
problem. ``tuner doctor --gpu``: every kernel path the engine can choose, run on each GPU against the reference
(engine.selftest); exit 1 on a failed path."""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from engine.config.argv import no_more, take_flag
from engine.errors import UserError
from engine.cli.console import output_width, wrap

EXIT_PROBLEM = 1


def cmd_doctor(argv: list[str]) -> int:
    """The quick checks (under two seconds); ``--full`` also loads bitsandbytes and its CUDA library (seconds)."""
    as_json = take_flag(argv, "--json")
    full = take_flag(argv, "--full")
    gpu = take_flag(argv, "--gpu")
    no_more(argv, "doctor")
    if gpu and full:
        raise UserError("--gpu and --full are separate checks", "run `tuner doctor --full`, then `tuner doctor --gpu`")
    if gpu:
        return check_gpu_paths(as_json)
    from engine.doctor import has_problem, run_checks

    findings = run_checks(full=full)
    if as_json:
        print(json.dumps([dataclasses.asdict(f) for f in findings], indent=2))
    else:
        print("\n".join(render_findings(findings, output_width(sys.stdout))))
    return EXIT_PROBLEM if has_problem(findings) else 0


def render_findings(findings, width: int | None = None) -> list[str]:
    """``state  check  detail`` per finding, the fix indented below it, and a count of warnings and problems;
    details and fixes wrapped to ``width`` columns in their own column."""
    from engine.rundir.files import printable_line

    checks = max(len(f.check) for f in findings)
    column = 7 + 2 + checks + 2
    lines = []
    for f in findings:
        lines += wrap(f"{f.state:<7}  {f.check:<{checks}}  {printable_line(f.detail)}", width, hang=column)
        if f.fix:
            lines += wrap(f"{'':<{column}}fix: {printable_line(f.fix)}", width, hang=column + len("fix: "))
    counts = {state: sum(f.state == state for f in findings) for state in ("warning", "problem")}
    lines.append(f"{counts['warning']} warning(s), {counts['problem']} problem(s)")
    return lines


def check_gpu_paths(as_json: bool, benches: list | None = None) -> int:
    """``tuner doctor --gpu``: the CUDA devices as NVML numbers them, then a line per path and geometry as each ends
    (passed / failed with the difference / not installed / not here); exit 1 when a path failed. ``benches``: the
    geometries and devices to check (default: engine.selftest's three geometries on each CUDA device)."""
    from engine.selftest import cuda_benches, run_checks

    mapping = []
    if benches is None:
        import torch

        if not torch.cuda.is_available():
            line = ("no CUDA device here: `tuner doctor --gpu` checks the GPU kernels on a GPU, and there is none to "
                    "check")
            print(json.dumps({"cuda": False, "message": line, "outcomes": []}) if as_json else line)
            return 0
        from engine.hardware import cuda_nvml_mapping

        mapping = cuda_nvml_mapping()
    if not as_json:
        for line in mapping_lines(mapping):
            print(line)
    with tempfile.TemporaryDirectory(prefix="tuner-selftest-") as workdir:  # the QLoRA path's saved models
        outcomes = run_checks(benches or cuda_benches(Path(workdir)),
                              progress=None if as_json else lambda o: print(o.line(), flush=True))
    failed = [o for o in outcomes if o.failed]
    if as_json:
        print(json.dumps({"cuda": True, "devices": mapping, "outcomes": [o.to_json() for o in outcomes]}, indent=2))
    else:
        counts = {state: sum(o.state == state for o in outcomes) for state in ("passed", "failed")}
        print(f"{counts['passed']} passed, {counts['failed']} failed, {len(outcomes) - len(failed) - counts['passed']} "
              "not installed or not on this card")
    return EXIT_PROBLEM if failed else 0


def mapping_lines(mapping: list[dict]) -> list[str]:
    """How CUDA's device numbers (after CUDA_VISIBLE_DEVICES) map to NVML's (nvidia-smi's), as the run's memory
    readings use it (engine.hardware.cuda_nvml_mapping)."""
    lines = []
    for d in mapping:
        if d.get("nvml") is None:
            lines.append(f"cuda:{d['cuda']} -> no NVML device found for it (uuid {d.get('cuda_uuid')})")
            continue
        mig = f" MIG {d['mig']}" if d.get("mig") is not None else ""
        lines.append(f"cuda:{d['cuda']} -> NVML {d['nvml']}{mig}: {d['name']} ({d['uuid']}, matched by {d['by']})")
    return lines
