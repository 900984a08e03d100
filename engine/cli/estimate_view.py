"""How `tuner estimate` prints: the components of the chosen run, every method against the seed table, the advice."""

from __future__ import annotations

from engine.memory.estimate import Estimate
from engine.memory.recommend import Recommendation


def render_estimate(model: str, result: Estimate, advice: Recommendation) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    parts = Table("component", "GiB", box=None, header_style="bold", title=f"{model}, {result.method}",
                  title_justify="left")
    for name, gib in result.components.items():
        if gib:
            parts.add_row(name.replace("_", " "), f"{gib:.2f}")
    parts.add_row(Text("peak allocated (torch)", style="bold"), Text(f"{result.peak_allocated_gib:.2f}", style="bold"))
    parts.add_row(Text("total (nvidia-smi)", style="bold"), Text(f"{result.total_gib:.2f}", style="bold"))
    console.print(parts)
    for line in result.assumptions:
        console.print(Text(f"  assumes {line}", style="dim"))

    methods = Table("method", "estimate GiB", "seed table GB", "fits", box=None, header_style="bold",
                    title="every method, this model and these settings", title_justify="left")
    for row in advice.rows:
        fits = "" if row.fits is None else "yes" if row.fits else "no"
        style = "bold green" if row.method == advice.method else ""
        methods.add_row(Text(row.label, style=style), f"{row.estimate.total_gib:.1f}", str(row.seed_gb), fits)
    console.print()
    console.print(methods)
    console.print()
    console.print(Text(advice.reason, style="bold"))
    for idea in advice.suggestions:
        console.print(f"  - {idea}")
