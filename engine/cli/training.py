"""Commands that train and use models: train (also the classic --do_predict and --detach), predict, export, chat,
preview."""

from __future__ import annotations

import json
import sys

from engine.config.argv import load_config, take_flag, take_model, take_option
from engine.cli.console import say
from engine.errors import UserError


def cmd_train(argv: list[str]) -> int:
    """Also the classic entry point: `--do_predict` without `--do_train` predicts, `--export_dir` alone exports."""
    print_config = take_flag(argv, "--print-config")
    detach = take_flag(argv, "--detach")
    force = take_flag(argv, "--force")  # start even while another run holds the same GPUs
    from engine.config.schema import build_config, given_values
    from engine.config.validation import problems_in
    from engine.errors import ConfigError
    from engine.models.catalog import with_recipe

    take_model(argv, "train")
    values = given_values(argv)
    problems: list[str] = []
    cfg = build_config(values, problems)
    t = cfg.train
    command = "predict" if t.do_predict and not t.do_train else "train"
    recipe = with_recipe(values) if command == "train" else None
    if recipe is not None and recipe.applied:
        problems = []
        cfg = build_config(recipe.values, problems)
        t = cfg.train
    problems += problems_in(cfg, command)  # unknown keys and bad values in one round
    if problems:
        raise ConfigError(problems)
    if print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if command == "predict":
        return run_predict(cfg)
    if recipe is not None and recipe.applied:
        say(recipe.describe(), hang=2, file=sys.stderr)  # stdout stays the run's line, for scripts
    from engine.runs.launch import start_run, with_run_directory

    from engine.config.validation import learning_rate_warning

    if "learning_rate" in values and learning_rate_warning(cfg):  # the user's own rate: a recipe's is meant
        say(f"tuner: warning: {learning_rate_warning(cfg)}", hang=2, file=sys.stderr)
    if detach:
        status = start_run(cfg, detach=True, force=force)
        say(f"started run {status.id} (pid {status.pid}) in {status.output_dir}", hang=2)
        say(f"  follow it: tuner logs {status.id} -f\n  stop it:   tuner stop {status.id}\n  list:      tuner runs",
            hang=13)
        return 0
    from engine.cli.train_view import TerminalView

    cfg = with_run_directory(cfg)  # where --do_predict reads what was trained
    code = start_run(cfg, detach=False, force=force, view=TerminalView())
    if code == 0 and t.do_predict:
        return run_predict_after_training(cfg)
    return code


def _warn(line: str) -> None:
    say(line, file=sys.stderr)  # wrapped to the terminal


def run_predict_after_training(cfg) -> int:
    """`--do_train --do_predict`: predict with what was just trained (in ``cfg``'s resolved output_dir), into
    <output_dir>/predict."""
    import copy
    from pathlib import Path

    from engine.infer.followup import adapter_chain

    run_dir = cfg.train.output_dir
    predict = copy.deepcopy(cfg)
    if cfg.finetune.finetuning_type == "lora":
        predict.model.adapter_name_or_path = adapter_chain(cfg.to_dict(), run_dir)
    else:
        predict.model.model_name_or_path = run_dir
    predict.train.output_dir = str(Path(run_dir) / "predict")
    return run_predict(predict)


def cmd_predict(argv: list[str]) -> int:
    from engine.infer.followup import load_followup_config

    cfg = load_followup_config(argv, "predict", warn=_warn)
    return run_predict(cfg)


def cmd_export(argv: list[str]) -> int:
    from engine.infer.followup import load_followup_config

    cfg = load_followup_config(argv, "export", warn=_warn)
    from engine.infer.export import export_model, render_summary

    summary = export_model(cfg, note=lambda line: say(line, hang=2))
    say(render_summary(summary), hang=2)
    return 0


def cmd_chat(argv: list[str]) -> int:
    system = take_option(argv, "--system")
    from engine.infer.followup import load_followup_config

    cfg = load_followup_config(argv, "chat", warn=_warn)
    from engine.cli.chat import run_chat

    return run_chat(cfg, system=system)


def cmd_preview(argv: list[str]) -> int:
    as_json = take_flag(argv, "--json")
    count = take_option(argv, "-n", "3")
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"-n takes a number of samples, got '{count}'")
    cfg = load_config(argv, "preview")
    from engine.cli.preview_view import render_preview
    from engine.data.preview import build_preview

    preview = build_preview(cfg, int(count))
    if as_json:
        print(json.dumps(preview.to_json(), ensure_ascii=False, indent=2))
    else:
        render_preview(preview)
    return 0


def run_predict(cfg) -> int:
    """Predict with a progress bar, then say where the predictions went and how they score."""
    from rich.progress import Progress

    from engine.infer.predict import predict, summary_lines

    with Progress(transient=True) as bar:
        task = bar.add_task("predicting", total=None)
        out, results = predict(cfg, lambda done, total: bar.update(task, completed=done, total=total))
    say("\n".join(summary_lines(out, results)), hang=2)
    return 0
