"""The operator package's layers (docs/architecture.md) hold: read from the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import elmforest

ROOT = Path(elmforest.__file__).parent

# Module-name prefixes a layer must never import (every import counts: a function's, and one
# under TYPE_CHECKING too, since each still says which layer knows of which).
FORBIDDEN = {
    "elmforest.api": [
        "elmforest.planner",
        "elmforest.adapters",
        "elmforest.observe",
        "elmforest.reconcile",
        "elmforest.scheduling",
        "elmforest.local",
        "elmforest.handlers",
    ],
    "elmforest.planner": [
        "elmforest.adapters",
        "elmforest.observe",
        "elmforest.reconcile",
        "elmforest.scheduling",
        "elmforest.local",
        "elmforest.handlers",
    ],
    "elmforest.adapters": [
        "elmforest.observe",
        "elmforest.reconcile",
        "elmforest.scheduling",
        "elmforest.local",
        "elmforest.handlers",
    ],
    "elmforest.observe": [
        "elmforest.adapters.kube",
        "elmforest.reconcile",
        "elmforest.scheduling",
        "elmforest.local",
        "elmforest.handlers",
    ],
    "elmforest.reconcile": ["elmforest.scheduling.worker", "elmforest.local", "elmforest.handlers"],
    "elmforest.scheduling.queue": ["elmforest."],
    "elmforest.scheduling.expectations": ["elmforest."],
    "elmforest.scheduling.wakeups": ["elmforest."],
    "elmforest.local": [
        "elmforest.reconcile",
        "elmforest.scheduling",
        "elmforest.handlers",
        "elmforest.adapters.kube",
    ],
}
THIRD_PARTY = {  # what the pure and shared layers must not pull in
    "elmforest.planner": ["kopf", "kubernetes", "boto3", "torch"],
    "elmforest.api": ["kopf", "kubernetes", "boto3", "torch"],
    "elmforest.observe": ["kopf", "kubernetes", "torch"],
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {
        name: {i for i in _imports(path) if i in modules and i != name}
        for name, path in modules.items()
    }


def test_no_layer_imports_one_above_it() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        module, imported = _module_name(path), _imports(path)
        for layer, banned in FORBIDDEN.items():
            if module == layer or module.startswith(layer + "."):
                wrong += [f"{module} -> {i}" for i in imported for b in banned if i.startswith(b)]
        for layer, banned in THIRD_PARTY.items():
            if module == layer or module.startswith(layer + "."):
                wrong += [f"{module} -> {i}" for i in imported if i.split(".")[0] in banned]
    assert wrong == []


def test_no_import_cycles() -> None:
    graph, cycles = _graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_layers_named_in_the_docs_exist() -> None:
    for layer in FORBIDDEN:
        relative = Path(*layer.split(".")[1:])
        assert (ROOT / relative).is_dir() or (ROOT / relative).with_suffix(".py").is_file(), layer
