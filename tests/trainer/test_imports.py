"""The trainer's import graph: the CLI answers without torch, and the layers of docs/architecture.md
hold (no cycles, nothing importing upward).

``elmtrain --help``, a bad command line and a rerun with nothing to do used to import torch and
transformers (about 7 s); ``bench/cli.py`` measures what keeping them out buys. Here the import
graph is checked, never a time.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import elmtrain
from tests.conftest import TINY_MODEL
from tests.conftest import elmtrain as run_elmtrain
from tests.trainer.conftest import ForestFactory, training

# Builds the whole command line (what --help builds), runs an argument error, then the two
# commands given (split by "--"), and says which of torch, transformers and tokenizers (the
# modules that cost seconds) this process imported.
PROBE = """
import json, sys
from elmtrain.cli import build_parser, main

build_parser()
codes = {}
for name, argv in (("help", ["--help"]), ("usage", ["prepare"])):
    try:
        main(argv)
    except SystemExit as exit:
        codes[name] = exit.code
split = sys.argv.index("--")
codes["prepare"] = main(sys.argv[1:split])
codes["seed"] = main(sys.argv[split + 1:])
heavy = sorted(m for m in ("torch", "transformers", "tokenizers") if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_help_usage_errors_and_reruns_import_no_torch(
    seeded_forest: Path, corpus: Path, forest_copy: ForestFactory
) -> None:
    """A rerun of ``prepare`` whose shards are committed, and of a finished ``seed``, decide
    from storage alone: neither torch, transformers nor the tokenizers is imported."""
    forest = str(forest_copy(seeded_forest, "forest"))
    data = ["--data", str(corpus / "cooking" / "train.txt")]
    prepare = ["prepare", "--forest", forest, *data, "--val-data", str(corpus / "cooking")]
    run_elmtrain(*prepare)  # the first time: tokenized
    domains = ("cooking", "sailing", "finance", "poetry")
    seed = ["seed", "--forest", forest, "--model", TINY_MODEL, "--merge"]
    seed += ["--training", training(steps=40), "--data"]
    seed += [str(corpus / d / "train.txt") for d in domains]  # as the template's seed ran
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, "--log-level", "warning", *prepare, "--", *seed],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found["codes"] == {"help": 0, "usage": 2, "prepare": 0, "seed": 0}
    assert found["heavy"] == []


# ---- the layers (docs/architecture.md, "Layers of the trainer package") ----

PACKAGE = Path(elmtrain.__file__).parent

# Top to bottom. A module may import its own unit (subpackage or top-level module) and any unit
# of a lower layer, never one beside it or above it; elmcore is below them all.
LAYERS = [
    {"__main__"},
    {"cli"},
    {"commands"},
    {"run", "serving"},
    {"scoring", "mix"},
    {"forest"},
    {"model", "data", "runtime", "clusters"},
    {"config", "cache"},
]
RANK = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports anywhere: at the top, under
    TYPE_CHECKING or inside a function (``from package import module`` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                child = f"{base}.{alias.name}"
                targets.add(child if child in known else base)
    return {target for target in targets if target in known or target.startswith("elmforest")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) - {name} for name, path in modules.items()}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's own __init__


def test_no_import_cycles() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_layers_hold() -> None:
    graph = _graph()
    unplaced = sorted({u for m in graph if (u := _unit(m)) is not None and u not in RANK})
    assert not unplaced, f"place these in LAYERS (and docs/architecture.md): {unplaced}"
    wrong = []
    for module, targets in sorted(graph.items()):
        unit = _unit(module)
        for target in sorted(targets):
            if target.startswith("elmforest"):
                wrong.append(f"{module} -> {target} (the operator)")
                continue
            other = _unit(target)
            if unit is None or other is None or other == unit:
                continue
            if RANK[other] <= RANK[unit]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_graph_sees_what_it_checks() -> None:
    """The walk finds top-level, TYPE_CHECKING and function-level imports (or the two tests
    above would pass on an empty graph)."""
    graph = _graph()
    assert "elmtrain.data.store" in graph["elmtrain.forest"]  # inside a method
    assert "elmtrain.forest" in graph["elmtrain.run.lineage"]  # under TYPE_CHECKING
    assert "elmtrain.run.outcome" in graph["elmtrain.commands.seed"]  # at the top
