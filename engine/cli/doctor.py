"""``tuner doctor [--full]``: the machine's findings, one line each, with the fix under each problem; exit 1 on a
problem."""

from __future__ import annotations

import dataclasses
import json
import sys

from engine.config.argv import no_more, take_flag
from engine.cli.console import output_width, wrap

EXIT_PROBLEM = 1


def cmd_doctor(argv: list[str]) -> int:
    """The quick checks (under two seconds); ``--full`` also loads bitsandbytes and its CUDA library (seconds)."""
    as_json = take_flag(argv, "--json")
    full = take_flag(argv, "--full")
    no_more(argv, "doctor")
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
