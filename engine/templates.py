"""Prompt templates as data: turn a conversation into text pieces, token ids and label masks.

A conversation is the OpenAI message form: an optional system message, then user and assistant turns alternating,
starting with user; an assistant turn may call tools (``tool_calls``), answered by ``tool`` messages before the next
assistant turn, with the tools' schemas given beside the messages as a JSON string. The templates themselves live in
``presets/templates.yaml``; ``auto`` means the tokenizer's own ``chat_template``.
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
from engine.tool_formats import TOOL_FORMATS, function_text, parse_tools, tool_calls, tool_prompt

IGNORE_INDEX = -100
AUTO = "auto"
_PLACEHOLDER = re.compile(r"\{\{\s*(content|bos_token|eos_token)\s*\}\}")
_FORMATS = ("prefix", "system", "user", "assistant_prefix", "assistant")
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
    observation: str | None = None
    observation_join: str | None = None
    function: str | None = None
    tool_format: str = "default"
    thought_words: tuple[str, str] | None = None
    efficient_eos: bool = False
    trim: bool = False
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


class NoLearnedTokens(UserError):
    """A conversation that would train on nothing: no assistant reply, or none left within cutoff_len.

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
        if "thought_words" in fields:
            fields["thought_words"] = tuple(fields["thought_words"])
        template = Template(name=name, **fields)
        for turn in ("system", "user", "assistant", "observation", "function"):
            fmt = getattr(template, turn)
            if fmt is not None and _PLACEHOLDER.findall(fmt).count("content") != 1:
                raise ValueError(f"templates.yaml: {name}.{turn} must contain {{{{content}}}} exactly once")
        if template.tool_format not in TOOL_FORMATS:
            raise ValueError(f"templates.yaml: {name}.tool_format must be one of {', '.join(TOOL_FORMATS)}")
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

_RULE = (
    "a conversation is an optional system message, then user and assistant turns alternating, user first; "
    "an assistant turn that calls tools is followed by one tool message per result, then the assistant again"
)


def check_conversation(messages: list[dict]) -> None:
    """Raise a UserError naming the first message out of place (1-based), so a user can find it in their data."""
    if not messages:
        raise UserError("the conversation has no messages", hint=_RULE)
    offset = 1 if messages[0].get("role") == "system" else 0
    if len(messages) == offset:
        raise UserError("the conversation has only a system message", hint=_RULE)
    previous = None
    for i, message in enumerate(messages[offset:], start=offset):
        where = f"message {i + 1} of {len(messages)}"
        role, expected = message.get("role"), _expected_roles(previous)
        if role not in expected:
            if role == "system":
                raise UserError(f"{where} is a system message: only the first message may be one", hint=_RULE)
            wanted = " or ".join(repr(r) for r in expected)
            raise UserError(f"{where} has role {role!r} where {wanted} was expected", hint=_RULE)
        if role == "assistant" and message.get("tool_calls"):
            tool_calls(message, where)
        elif not isinstance(message.get("content"), str):
            raise UserError(f"{where} has no text content")
        previous = message


def _expected_roles(previous: dict | None) -> tuple[str, ...]:
    if previous is None:
        return ("user",)
    if previous["role"] == "user":
        return ("assistant",)
    if previous["role"] == "tool":
        return ("tool", "assistant")
    return ("tool",) if previous.get("tool_calls") else ("user",)


def render_segments(
    template: Template, messages: list[dict], tokenizer=None, *, add_generation_prompt: bool = False,
    tools: str | None = None,
) -> list[Segment]:
    """The whole conversation as text pieces, learned=True for every assistant reply and its end-of-turn tokens.

    With ``add_generation_prompt`` the text ends with the opening of an assistant turn, ready for generation;
    ``tools`` is the JSON list of function schemas the conversation may call.
    """
    check_conversation(messages)
    if template.from_tokenizer:
        return _tokenizer_segments(tokenizer, _with_default_system(template, messages), add_generation_prompt, tools)
    pieces = _pieces(template, messages, tokenizer, add_generation_prompt, tools)
    if template.efficient_eos and not add_generation_prompt and messages[-1]["role"] == "assistant":
        pieces.append(Segment(_token(tokenizer, "eos_token", template), True))
    return _merge(pieces)


def render_text(
    template: Template, messages: list[dict], tokenizer=None, *, add_generation_prompt: bool = False,
    tools: str | None = None,
) -> str:
    """The conversation as one string, exactly what ``encode`` tokenizes."""
    segments = render_segments(template, messages, tokenizer, add_generation_prompt=add_generation_prompt,
                               tools=tools)
    return "".join(s.text for s in segments)


