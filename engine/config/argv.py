"""A command's words (argv) as the engine reads them, for either face: the options a command takes for itself
(taken out of argv; what is left is config), the model named by the first word, and the validated config."""

from __future__ import annotations

from engine.errors import UserError


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
