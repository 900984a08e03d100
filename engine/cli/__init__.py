"""The ``tuner`` command: subcommands that call the engine, and the one place a ``UserError`` becomes a line and an exit code.

Every subcommand takes the same config names (YAML files, ``key=value``, ``--key value``); heavy libraries load
only inside the subcommand that needs them, so ``tuner --help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

from engine.cli.args import EXIT_USER_ERROR, Command
from engine.cli.console import output_width, wrap
from engine.cli.doctor import cmd_doctor
from engine.cli.download import cmd_download
from engine.cli.info import cmd_datasets, cmd_estimate, cmd_gpus, cmd_models, cmd_templates
from engine.cli.runs import cmd_logs, cmd_resume, cmd_runs, cmd_stop
from engine.cli.training import cmd_chat, cmd_export, cmd_predict, cmd_preview, cmd_train
from engine.errors import ConfigError, UserError

__all__ = ["COMMANDS", "Command", "main"]


MODEL_USAGE = "[MODEL] [CONFIG.yaml ...] [key=value ...] [--key value ...]"


COMMANDS: dict[str, Command] = {
    "train": Command(cmd_train, "Fine-tune a model (LoRA, QLoRA, freeze, full).",
                     f"tuner train {MODEL_USAGE} [--detach] [--force] [--print-config]", takes_config=True),
    "download": Command(cmd_download, "Download a hub model into the cache before a run: access and disk checked "
                        "first, progress, resumable.", "tuner download MODEL [--revision R] [--json]"),
    "runs": Command(cmd_runs, "List every run on this host: state, progress, loss, directory.",
                    "tuner runs [--json]"),
    "logs": Command(cmd_logs, "Print a run's log (the latest run when none is named); -f follows it.",
                    "tuner logs [RUN] [-f]"),
    "stop": Command(cmd_stop, "Stop a run gracefully: it finishes the step and saves a checkpoint.",
                    "tuner stop [RUN]"),
    "resume": Command(cmd_resume, "Continue a stopped or failed run from its last checkpoint, detached.",
                      "tuner resume [RUN] [--hf_hub_token TOKEN]"),
    "predict": Command(cmd_predict, "Generate for a dataset's prompts and score them (BLEU-4, ROUGE).",
                       f"tuner predict [--run RUN] {MODEL_USAGE}", takes_config=True),
    "export": Command(cmd_export, "Write a checked safetensors model: a LoRA adapter merged into its base, or a "
                      "full or freeze fine-tune as it is.",
                      f"tuner export [--run RUN] {MODEL_USAGE}", takes_config=True),
    "chat": Command(cmd_chat, "Chat in the terminal with a model or adapter (streaming; /clear, /exit).",
                    f"tuner chat [--run RUN] {MODEL_USAGE} [--system TEXT]", takes_config=True),
    "preview": Command(cmd_preview, "Show samples as the model will see them, with the learned part marked.",
                       f"tuner preview {MODEL_USAGE} [-n N] [--json]", takes_config=True),
    "estimate": Command(cmd_estimate, "Peak GPU memory of a run per method, and the method to use on these GPUs.",
                        f"tuner estimate {MODEL_USAGE} [--num_gpus N] [--gpu_memory_gib G] [--json]",
                        takes_config=True),
    "gpus": Command(cmd_gpus, "The NVIDIA GPUs found: memory, utilisation, temperature, power, processes.",
                    "tuner gpus [--json]"),
    "doctor": Command(cmd_doctor, "Check this machine before a first run: driver and torch, GPUs, kernels, disk, "
                      "the hub; exit 1 on a problem. --full also loads bitsandbytes (seconds). --gpu runs every "
                      "kernel path the engine can choose on each GPU against the reference (about two minutes).",
                      "tuner doctor [--full | --gpu] [--json]"),
    "models": Command(cmd_models, "List the model catalog.", "tuner models [--json]"),
    "templates": Command(cmd_templates, "List the prompt templates with a rendered example.", "tuner templates"),
    "datasets": Command(cmd_datasets, "List the registered datasets (bundled, and those of --dataset_dir's "
                        "dataset_info.json: ./data by default).",
                        "tuner datasets [--dataset_dir DIR] [--json]"),
}



def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tuner-tui")
    except PackageNotFoundError:
        return "unknown"



def top_help(commands: dict[str, Command], width: int | None = None) -> str:
    """The commands, one each with its summary, wrapped to ``width`` columns with summaries kept in their column."""
    lines = ["usage: tuner COMMAND [ARGS]", "", "Fine-tune open LLMs on a GPU server from your terminal.", "", "commands:"]
    names = max(map(len, commands))
    for name, cmd in commands.items():
        lines += wrap(f"  {name:<{names}}  {cmd.summary}", width, hang=names + 4)
    closing = ["`tuner COMMAND --help` shows a command's options. Every config key works as",
               "--key value, key=value or in a YAML file, with the names of LLaMA-Factory and",
               "Hugging Face TrainingArguments."]
    lines += ["", *(part for line in closing for part in wrap(line, width))]
    return "\n".join(lines)



def command_help(cmd: Command, width: int | None = None) -> str:
    """A command's usage and summary, and for a config command every key with its default and help, wrapped to
    ``width`` columns."""
    lines = [*_usage_lines(cmd.usage, width), "", *wrap(cmd.summary, width)]
    if "[MODEL]" in cmd.usage:
        lines += ["", *wrap("MODEL, the first word, is the same as --model_name_or_path MODEL: a name from "
                            "`tuner models`, a hub id or a local directory.", width)]
    if cmd.takes_config:
        from engine.config.schema import ALIASES, SECTIONS

        for section, cls in SECTIONS.items():
            lines += ["", f"{section}:"]
            for f in dataclasses.fields(cls):
                lines += _option_help(f.name, f.default, f.metadata["help"], width, f.metadata.get("choices"))
        lines += _passthrough_help(width)
        lines += ["", *wrap("old spellings accepted: " + ", ".join(f"{old} = {new}" for old, new in ALIASES.items()),
                            width, hang=4),
                  *wrap("a bare --flash_attn means flash attention 2 (falls back to SDPA when it is not installed)",
                        width, hang=4)]
    return "\n".join(lines)


def _usage_lines(usage: str, width: int | None) -> list[str]:
    """``usage: tuner CMD [A] [B ...]`` wrapped between bracketed groups, never inside one, continuing under [A]."""
    import re

    command = " ".join(usage.split()[:2])
    kept = re.sub(r"\[[^]]*\]", lambda group: group[0].replace(" ", "\xa0"), f"usage: {usage}")
    return [line.replace("\xa0", " ") for line in wrap(kept, width, hang=len(f"usage: {command} "))]


def _option_help(name: str, default, text: str, width: int | None, choices=None) -> list[str]:
    extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
    return [*wrap(f"  --{name} (default {default}){extra}", width, hang=6), *wrap(f"      {text}", width)]



def _passthrough_help(width: int | None) -> list[str]:
    """The installed transformers' and TRL's training fields that pass through (engine.config.library)."""
    from engine.config.library import kept_fields_path
    from engine.config.schema import passthrough_fields

    kept = kept_fields_path()
    if kept is not None and not kept.is_file():  # the first time for these versions: seconds, once
        print("tuner: reading the installed transformers' and TRL's training fields (once for these versions)...",
              file=sys.stderr, flush=True)
    fields = passthrough_fields()
    if not fields:
        return []
    lines = ["", *wrap("transformers (TrainingArguments / TRL SFTConfig fields of the installed versions, passed "
                       "through):", width)]
    for f in fields.values():
        lines += _option_help(f.name, f.default, f.help.split(". ")[0].rstrip(".") + ".", width)
    return lines


EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: what the shell reports for `yes | head -1`, so scripts see the usual code


def main(argv: list[str] | None = None, extra: dict[str, Command] | None = None) -> int:
    """Run one of the engine's commands, or one of ``extra`` (a face's: ``tuner`` finds them).

    A reader that closes the pipe early (``tuner models | head -1``) ends the command quietly, as SIGPIPE would."""
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv), {**COMMANDS, **(extra or {})})
        sys.stdout.flush()  # a closed pipe raises here, inside the try, not at the interpreter's exit
        return code
    except BrokenPipeError:
        return _pipe_closed()


FACES = "tuner.faces"  # the entry-point group through which the terminal app adds its commands (pyproject.toml)


def tuner(argv: list[str] | None = None) -> int:
    """The whole `tuner` command: the engine's commands and those the installed faces add (the terminal app's
    wizard and dashboard), found through their entry points, so the engine never imports a face. No command, or
    ``--config FILE``, runs a face's default: the wizard."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands, default = _faces() if _wants_face(argv) else ({}, None)
    if not argv or argv[0] == "--config" or argv[0].startswith("--config="):
        if default is None:
            return _fail(UserError("the terminal app is not installed with this engine, so `tuner` alone has nothing "
                                   "to open", "reinstall: pip install -e . (or run `tuner --help`)"))
        return default(argv)
    return main(argv, extra=commands)


