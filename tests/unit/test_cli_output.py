"""What `tuner` prints where a person or a script reads it: into a pipe closed early, into a pipe whole, and the
settings a memory estimate is for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import EXIT_PIPE_CLOSED, main
from engine.models.catalog import list_models

ROOT = Path(__file__).resolve().parents[2]
MOE_4BIT = "mixture-of-experts weights (fused expert tensors) quantized to 4-bit NF4 like the Linear layers"
MOE_8BIT = ("mixture-of-experts weights (fused expert tensors) stay 16-bit: bitsandbytes has no 8-bit path for "
            "parameters outside Linear layers")
MIXTRAL = ["--model_name_or_path", "mixtral-8x7b", "--num_gpus", "1", "--gpu_memory_gib", "80",
           "per_device_train_batch_size=2", "cutoff_len=512"]


def closed_pipe_run(*argv: str) -> subprocess.CompletedProcess:
    """Run ``argv`` into a pipe whose reader is gone before the output comes (as `head -1`'s is once it has its
    line)."""
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    _, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, None, err)


def test_without_care_a_closed_pipe_ends_python_with_broken_pipe_error():
    result = closed_pipe_run(sys.executable, "-c", "import time; time.sleep(0.5); print('x' * 100)")
    assert "BrokenPipeError" in result.stderr


@pytest.mark.parametrize("args", [["models"], ["estimate", "--help"], ["train", "--help"]])
def test_a_pipe_closed_early_ends_the_command_quietly_with_the_sigpipe_code(args):
    result = closed_pipe_run(sys.executable, "-m", "engine.cli", *args)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert result.returncode == EXIT_PIPE_CLOSED


def test_models_into_a_pipe_are_tab_separated_with_whole_hub_ids(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("\t") for line in lines]
    assert rows[0] == ["name", "hub id", "params", "template", "family"]
    assert all(len(row) == 5 for row in rows)
    assert {row[1] for row in rows[1:]} >= {m.hub_id for m in list_models() if m.hub_id}
    assert ["mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1"] == rows[[r[0] for r in rows].index(
        "mixtral-8x7b-instruct")][:2]


def words(text: str) -> str:
    """The printed text with its line wrapping undone: Rich wraps at the console's width, whatever it is."""
    return " ".join(text.split())


def test_estimate_table_says_the_batch_it_is_for_and_how_qlora_treats_moe_experts(capsys):
    assert main(["estimate", *MIXTRAL]) == 0
    out = words(capsys.readouterr().out)
    assert out.startswith("figures for per_device_train_batch_size 2 x cutoff_len 512, gradient checkpointing on, 1 GPU")
    assert f"QLoRA 8-bit assumes {MOE_8BIT}" in out and f"QLoRA 4-bit assumes {MOE_4BIT}" in out


def test_estimate_table_of_a_qlora_run_on_moe_says_it_too(capsys):
    assert main(["estimate", *MIXTRAL, "--quantization_bit", "4", "gradient_checkpointing=false"]) == 0
    out = words(capsys.readouterr().out)
    assert "per_device_train_batch_size 2 x cutoff_len 512, gradient checkpointing off" in out
    assert f"assumes {MOE_4BIT}" in out


def test_estimate_of_a_dense_model_has_no_moe_note(capsys):
    assert main(["estimate", "--model_name_or_path", "llama2-7b", "--num_gpus", "1", "--gpu_memory_gib", "80"]) == 0
    out = words(capsys.readouterr().out)
    assert "mixture-of-experts" not in out and "QLoRA 4-bit assumes 4-bit Linear layers" in out


