"""``tuner preview``: the first samples exactly as the model will see them, the learned part marked, length stats and
a histogram cut at cutoff_len, and whether the template matches the model's own chat_template."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.config.schema import TunerConfig
from engine.data.stats import Bucket

BAR_BLOCKS = " ▏▎▍▌▋▊▉█"


@dataclass
class PreviewSample:
    text: str
    prompt: str
    completion: str
    input_ids: list[int]
    labels: list[int]
    segments: list  # engine.templates.Segment, for display
    label: bool | None = None  # stage kto: whether the reply is desirable (kto_tag)


@dataclass
class PairSample:
    """A preference pair as stage dpo trains on it: the prompt as rendered, each reply as it follows the prompt
    (the learned part), and their token counts after cutoff_len."""

    prompt: str
    chosen: str
    rejected: str
    tokens: dict  # {"prompt": n, "chosen": n, "rejected": n}


@dataclass
class TemplateCheck:
    """The template a run would use and how it compares with the tokenizer's own chat_template."""

    template: str
    has_chat_template: bool
    warning: str | None  # set when the template renders a sample conversation differently from the chat_template


@dataclass
class Preview:
    template: str
    samples: list[PreviewSample]
    stats: dict
    report: list[str]
    cutoff_len: int
    histogram: list[Bucket]
    template_warning: str | None
    pairs: list[PairSample] = field(default_factory=list)  # stage dpo: the pairs shown instead of samples

    def to_json(self) -> dict:
        return {
            "template": self.template,
            "template_warning": self.template_warning,
            "samples": [{"text": s.text, "prompt": s.prompt, "completion": s.completion, "input_ids": s.input_ids,
                         "labels": s.labels, **({} if s.label is None else {"desirable": s.label})}
                        for s in self.samples],
            "pairs": [asdict(pair) for pair in self.pairs],
            "stats": self.stats,
            "cutoff_len": self.cutoff_len,
            "histogram": [asdict(bucket) for bucket in self.histogram],
            "report": self.report,
        }


def check_template(cfg: TunerConfig) -> TemplateCheck:
    """Whether the template ``cfg`` chooses renders like the model's own chat_template; loads only the tokenizer."""
    from engine.models.resolve import resolve_configured
    from engine.models.loading import load_tokenizer

    resolved = resolve_configured(cfg.model, check_room=False)  # the tokenizer only
    tokenizer = load_tokenizer(resolved.path, cfg)
    return _compare_template(cfg, tokenizer, resolved.spec.template if resolved.spec else None)


def _compare_template(cfg: TunerConfig, tokenizer, catalog_template: str | None) -> TemplateCheck:
    from engine.data.tokenize import choose_template
    from engine.templates import get_template, template_mismatch

    name = choose_template(cfg, tokenizer, catalog_template)
    return TemplateCheck(name, bool(getattr(tokenizer, "chat_template", None)),
                         template_mismatch(get_template(name), tokenizer))


def build_preview(cfg: TunerConfig, count: int = 3) -> Preview:
    """Render and tokenize every sample (for the stats) and keep the first ``count`` for display."""
    from engine.models.resolve import resolve_configured
    from engine.data.loaders import load_conversations
    from engine.data.stats import length_histogram, length_stats
    from engine.data.tokenize import encode_conversations, training_template
    from engine.models.loading import load_tokenizer
    from engine.templates import render_segments, render_text

    resolved = resolve_configured(cfg.model, check_room=False)  # the tokenizer only
    tokenizer = load_tokenizer(resolved.path, cfg)
    if cfg.finetune.stage in ("dpo", "rm"):  # a reward model reads its pairs as DPO does
        return _pair_preview(cfg, tokenizer, resolved.spec.template if resolved.spec else None, count)
    if cfg.finetune.stage == "kto":
        return _feedback_preview(cfg, tokenizer, resolved.spec.template if resolved.spec else None, count)
    if cfg.finetune.stage == "pt":
        return _text_preview(cfg, tokenizer, count)
    d = cfg.data
    loaded = load_conversations(d.dataset, d.dataset_dir, max_samples=d.max_samples, val_size=d.val_size,
                                eval_dataset=d.eval_dataset, seed=cfg.train.seed)
    check = _compare_template(cfg, tokenizer, resolved.spec.template if resolved.spec else None)
    name = check.template
    template = training_template(name, d.default_system)
    options = {"mask_history": d.mask_history, "default_system": d.default_system}
    encoded = encode_conversations(loaded.train, tokenizer, name, d.cutoff_len, d.train_on_prompt, **options)
    samples = []
    for conversation in loaded.train:
        if len(samples) == count:
            break
        rows = encode_conversations([conversation], tokenizer, name, d.cutoff_len, d.train_on_prompt, **options).rows
        if not rows:
            continue
        row, messages, tools = rows[0], conversation["messages"], conversation.get("tools")
        text = render_text(template, messages, tokenizer, tools=tools)
        prompt = render_text(template, messages[:-1], tokenizer, add_generation_prompt=True, tools=tools)
        completion = text[len(prompt):] if text.startswith(prompt) else ""
        samples.append(PreviewSample(text, prompt, completion, row["input_ids"], row["labels"],
                                     render_segments(template, messages, tokenizer, tools=tools)))
    report = loaded.report.lines() + [f"{n} dropped: {reason}" for reason, n in encoded.dropped.items()]
    return Preview(name, samples, length_stats(encoded.lengths, d.cutoff_len), report, d.cutoff_len,
                   length_histogram(encoded.lengths, d.cutoff_len), check.warning)


