"""Prompt templates as data: turn a conversation into text pieces, token ids and label masks.

A conversation is the OpenAI message form: an optional system message, then user and assistant turns alternating,
starting with user. The templates themselves live in ``presets/templates.yaml``; ``auto`` means the tokenizer's own
``chat_template``.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.errors import UserError
from engine.paths import PRESETS_DIR

IGNORE_INDEX = -100
AUTO = "auto"
_PLACEHOLDER = re.compile(r"\{\{\s*(content|bos_token|eos_token)\s*\}\}")
_FORMATS = ("prefix", "system", "user", "assistant_prefix", "assistant", "separator")
_EXAMPLE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
_PROBES = (
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Still here."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Still here."},
    ],
)


@dataclass(frozen=True)
class Template:
    """One entry of templates.yaml; the file's header explains each field."""

    name: str
    description: str
    prefix: str = ""
    system: str = "{{content}}"
    system_in_user: bool = False
    default_system: str | None = None
    user: str = "{{content}}"
    assistant_prefix: str = ""
    assistant: str = "{{content}}{{eos_token}}"
    separator: str = ""
    trim: bool = True
    stop_words: tuple[str, ...] = ()
    bos_token: str = ""
    eos_token: str = ""
    from_tokenizer: bool = False


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; ``learned`` pieces are the assistant replies the model is trained to produce."""

    text: str
    learned: bool


@dataclass
class EncodedSample:
    """Token ids and labels of one conversation; labels are IGNORE_INDEX where the model is not trained."""

    input_ids: list[int]
    labels: list[int]
    first_learned: int | None = None


class NoLearnedTokens(UserError):
    """A conversation that would train on nothing: no assistant reply, or its first reply lies beyond cutoff_len.

    The data layer catches it to drop and count the sample.
    """


# --- the registry -----------------------------------------------------------------------------------------------


@functools.cache
def _templates() -> dict[str, Template]:
    with open(PRESETS_DIR / "templates.yaml", encoding="utf-8") as f:
        entries = yaml.safe_load(f)
    templates = {}
    for name, fields in entries.items():
        fields["stop_words"] = tuple(fields.get("stop_words", ()))
        template = Template(name=name, **fields)
        for turn in ("system", "user", "assistant"):
            if _PLACEHOLDER.findall(getattr(template, turn)).count("content") != 1:
                raise ValueError(f"templates.yaml: {name}.{turn} must contain {{{{content}}}} exactly once")
        templates[name] = template
    return templates


def template_names() -> list[str]:
    """All template names, ``auto`` included, in the order of templates.yaml."""
    return list(_templates())


def get_template(name: str) -> Template:
    """The template called ``name``; a UserError listing the known names, closest first, when there is none."""
    templates = _templates()
    if name in templates:
        return templates[name]
    by_closeness = difflib.get_close_matches(name, templates, n=len(templates), cutoff=0.0)
    close = difflib.get_close_matches(name, templates, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"unknown template {name!r}", hint=f"{guess}known templates: {', '.join(by_closeness)}")


def describe_templates() -> list[tuple[str, str, str]]:
    """(name, description, a one-turn conversation rendered on one line) per template, for ``tuner templates``."""
    rows = []
    for template in _templates().values():
        if template.from_tokenizer:
            example = "(the format saved with the model's tokenizer)"
        else:
            example = render_text(template, _EXAMPLE).replace("\n", "\\n")
        rows.append((template.name, template.description, example))
    return rows


# --- rendering --------------------------------------------------------------------------------------------------


def check_conversation(messages: list[dict]) -> None:
    """Raise a UserError naming the first message out of place (1-based), so a user can find it in their data."""
    rule = "a conversation is an optional system message, then user and assistant turns alternating, user first"
    if not messages:
        raise UserError("the conversation has no messages", hint=rule)
    offset = 1 if messages[0].get("role") == "system" else 0
    if len(messages) == offset:
        raise UserError("the conversation has only a system message", hint=rule)
    for i, message in enumerate(messages[offset:], start=offset):
        role = message.get("role")
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if role != expected:
            where = f"message {i + 1} of {len(messages)}"
            if role == "system":
                raise UserError(f"{where} is a system message: only the first message may be one", hint=rule)
            raise UserError(f"{where} has role {role!r} where {expected!r} was expected", hint=rule)
        if not isinstance(message.get("content"), str):
            raise UserError(f"message {i + 1} of {len(messages)} has no text content")


def render_segments(
    template: Template, messages: list[dict], tokenizer=None, *, add_generation_prompt: bool = False
) -> list[Segment]:
    """The whole conversation as text pieces, learned=True for every assistant reply and its end-of-turn tokens.

    With ``add_generation_prompt`` the text ends with the opening of an assistant turn, ready for generation.
    """
    check_conversation(messages)
    if template.from_tokenizer:
        return _tokenizer_segments(tokenizer, messages, add_generation_prompt)
    values = {attribute: _token(tokenizer, attribute, template) for attribute in ("bos_token", "eos_token")}

    def fill(fmt: str, content: str = "") -> str:
        return _PLACEHOLDER.sub(lambda m: content if m.group(1) == "content" else values[m.group(1)], fmt)

    def clean(text: str) -> str:
        return text.strip() if template.trim else text

    system, turns = _split_system(template, messages)
    pieces = [Segment(fill(template.prefix), False)]
    if system is not None and not template.system_in_user:
        pieces.append(Segment(fill(template.system, clean(system)), False))
    for i, message in enumerate(turns):
        if message["role"] == "user":
            content = message["content"]
            if i == 0 and system is not None and template.system_in_user:
                content = fill(template.system, clean(system)) + content
            pieces.append(Segment(fill(template.user, clean(content)), False))
        else:
            pieces.append(Segment(fill(template.assistant_prefix), False))
            pieces.append(Segment(fill(template.assistant, clean(message["content"])), True))
            pieces.append(Segment(fill(template.separator), False))
    if add_generation_prompt:
        pieces.append(Segment(fill(template.assistant_prefix), False))
    return _merge(pieces)


def render_text(
    template: Template, messages: list[dict], tokenizer=None, *, add_generation_prompt: bool = False
) -> str:
    """The conversation as one string, exactly what ``encode`` tokenizes."""
    segments = render_segments(template, messages, tokenizer, add_generation_prompt=add_generation_prompt)
    return "".join(s.text for s in segments)


def _token(tokenizer, attribute: str, template: Template) -> str:
    """The tokenizer's bos/eos string, or the template's own literal when the tokenizer has none."""
    return getattr(tokenizer, attribute, None) or getattr(template, attribute)


def _split_system(template: Template, messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return template.default_system, messages


def _merge(pieces: list[Segment]) -> list[Segment]:
    """Join neighbours of the same kind and drop empty pieces: fewer boundaries, closer to how the text tokenizes."""
    merged: list[Segment] = []
    for piece in pieces:
        if not piece.text:
            continue
        if merged and merged[-1].learned == piece.learned:
            merged[-1] = Segment(merged[-1].text + piece.text, piece.learned)
        else:
            merged.append(piece)
    return merged


def _tokenizer_segments(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
    """Render with the tokenizer's chat_template; each reply is what rendering up to it adds to its prompt.

    Whitespace after a reply (the newline between turns) is left unlearned, as the named templates' separators are.
    """
    from jinja2.exceptions import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        missing = "there is no tokenizer" if tokenizer is None else "this tokenizer has none"
        raise UserError(
            f"template 'auto' means the tokenizer's own chat_template, and {missing}",
            hint=f"choose a named template: {', '.join(n for n in template_names() if n != AUTO)}",
        )

    def render(conversation: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as e:
            raise UserError(f"the tokenizer's chat_template rejected the conversation: {e}") from e

    full = render(messages, add_generation_prompt)
    segments, start = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[:i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise UserError(
                "the tokenizer's chat_template renders the start of a conversation differently from the whole, "
                "so its replies cannot be located",
                hint="choose a named template instead of 'auto'",
            )
        reply_end = len(prompt) + len(upto[len(prompt):].rstrip())
        segments += [Segment(full[start:len(prompt)], False), Segment(full[len(prompt):reply_end], True)]
        start = reply_end
    segments.append(Segment(full[start:], False))
    return _merge(segments)


# --- tokens and labels ------------------------------------------------------------------------------------------


def encode(tokenizer, template: Template, messages: list[dict], cutoff_len: int | None = None) -> EncodedSample:
    """Token ids and labels, keeping the first ``cutoff_len`` tokens.

    Each segment is tokenized on its own (special tokens written in the text become their ids), so labels align
    exactly with the learned text. Raises NoLearnedTokens when nothing would be learned.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in render_segments(template, messages, tokenizer):
        ids = tokenizer.encode(segment.text, add_special_tokens=False)
        input_ids += ids
        labels += ids if segment.learned else [IGNORE_INDEX] * len(ids)
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first is None:
        raise NoLearnedTokens("the conversation has no assistant reply to learn from")
    if cutoff_len is not None and first >= cutoff_len:
        raise NoLearnedTokens(
            f"the first assistant reply starts at token {first}, beyond cutoff_len={cutoff_len}",
            hint="raise cutoff_len or shorten the prompt",
        )
    return EncodedSample(input_ids[:cutoff_len], labels[:cutoff_len])