def test_estimate_json_has_the_batch_and_every_methods_assumptions(capsys):
    assert main(["estimate", *MIXTRAL, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["per_device_train_batch_size"], result["cutoff_len"], result["gradient_checkpointing"],
            result["num_gpus"]) == (2, 512, True, 1)
    methods = result["recommendation"]["methods"]
    assert MOE_4BIT in methods["qlora-4bit"]["assumptions"] and MOE_8BIT in methods["qlora-8bit"]["assumptions"]
    assert MOE_8BIT not in methods["lora"]["assumptions"] and MOE_4BIT not in result["assumptions"]


# --- at 80 columns: wrapped at spaces, no word, id or path split --------------------------------------------------

def printed(argv: list[str], columns: int | None, capsys, monkeypatch) -> tuple[int, str, str]:
    """``tuner ARGV``'s exit code, stdout and stderr, with $COLUMNS set to ``columns`` (None: unset, as in a pipe)."""
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", str(columns))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_rewrapped(narrow: str, whole: str, width: int = 80) -> None:
    """``narrow`` is ``whole`` wrapped again: the same words in the same order (so none was split), and no line past
    ``width`` but one holding a single word longer than any line (an id or a path, kept whole)."""
    assert narrow.split() == whole.split()
    assert [line for line in narrow.splitlines() if len(line) > width and len(line.split()) > 1] == []


def in_terminal(*args: str, columns: int = 80) -> str:
    """What `python -m engine.cli ARGS` shows on a pseudo-terminal ``columns`` wide, without $COLUMNS, escape codes
    removed."""
    import fcntl
    import os
    import pty
    import re
    import select
    import struct
    import termios
    import time

    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, env=env, stdin=terminal,
                               stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command ended and its side of the terminal is closed
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    process.kill()
    process.wait()
    os.close(master)
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


@pytest.mark.parametrize("argv", [["--help"], ["estimate", "--help"], ["train", "--help"]])
def test_help_at_80_columns_is_wrapped_at_spaces_with_no_word_split(argv, capsys, monkeypatch):
    _, whole, _ = printed(argv, None, capsys, monkeypatch)
    _, narrow, _ = printed(argv, 80, capsys, monkeypatch)
    assert any(len(line) > 80 for line in whole.splitlines())  # into a pipe, lines stay whole
    assert_rewrapped(narrow, whole)


def test_top_help_keeps_each_summary_in_its_column_at_80_columns(capsys, monkeypatch):
    _, out, _ = printed(["--help"], 80, capsys, monkeypatch)
    lines = out.splitlines()
    commands = lines[lines.index("commands:") + 1:lines.index("", lines.index("commands:"))]
    assert "  download   Download a hub model into the cache before a run: access and disk" in commands
    assert all(line.startswith("  ") and (line[2] != " " or line.startswith(" " * 13) and line[13] != " ")
               for line in commands)


def test_usage_line_continues_under_the_commands_arguments(capsys, monkeypatch):
    _, out, _ = printed(["estimate", "--help"], 80, capsys, monkeypatch)
    first, second = out.splitlines()[:2]
    assert first.startswith("usage: tuner estimate [MODEL] [CONFIG.yaml ...]") and len(first) <= 80
    assert second.startswith(" " * len("usage: tuner estimate ") + "[")


def test_help_on_an_80_column_terminal_is_wrapped_to_it():
    shown = in_terminal("--help")
    assert "  doctor     Check this machine before a first run: driver and torch, GPUs," in shown.splitlines()
    assert max(len(line) for line in shown.splitlines()) <= 80


def test_a_path_longer_than_the_line_gets_a_line_of_its_own_whole():
    from engine.cli.console import wrap

    path = "/home/someone/projects/fine-tuning/saves/llama3.1-8b-instruct/lora/20261206-153012-abcdef/checkpoint-500"
    lines = wrap(f"ok       disk          12.0 GiB free in {path}, run index /root/.local/state/tuner-tui", 80,
                 hang=23)
    assert lines == ["ok       disk          12.0 GiB free in",
                     f"                       {path},",
                     "                       run index /root/.local/state/tuner-tui"]
    assert wrap("a line that fits", 80) == ["a line that fits"] and wrap("x " * 50, None) == ["x " * 50]


def test_doctor_findings_at_80_columns_wrap_under_their_detail_and_fix():
    from engine.cli.doctor import render_findings
    from engine.doctor import OK, PROBLEM, Finding

    findings = [Finding("hub", PROBLEM, "https://huggingface.co does not answer within 3 s ([Errno -2] Name or "
                        "service not known)", "export HTTPS_PROXY=http://PROXY:PORT if this server needs one; or "
                        "export HF_HUB_OFFLINE=1 to use the cache only"),
                Finding("bitsandbytes", OK, "bitsandbytes 0.50.2; torch sees no GPU: QLoRA runs on the CPU too")]
    whole, narrow = render_findings(findings), render_findings(findings, 80)
    assert_rewrapped("\n".join(narrow), "\n".join(whole))
    assert narrow[:4] == [
        "problem  hub           https://huggingface.co does not answer within 3 s ([Errno",
        "                       -2] Name or service not known)",
        "                       fix: export HTTPS_PROXY=http://PROXY:PORT if this server",
        "                            needs one; or export HF_HUB_OFFLINE=1 to use the"]


def test_tuner_doctor_at_80_columns_keeps_every_line_within_them(capsys, monkeypatch):
    _, out, _ = printed(["doctor"], 80, capsys, monkeypatch)
    lines = out.splitlines()
    assert [line for line in lines if len(line) > 80 and len(line.split()) > 1] == []
    continued = [line for line in lines[:-1] if line.startswith(" ")]
    assert continued and all(line.startswith(" " * 23) for line in continued)  # under the detail column


def test_models_on_an_80_column_terminal_show_every_name_and_hub_id_whole():
    shown = in_terminal("models")
    lines = shown.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in shown
    for m in list_models():
        assert any(line.split()[:2] == [m.name, m.hub_id or "(built"] for line in lines), m.name
    assert lines[-1] == "(family left out to fit 80 columns; --json has everything)"


def test_models_on_a_wide_terminal_show_every_column():
    lines = in_terminal("models", columns=120).splitlines()
    assert lines[0].split() == ["name", "hub", "id", "params", "template", "family"] and "left out" not in lines[-1]


# --- the model as the first word ----------------------------------------------------------------------------------

def test_estimate_takes_the_model_as_its_first_word(capsys, monkeypatch):
    settings = ["--num_gpus", "1", "--gpu_memory_gib", "24", "--json"]
    _, flagged, _ = printed(["estimate", "--model_name_or_path", "llama2-7b", *settings], None, capsys, monkeypatch)
    for argv in (["estimate", "llama2-7b", *settings], ["estimate", *settings[:2], "llama2-7b", *settings[2:]],
                 ["estimate", "llama2-7b", "--model_name_or_path", "llama2-7b", *settings]):
        code, out, err = printed(argv, None, capsys, monkeypatch)
        assert (code, err) == (0, "") and json.loads(out) == json.loads(flagged), argv


@pytest.mark.parametrize("command", ["estimate", "preview", "predict", "export", "chat", "train"])
def test_a_model_word_and_another_model_flag_are_refused_in_one_line(command, capsys, monkeypatch):
    code, out, err = printed([command, "llama2-7b", "--model_name_or_path", "mistral-7b-v0.1"], None, capsys,
                             monkeypatch)
    assert code == 2 and out == ""
    assert err == (f"tuner: error: `tuner {command}` got two models: llama2-7b and --model_name_or_path "
                   f"mistral-7b-v0.1; give one\n")


def test_train_takes_a_model_word_and_still_a_config_file_first(tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: tiny-llama\ndataset: demo_alpaca\nlearning_rate: 0.001\n")
    _, from_file, _ = printed(["train", str(config), "--print-config"], None, capsys, monkeypatch)
    assert "model_name_or_path: tiny-llama" in from_file and "learning_rate: 0.001" in from_file
    _, from_word, _ = printed(["train", "tiny-mistral", str(config), "--print-config"], None, capsys, monkeypatch)
    assert "model_name_or_path: tiny-mistral" in from_word and "learning_rate: 0.001" in from_word


def test_a_first_word_naming_a_file_that_is_not_a_config_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    notes = tmp_path / "run-config"
    notes.write_text("model_name_or_path: tiny-llama\n")
    code, _, err = printed(["train", str(notes)], None, capsys, monkeypatch)
    assert code == 2
    assert err == f"tuner: error: {notes} is a file, not a model: config files end in .yaml, .yml or .json\n"


def test_command_help_names_the_model_word(capsys, monkeypatch):
    _, out, _ = printed(["chat", "--help"], None, capsys, monkeypatch)
    assert out.splitlines()[0] == ("usage: tuner chat [--run RUN] [MODEL] [CONFIG.yaml ...] [key=value ...] "
                                   "[--key value ...] [--system TEXT]")
    assert "MODEL, the first word, is the same as --model_name_or_path MODEL" in out


@pytest.mark.parametrize("command", ["chat", "predict", "export"])
def test_a_model_word_beside_run_is_refused_in_one_line(command, capsys):
    assert main([command, "--run", "my-run", "tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"tuner: error: `tuner {command} --run my-run` takes its model from the run: leave out "
                                "'tiny-llama' (--model_name_or_path puts another base under a LoRA run's adapter)"]
    assert "Traceback" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["--num_gpus", "0"], "--num_gpus takes a whole number of GPUs, 1 or more, got '0'"),
    (["--num_gpus", "1.5"], "--num_gpus takes a whole number of GPUs, 1 or more, got '1.5'"),
    (["--gpu_memory_gib", "0", "--num_gpus", "1"], "--gpu_memory_gib takes a number of GiB above 0, got '0'"),
])
def test_estimate_refuses_a_count_of_gpus_or_memory_that_cannot_be(capsys, args, message):
    assert main(["estimate", "llama2-7b", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
