"""Chat on the tiny demo model: streamed replies, history, the system prompt and the terminal loop's commands."""

from __future__ import annotations

import io

import pytest

import engine.cli.chat
from engine.cli.chat import run_chat
from engine.infer.chat import ChatSession, settled_text, start_chat
from engine.config.schema import parse_args
from engine.errors import UserError
from engine.infer.inference import generate

SYSTEM_IN_LLAMA2 = "<<SYS>>\nAnswer in one word.\n<</SYS>>"


def chat_config(*extra: str):
    return parse_args(["--model_name_or_path", "tiny-llama", "--max_new_tokens", "12", *extra])


@pytest.fixture(scope="module")
def session(tiny_models) -> ChatSession:
    return start_chat(chat_config())


@pytest.fixture
def started(tiny_models, monkeypatch) -> list[ChatSession]:
    """The sessions run_chat starts, so a test can look inside the one the terminal loop talked to."""
    sessions = []

    def spy(cfg, system=None):
        sessions.append(real(cfg, system))
        return sessions[-1]

    real = engine.cli.chat.start_chat
    monkeypatch.setattr(engine.cli.chat, "start_chat", spy)
    return sessions


def chat(script: str, *extra: str, system: str | None = None) -> tuple[int, str]:
    out = io.StringIO()
    code = run_chat(chat_config(*extra), stdin=io.StringIO(script), stdout=out, system=system)
    return code, out.getvalue()


def test_streamed_pieces_join_into_the_reply_that_generate_gives(session):
    session.clear()
    expected = generate(session.inference, [session.messages("hello")], session.kwargs)[0]
    pieces: list[str] = []
    reply = session.reply("hello", on_token=pieces.append)
    assert reply == expected and reply
    assert len(pieces) > 1 and "".join(pieces) == reply


def test_streaming_with_a_template_that_has_stop_words(tiny_models):
    session = start_chat(chat_config("--template", "chatml"))
    assert session.kwargs["stop_strings"] == ["<|im_end|>", "<|im_start|>"]  # LLaMA-Factory's chatml stop words
    pieces: list[str] = []
    reply = session.reply("hello", on_token=pieces.append)
    assert "".join(pieces) == reply and "<|im_end|>" not in reply


def test_history_grows_each_turn_and_clear_empties_it(session):
    session.set_system("Answer in one word.")
    session.reply("hello")
    session.reply("hi again")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.prompt("third").count("[INST]") == 3, "the whole history is rendered each turn"
    session.clear()
    assert session.history == []
    assert session.system == "Answer in one word." and SYSTEM_IN_LLAMA2 in session.prompt("hello")


def test_scripted_conversation_answers_twice_and_clear_forgets(started):
    code, output = chat("hello\n/clear\nhi again\n/exit\n")
    assert code == 0
    lines = output.splitlines()
    assert lines[0] == "chat with tiny-llama (template llama2); /help for commands"
    assert lines[1] == "user: hello"
    assert output.count("\nassistant: ") == 2
    assert "user: /clear\n(conversation cleared)\nuser: hi again\nassistant: " in output
    assert [m["content"] for m in started[0].history if m["role"] == "user"] == ["hi again"]


def test_system_command_sets_the_prompt_and_starts_afresh(started):
    code, output = chat("hello\n/system Answer in one word.\n/exit\n")
    assert code == 0 and "(system prompt set; conversation cleared)" in output
    session = started[0]
    assert session.system == "Answer in one word." and session.history == []
    assert SYSTEM_IN_LLAMA2 in session.prompt("hello")


def test_system_argument_reaches_the_rendered_prompt(started):
    assert chat("/exit\n", system="Answer in one word.")[0] == 0
    assert SYSTEM_IN_LLAMA2 in started[0].prompt("hello")


def test_end_of_input_ends_the_chat_with_exit_code_0(started):
    code, output = chat("hello\n")
    assert code == 0 and output.count("assistant: ") == 1 and output.endswith("user: \n")
    assert len(started[0].history) == 2


def test_ctrl_c_at_the_prompt_ends_cleanly(started):
    class Interrupted(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    out = io.StringIO()
    assert run_chat(chat_config(), stdin=Interrupted(), stdout=out) == 0
    assert out.getvalue().endswith("user: \n")


def test_empty_lines_are_ignored_and_unknown_commands_and_lines_not_utf8_answered(started):
    code, output = chat("\n   \n/frobnicate\ncaf\udce9\n/help\n/exit\n")  # caf\xe9 in Latin-1, as stdin decodes it
    assert code == 0 and "assistant: " not in output
    assert "user: caf?\nerror: that line is not UTF-8 text, so it was not sent" in output
    assert "unknown command /frobnicate; commands: /help, /clear, /system <text>, /exit\n" in output
    assert "/clear           forget the conversation, keep the system prompt" in output
    assert started[0].history == []


def test_beam_search_is_refused_before_the_model_loads():
    with pytest.raises(UserError, match="beam search"):
        start_chat(chat_config("--num_beams", "2"))


@pytest.mark.parametrize(("text", "settled"), [
    (" Hello <|im", "Hello"),
    (" Hello <|im_end|> more", "Hello"),
    ("Hello <", "Hello"),
    ("caf\ufffd", "caf"),
    ("one two \n", "one two"),
])
def test_settled_text_holds_back_what_may_yet_change(text, settled):
    assert settled_text(text, ["<|im_end|>"]) == settled
