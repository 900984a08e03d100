"""``tuner preview``: the first samples exactly as the model will see them, the learned part marked, and length stats."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import TunerConfig


@dataclass
class PreviewSample:
    text: str
    prompt: str
    completion: str
    input_ids: list[int]
    labels: list[int]
    segments: list  # engine.templates.Segment, for display


@dataclass
class Preview:
    template: str
    samples: list[PreviewSample]
    stats: dict
    report: list[str]

    def to_json(self) -> dict:
        return {
            "template": self.template,
            "samples": [{"text": s.text, "prompt": s.prompt, "completion": s.completion, "input_ids": s.input_ids,
                         "labels": s.labels} for s in self.samples],
            "stats": self.stats,
            "report": self.report,
        }


def build_preview(cfg: TunerConfig, count: int = 3) -> Preview:
    """Render and tokenize every sample (for the stats) and keep the first ``count`` for display."""
    from engine.catalog import resolve_model
    from engine.data.loaders import load_conversations
    from engine.data.stats import length_stats
    from engine.data.tokenize import choose_template, encode_conversations
    from engine.modeling import load_tokenizer
    from engine.templates import get_template, render_segments, render_text

    resolved = resolve_model(cfg.model.model_name_or_path)
    tokenizer = load_tokenizer(resolved.path, cfg)
    d = cfg.data
    loaded = load_conversations(d.dataset, d.dataset_dir, max_samples=d.max_samples, val_size=d.val_size,
                                eval_dataset=d.eval_dataset, seed=cfg.train.seed)
    name = choose_template(cfg, tokenizer, resolved.spec.template if resolved.spec else None)
    template = get_template(name)
    encoded = encode_conversations(loaded.train, tokenizer, name, d.cutoff_len, d.train_on_prompt)
    samples = []
    for conversation in loaded.train:
        if len(samples) == count:
            break
        rows = encode_conversations([conversation], tokenizer, name, d.cutoff_len, d.train_on_prompt).rows
        if not rows:
            continue
        row, messages = rows[0], conversation["messages"]
        text = render_text(template, messages, tokenizer)
        prompt = render_text(template, messages[:-1], tokenizer, add_generation_prompt=True)
        completion = text[len(prompt):] if text.startswith(prompt) else ""
        samples.append(PreviewSample(text, prompt, completion, row["input_ids"], row["labels"],
                                     render_segments(template, messages, tokenizer)))
    report = loaded.report.lines() + [f"{n} dropped: {reason}" for reason, n in encoded.dropped.items()]
    return Preview(name, samples, length_stats(encoded.lengths, d.cutoff_len), report)


def render_preview(preview: Preview) -> None:
    """Print the samples with the learned text highlighted, then the token-length stats."""
    from rich.console import Console
    from rich.text import Text

    console = Console()
    for line in preview.report:
        console.print(Text(line, style="dim"))
    console.print(Text(f"template: {preview.template}   learned text is highlighted", style="bold"))
    for index, sample in enumerate(preview.samples):
        console.rule(f"sample {index}  ({len(sample.input_ids)} tokens, "
                     f"{sum(label != -100 for label in sample.labels)} learned)")
        text = Text()
        for segment in sample.segments:
            text.append(segment.text, style="black on green" if segment.learned else "")
        console.print(text)
    s = preview.stats
    console.rule("token lengths")
    console.print(f"samples {s['count']}  mean {s['mean']}  p50 {s['p50']}  p95 {s['p95']}  max {s['max']}  "
                  f"over cutoff_len: {s['over_cutoff']}")
