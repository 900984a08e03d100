"""What the wizard has chosen so far: flat config keys as typed, the method and the chosen GPUs.

Everything here turns the choices into engine calls' arguments; the checks themselves are the engine's.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config.schema import FIELDS, TunerConfig, base_type, build_config, coerce, read_config_file
from engine.errors import ConfigError, UserError
from engine.models.catalog import RecipeUse, with_recipe
from engine.paths import state_dir
from engine.config.validation import validate

METHODS = ("full", "freeze", "lora", "qlora-8bit", "qlora-4bit")
REMEMBERED = "wizard.yaml"

# What an empty field stands for, where the config's default alone would not say it.
DEFAULT_NOTES = {
    "lora_alpha": "2 x rank",
    "lora_target": "all: every linear layer",
    "max_steps": "-1: use epochs",
    "output_dir": "saves/<model>/<method>/<time>",
    "eval_steps": "none: every logging_steps",
    "save_total_limit": "none: keep all",
    "max_samples": "none: all of them",
    "neftune_noise_alpha": "none: off",
    "bf16": "auto: when the GPU has it",
    "fp16": "auto: when the GPU lacks bf16",
}


def default_text(key: str, recipe: RecipeUse | None = None) -> str:
    """What leaving ``key`` empty means: the model's recipe value while the recipe (``Choices.recipe()``) applies,
    else the config's default, explained where a bare value would not say it."""
    if recipe is not None and key in recipe.applied:
        return f"{_flag_text(recipe.applied[key])}: {recipe.model}'s recipe"
    if key in DEFAULT_NOTES:
        return DEFAULT_NOTES[key]
    default = FIELDS[key][1].default
    return str(default).lower() if isinstance(default, bool) else str(default)


def help_text(key: str) -> str:
    return f"{key}: {FIELDS[key][1].metadata['help']}"


def kind_of(key: str) -> str:
    """How the wizard asks for ``key``: "switch" (on or off), "select" (one of a few values; on/off settings that
    default to a decision at run time offer true and false) or "input"."""
    f = FIELDS[key][1]
    if f.metadata.get("choices"):
        return "select"
    if base_type(key) is bool:
        return "select" if f.default is None else "switch"
    return "input"


def options_of(key: str) -> tuple[str, ...]:
    """The values a "select" setting offers."""
    choices = FIELDS[key][1].metadata.get("choices")
    return tuple(str(choice) for choice in choices) if choices else ("true", "false")


def method_keys(method: str) -> dict[str, Any]:
    """The config keys a method stands for (the inverse of engine.memory.estimate.method_of)."""
    if method.startswith("qlora-"):
        return {"finetuning_type": "lora", "quantization_bit": int(method[len("qlora-"):-len("bit")])}
    return {"finetuning_type": method, "quantization_bit": None}


