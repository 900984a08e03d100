"""A conversation with a model: ``ChatSession`` keeps the system prompt and history and streams each reply. The
terminal loop of ``tuner chat`` (engine.cli.chat) and the TUI's chat screen drive it the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config.schema import TunerConfig
from engine.errors import UserError
from engine.infer.inference import Inference, generate, generation_kwargs, load_for_inference, prompt_text

def settled_text(text: str, stops: list[str]) -> str:
    """The part of a reply still being generated that later tokens cannot change or cut, stripped as replies are.

    Holds back text that may begin a stop word, an unfinished character and trailing whitespace (which the
    tokenizer's clean-up may yet remove), so what is streamed is always the start of the final reply.
    """
    found = [text.find(stop) for stop in stops if stop in text]
    if found:
        text = text[:min(found)]
    else:
        partial = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        text = text[:len(text) - partial]
    return text.rstrip("\ufffd").strip()


@dataclass
class _Stream:
    """A streamer for ``model.generate``: decodes all new tokens after each step and hands on the newly settled text."""

    tokenizer: object
    stops: list[str]
    on_token: Callable[[str], None]
    ids: list[int] = field(default_factory=list)
    shown: int = 0
    prompt_seen: bool = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        ready = settled_text(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        if len(ready) > self.shown:
            self.on_token(ready[self.shown:])
            self.shown = len(ready)

    def end(self) -> None:
        pass


@dataclass
class ChatSession:
    """One conversation with a loaded model; ``kwargs`` are ``generation_kwargs`` (stop words included)."""

    inference: Inference
    kwargs: dict
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def messages(self, user_text: str | None = None) -> list[dict]:
        """The system prompt (when set), the history and, when given, the next user message."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = [{"role": "user", "content": user_text}] if user_text is not None else []
        return system + self.history + user

    def prompt(self, user_text: str) -> str:
        """The text the model would be given for ``user_text``: the whole conversation through the template."""
        return prompt_text(self.inference, self.messages(user_text))

    def reply(self, user_text: str, on_token: Callable[[str], None] | None = None) -> str:
        """Generate the answer to ``user_text``, streaming its pieces to ``on_token``; both join the history after."""
        messages = self.messages(user_text)
        kwargs = self.kwargs
        stream = None
        if on_token is not None:
            stream = _Stream(self.inference.tokenizer, list(kwargs.get("stop_strings") or []), on_token)
            kwargs = {**kwargs, "streamer": stream}
        text = generate(self.inference, [messages], kwargs)[0]
        if stream is not None and len(text) > stream.shown:
            on_token(text[stream.shown:])
        self.history += [messages[-1], {"role": "assistant", "content": text}]
        return text

    def clear(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        """A new system prompt (None or empty: the template's default) starts a new conversation."""
        self.system = text or None
        self.clear()


def start_chat(cfg: TunerConfig, system: str | None = None) -> ChatSession:
    """Load the model (and adapters) for chatting; replies are streamed, which beam search cannot do."""
    if cfg.generate.num_beams > 1:
        raise UserError("chat streams its replies, which beam search cannot do", hint="leave num_beams at 1")
    inference = load_for_inference(cfg)
    return ChatSession(inference, generation_kwargs(cfg, inference), system or None)
