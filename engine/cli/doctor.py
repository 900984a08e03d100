"""``tuner doctor``: the machine's findings, one line each, with the fix under each problem; exit 1 on a problem."""

from __future__ import annotations

import dataclasses
import json

from engine.cli.args import no_more, take_flag

EXIT_PROBLEM = 1


def cmd_doctor(argv: list[str]) -> int:
    as_json = take_flag(argv, "--json")
    no_more(argv, "doctor")
    from engine.doctor import has_problem, run_checks

    findings = run_checks()
    if as_json:
        print(json.dumps([dataclasses.asdict(f) for f in findings], indent=2))
    else:
        print("\n".join(render_findings(findings)))
    return EXIT_PROBLEM if has_problem(findings) else 0


def render_findings(findings) -> list[str]:
    """``state  check  detail`` per finding, the fix indented below it, and a count of warnings and problems."""
    from engine.runs.files import printable_line

    width = max(len(f.check) for f in findings)
    lines = []
    for f in findings:
        lines.append(f"{f.state:<7}  {f.check:<{width}}  {printable_line(f.detail)}")
        if f.fix:
            lines.append(f"{'':<7}  {'':<{width}}  fix: {printable_line(f.fix)}")
    counts = {state: sum(f.state == state for f in findings) for state in ("warning", "problem")}
    lines.append(f"{counts['warning']} warning(s), {counts['problem']} problem(s)")
    return lines
