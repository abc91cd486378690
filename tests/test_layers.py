"""The house: imports point down the data flow and never in circles (lazy, in-function imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import medlsdm

ROOT = Path(medlsdm.__file__).parent

# data -> autoencoder -> diffusion -> pipeline -> training / evaluation -> demo -> cli; a module may import its
# own layer (same package) or lower ones. runs/export read run folders (weights, configs) for the pipeline.
LAYERS = {
    "errors": 0, "config": 0, "io": 0, "devices": 0,
    "data": 1, "viz": 1,
    "autoencoder": 2,
    "diffusion": 3,
    "runs": 4, "export": 4,
    "pipeline": 5,
    "training": 6, "evaluation": 6,
    "demo": 7,
    "cli": 8, "cli_parser": 8, "__main__": 9,
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medlsdm"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("medlsdm")]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def _layer(module: str) -> int:
    return LAYERS.get(_part(module), -1)


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in _graph() if m != "medlsdm" and _layer(m) < 0]
    assert unplaced == [], "add these to LAYERS"


def test_imports_point_down_the_flow() -> None:
    upward = sorted(f"{m} -> {d}" for m, deps in _graph().items() if m != "medlsdm" for d in deps
                    if d != "medlsdm" and _layer(d) > _layer(m))
    assert upward == []


def test_evaluation_never_imports_training_and_back() -> None:
    crossing = sorted(f"{m} -> {d}" for m, deps in _graph().items() for d in deps
                      if {_part(m), _part(d)} == {"evaluation", "training"})
    assert crossing == []


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep == "medlsdm" or node == "medlsdm":
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