def _pieces(template: Template, messages: list[dict], tokenizer, add_generation_prompt: bool,
            tools: str | None) -> list[Segment]:
    """The named template's pieces, as LLaMA-Factory lays them out: the tools' description follows the system
    prompt, a tool result takes the observation format, a reply that calls tools the function format."""
    values = {attribute: _token(tokenizer, attribute, template) for attribute in ("bos_token", "eos_token")}

    def fill(fmt: str, content: str = "") -> str:
        return _PLACEHOLDER.sub(lambda m: content if m.group(1) == "content" else values[m.group(1)], fmt)

    def clean(text: str) -> str:
        return text.strip() if template.trim else text

    system, turns = _split_system(template, messages)
    tool_text = tool_prompt(template.tool_format, parse_tools(tools))
    system_text = fill(template.system, clean(system or "") + tool_text) if system or tool_text else ""
    pieces = [Segment(fill(template.prefix), False)]
    if not template.system_in_user:
        pieces.append(Segment(system_text, False))
    for i, message in enumerate(_joined_results(template, turns)):
        if message["role"] == "assistant":
            pieces.append(Segment(fill(template.assistant_prefix), False))
            pieces.append(Segment(_reply(template, message, fill, clean), True))
        elif message["role"] == "tool":
            pieces.append(Segment(fill(template.observation or template.user, clean(message["content"])), False))
        else:
            content = message["content"]
            if i == 0 and template.system_in_user:
                content = system_text + content
            pieces.append(Segment(fill(template.user, clean(content)), False))
    if add_generation_prompt:
        pieces.append(Segment(fill(template.assistant_prefix), False))
    return pieces


def _joined_results(template: Template, turns: list[dict]) -> list[dict]:
    """Consecutive tool results as one observation, joined by ``observation_join``, for the templates whose
    published format answers several calls in one turn (Qwen's <tool_response> blocks); the others keep one turn
    per result."""
    if template.observation_join is None:
        return turns
    joined: list[dict] = []
    for message in turns:
        if message["role"] == "tool" and joined and joined[-1]["role"] == "tool":
            joined[-1] = {"role": "tool", "content": joined[-1]["content"] + template.observation_join +
                          message["content"]}
        else:
            joined.append(message)
    return joined


def _reply(template: Template, message: dict, fill, clean) -> str:
    """An assistant turn's learned text: its calls in the template's tool format, and for a reasoning template an
    empty thought in front when the reply has none (LLaMA-Factory's ReasoningTemplate, thinking enabled)."""
    raw = message.get("content") or ""
    content, fmt = clean(raw), template.assistant
    calls = tool_calls(message) if message.get("tool_calls") else []
    if calls:
        text = function_text(template.tool_format, calls)
        content, fmt = (f"{content}\n{text}" if content else text), template.function or template.assistant
    thought = ""
    if template.thought_words and not any(word.strip() in raw for word in template.thought_words):
        thought = "".join(template.thought_words)
    return thought + fill(fmt, content)


def _token(tokenizer, attribute: str, template: Template) -> str:
    """The tokenizer's bos/eos string, or the template's own literal when the tokenizer has none."""
    return getattr(tokenizer, attribute, None) or getattr(template, attribute)


def _split_system(template: Template, messages: list[dict]) -> tuple[str | None, list[dict]]:
    """The system prompt (an empty one gives way to the default, as in LLaMA-Factory) and the turns after it."""
    if messages[0]["role"] == "system":
        return messages[0]["content"] or template.default_system, messages[1:]
    return template.default_system, messages


def _with_default_system(template: Template, messages: list[dict]) -> list[dict]:
    """For ``auto``: a default system prompt given to it (data.default_system) as the conversation's system message."""
    if template.default_system is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": template.default_system}, *messages]


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


def _for_chat_template(message: dict) -> dict:
    """A message as Hugging Face chat templates expect it: tool-call arguments as a mapping (they write them with
    ``tojson``; our data holds them as JSON text), no ``tool_calls: None`` left by a datasets round trip."""
    message = {key: value for key, value in message.items() if value is not None or key == "content"}
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            function = dict(call.get("function") or {})
            if isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    pass  # left as written: tool_calls() names the problem where the named templates render it
            calls.append({**call, "function": function})
        message["tool_calls"] = calls
    return message


