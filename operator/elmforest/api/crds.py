"""The CustomResourceDefinitions, built from the models; ``crds/`` holds their YAML.

Regenerate with ``elmforest crds --write crds/``; a test fails when the files drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from elmforest.api import BRANCH, CATEGORY, CLUSTER_SET, FOREST, GROUP, VERSION, Kind
from elmforest.api.branch import ElmBranchSpec, ElmBranchStatus
from elmforest.api.clusterset import ElmClusterSetSpec, ElmClusterSetStatus
from elmforest.api.forest import ElmForestSpec, ElmForestStatus
from elmforest.api.rules import NAME_IS_LABEL
from elmforest.api.schema import crd_schema


def _column(name: str, path: str, kind: str = "string", **extra: Any) -> dict[str, Any]:
    return {"name": name, "jsonPath": path, "type": kind, **extra}


AGE = _column("Age", ".metadata.creationTimestamp", "date")

COLUMNS = {
    FOREST.kind: [
        _column("Phase", ".status.phase"),
        _column("Experts", ".status.expertCount", "integer"),
        _column("Revision", ".status.manifest.revision", "integer", priority=1),
        AGE,
    ],
    BRANCH.kind: [
        _column("Forest", ".spec.forest"),
        _column("Domain", ".spec.domain"),
        _column("Phase", ".status.phase"),
        _column("Progress", ".status.progress.summary"),
        _column("Perplexity", ".status.metrics.valPerplexityAfter", "number"),
        _column("Version", ".status.version", "integer", priority=1),
        AGE,
    ],
    CLUSTER_SET.kind: [
        _column("Forest", ".spec.forest"),
        _column("Clusters", ".spec.clusters", "integer"),
        _column("Phase", ".status.phase"),
        _column("Documents", ".status.documents", "integer"),
        _column("Clusterer", ".status.clustererSha256", priority=1),
        _column("Version", ".status.version", "integer", priority=1),
        AGE,
    ],
}

DESCRIPTIONS = {
    FOREST.kind: "A forest of expert LMs (BTM): storage, architecture, tokenizer, seed, trainer.",
    BRANCH.kind: "One domain's expert LM: initialised from the forest, trained, then merged.",
    CLUSTER_SET.kind: "Domains found, not given (c-BTM): an unlabeled corpus clustered into "
    "k branches.",
}


# A forest's fields that take the chart's install-time defaults where the user left them unset
# (planner/defaults.py). A schema default there would have the API server fill them in first,
# and the chart's value would never apply (``trainer: {queueName: q}`` reset the chart's gpus).
CHART_DEFAULTED = ("trainer", "storage")


def _without_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def _spec_schema(kind: Kind, spec: type[BaseModel]) -> dict[str, Any]:
    schema = crd_schema(spec)
    if kind.kind == FOREST.kind:
        for name in CHART_DEFAULTED:
            schema["properties"][name] = _without_defaults(schema["properties"][name])
    return schema


def _schema(kind: Kind, spec: type[BaseModel], status: type[BaseModel]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": DESCRIPTIONS[kind.kind],
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _spec_schema(kind, spec),
            "status": crd_schema(status),
        },
        "x-kubernetes-validations": [NAME_IS_LABEL.schema()],
    }


def crd(kind: Kind) -> dict[str, Any]:
    models: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
        FOREST.kind: (ElmForestSpec, ElmForestStatus),
        BRANCH.kind: (ElmBranchSpec, ElmBranchStatus),
        CLUSTER_SET.kind: (ElmClusterSetSpec, ElmClusterSetStatus),
    }
    spec, status = models[kind.kind]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name, "labels": {"app.kubernetes.io/part-of": "elmforest"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": [kind.short_name],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": COLUMNS[kind.kind],
                    "schema": {"openAPIV3Schema": _schema(kind, spec, status)},
                }
            ],
        },
    }


HEADER = "# Generated from operator/elmforest/api by `elmforest crds --write crds/`. Do not edit.\n"


def render(kind: Kind) -> str:
    return HEADER + yaml.safe_dump(crd(kind), sort_keys=False, width=100)


def files() -> dict[str, str]:
    return {f"{GROUP}_{kind.plural}.yaml": render(kind) for kind in (FOREST, BRANCH, CLUSTER_SET)}


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files().items():
        path = folder / name
        path.write_text(text)
        written.append(path)
    return written
