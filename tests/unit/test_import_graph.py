"""The engine's layering (docs/design.md), read from the source: every import, those inside functions included (they
run too, only later). No circle of modules; neither face (the TUI, the CLI) imports the other, and the engine never
imports the TUI; training and inference never import the orchestration that starts runs; models, data and memory sit
below them; the run directory's format imports only the leaves. Each rule names what broke it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "tuner_tui")
FACES = ("tuner_tui", "engine.cli")
ORCHESTRATION = ("engine.runs",)  # start, supervise, stop, resume, the GPU queue, follow-up tasks
STAGES = ("engine.train", "engine.infer")
PARTS = ("engine.models", "engine.data", "engine.memory")
# The run directory's format and its readers: what every part reads and writes, so it imports only the leaves.
FORMAT = ("engine.rundir",)
LEAVES = ("engine.errors", "engine.paths", "engine.hardware", "engine.quiet")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (a ``from package import name`` counts as the module ``name`` when
    there is one, else the package)."""
    known = modules()

    def ours(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(ours(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets.update(ours(f"{base}.{alias.name}") or ours(base) for alias in node.names)
        graph[name] = {target for target in targets if target and target != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def arrows(graph: dict[str, set[str]], sources: tuple[str, ...], targets: tuple[str, ...]) -> list[str]:
    def within(name: str, prefixes: tuple[str, ...]) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)

    return sorted(f"{source} -> {target}" for source, imported in graph.items() if within(source, sources)
                  for target in imported if within(target, targets))


def outside(graph: dict[str, set[str]], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Every module but those of ``allowed`` (and the ``engine`` package itself, which holds nothing)."""
    return tuple(name for name in graph if name != "engine" and not any(
        name == prefix or name.startswith(prefix + ".") for prefix in allowed))


def test_no_module_takes_part_in_a_circle_of_imports():
    assert circles(import_graph()) == []


def test_the_engine_never_imports_the_tui_and_the_tui_never_imports_the_cli():
    """The two faces stand side by side over the engine: the `tuner` executable (engine.cli) finds the terminal
    app's commands through its entry point, and what both show comes from the engine."""
    graph = import_graph()
    assert arrows(graph, ("engine",), ("tuner_tui",)) == []
    assert arrows(graph, ("tuner_tui",), ("engine.cli",)) == []
    below_the_faces = tuple(name for name in graph if name.startswith("engine.") and not name.startswith("engine.cli"))
    assert arrows(graph, below_the_faces, ("engine.cli",)) == []


def test_models_data_and_memory_sit_below_training_inference_and_what_starts_runs():
    """Models may write into a run's format (a download's events), never reach up into what uses them."""
    assert arrows(import_graph(), PARTS, (*STAGES, *FACES, *ORCHESTRATION)) == []


def test_training_and_inference_never_import_the_orchestration_above_them():
    """A stop request, the GPU turn and the rank are handed to training (engine.train.stage.StopAsked,
    run_training's gpu_turn, engine.world), never fetched from the code that starts runs."""
    assert arrows(import_graph(), STAGES, (*ORCHESTRATION, *FACES)) == []


def test_the_run_directorys_format_imports_only_the_leaves():
    graph = import_graph()
    assert arrows(graph, FORMAT, outside(graph, FORMAT + LEAVES)) == []


def test_the_config_and_the_world_sit_beside_the_format():
    """The typed config and which processes a run has: foundations. Only the config's validation, which checks a
    config against the data registry and the models, reaches up to the parts."""
    graph = import_graph()
    config = tuple(name for name in graph if name.startswith(("engine.config", "engine.world"))
                   and name not in ("engine.config", "engine.config.validation"))  # the package: its modules
    assert arrows(graph, config, outside(graph, ("engine.config", "engine.world", *FORMAT, *LEAVES))) == []


def test_the_leaves_import_only_each_other():
    """Errors, paths, the hardware probe and the libraries' quiet switch: what everything may import."""
    graph = import_graph()
    assert arrows(graph, LEAVES, outside(graph, LEAVES)) == []


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "engine.train.runner" in graph["engine.runs.launch"]  # `from engine.train.runner import run_training`
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
