"""The terminal loop of `tuner chat`: a prompt, the reply streaming, and the slash commands, over a ChatSession."""

from __future__ import annotations

import sys
from typing import TextIO

from engine.config.schema import TunerConfig
from engine.errors import UserError
from engine.infer.chat import start_chat
from engine.rundir.files import printable_line

COMMANDS = "/help, /clear, /system <text>, /exit"
HELP = (
    "/clear           forget the conversation, keep the system prompt",
    "/system <text>   set the system prompt and start afresh (/system alone: the template's default)",
    "/exit            leave (also Ctrl-D or Ctrl-C)",
    "/help            this list",
)


def run_chat(cfg: TunerConfig, stdin: TextIO | None = None, stdout: TextIO | None = None,
             system: str | None = None) -> int:
    """Chat in the terminal until /exit, end of input or Ctrl-C at the prompt; Ctrl-C during a reply drops that turn.

    Piped input is echoed after the "user: " prompt, so the output reads as a transcript."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if stdin is sys.stdin and hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused below, never a traceback
    session = start_chat(cfg, system)
    echo = not stdin.isatty()

    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    say(f"chat with {printable_line(cfg.model.model_name_or_path)} (template {session.inference.template}); "
        "/help for commands")
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
        undecodable = not _utf8(text)
        if echo:
            say(text.encode("utf-8", errors="replace").decode() if undecodable else text)
        if undecodable:  # the terminal or the piped file is not UTF-8: its bytes came through as surrogates
            say("error: that line is not UTF-8 text, so it was not sent (is the terminal's encoding UTF-8?)")
            continue
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


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
