"""What every command shares: how it is described, and its own options taken out of argv (the rest is config)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from engine.errors import UserError

EXIT_USER_ERROR = 2


@dataclasses.dataclass
class Command:
    run: Callable[[list[str]], int]
    summary: str
    usage: str
    takes_config: bool = False


def take_flag(argv: list[str], *names: str) -> bool:
    """Remove a command's own on/off option (``--json``) from argv; the rest is config."""
    found = any(name in argv for name in names)
    argv[:] = [a for a in argv if a not in names]
    return found


def take_option(argv: list[str], name: str, default: str | None = None) -> str | None:
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


def no_more(argv: list[str], command: str, why: str = "") -> None:
    if argv:
        raise UserError(f"`tuner {command}` takes no argument '{argv[0]}'{why}")


def take_run(argv: list[str], command: str, why: str = "") -> str | None:
    """The optional RUN of `tuner logs|stop|resume [RUN]` (its own options already taken); any other word or option
    is refused, never ignored."""
    run = argv.pop(0) if argv and not argv[0].startswith("-") else None
    no_more(argv, command, why if argv and argv[0].startswith("-") else "")
    return run


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def take_model(argv: list[str], command: str) -> None:
    """`tuner estimate MODEL ...`: a first word that is not a config file, key=value or an option names the model,
    as --model_name_or_path does; both at once must agree."""
    from pathlib import Path

    from engine.config.schema import parse_overrides

    if not argv or argv[0].startswith("-") or "=" in argv[0] or argv[0].endswith(CONFIG_SUFFIXES):
        return
    model = argv.pop(0)
    if Path(model).is_file():
        raise UserError(f"{model} is a file, not a model: config files end in .yaml, .yml or .json")
    flag = parse_overrides(argv)[1].get("model_name_or_path")
    if flag is not None and flag != model:
        raise UserError(f"`tuner {command}` got two models: {model} and --model_name_or_path {flag}; give one")
    if flag is None:
        argv += ["--model_name_or_path", model]


def load_config(argv: list[str], command: str, base: dict | None = None):
    """The command's config from a first word naming the model, files and overrides on top of ``base``, validated
    for ``command``."""
    from engine.config.schema import parse_args
    from engine.config.validation import problems_in
    from engine.errors import ConfigError

    take_model(argv, command)
    problems: list[str] = []
    cfg = parse_args(argv, base, problems, command)
    problems += problems_in(cfg, command)  # the keys' and the values' problems in one round
    if problems:
        raise ConfigError(problems)
    return cfg


def load_followup_config(argv: list[str], command: str):
    """predict, chat and export: with ``--run RUN`` the run's weights and settings come first, argv on top."""
    import sys

    from engine.cli.console import say
    from engine.runs.files import printable_line

    run_ref = take_option(argv, "--run")
    if run_ref is None:
        return load_config(argv, command)
    if argv and not argv[0].startswith("-") and "=" not in argv[0] and not argv[0].endswith(CONFIG_SUFFIXES):
        raise UserError(f"`tuner {command} --run {run_ref}` takes its model from the run: leave out '{argv[0]}'",
                        hint="--model_name_or_path puts another base under a LoRA run's adapter")
    from engine.infer.followup import NOT_INHERITED_WARNING, followup_values, run_config_values, training_data_warning
    from engine.runs.jobs import find_job

    job = find_job(run_ref)
    cfg = load_config(argv, command, followup_values(job, command))
    if cfg.model.trust_remote_code:
        print(f"tuner: warning: trust_remote_code is on: the Python code that ships with "
              f"{printable_line(cfg.model.model_name_or_path)} will run", file=sys.stderr)
    elif run_config_values(job).get("trust_remote_code") is True:
        print("tuner: warning: " + NOT_INHERITED_WARNING.format(id=job.id, model=printable_line(
            cfg.model.model_name_or_path)), file=sys.stderr)
    if command == "predict":
        warning = training_data_warning(job, cfg.data.eval_dataset or cfg.data.dataset)
        if warning:
            say(f"tuner: warning: {printable_line(warning)}", file=sys.stderr)
    return cfg

