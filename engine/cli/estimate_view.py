"""How `tuner estimate` prints: the components of the chosen run, every method beside the VRAM table of LLaMA-Factory's
README, the advice and why."""

from __future__ import annotations

from engine.memory.estimate import Estimate, RunShape
from engine.memory.recommend import (STRATEGY_LABELS, Recommendation, llamafactory_caption, llamafactory_size,
                                     strategy_of)


def strategy_text(strategy: str) -> str:
    return f"{STRATEGY_LABELS[strategy]} (strategy {strategy})"


def settings_line(shape: RunShape) -> str:
    """The batch every figure is for, in the config's names, so a reader can tell which run the numbers describe."""
    gpus = f"{shape.num_gpus} GPU{'s' if shape.num_gpus != 1 else ''}"
    if shape.num_gpus > 1:
        gpus += f" with {strategy_text(strategy_of(shape))}"
    return (f"figures for per_device_train_batch_size {shape.batch_size} x cutoff_len {shape.seq_len}, "
            f"gradient checkpointing {'on' if shape.gradient_checkpointing else 'off'}, {gpus}")


def other_methods_assume(result: Estimate, advice: Recommendation) -> dict[str, list[str]]:
    """What the other methods' figures assume beyond the chosen one's (QLoRA's quantization, a mixture of experts'
    16-bit experts), each line with the labels of the methods that assume it."""
    lines: dict[str, list[str]] = {}
    for row in advice.rows:
        for line in row.estimate.assumptions:
            if row.method != result.method and line not in result.assumptions:
                lines.setdefault(line, []).append(row.label)
    return lines


def estimate_json(shape: RunShape, result: Estimate, advice: Recommendation) -> dict:
    """`tuner estimate --json`: the chosen method's estimate, the batch it is for, and every method's figures with
    their assumptions."""
    recommendation = advice.to_json()
    for row in advice.rows:
        recommendation["methods"][row.method]["assumptions"] = row.estimate.assumptions
    return {**result.to_json(), "per_device_train_batch_size": shape.batch_size, "cutoff_len": shape.seq_len,
            "gradient_checkpointing": shape.gradient_checkpointing, "num_gpus": shape.num_gpus,
            "strategy": strategy_of(shape), "recommendation": recommendation}


def render_estimate(model: str, shape: RunShape, result: Estimate, advice: Recommendation) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    console.print(Text(settings_line(shape), style="bold"))
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

    size, close = llamafactory_size(shape.geometry)
    columns = ["method", "estimate GiB", "LLaMA-Factory GB", "fits"] if close else ["method", "estimate GiB", "fits"]
    methods = Table(*columns, box=None, header_style="bold", title="every method, this model and these settings",
                    title_justify="left")
    for row in advice.rows:
        fits = "" if row.fits is None else "yes" if row.fits else "no"
        style = "bold green" if row.method == advice.method else ""
        cells = [Text(row.label, style=style), f"{row.estimate.total_gib:.1f}", str(row.llamafactory_gb), fits]
        methods.add_row(*(cells if close else cells[:2] + cells[3:]))
    console.print()
    console.print(methods)
    console.print(Text(f"  {llamafactory_caption(size, close)}", style="dim"))
    for row in advice.rows:
        if row.note:
            console.print(Text(f"  {row.label}: {row.note}"))
    for line, labels in other_methods_assume(result, advice).items():
        console.print(Text(f"  {', '.join(labels)} assume{'s' if len(labels) == 1 else ''} {line}", style="dim"))
    console.print()
    console.print(Text(advice.reason, style="bold"))
    if advice.why:
        console.print(Text(advice.why))
    for idea in advice.suggestions:
        console.print(f"  - {idea}")