@dataclass
class Choices:
    """The values typed so far (strings, as entered), the chosen method and GPU indices (None: all)."""

    values: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
    gpus: list[int] | None = None
    preselected_for: str | None = None  # the model the method step picked ``method`` for; None once the user chose

    def flat(self) -> dict[str, Any]:
        """The flat key/value pairs for build_config: empty strings left out, the method's keys added, and the
        model's recipe (engine.models.catalog.with_recipe) where it applies."""
        return self.recipe().values

    def recipe(self) -> RecipeUse:
        """The chosen model's recipe as it applies to what was typed and chosen: whole, or not at all."""
        values = {k: v for k, v in self.values.items() if v not in ("", None) and not k.startswith("_")}
        if self.gpus:
            values["nproc_per_node"] = str(len(self.gpus))  # the GPUs chosen: one process each (unset: every one)
        if self.method:
            values.update({k: v for k, v in method_keys(self.method).items() if v is not None})
        return with_recipe(values)

    def model_section(self):
        """The model keys as typed (token, revision, cache directory: how to ask the hub), or None while they do not
        make a config."""
        try:
            return build_config({k: v for k, v in self.flat().items() if FIELDS.get(k, ("",))[0] == "model"}).model
        except ConfigError:
            return None

    def recipe_method(self) -> str | None:
        """The method the model's recipe trains with, while it applies; None when it does not or names none."""
        from engine.memory.estimate import method_of

        applied = self.recipe().applied
        if "finetuning_type" not in applied:
            return None
        return method_of(applied["finetuning_type"], applied.get("quantization_bit"))

    def config(self) -> TunerConfig:
        return build_config(self.flat())

    def world_size(self, gpu_count: int) -> int:
        """The run's training processes on ``gpu_count`` chosen GPUs here: nproc_per_node on each of nnodes machines
        (1 while the launch keys are wrong: the engine says why when the run starts)."""
        from engine.world import launch_plan

        try:
            return launch_plan(self.config(), gpu_count=gpu_count).world_size
        except UserError:
            return 1

    def other_node_commands(self, gpu_count: int) -> list[str]:
        """The command each other machine of a multi-machine run types (empty on one machine)."""
        from engine.runs.distributed import other_node_commands
        from engine.world import launch_plan

        return other_node_commands(launch_plan(self.config(), gpu_count=gpu_count), shlex.split(self.command_line()))

    def is_on(self, key: str) -> bool:
        """An on/off setting as typed, or its default (the model's recipe or the config's) when it is empty or not a
        true/false word."""
        try:
            return bool(coerce(key, self.values[key]))
        except (KeyError, ValueError):
            return bool(self.recipe().applied.get(key, FIELDS[key][1].default))

    def problems(self, keys: tuple[str, ...], command: str = "train") -> dict[str, str]:
        """Each of ``keys`` with the engine's complaint about it (build_config, then validate), empty when sound."""
        try:
            cfg = build_config(self.flat())
            validate(cfg, command)
        except ConfigError as exc:
            found: dict[str, str] = {}
            for problem in exc.problems:
                for key in keys:
                    if problem.startswith(key) or f"'{key}'" in problem:
                        found.setdefault(key, problem)
            return found
        return {}

    def flags(self) -> list[str]:
        """`tuner train` flags for every value that differs from the default, and every key the recipe set."""
        cfg, default = self.config().to_dict(), TunerConfig().to_dict()
        recipe = self.recipe().applied
        flags = []
        for key, value in cfg.items():
            if (value != default.get(key) or key in recipe) and value is not None:
                flags += [f"--{key}", _flag_text(value)]
        return flags

    def command_line(self) -> str:
        return shlex.join(["tuner", "train", *self.flags(), "--detach"])

    def to_yaml(self) -> str:
        return self.config().to_yaml()

    def remember(self, directory: Path | None = None) -> Path:
        """Keep these choices for the next launch (state_dir()/wizard.yaml)."""
        path = (directory or state_dir()) / REMEMBERED
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = {k: str(v) for k, v in self.values.items() if v not in ("", None) and not _secret(k)}
        method = self.method if self.preselected_for is None else None  # a preselection is made again next time
        path.write_text(yaml.safe_dump({"values": kept, "method": method, "gpus": self.gpus}, sort_keys=False))
        return path

    @classmethod
    def recalled(cls, directory: Path | None = None) -> Choices:
        """The last launch's choices, or none when there are none (or they cannot be read)."""
        path = (directory or state_dir()) / REMEMBERED
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        values = data.get("values") if isinstance(data.get("values"), dict) else {}
        method = data.get("method") if data.get("method") in METHODS else None
        gpus = data.get("gpus") if isinstance(data.get("gpus"), list) else None
        return cls({str(k): str(v) for k, v in values.items()}, method, gpus)

    @classmethod
    def from_file(cls, path: str | Path, base: Choices | None = None) -> Choices:
        """``base`` overlaid with a config file's keys (UserError when it cannot be read)."""
        data = read_config_file(path)
        choices = base or cls()
        cfg = build_config(data)  # the file's own mistakes, reported before the wizard opens
        values = dict(choices.values)
        method = choices.method
        for key, value in data.items():
            if key in ("finetuning_type", "quantization_bit"):
                continue
            values[key] = "" if value is None else _flag_text(value)
        if "finetuning_type" in data or "quantization_bit" in data:
            from engine.memory.estimate import method_of

            method = method_of(cfg.finetune.finetuning_type, cfg.model.quantization_bit)
        return cls(values, method, choices.gpus)


def _flag_text(value: Any) -> str:
    """A value as typed on a command line: true/false, a mapping or list as JSON (lr_scheduler_kwargs ...)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _secret(key: str) -> bool:
    """A token and the like: never written to the remembered choices."""
    return key in FIELDS and bool(FIELDS[key][1].metadata.get("secret"))


def save_config(choices: Choices, path: str) -> Path:
    """Write the config YAML to ``path``; UserError when it cannot be written."""
    target = Path(path).expanduser()
    if not path.strip():
        raise UserError("give a path to save the config to")
    if not target.parent.is_dir():
        raise UserError(f"cannot save to {target}: the folder {target.parent} does not exist")
    text = choices.to_yaml()
    try:
        target.write_text(text)
    except OSError as exc:
        raise UserError(f"cannot save to {target}: {exc.strerror}") from None
    return target


def start_run(choices: Choices, visible_devices: str | None = None) -> Path:
    """The run these choices describe, started detached through the engine (as `tuner train --detach` does); its
    directory. UserError when the engine refuses it."""
    from engine.runs.launch import start_run as launch

    cfg = choices.config()
    validate(cfg, "train")
    return Path(launch(cfg, detach=True, visible_devices=visible_devices).output_dir)
