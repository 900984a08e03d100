"""A conversation with a model: ``ChatSession`` keeps the system prompt and history and streams each reply; ``run_chat``
is the terminal loop of ``tuner chat`` over it. The TUI drives a ``ChatSession`` the same way."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from engine.config import TunerConfig
from engine.errors import UserError
from engine.inference import Inference, generate, generation_kwargs, load_for_inference, prompt_text

COMMANDS = "/help, /clear, /system <text>, /exit"
HELP = (
    "/clear           forget the conversation, keep the system prompt",
    "/system <text>   set the system prompt and start afresh (/system alone: the template's default)",
    "/exit            leave (also Ctrl-D or Ctrl-C)",
    "/help            this list",
)


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


def run_chat(cfg: TunerConfig, stdin: TextIO | None = None, stdout: TextIO | None = None,
             system: str | None = None) -> int:
    """Chat in the terminal until /exit, end of input or Ctrl-C at the prompt; Ctrl-C during a reply drops that turn.

    Piped input is echoed after the "user: " prompt, so the output reads as a transcript."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = start_chat(cfg, system)
    echo = not stdin.isatty()

    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    say(f"chat with {cfg.model.model_name_or_path} (template {session.inference.template}); /help for commands")
    while True:
        say("user: ", end="")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            say()
            return 0
        if not line:
            say()
            return 0
        text = line.strip()
        if echo:
            say(text)
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command == "/exit":
                return 0
            if command == "/clear":
                session.clear()
                say("(conversation cleared)")
            elif command == "/system":
                session.set_system(argument.strip())
                say(f"(system prompt {'set' if session.system else 'reset'}; conversation cleared)")
            elif command == "/help":
                say("\n".join(HELP))
            else:
                say(f"unknown command {command}; commands: {COMMANDS}")
            continue
        say("assistant: ", end="")
        try:
            session.reply(text, on_token=lambda piece: say(piece, end=""))
            say()
        except KeyboardInterrupt:
            say(" (interrupted; this turn is dropped)")
        except UserError as exc:
            say(f"error: {exc}")