def _tokenizer_segments(tokenizer, messages: list[dict], add_generation_prompt: bool,
                        tools: str | None) -> list[Segment]:
    """Render with the tokenizer's chat_template (the messages and tools as they are); each reply is all that
    rendering up to it adds to its prompt, the whitespace after its end-of-turn token included, as LLaMA-Factory
    learns it."""
    from jinja2.exceptions import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        missing = "there is no tokenizer" if tokenizer is None else "this tokenizer has none"
        raise UserError(
            f"template 'auto' means the tokenizer's own chat_template, and {missing}",
            hint=f"choose a named template: {', '.join(n for n in template_names() if n != AUTO)}",
        )
    schemas = parse_tools(tools) or None
    messages = [_for_chat_template(message) for message in messages]

    def render(conversation: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(conversation, tools=schemas, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
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
        segments += [Segment(full[start:len(prompt)], False), Segment(full[len(prompt):len(upto)], True)]
        start = len(upto)
    segments.append(Segment(full[start:], False))
    return _merge(segments)


# --- tokens and labels ------------------------------------------------------------------------------------------


@dataclass
class EncodedTurns:
    """A conversation's token ids as (prompt, reply) pairs, one per assistant reply, as LLaMA-Factory's
    ``encode_multiturn`` gives them (text after the last reply is a last pair with no reply); ``sample`` cuts them
    to cutoff_len and labels them."""

    pairs: list[tuple[list[int], list[int]]]
    eos_id: int | None = None  # efficient_eos: one eos closes the conversation, learned

    @property
    def length(self) -> int:
        """Tokens before truncation."""
        return sum(len(source) + len(target) for source, target in self.pairs) + (self.eos_id is not None)

    def sample(self, cutoff_len: int | None = None, *, train_on_prompt: bool = False,
               mask_history: bool = False) -> EncodedSample:
        """Ids and labels, cut as LLaMA-Factory's supervised processor cuts: turn by turn, each (prompt, reply) pair
        gets its share of what is left of cutoff_len (``infer_seqlen``), until none is left. With ``mask_history``
        only the last reply is learned, and turns are taken from the last back, so it is the one that survives."""
        if train_on_prompt and self.eos_id is not None:
            raise UserError("this template (efficient_eos) cannot train on the prompt, as in LLaMA-Factory",
                            hint="set train_on_prompt: false or choose another template")
        order = list(enumerate(self.pairs))
        if mask_history:
            order.reverse()
        last = max((i for i, (_, target) in order if target), default=None)
        total = 1 if self.eos_id is not None else 0
        input_ids: list[int] = []
        labels: list[int] = []
        for turn, (i, (source, target)) in enumerate(order):
            if cutoff_len is not None:
                if total >= cutoff_len:
                    break
                source_len, target_len = infer_seqlen(len(source), len(target), cutoff_len - total)
                source, target = source[:source_len], target[:target_len]
            total += len(source) + len(target)
            if train_on_prompt:
                source_labels = list(source)
            elif self.eos_id is not None and turn != 0 and source:
                source_labels = [self.eos_id] + [IGNORE_INDEX] * (len(source) - 1)
            else:
                source_labels = [IGNORE_INDEX] * len(source)
            target_labels = [IGNORE_INDEX] * len(target) if mask_history and i != last else list(target)
            if mask_history:
                input_ids, labels = source + target + input_ids, source_labels + target_labels + labels
            else:
                input_ids, labels = input_ids + source + target, labels + source_labels + target_labels
        if self.eos_id is not None:
            input_ids, labels = input_ids + [self.eos_id], labels + [self.eos_id]
        return EncodedSample(input_ids, labels)


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's share of ``cutoff_len`` for a (prompt, reply) pair: a short reply keeps all its tokens, else
    a short prompt does, else both shrink in proportion to their lengths."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    max_source_len = max(cutoff_len - new_target_len, 0)
    return min(max_source_len, source_len), new_target_len


def encode(tokenizer, template: Template, messages: list[dict], cutoff_len: int | None = None, *,
           tools: str | None = None, train_on_prompt: bool = False, mask_history: bool = False) -> EncodedSample:
    """Token ids and labels, cut to ``cutoff_len`` as ``EncodedTurns.sample`` does.

    Each segment is tokenized on its own (special tokens written in the text become their ids), so labels align
    exactly with the learned text. Raises NoLearnedTokens when nothing would be learned.
    """
    turns = encode_many(tokenizer, template, [messages], [tools])[0]
    if turns is None:
        raise NoLearnedTokens("the conversation has no assistant reply to learn from")
    sample = turns.sample(cutoff_len, train_on_prompt=train_on_prompt, mask_history=mask_history)
    if all(label == IGNORE_INDEX for label in sample.labels):
        raise NoLearnedTokens(f"no reply is left to learn within cutoff_len={cutoff_len}", hint="raise cutoff_len")
    return sample


def encode_many(tokenizer, template: Template, conversations: list[list[dict]],
                tools: list[str | None] | None = None) -> list[EncodedTurns | None]:
    """The (prompt, reply) pairs of many conversations at once: every segment of every conversation goes to the
    tokenizer in one batch call, which a fast tokenizer runs in Rust. None for a conversation with nothing to learn.
    ``tools`` holds each conversation's tools (a JSON string, or empty)."""
    tools = tools or [None] * len(conversations)
    paired = [_text_pairs(template, messages, tokenizer, t) for messages, t in zip(conversations, tools)]
    ids = iter(tokenize_texts(tokenizer, [text for pairs in paired for pair in pairs for text in pair]))
    eos_id = _eos_id(tokenizer, template) if template.efficient_eos else None
    return [
        EncodedTurns([(next(ids), next(ids)) for _ in pairs], eos_id) if any(t for _, t in pairs) else None
        for pairs in paired
    ]


def _text_pairs(template: Template, messages: list[dict], tokenizer, tools: str | None) -> list[tuple[str, str]]:
    """(prompt text, reply text) per reply; text after the last reply makes a pair with an empty reply."""
    check_conversation(messages)
    if template.from_tokenizer:
        segments = _tokenizer_segments(tokenizer, _with_default_system(template, messages), False, tools)
    else:
        segments = _merge(_pieces(template, messages, tokenizer, False, tools))
    pairs, source = [], ""
    for segment in segments:
        if segment.learned:
            pairs.append((source, segment.text))
            source = ""
        else:
            source += segment.text
    return pairs + [(source, "")] if source else pairs


def _eos_id(tokenizer, template: Template) -> int:
    if getattr(tokenizer, "eos_token_id", None) is not None:
        return tokenizer.eos_token_id
    ids = tokenize_texts(tokenizer, [template.eos_token])[0]
    if len(ids) != 1:
        raise UserError(f"template {template.name!r} ends each conversation with eos, and this tokenizer has none",
                        hint="choose a tokenizer with an eos token, or another template")
    return ids[0]


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
    system = "(system | trim)" if template.trim else "system"
    default = _literal(template.default_system) if template.default_system is not None else "none"
    lines = [
        f"{{%- set {var} = {var}_token if {var}_token else {_literal(getattr(template, var + '_token'))} -%}}"
        for var in ("bos", "eos")
        if any(f"{var}_token" in _PLACEHOLDER.findall(getattr(template, field)) for field in _FORMATS)
        or (var == "eos" and template.efficient_eos)
    ]
    lines += [
        "{%- if messages[0]['role'] == 'system' -%}",
        f"{{%- set system = messages[0]['content'] or {default} -%}}",
        "{%- set messages = messages[1:] -%}",
        "{%- else -%}",
        f"{{%- set system = {default} -%}}",
        "{%- endif -%}",
        _output(_parts(template.prefix)),
    ]
    if not template.system_in_user:
        lines.append(f"{{%- if system -%}}{_output(_parts(template.system, system))}{{%- endif -%}}")
    lines += [
        "{%- for message in messages -%}",
        "{%- if message['role'] not in ['user', 'assistant'] or "
        "(message['role'] == 'user') != (loop.index0 % 2 == 0) -%}",
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}",
        "{%- endif -%}",
        "{%- set content = message['content'] -%}",
    ]
    if template.system_in_user:
        folded = " + ".join(_parts(template.system, system) + ["content"])
        lines.append(f"{{%- if loop.first and system -%}}{{%- set content = {folded} -%}}{{%- endif -%}}")
    lines += [
        "{%- if message['role'] == 'user' -%}",
        _output(_parts(template.user, content)),
        "{%- else -%}",
        _output(_parts(template.assistant_prefix)),
    ]
    if template.thought_words:
        tags = " and ".join(f"{_literal(word.strip())} not in message['content']" for word in template.thought_words)
        lines.append(f"{{%- if {tags} -%}}{_output([_literal(''.join(template.thought_words))])}{{%- endif -%}}")
    lines += [
        _output(_parts(template.assistant, content)),
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    if template.assistant_prefix:
        lines.append(f"{{%- if add_generation_prompt -%}}{_output(_parts(template.assistant_prefix))}{{%- endif -%}}")
    if template.efficient_eos:
        lines.append("{%- if not add_generation_prompt and messages[-1]['role'] == 'assistant' -%}{{- eos -}}"
                     "{%- endif -%}")
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
