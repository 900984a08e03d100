"""`tuner preview` in the terminal: the samples with the learned text highlighted, then the token-length stats."""

from __future__ import annotations

from engine.data.preview import Preview, histogram_lines
from engine.rundir.files import printable


def render_preview(preview: Preview) -> None:
    """Print the samples with the learned text highlighted, then the token-length stats."""
    from rich.console import Console
    from rich.text import Text

    console = Console()
    for line in preview.report:
        console.print(Text(line, style="dim"))
    console.print(Text(f"template: {preview.template}   learned text is highlighted", style="bold"))
    if preview.template_warning:
        console.print(Text(f"warning: {preview.template_warning}", style="yellow"))
    for index, pair in enumerate(preview.pairs):
        tokens = pair.tokens
        console.rule(f"pair {index}  (prompt {tokens['prompt']} tokens, chosen {tokens['chosen']}, rejected "
                     f"{tokens['rejected']})")
        console.print(Text(printable(pair.prompt)))
        console.print(Text("chosen:   ", style="bold") + Text(printable(pair.chosen), style="black on green"))
        console.print(Text("rejected: ", style="bold") + Text(printable(pair.rejected), style="black on red"))
    for index, sample in enumerate(preview.samples):
        judged = "" if sample.label is None else ", the reply desirable" if sample.label else ", the reply undesirable"
        console.rule(f"sample {index}  ({len(sample.input_ids)} tokens, "
                     f"{sum(label != -100 for label in sample.labels)} learned{judged})")
        text = Text()
        reply_style = "black on red" if sample.label is False else "black on green"
        for segment in sample.segments:
            text.append(printable(segment.text), style=reply_style if segment.learned else "")
        console.print(text)
    s = preview.stats
    console.rule("token lengths")
    console.print(f"samples {s['count']}  mean {s['mean']}  p50 {s['p50']}  p95 {s['p95']}  max {s['max']}  "
                  f"over cutoff_len: {s['over_cutoff']}")
    styles = {"within": "", "over": "yellow", "cutoff": "bold"}
    for line, kind in histogram_lines(preview):
        console.print(Text(line, style=styles[kind]))