def encode_many(tokenizer, template: Template, conversations: list[list[dict]]) -> list[EncodedSample | None]:
    """``encode`` for many conversations at once (no cutoff): every segment of every conversation goes to the
    tokenizer in one batch call, which a fast tokenizer runs in Rust. None for a conversation with nothing to learn;
    ``first_learned`` of each sample is the position of its first learned token."""
    rendered = [render_segments(template, messages, tokenizer) for messages in conversations]
    ids = iter(tokenize_texts(tokenizer, [segment.text for segments in rendered for segment in segments]))
    samples: list[EncodedSample | None] = []
    for segments in rendered:
        input_ids: list[int] = []
        labels: list[int] = []
        first = None
        for segment in segments:
            piece = next(ids)
            if segment.learned:
                if first is None and piece:
                    first = len(input_ids)
                labels += piece
            else:
                labels += [IGNORE_INDEX] * len(piece)
            input_ids += piece
        samples.append(None if first is None else EncodedSample(input_ids, labels, first))
    return samples


def tokenize_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, special tokens written in it becoming their ids, none added: the Rust tokenizer's own
    batch call when there is one (the same ids as ``tokenizer.encode(text, add_special_tokens=False)``)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# --- Hugging Face chat_template ---------------------------------------------------------------------------------


def to_chat_template(template: Template) -> str:
    """The template as a Jinja ``chat_template``, so an exported model's tokenizer renders what it was trained on."""
    if template.from_tokenizer:
        raise UserError("template 'auto' has no format of its own: it is the tokenizer's chat_template")
    content = "(content | trim)" if template.trim else "content"
    default = _literal(template.default_system) if template.default_system is not None else "none"
    lines = [
        f"{{%- set {var} = {var}_token if {var}_token else {_literal(getattr(template, var + '_token'))} -%}}"
        for var in ("bos", "eos")
        if any(f"{var}_token" in _PLACEHOLDER.findall(getattr(template, field)) for field in _FORMATS)
    ]
    lines += [
        "{%- if messages[0]['role'] == 'system' -%}",
        f"{{%- set system = messages[0]['content']{' | trim' if template.trim else ''} -%}}",
        "{%- set messages = messages[1:] -%}",
        "{%- else -%}",
        f"{{%- set system = {default} -%}}",
        "{%- endif -%}",
        _output(_parts(template.prefix)),
    ]
    if not template.system_in_user:
        lines.append(f"{{%- if system is not none -%}}{_output(_parts(template.system, 'system'))}{{%- endif -%}}")
    lines += [
        "{%- for message in messages -%}",
        "{%- if message['role'] not in ['user', 'assistant'] or "
        "(message['role'] == 'user') != (loop.index0 % 2 == 0) -%}",
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}",
        "{%- endif -%}",
        "{%- set content = message['content'] -%}",
    ]
    if template.system_in_user:
        folded = " + ".join(_parts(template.system, "system") + ["content"])
        lines.append(f"{{%- if loop.first and system is not none -%}}{{%- set content = {folded} -%}}{{%- endif -%}}")
    reply = _parts(template.assistant_prefix) + _parts(template.assistant, content) + _parts(template.separator)
    lines += [
        "{%- if message['role'] == 'user' -%}",
        _output(_parts(template.user, content)),
        "{%- else -%}",
        _output(reply),
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    if template.assistant_prefix:
        lines.append(f"{{%- if add_generation_prompt -%}}{_output(_parts(template.assistant_prefix))}{{%- endif -%}}")
    return "\n".join(line for line in lines if line)


def _parts(fmt: str, content: str = "") -> list[str]:
    """A format string as Jinja expressions: string literals, the content expression, the bos and eos variables."""
    variables = {"content": content, "bos_token": "bos", "eos_token": "eos"}
    parts = []
    for i, piece in enumerate(_PLACEHOLDER.split(fmt)):
        is_placeholder = i % 2 == 1
        if is_placeholder and variables[piece]:
            parts.append(variables[piece])
        elif not is_placeholder and piece:
            parts.append(_literal(piece))
    return parts


def _output(parts: list[str]) -> str:
    return f"{{{{- {' + '.join(parts)} -}}}}" if parts else ""


def _literal(text: str) -> str:
    """A Jinja string literal; braces and % are escaped so they can never close the surrounding tag."""
    return json.dumps(text).replace("{", "\\u007b").replace("}", "\\u007d").replace("%", "\\u0025")


def template_mismatch(template: Template, tokenizer) -> str | None:
    """A one-line warning when the tokenizer's own chat_template renders a probe conversation differently.

    Training in one format and prompting in another makes models that never stop. Probes the tokenizer's template
    refuses (e.g. a system message) are skipped.
    """
    from jinja2.exceptions import TemplateError

    if template.from_tokenizer or not getattr(tokenizer, "chat_template", None):
        return None
    for probe in _PROBES:
        try:
            theirs = tokenizer.apply_chat_template(probe, tokenize=False)
        except TemplateError:
            continue
        ours = render_text(template, probe, tokenizer)
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            source = str(getattr(tokenizer, "name_or_path", "") or "this model")
            source = Path(source).name if Path(source).is_absolute() else source  # a directory: its name
            return (
                f"template {template.name!r} differs from the chat_template of {source} "
                f"(ours: {ours[at:at + 30]!r}, theirs: {theirs[at:at + 30]!r}); a model trained in one format and "
                "prompted in the other may never stop: consider template 'auto'"
            )
    return None
