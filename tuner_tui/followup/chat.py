"""Chat with what a run trained: its weights, base and template loaded as `tuner chat --run RUN` would.

Loading and every reply run in thread workers; reply pieces are streamed into the conversation as they come.
Leaving the screen (or the app) stops a reply at its next piece, so quitting does not wait for the reply to finish
(the app joins its worker threads as it exits), and lets the model go.
"""

from __future__ import annotations

import threading
from pathlib import Path

from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Footer, Input, Static
from textual.worker import Worker, WorkerState

from engine.rundir.files import printable_line
from tuner_tui.errors import failure_text

LOAD, REPLY = "load", "reply"


class ReplyAbandoned(Exception):
    """Raised into a reply's generation when its screen has gone, to stop it at the next piece."""


def load_run_chat(run_dir: Path, max_new_tokens: int | None = None):
    """The chat session on a run's weights, configured as `tuner chat --run RUN` would be, and what was loaded,
    in words."""
    from engine.infer.chat import start_chat
    from engine.infer.followup import load_followup_config

    flags = ["--max_new_tokens", str(max_new_tokens)] if max_new_tokens is not None else []
    cfg = load_followup_config(["--run", str(run_dir), *flags], "chat")
    weights = cfg.model.adapter_name_or_path or cfg.model.model_name_or_path
    return start_chat(cfg), f"{Path(weights).name} on {Path(cfg.model.model_name_or_path).name}" \
        if cfg.model.adapter_name_or_path else Path(weights).name


class Turn(Static):
    """One message of the conversation; an assistant's grows as its pieces arrive."""

    def __init__(self, role: str, text: str = ""):
        super().__init__(text, classes=role, markup=False)
        self.role, self.text = role, text
        self.border_title = role

    def add(self, piece: str) -> None:
        self.text += piece
        self.update(self.text)


class ChatScreen(Screen):
    CSS_PATH = "followup.tcss"
    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="Back to the dashboard; the model is let go"),
        Binding("ctrl+l", "clear", "New conversation", tooltip="Forget the conversation so far"),
    ]

    def __init__(self, run_dir: Path, max_new_tokens: int | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.max_new_tokens = max_new_tokens
        self.session = None
        self._gone = threading.Event()

    def compose(self) -> ComposeResult:
        yield Static(f"Chat with run {printable_line(self.run_dir.name)}", id="title", markup=False)
        yield Static("loading the model…", id="status", markup=False)
        yield VerticalScroll(id="conversation")
        yield Input(placeholder="loading the model…", id="prompt", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        self.run_worker(lambda: load_run_chat(self.run_dir, self.max_new_tokens), name="loading the model",
                        group=LOAD, thread=True, exit_on_error=False)

    def on_unmount(self) -> None:
        self._gone.set()
        self.session = None

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place this screen's workers end: the session ready, a reply done, or a failure shown."""
        worker, prompt = event.worker, self.query_one("#prompt", Input)
        if event.state == WorkerState.SUCCESS and worker.group == LOAD:
            self.session, loaded = worker.result
            self.query_one("#status", Static).update(
                f"{loaded} · template {self.session.inference.template} · Enter sends, Ctrl-L starts over")
        elif event.state == WorkerState.ERROR:
            if isinstance(worker.error, ReplyAbandoned):
                return
            text = failure_text(worker.error)
            if worker.group == LOAD:
                self.query_one("#status", Static).update(f"cannot chat with this run: {text}")
                self.query_one("#status").add_class("error")
                return
            self._conversation().mount(Turn("error", text))
        if event.state in (WorkerState.SUCCESS, WorkerState.ERROR) and self.session is not None:
            prompt.disabled = False
            prompt.placeholder = "your message"
            prompt.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        if not text or self.session is None:
            return
        event.input.value = ""
        event.input.disabled = True
        answer = Turn("assistant")
        self._conversation().mount_all([Turn("user", text), answer])
        self.run_worker(lambda: self._reply(text, answer), name="replying", group=REPLY, thread=True,
                        exit_on_error=False)

    def _reply(self, text: str, answer: Turn) -> str:
        def show(piece: str) -> bool:
            """False once the screen is leaving (its widgets may already be gone while the piece was on its way)."""
            conversation = self.query("#conversation")
            if self._gone.is_set() or not conversation:
                return False
            answer.add(piece)
            conversation.first().scroll_end(animate=False)
            return True

        def on_token(piece: str) -> None:
            if self._gone.is_set() or not self.app.call_from_thread(show, piece):
                raise ReplyAbandoned

        reply = self.session.reply(text, on_token=on_token)
        if not reply.strip():
            self.app.call_from_thread(answer.update, Content.styled("(an empty reply: the model stopped at once)",
                                                                    "$text-muted"))
        return reply

    def _conversation(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    def action_clear(self) -> None:
        if self.session is not None:
            self.session.clear()
        self._conversation().remove_children()

    def action_back(self) -> None:
        self._gone.set()
        self.dismiss()

    def system_commands(self):
        yield SystemCommand("New conversation", "Forget the conversation so far", self.action_clear)
