"""A cluster set's planner input, observed one way for both modes (see :mod:`.branch`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pydantic import ValidationError

from elmcore.errors import ElmError
from elmforest.adapters.errors import SecretError
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api.clusterset import ElmClusterSetSpec, ElmClusterSetStatus
from elmforest.api.forest import StorageSpec
from elmforest.observe.branch import validation_message
from elmforest.planner import cluster_steps as steps
from elmforest.planner.clusterset import ClusterSetInput, GeneratedBranch
from elmforest.planner.defaults import Defaults
from elmforest.planner.observed import JobState
from elmforest.planner.siblings import forest_view


class ClusterSetSource(Protocol):
    """What observing a cluster set reads, wherever this mode keeps it."""

    @property
    def defaults(self) -> Defaults | None:
        """The installation's defaults for forest fields the spec leaves out (the chart's)."""

    def forest(self, name: str) -> Mapping[str, Any] | None:
        """The forest object (as the API returns it), None if there is none."""

    def storage(self, spec: StorageSpec) -> ForestStorage:
        """The forest's storage client (raises SecretError for an unusable Secret)."""

    def set_jobs(self, name: str) -> dict[str, JobState]:
        """The set's own Jobs (fit, assignment), by name."""

    def set_branches(self, name: str) -> Sequence[Mapping[str, Any]]:
        """The branches the set generated (as the API returns them)."""

    def branch_names(self) -> set[str]:
        """Every branch's name in the set's namespace, whoever made it."""


@dataclass(frozen=True)
class ObservedClusterSet:
    input: ClusterSetInput
    spec_error: str | None


def generated(body: Mapping[str, Any]) -> GeneratedBranch:
    meta, status = body["metadata"], body.get("status") or {}
    return GeneratedBranch(
        spec=dict(body.get("spec") or {}),
        phase=str(status.get("phase", "Pending")),
        current=status.get("observedGeneration") == meta.get("generation"),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def observe_cluster_set(source: ClusterSetSource, body: Mapping[str, Any]) -> ObservedClusterSet:
    meta = body["metadata"]
    name = meta["name"]
    inp = ClusterSetInput(
        name=name,
        namespace=meta.get("namespace", ""),
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
        spec=None,
        status=ElmClusterSetStatus.model_validate(body.get("status") or {}),
    )
    try:
        spec = ElmClusterSetSpec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        return ObservedClusterSet(inp, validation_message(error, "spec"))
    forest = forest_view(source.forest(spec.forest), source.defaults)
    branches = {b["metadata"]["name"]: generated(b) for b in source.set_branches(name)}
    inp = replace(
        inp,
        spec=spec,
        forest=forest.spec if forest else None,
        forest_ready=bool(forest and forest.ready),
        jobs=source.set_jobs(name),
        branches=branches,
        taken=frozenset(source.branch_names() - set(branches)),
    )
    if forest is None or not forest.ready:
        return ObservedClusterSet(inp, None)  # nothing to read before the forest is Ready
    key = steps.storage_name(name, spec)
    try:
        storage = source.storage(forest.spec.storage)
        clusterer, assignments = storage.cluster_set(key, spec.parallelism)
        records = {
            "fit": storage.records(steps.fit_run(key)),
            "assign": storage.records(steps.assign_run(key)),
        }
    except (SecretError, ElmError) as error:
        return ObservedClusterSet(replace(inp, storage_error=str(error)), None)
    inp = replace(inp, clusterer=clusterer, assignments=assignments, records=records)
    return ObservedClusterSet(inp, None)