def _wants_face(argv: list[str]) -> bool:
    """Whether the faces must be looked up: no command, --config, help (it lists every command), or a command the
    engine does not have. The engine's own commands start without reading any package's metadata."""
    return not argv or argv[0] not in COMMANDS


def _faces() -> tuple[dict[str, Command], Callable[[list[str]], int] | None]:
    """The commands, and the default, of every installed face."""
    from importlib.metadata import entry_points

    commands: dict[str, Command] = {}
    default = None
    for entry in entry_points(group=FACES):
        face = entry.load()
        commands.update({name: Command(run, summary, usage) for name, (run, summary, usage) in face.COMMANDS.items()})
        default = default or getattr(face, "DEFAULT", None)
    return commands, default


def executable() -> None:
    """The `tuner` executable: ``tuner``, then, after a screen that loaded a model (chat), an exit that skips the
    interpreter's seconds-long teardown of torch; the screen is closed and every run is its own process by then."""
    face = _wants_face(sys.argv[1:])
    code = tuner()
    if face and "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _pipe_closed() -> int:
    """Point stdout at /dev/null, so the interpreter's final flush of what is still buffered cannot raise again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE_CLOSED


def _run(argv: list[str], commands: dict[str, Command]) -> int:
    from engine.quiet import quiet_libraries

    quiet_libraries()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(top_help(commands, output_width(sys.stdout)))
        return 0
    if argv[0] == "--version":
        print(f"tuner {_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        import difflib

        close = difflib.get_close_matches(name, commands, n=1)
        hint = f"did you mean `tuner {close[0]}`?" if close else "see `tuner --help`"
        return _fail(UserError(f"unknown command '{name}'", hint))
    if "-h" in rest or "--help" in rest:
        print(command_help(commands[name], output_width(sys.stdout)))
        return 0
    try:
        return commands[name].run(rest)
    except UserError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print("tuner: interrupted", file=sys.stderr)
        return 130



def _fail(exc: UserError) -> int:
    from engine.rundir.files import printable_line

    lines = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
    for line in lines:
        print(f"tuner: error: {printable_line(line)}", file=sys.stderr)
    return EXIT_USER_ERROR