def _pair_preview(cfg: TunerConfig, tokenizer, catalog_template: str | None, count: int) -> Preview:
    """Stage dpo's (and rm's) preview: the first pairs rendered as the model sees them, the stats of the prompt and
    longer reply (what cutoff_len cuts)."""
    from engine.data.pairs import encode_pairs
    from engine.data.stats import length_histogram, length_stats
    from engine.templates import render_text

    d = cfg.data
    loaded, check, template = _preference_data(cfg, tokenizer, catalog_template, "pairs")
    rows, dropped, lengths, _ = encode_pairs(loaded.train, tokenizer, check.template, d.cutoff_len, d.default_system)
    shown = []
    for pair in loaded.train[:count]:
        messages, tools = pair["messages"], pair.get("tools")
        prompt = render_text(template, messages, tokenizer, add_generation_prompt=True, tools=tools)
        replies = {}
        for key in ("chosen", "rejected"):
            text = render_text(template, [*messages, {"role": "assistant", "content": pair[key]}], tokenizer,
                               tools=tools)
            replies[key] = text[len(prompt):] if text.startswith(prompt) else pair[key]
        rows, *_ = encode_pairs([pair], tokenizer, check.template, d.cutoff_len, d.default_system)
        if not rows:
            continue  # nothing of it left within cutoff_len: the report counts it
        row = rows[0]
        shown.append(PairSample(prompt, replies["chosen"], replies["rejected"],
                                {key: len(row[f"{key}_ids"]) for key in ("prompt", "chosen", "rejected")}))
    report = loaded.report.lines() + [f"{n} dropped: {reason}" for reason, n in dropped.items()]
    return Preview(check.template, [], length_stats(lengths, d.cutoff_len), report, d.cutoff_len,
                   length_histogram(lengths, d.cutoff_len), check.warning, shown)


def _preference_data(cfg: TunerConfig, tokenizer, catalog_template: str | None, kind: str):
    """A preference stage's samples (``kind`` pairs or feedback), the template check and the template itself."""
    from engine.data.loaders import load_conversations
    from engine.data.tokenize import training_template

    d = cfg.data
    loaded = load_conversations(d.dataset, d.dataset_dir, max_samples=d.max_samples, val_size=d.val_size,
                                eval_dataset=d.eval_dataset, seed=cfg.train.seed, kind=kind)
    check = _compare_template(cfg, tokenizer, catalog_template)
    return loaded, check, training_template(check.template, d.default_system)


