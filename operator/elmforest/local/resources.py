"""Read ``ElmForest``, ``ElmBranch`` and ``ElmClusterSet`` YAML for local mode, failing fast on
anything wrong.

Every error names the file, the line and the field (``forest.yaml:7: spec.foo: unknown field``).
Relative paths in locations are resolved against the folder of the file that holds them (as
Compose and Kustomize do), so an example folder runs from anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from elmcore.errors import BadInputError
from elmcore.names import validate_label
from elmforest.api import API_VERSION, BRANCH, CLUSTER_SET, FOREST, GROUP
from elmforest.api.base import DNS1123_LABEL, DNS1123_SUBDOMAIN
from elmforest.api.branch import ElmBranchSpec
from elmforest.api.clusterset import ElmClusterSetSpec
from elmforest.api.forest import STORAGE_URI, ElmForestSpec

YAML_SUFFIXES = (".yaml", ".yml")
# Where each kind holds locations (JSON paths below spec; "*" walks a list).
_LOCATIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    FOREST.kind: (
        ("storage", "uri"),
        ("model", "pretrained"),
        ("tokenizer", "from"),
        ("tokenizer", "data", "*"),
        ("seed", "data", "*"),
        ("seed", "valData", "*"),
        ("evaluation", "*", "data", "*"),
        ("evaluation", "*", "priorData", "*"),
    ),
    BRANCH.kind: (("data", "train", "*"), ("data", "validation", "*"), ("data", "test", "*")),
    CLUSTER_SET.kind: (("data", "*"),),
}
_MODELS: dict[str, type[ElmForestSpec | ElmBranchSpec | ElmClusterSetSpec]] = {
    FOREST.kind: ElmForestSpec,
    BRANCH.kind: ElmBranchSpec,
    CLUSTER_SET.kind: ElmClusterSetSpec,
}
AnySpec = ElmForestSpec | ElmBranchSpec | ElmClusterSetSpec


class ManifestError(BadInputError):
    """A YAML file that local mode cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class Declared:
    kind: str
    name: str
    source: Path
    line: int
    spec: AnySpec
    raw_spec: dict[str, Any]  # as written, locations resolved (what the state records)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Declaration:
    forests: dict[str, Declared]
    branches: dict[str, Declared]
    files: tuple[Path, ...]
    cluster_sets: dict[str, Declared] = field(default_factory=dict)

    def branch_spec(self, name: str) -> ElmBranchSpec:
        spec = self.branches[name].spec
        assert isinstance(spec, ElmBranchSpec)
        return spec


def yaml_files(paths: Iterable[Path]) -> list[Path]:
    """The YAML files of ``paths``: files as given, folders' ``*.yaml`` (not recursive)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in YAML_SUFFIXES and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise ManifestError(f"{path}: no such file or folder")
    return list(dict.fromkeys(f.absolute() for f in files))


def resolve_location(value: str, base: Path) -> str:
    """``data/x.txt`` -> ``file:///abs/base/data/x.txt``; URIs pass through unchanged."""
    if "://" in value:
        return value
    absolute = value if value.startswith("/") else os.path.normpath(base / value)
    return "file://" + Path(absolute).as_posix()


def _resolve(node: Any, path: Sequence[str], base: Path) -> Any:
    if not path:
        return resolve_location(node, base) if isinstance(node, str) else node
    head, rest = path[0], path[1:]
    if head == "*" and isinstance(node, list):
        return [_resolve(item, rest, base) for item in node]
    if isinstance(node, dict) and head in node:
        return {**node, head: _resolve(node[head], rest, base)}
    return node


def _line_of(node: yaml.Node, loc: Sequence[str | int]) -> int:
    """The 1-based line of the deepest node along ``loc`` that exists."""
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            child = node.value[part] if part < len(node.value) else None
        if child is None:
            break
        node = child
    return node.start_mark.line + 1


_NAME_PATTERNS = (DNS1123_LABEL, DNS1123_SUBDOMAIN)
# Parts of a pydantic error location that name a union member, not a field.
_UNION_MEMBERS = {"int", "str", "float", "bool"}


def _explain(error: ErrorDetails) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "string_pattern_mismatch":
        pattern = str((error.get("ctx") or {}).get("pattern", ""))
        if pattern in _NAME_PATTERNS:
            return (
                f"{value!r} is not a valid name (DNS-1123: lowercase letters, digits and '-', "
                "starting and ending with a letter or digit)"
            )
        if pattern == STORAGE_URI:
            return (
                f"{value!r} is not a storage location (s3://bucket/prefix or file:///path, "
                "without '.' or '..' segments, '%', '?' or '#')"
            )
        return f"{value!r} does not match {pattern}"
    return str(error["msg"]).removeprefix("Value error, ")


