"""Commands that answer questions without training: the catalog, templates, datasets, GPUs, memory estimates."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from engine.config.argv import load_config, no_more, take_flag, take_option
from engine.errors import UserError


def cmd_models(argv: list[str]) -> int:
    as_json = take_flag(argv, "--json")
    no_more(argv, "models")
    from engine.models.catalog import list_models, param_count

    models = list_models()
    if as_json:
        print(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
        return 0
    header = ("name", "hub id", "params", "template", "family")
    rows = [(m.name, m.hub_id or "(built locally)", _billions(param_count(m)), m.template, m.family) for m in models]
    if not sys.stdout.isatty():  # a pipe or a file: whole hub ids, tab-separated, for grep, cut and awk -F'\t'
        for row in (header, *rows):
            print("\t".join(row))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    shown = list(range(len(header)))
    for optional in ("family", "template", "params"):  # they give way, so that no name or hub id is cut
        if sum(widths[i] for i in shown) + len(shown) - 1 <= console.width:
            break
        shown.remove(header.index(optional))
    table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=True)
    for i in shown:
        table.add_column(header[i], no_wrap=True, min_width=widths[i])
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    console.print(table)
    if len(shown) < len(header):
        left_out = ", ".join(name for i, name in enumerate(header) if i not in shown)
        console.print(Text(f"({left_out} left out to fit {console.width} columns; --json has everything)",
                           style="dim"))
    return 0


def cmd_templates(argv: list[str]) -> int:
    no_more(argv, "templates")
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
    as_json = take_flag(argv, "--json")
    from engine.config.schema import DataArgs

    dataset_dir = take_option(argv, "--dataset_dir", DataArgs.dataset_dir)  # ./data, as `tuner train` reads it
    no_more(argv, "datasets")
    from engine.data import load_registry
    from engine.data.registry import STAGE_KINDS

    stage_of = {kind: ", ".join(stage for stage, kinds in STAGE_KINDS.items() if kind in kinds)
                for kinds in STAGE_KINDS.values() for kind in kinds}

    registry = load_registry(dataset_dir)
    if as_json:
        print(json.dumps({name: dataclasses.asdict(attr) for name, attr in registry.items()}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from engine.rundir.files import printable_line

    table = Table("name", "source", "formatting", "stage", box=None, header_style="bold")
    for name, attr in registry.items():  # names and paths come from the user's dataset_info.json: shown, not obeyed
        table.add_row(*(Text(printable_line(cell)) for cell in
                        (name, f"{attr.load_from}: {attr.location}", attr.formatting or "(detected)",
                         stage_of[attr.kind])))
    Console().print(table)
    return 0


def cmd_gpus(argv: list[str]) -> int:
    as_json = take_flag(argv, "--json")
    no_more(argv, "gpus")
    from engine.hardware import probe

    state = probe()
    if as_json:
        print(json.dumps(state.to_json(), indent=2))
        return 0
    from rich.console import Console

    Console().print(render_gpus(state))
    return 0


def cmd_estimate(argv: list[str]) -> int:
    as_json = take_flag(argv, "--json")
    num_gpus = take_option(argv, "--num_gpus")
    memory = take_option(argv, "--gpu_memory_gib")
    cfg = load_config(argv, "estimate")
    from engine.memory.estimate import estimate
    from engine.memory.recommend import model_geometry, recommend, shape_from_config

    gpus, budget = _gpu_budget(num_gpus, memory, cfg)
    shape = shape_from_config(cfg, model_geometry(cfg.model.model_name_or_path, cfg.model), num_gpus=gpus)
    result = estimate(shape)
    advice = recommend(shape, budget)
    from engine.cli.estimate_view import estimate_json, render_estimate

    if as_json:
        print(json.dumps(estimate_json(shape, result, advice), indent=2))
        return 0
    render_estimate(cfg.model.model_name_or_path, shape, result, advice)
    return 0


def _gpu_budget(num_gpus: str | None, memory: str | None, cfg) -> tuple[int, float | None]:
    """How many GPUs and how much memory each has for the run: as given, else the run's processes (its
    nproc_per_node x nnodes, every GPU the probe finds by default) and the least free memory among them."""
    if num_gpus is not None and not (num_gpus.isdigit() and 1 <= int(num_gpus) <= 100_000):
        raise UserError(f"--num_gpus takes a whole number of GPUs, 1 or more, got '{num_gpus}'")
    if memory is not None and not (memory.replace(".", "", 1).isdigit() and 0 < float(memory) <= 1e6):
        raise UserError(f"--gpu_memory_gib takes a number of GiB above 0, got '{memory}'")
    if num_gpus is not None and memory is not None:
        return int(num_gpus), float(memory)
    from engine.hardware import probe

    from engine.memory.recommend import memory_budget
    from engine.world import launch_plan

    found = probe().gpus
    count = int(num_gpus) if num_gpus is not None else launch_plan(cfg, gpu_count=len(found)).world_size
    return count, float(memory) if memory is not None else memory_budget(found)


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def render_gpus(state):
    """A table of the GPUs with the driver and CUDA line, or the no-GPU message (``tuner gpus``)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if not state.gpus:
        return Text(state.message or "no NVIDIA GPU found")
    table = Table("#", "name", "memory GiB", "util", "temp", "power W", "procs", box=None, header_style="bold")
    for g in state.gpus:
        index = str(g.index) if g.index == g.physical_index else f"{g.index} (nvidia-smi {g.physical_index})"
        table.add_row(index, _text(g.name), f"{_text(g.memory_used_gib)} / {_text(g.memory_total_gib)}",
                      _text(g.utilization_pct, " %"), _text(g.temperature_c, " °C"),
                      f"{_text(g.power_w)} / {_text(g.power_limit_w)}",
                      _text(None if g.processes is None else len(g.processes)))
    line = f"driver {_text(state.driver_version)}, CUDA {_text(state.cuda_version)}"
    return Group(table, Text(line))


def _text(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}{unit}" if isinstance(value, float) else f"{value}{unit}"