def _feedback_preview(cfg: TunerConfig, tokenizer, catalog_template: str | None, count: int) -> Preview:
    """Stage kto's preview: the first samples as the model sees them, the reply (what the loss judges) marked and
    said desirable or not, and the stats of the prompt and reply (what cutoff_len cuts)."""
    from engine.data.pairs import encode_feedback
    from engine.data.stats import length_histogram, length_stats
    from engine.templates import Segment, render_text

    d = cfg.data
    loaded, check, template = _preference_data(cfg, tokenizer, catalog_template, "feedback")
    _, dropped, lengths, _ = encode_feedback(loaded.train, tokenizer, check.template, d.cutoff_len, d.default_system)
    shown = []
    for sample in loaded.train:
        if len(shown) == count:
            break
        rows, *_ = encode_feedback([sample], tokenizer, check.template, d.cutoff_len, d.default_system)
        if not rows:
            continue  # nothing of it left within cutoff_len: the report counts it
        messages, tools, row = sample["messages"], sample.get("tools"), rows[0]
        text = render_text(template, messages, tokenizer, tools=tools)
        prompt = render_text(template, messages[:-1], tokenizer, add_generation_prompt=True, tools=tools)
        reply = text[len(prompt):] if text.startswith(prompt) else messages[-1]["content"]
        ids = row["prompt_ids"] + row["completion_ids"]
        shown.append(PreviewSample(prompt + reply, prompt, reply, ids,
                                   [-100] * len(row["prompt_ids"]) + row["completion_ids"],
                                   [Segment(prompt, False), Segment(reply, True)], label=sample["label"]))
    report = loaded.report.lines() + [f"{n} dropped: {reason}" for reason, n in dropped.items()]
    return Preview(check.template, shown, length_stats(lengths, d.cutoff_len), report, d.cutoff_len,
                   length_histogram(lengths, d.cutoff_len), check.warning)


def _text_preview(cfg: TunerConfig, tokenizer, count: int) -> Preview:
    """Stage pt's preview: the first blocks of cutoff_len tokens as the model reads them (all learned), and the
    lengths of the texts they were joined from. Cut here, not through the cache a run fills (engine.data.texts)."""
    from engine.data.loaders import load_conversations
    from engine.data.stats import length_histogram, length_stats
    from engine.data.texts import text_blocks
    from engine.templates import Segment, tokenize_texts

    d = cfg.data
    loaded = load_conversations(d.dataset, d.dataset_dir, max_samples=d.max_samples, seed=cfg.train.seed,
                                kind="text")
    texts = [entry["text"] for entry in loaded.train]
    blocks, left = text_blocks(texts, tokenizer, d.cutoff_len)
    samples = []
    for block in blocks[:count]:
        text = tokenizer.decode(block)
        samples.append(PreviewSample(text, "", text, block, block, [Segment(text, True)]))
    lengths = [len(ids) + 1 for ids in tokenize_texts(tokenizer, texts)]
    report = loaded.report.lines() + [f"train: {len(texts)} texts joined into {len(blocks)} blocks of {d.cutoff_len} "
                                      "tokens" + (f"; the last {left} tokens, short of a block, left out" if left
                                                  else "")]
    return Preview("none (raw text)", samples, length_stats(lengths, d.cutoff_len), report, d.cutoff_len,
                   length_histogram(lengths, d.cutoff_len), None)


def histogram_lines(preview: Preview, bar_width: int = 40) -> list[tuple[str, str]]:
    """The histogram as text lines, each with its kind: "within" or "over" cutoff_len, or "cutoff" for the line that
    marks it, between the buckets within and those over. Bars are scaled to the fullest bucket."""
    buckets = preview.histogram
    if not buckets:
        return []
    digits = len(str(buckets[-1].high))
    fullest = max(bucket.count for bucket in buckets)

    def line(bucket: Bucket) -> tuple[str, str]:
        bar = _bar(bucket.count / fullest * bar_width)
        return (f"{bucket.low:>{digits}}–{bucket.high:<{digits}} {bar:<{bar_width}} {bucket.count}",
                "over" if bucket.over_cutoff else "within")

    s = preview.stats
    marker = (f"{'┄' * (2 * digits + 1)} cutoff_len {preview.cutoff_len}: {s['over_cutoff']} of {s['count']} longer "
              "┄┄┄")
    return ([line(bucket) for bucket in buckets if not bucket.over_cutoff] + [(marker, "cutoff")]
            + [line(bucket) for bucket in buckets if bucket.over_cutoff])


def _bar(cells: float) -> str:
    """``cells`` character cells of bar in eighths; any count above zero shows at least an eighth."""
    eighths = max(round(cells * 8), 1 if cells > 0 else 0)
    full, part = divmod(eighths, 8)
    return "█" * full + BAR_BLOCKS[part].strip()