def field_path(loc: Sequence[str | int]) -> str:
    """A pydantic location as Kubernetes writes a field path: ``spec.evaluation[0].data``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _UNION_MEMBERS and "[" not in part:  # function-after[...] and such
            path += f".{part}" if path else part
    return path


def _validate(
    model: type[BaseModel], data: Any, where: Path, node: yaml.Node, what: str
) -> BaseModel:
    try:
        # Strict, from JSON, as the API server decodes what kubectl sends: "5" is no integer,
        # "yes" no boolean (YAML's dates and the like travel as strings, as in kubectl).
        return model.model_validate_json(json.dumps(data, default=str), strict=True)
    except ValidationError as error:
        errors = error.errors()
        # A typo shows up twice (unknown field, required field missing): name the typo.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc = ["spec", *first["loc"]]
        line = _line_of(node, loc)
        raise ManifestError(
            f"{where}:{line}: {what}: {field_path(loc)}: {_explain(first)}"
        ) from None


def _documents(path: Path) -> list[tuple[yaml.Node, Any]]:
    try:
        loader = yaml.SafeLoader(path.read_text())
    except OSError as error:
        raise ManifestError(f"{path}: cannot read ({error.strerror})") from None
    documents = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                documents.append((node, loader.construct_document(node)))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or error
        raise ManifestError(f"{path}{line}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()
    return documents


def _declared(path: Path, node: yaml.Node, body: Any) -> Declared | None:
    line = node.start_mark.line + 1
    if not isinstance(body, dict):
        raise ManifestError(f"{path}:{line}: expected a resource (a mapping), got {body!r:.60}")
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if not str(api_version or "").startswith(f"{GROUP}/"):
        return None  # Secrets, Namespaces ...: a cluster's business, not local mode's
    if api_version != API_VERSION or kind not in _MODELS:
        raise ManifestError(
            f"{path}:{line}: unknown resource {api_version}/{kind} "
            f"(expected {API_VERSION} ElmForest, ElmBranch or ElmClusterSet)"
        )
    metadata: dict[str, Any] = body.get("metadata") or {}
    try:
        # validate_label checks the type too: a missing or non-string name is an error.
        name = validate_label(metadata.get("name"), "metadata.name")  # type: ignore[arg-type]
    except BadInputError as error:
        where = _line_of(node, ["metadata", "name"])
        raise ManifestError(f"{path}:{where}: {kind}: {error}") from None
    raw = body.get("spec")
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}:{line}: {kind} {name!r}: spec: required field is missing")
    for location in _LOCATIONS[kind]:
        raw = _resolve(raw, location, path.parent)
    spec = _validate(_MODELS[kind], raw, path, node, f"{kind} {name!r}")
    assert isinstance(spec, AnySpec)
    trainer_path = ["branchTemplate", "trainer"] if kind == CLUSTER_SET.kind else ["trainer"]
    holder = spec.branch_template if isinstance(spec, ElmClusterSetSpec) else spec
    nodes = getattr(holder.trainer, "nodes", None) or 1
    if nodes > 1:
        # One machine has no nodes to spread a branch over; pretending (N processes on
        # localhost) would show nothing a cluster's rendezvous needs. Say so before any work.
        where = _line_of(node, ["spec", *trainer_path, "nodes"])
        raise ManifestError(
            f"{path}:{where}: {kind} {name!r}: spec.{'.'.join(trainer_path)}.nodes: {nodes} "
            "needs a cluster (local mode trains each branch on this machine; use trainer.gpus "
            "for its GPUs)"
        )
    return Declared(kind, name, path, line, spec, raw)


def _check_references(
    forests: dict[str, Declared], branches: dict[str, Declared], sets: dict[str, Declared]
) -> None:
    known = ", ".join(sorted(forests)) or "none"
    for item in [*sets.values(), *branches.values()]:
        assert isinstance(item.spec, ElmBranchSpec | ElmClusterSetSpec)
        if item.spec.forest not in forests:
            raise ManifestError(
                f"{item.where}: {item.kind} {item.name!r}: spec.forest: no ElmForest "
                f"{item.spec.forest!r} among the given files (declared: {known})"
            )
    owners: dict[tuple[str, str], Declared] = {}
    for branch in branches.values():
        spec = branch.spec
        assert isinstance(spec, ElmBranchSpec)
        other = owners.setdefault((spec.forest, spec.domain), branch)
        if other is not branch:
            raise ManifestError(
                f"{branch.where}: ElmBranch {branch.name!r}: spec.domain: {spec.domain!r} is "
                f"already trained by ElmBranch {other.name!r} ({other.where})"
            )


def _declared_in(path: Path, found: dict[str, dict[str, Declared]]) -> list[str]:
    """Record the resources of one file; return what is wrong with it (one line per object)."""
    problems = []
    try:
        documents = _documents(path)
    except ManifestError as error:
        return [str(error)]
    for node, body in documents:
        try:
            declared = _declared(path, node, body)
        except ManifestError as error:
            problems.append(str(error))
            continue
        if declared is None:
            continue
        twin = found[declared.kind].setdefault(declared.name, declared)
        if twin is not declared:
            problems.append(
                f"{declared.where}: {declared.kind} {declared.name!r} is declared twice "
                f"(also at {twin.where})"
            )
    return problems


def load(paths: Iterable[Path]) -> Declaration:
    """Every ElmForest and ElmBranch in ``paths``, validated, with cross-references checked.

    Like ``kubectl apply -f folder/``, every file is read and every invalid one reported (one
    line each, in one error), not only the first.
    """
    files = yaml_files(paths)
    found: dict[str, dict[str, Declared]] = {kind: {} for kind in _MODELS}
    problems: list[str] = []
    for path in files:
        problems += _declared_in(path, found)
    if problems:
        raise ManifestError("\n".join(problems))
    forests, branches, sets = (found[k] for k in (FOREST.kind, BRANCH.kind, CLUSTER_SET.kind))
    _check_references(forests, branches, sets)
    return Declaration(forests, branches, tuple(files), sets)
