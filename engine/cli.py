"""The ``tuner`` command: subcommands that call the engine, and the one place a ``UserError`` becomes a line and an exit code.

Every subcommand takes the same config names (YAML files, ``key=value``, ``--key value``); heavy libraries load
only inside the subcommand that needs them, so ``tuner --help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable

from engine.errors import ConfigError, UserError

EXIT_USER_ERROR = 2


@dataclasses.dataclass
class Command:
    run: Callable[[list[str]], int]
    summary: str
    usage: str
    takes_config: bool = False


def _take_flag(argv: list[str], *names: str) -> bool:
    """Remove a command's own on/off option (``--json``) from argv; the rest is config."""
    found = any(name in argv for name in names)
    argv[:] = [a for a in argv if a not in names]
    return found


def _take_option(argv: list[str], name: str, default: str | None = None) -> str | None:
    """Remove a command's own ``--name value`` option from argv and return its value."""
    for i, token in enumerate(argv):
        if token == name:
            if i + 1 >= len(argv):
                raise UserError(f"{name} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if token.startswith(name + "="):
            del argv[i]
            return token.split("=", 1)[1]
    return default


def _load_config(argv: list[str], command: str):
    from engine.config import parse_args
    from engine.validation import validate

    cfg = parse_args(argv)
    validate(cfg, command)
    return cfg


def cmd_train(argv: list[str]) -> int:
    """Also the classic entry point: `--do_predict` without `--do_train` predicts, `--export_dir` alone exports."""
    print_config = _take_flag(argv, "--print-config")
    detach = _take_flag(argv, "--detach")
    detached = _take_flag(argv, "--detached")  # set by --detach on the process it starts
    from engine.config import parse_args
    from engine.validation import validate

    cfg = parse_args(argv)
    t = cfg.train
    command = "predict" if t.do_predict and not t.do_train else "train"
    validate(cfg, command)
    if print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if command == "predict":
        from engine.predict import run_predict

        return run_predict(cfg)
    if detach:
        return _detach(argv, cfg)
    from engine.train import run_training

    code = run_training(cfg, foreground=not detached)
    if code == 0 and t.do_predict:
        return run_predict_after_training(cfg)
    return code


def _detach(argv: list[str], cfg) -> int:
    """Start the run as its own process and return at once with its id and directory."""
    from pathlib import Path

    from engine.jobs import launch_detached
    from engine.train import default_output_dir, prepare_run_dir

    model = cfg.model.model_name_or_path
    output_dir = Path(cfg.train.output_dir) if cfg.train.output_dir else default_output_dir(
        model, cfg.finetune.finetuning_type)
    cfg.train.output_dir = str(output_dir)
    run = prepare_run_dir(cfg, model)  # the same refusals as a foreground run, before anything starts
    child_argv = _without(argv, ("output_dir", "overwrite_output_dir"))  # decided here, once
    status = launch_detached(child_argv, run.path, run.status.name, model, run.status.method)
    print(f"started run {status.id} (pid {status.pid}) in {status.output_dir}")
    print(f"  follow it: tuner logs {status.id} -f    stop it: tuner stop {status.id}    list: tuner runs")
    return 0


def _without(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """argv less the given keys in any spelling (--key value, --key=value, key=value, a bare --flag)."""
    from engine.config import parse_overrides

    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name = token.lstrip("-").split("=", 1)[0]
        if name in keys:
            takes_value = token.startswith("--") and "=" not in token and i + 1 < len(argv) and \
                parse_overrides(argv[i:i + 2])[1].get(name) == argv[i + 1]
            i += 2 if takes_value else 1
            continue
        out.append(token)
        i += 1
    return out


def cmd_runs(argv: list[str]) -> int:
    as_json = _take_flag(argv, "--json")
    _no_more(argv, "runs")
    from pathlib import Path

    from engine.jobs import list_jobs

    jobs = list_jobs()
    if as_json:
        print(json.dumps([_job_json(job) for job in jobs], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("id", "state", "model", "method", "progress", "loss", "elapsed"):
        table.add_column(column, no_wrap=column == "id")
    for job in jobs:
        s = job.status
        if s is None:
            table.add_row(job.id, "missing", str(job.dir))
            continue
        progress = f"{s.step}/{s.total_steps}" if s.total_steps else ""
        loss = f"{s.loss:.4f}" if s.loss is not None else ""
        table.add_row(job.id, job.state, Path(s.model or "").name, s.method or "", progress, loss,
                      _elapsed(s.started_at, s.ended_at))
    Console().print(table if jobs else "no runs yet: start one with `tuner train ... --detach`")
    return 0


def _elapsed(started_at: str, ended_at: str | None) -> str:
    from datetime import datetime, timezone

    start = datetime.fromisoformat(started_at)
    end = datetime.fromisoformat(ended_at) if ended_at else datetime.now(timezone.utc)
    seconds = int((end - start).total_seconds())
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _job_json(job) -> dict:
    status = dataclasses.asdict(job.status) if job.status else None
    return {"id": job.id, "dir": str(job.dir), "state": job.state, "status": status, "last_log": job.last_log}


def cmd_logs(argv: list[str]) -> int:
    follow_on = _take_flag(argv, "-f", "--follow")
    from engine.jobs import find_job, follow, process_alive

    job = find_job(argv[0] if argv else None)
    log_file = job.dir / "train.log"
    if not log_file.is_file():
        raise UserError(f"run {job.id} has no train.log in {job.dir}")
    follow(log_file, sys.stdout, follow_on, alive=lambda: process_alive(job.status.pid))
    return 0


def cmd_stop(argv: list[str]) -> int:
    from engine.jobs import find_job, stop_job

    job = find_job(argv[0] if argv else None)
    state = stop_job(job, wait_s=30.0)
    print(f"run {job.id}: {state}" + (" (a checkpoint was saved; `tuner resume` continues it)"
                                      if state == "stopped" else ""))
    return 0


def cmd_resume(argv: list[str]) -> int:
    """Start a stopped or failed run again with its own config; it continues from its last checkpoint."""
    from engine.jobs import find_job, launch_detached

    job = find_job(argv[0] if argv else None)
    if job.state in ("running", "queued"):
        raise UserError(f"run {job.id} is still {job.state}")
    if job.state == "completed":
        raise UserError(f"run {job.id} is completed: nothing to resume")
    config = job.dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"run {job.id} has no config.yaml in {job.dir} to resume with")
    s = job.status
    status = launch_detached([str(config)], job.dir, s.name, s.model, s.method or "")
    print(f"resumed run {status.id} (pid {status.pid}) in {status.output_dir}")
    return 0


def run_predict_after_training(cfg) -> int:
    """`--do_train --do_predict`: predict with what was just trained, into <output_dir>/predict."""
    from pathlib import Path

    from engine.predict import run_predict
    from engine.runs import read_status

    run_dir = read_status(Path(cfg.train.output_dir)).output_dir if cfg.train.output_dir else None
    if run_dir is None:
        raise UserError("--do_predict after training needs an output_dir")
    if cfg.finetune.finetuning_type == "lora":
        cfg.model.adapter_name_or_path = run_dir
    else:
        cfg.model.model_name_or_path = run_dir
    cfg.train.output_dir = str(Path(run_dir) / "predict")
    return run_predict(cfg)


def cmd_predict(argv: list[str]) -> int:
    cfg = _load_config(argv, "predict")
    from engine.predict import run_predict

    return run_predict(cfg)


def cmd_export(argv: list[str]) -> int:
    cfg = _load_config(argv, "export")
    from engine.export import run_export

    return run_export(cfg)


def cmd_chat(argv: list[str]) -> int:
    system = _take_option(argv, "--system")
    cfg = _load_config(argv, "chat")
    from engine.chat import run_chat

    return run_chat(cfg, system=system)


def cmd_preview(argv: list[str]) -> int:
    as_json = _take_flag(argv, "--json")
    count = _take_option(argv, "-n", "3")
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"-n takes a number of samples, got '{count}'")
    cfg = _load_config(argv, "preview")
    from engine.preview import build_preview, render_preview

    preview = build_preview(cfg, int(count))
    if as_json:
        print(json.dumps(preview.to_json(), ensure_ascii=False, indent=2))
    else:
        render_preview(preview)
    return 0


def cmd_models(argv: list[str]) -> int:
    as_json = _take_flag(argv, "--json")
    _no_more(argv, "models")
    from engine.catalog import list_models, param_count

    models = list_models()
    if as_json:
        print(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "hub id", "params", "template", "family", box=None, header_style="bold")
    for m in models:
        table.add_row(m.name, m.hub_id or "(built locally)", _billions(param_count(m)), m.template, m.family)
    Console().print(table)
    return 0


def cmd_templates(argv: list[str]) -> int:
    _no_more(argv, "templates")
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from engine.templates import describe_templates

    table = Table("name", "description", "example (one user turn, one reply)", box=None, header_style="bold")
    for name, description, example in describe_templates():
        table.add_row(Text(name), Text(description), Text(example))
    Console().print(table)
    return 0


def cmd_datasets(argv: list[str]) -> int:
    as_json = _take_flag(argv, "--json")
    dataset_dir = _take_option(argv, "--dataset_dir")
    _no_more(argv, "datasets")
    from engine.data import load_registry

    registry = load_registry(dataset_dir)
    if as_json:
        print(json.dumps({name: dataclasses.asdict(attr) for name, attr in registry.items()}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "source", "formatting", box=None, header_style="bold")
    for name, attr in registry.items():
        table.add_row(name, f"{attr.load_from}: {attr.location}", attr.formatting or "(detected)")
    Console().print(table)
    return 0


def cmd_gpus(argv: list[str]) -> int:
    as_json = _take_flag(argv, "--json")
    _no_more(argv, "gpus")
    from engine.hardware import probe, render_gpus

    state = probe()
    if as_json:
        print(json.dumps(state.to_json(), indent=2))
        return 0
    from rich.console import Console

    Console().print(render_gpus(state))
    return 0


def cmd_estimate(argv: list[str]) -> int:
    as_json = _take_flag(argv, "--json")
    num_gpus = _take_option(argv, "--num_gpus")
    memory = _take_option(argv, "--gpu_memory_gib")
    cfg = _load_config(argv, "estimate")
    from engine.memory import estimate
    from engine.recommend import model_geometry, recommend, shape_from_config

    gpus, budget = _gpu_budget(num_gpus, memory)
    shape = shape_from_config(cfg, model_geometry(cfg.model.model_name_or_path), num_gpus=gpus)
    result = estimate(shape)
    advice = recommend(shape, budget)
    if as_json:
        print(json.dumps({**result.to_json(), "num_gpus": gpus, "recommendation": advice.to_json()}, indent=2))
        return 0
    from engine.estimate_view import render_estimate

    render_estimate(cfg.model.model_name_or_path, result, advice)
    return 0


def _gpu_budget(num_gpus: str | None, memory: str | None) -> tuple[int, float | None]:
    """How many GPUs and how much memory each has for the run: as given, else what the probe finds (free memory)."""
    for name, value in (("--num_gpus", num_gpus), ("--gpu_memory_gib", memory)):
        if value is not None and not value.replace(".", "", 1).isdigit():
            raise UserError(f"{name} takes a number, got '{value}'")
    if num_gpus is not None and memory is not None:
        return int(num_gpus), float(memory)
    from engine.hardware import probe

    from engine.recommend import memory_budget

    found = probe().gpus
    count = int(num_gpus) if num_gpus is not None else max(len(found), 1)
    return count, float(memory) if memory is not None else memory_budget(found)


def _no_more(argv: list[str], command: str) -> None:
    if argv:
        raise UserError(f"`tuner {command}` takes no argument '{argv[0]}'")


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


CONFIG_USAGE = "[CONFIG.yaml ...] [key=value ...] [--key value ...]"

COMMANDS: dict[str, Command] = {
    "train": Command(cmd_train, "Fine-tune a model (LoRA, QLoRA, freeze, full).",
                     f"tuner train {CONFIG_USAGE} [--detach] [--print-config]", takes_config=True),
    "runs": Command(cmd_runs, "List every run on this host: state, progress, loss, directory.",
                    "tuner runs [--json]"),
    "logs": Command(cmd_logs, "Print a run's log (the latest run when none is named); -f follows it.",
                    "tuner logs [RUN] [-f]"),
    "stop": Command(cmd_stop, "Stop a run gracefully: it finishes the step and saves a checkpoint.",
                    "tuner stop [RUN]"),
    "resume": Command(cmd_resume, "Continue a stopped or failed run from its last checkpoint, detached.",
                      "tuner resume [RUN]"),
    "predict": Command(cmd_predict, "Generate for a dataset's prompts and score them (BLEU-4, ROUGE).",
                       f"tuner predict {CONFIG_USAGE}", takes_config=True),
    "export": Command(cmd_export, "Merge an adapter into its base and write a checked safetensors model.",
                      f"tuner export {CONFIG_USAGE}", takes_config=True),
    "chat": Command(cmd_chat, "Chat in the terminal with a model or adapter (streaming; /clear, /exit).",
                    f"tuner chat {CONFIG_USAGE} [--system TEXT]", takes_config=True),
    "preview": Command(cmd_preview, "Show samples as the model will see them, with the learned part marked.",
                       f"tuner preview {CONFIG_USAGE} [-n N] [--json]", takes_config=True),
    "estimate": Command(cmd_estimate, "Peak GPU memory of a run per method, and the method to use on these GPUs.",
                        f"tuner estimate {CONFIG_USAGE} [--num_gpus N] [--gpu_memory_gib G] [--json]",
                        takes_config=True),
    "gpus": Command(cmd_gpus, "The NVIDIA GPUs found: memory, utilisation, temperature, power, processes.",
                    "tuner gpus [--json]"),
    "models": Command(cmd_models, "List the model catalog.", "tuner models [--json]"),
    "templates": Command(cmd_templates, "List the prompt templates with a rendered example.", "tuner templates"),
    "datasets": Command(cmd_datasets, "List the registered datasets (bundled and --dataset_dir's dataset_info.json).",
                        "tuner datasets [--dataset_dir DIR] [--json]"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tuner-tui")
    except PackageNotFoundError:
        return "unknown"


def top_help(commands: dict[str, Command]) -> str:
    lines = ["usage: tuner COMMAND [ARGS]", "", "Fine-tune open LLMs on a GPU server from your terminal.", "", "commands:"]
    width = max(map(len, commands))
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in commands.items()]
    lines += ["", "`tuner COMMAND --help` shows a command's options; every config key works as --key value,",
              "key=value or in a YAML file, with the names of LLaMA-Factory and Hugging Face TrainingArguments."]
    return "\n".join(lines)


def command_help(cmd: Command) -> str:
    lines = [f"usage: {cmd.usage}", "", cmd.summary]
    if cmd.takes_config:
        from engine.config import ALIASES, SECTIONS

        for section, cls in SECTIONS.items():
            lines += ["", f"{section}:"]
            for f in dataclasses.fields(cls):
                choices = f.metadata.get("choices")
                extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
                lines.append(f"  --{f.name} (default {f.default}){extra}\n      {f.metadata['help']}")
        lines += ["", "old spellings accepted: " + ", ".join(f"{old} = {new}" for old, new in ALIASES.items()),
                  "a bare --flash_attn means flash attention 2 (falls back to SDPA when it is not installed)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None, extra: dict[str, Command] | None = None) -> int:
    """Run one command; ``extra`` holds the commands the TUI package adds (the engine never imports it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {**COMMANDS, **(extra or {})}
    from engine.quiet import quiet_libraries

    quiet_libraries()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(top_help(commands))
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
        print(command_help(commands[name]))
        return 0
    try:
        return commands[name].run(rest)
    except UserError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print("tuner: interrupted", file=sys.stderr)
        return 130


def _fail(exc: UserError) -> int:
    lines = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
    for line in lines:
        print(f"tuner: error: {line}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
