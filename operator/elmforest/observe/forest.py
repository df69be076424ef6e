"""A forest's planner input, observed one way for both modes (see :mod:`.branch`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pydantic import ValidationError

from elmcore.errors import ElmError
from elmcore.records import ServingRecord
from elmforest.adapters.errors import SecretError
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api.forest import ElmForestSpec, ElmForestStatus, StorageSpec
from elmforest.observe.branch import validation_message
from elmforest.planner.defaults import Defaults
from elmforest.planner.forest import ForestInput, seed_prepare
from elmforest.planner.mix import desired_mix, pending_branches
from elmforest.planner.observed import JobState, OwnedObject, StorageView
from elmforest.planner.policy import Policy
from elmforest.planner.siblings import ForestBranches


class ForestSource(Protocol):
    """What observing a forest reads, wherever this mode keeps it."""

    @property
    def defaults(self) -> Defaults | None:
        """The installation's defaults for fields the spec leaves out (the chart's)."""

    @property
    def policy(self) -> Policy:
        """The installation's guardrails: what a forest may name."""

    @property
    def runs_servers(self) -> bool:
        """Whether this mode runs ``spec.serving`` (a cluster: a Deployment; local mode
        leaves serving to ``elmforest serve -f``)."""

    @property
    def requires_image(self) -> bool:
        """Whether Jobs run an image (a cluster) or local processes."""

    def storage(self, spec: StorageSpec) -> ForestStorage:
        """The forest's storage client (raises SecretError for an unusable Secret)."""

    def forest_jobs(self, forest: str) -> dict[str, JobState]:
        """The forest's own Jobs (tokenizer, seed, prepare), by name."""

    def branches(self, forest: str) -> ForestBranches:
        """The forest's branches."""

    def serving_objects(self, forest: str) -> dict[str, OwnedObject]:
        """The forest's servers' Deployment and Service as last seen, by kind."""


@dataclass(frozen=True)
class ObservedForest:
    input: ForestInput
    spec_error: str | None  # the spec does not validate: a Failed status, never a retry
    storage: ForestStorage | None  # for the plan's storage actions


def observe_forest(source: ForestSource, body: Mapping[str, Any]) -> ObservedForest:
    meta = body["metadata"]
    name = meta["name"]
    spec: ElmForestSpec | None = None
    spec_error = None
    try:
        spec = ElmForestSpec.model_validate(body.get("spec") or {})
        if source.defaults is not None:
            spec = source.defaults.apply(spec)
    except ValidationError as error:
        spec_error = validation_message(error, "spec")
    if spec is not None and not source.runs_servers:
        spec = spec.model_copy(update={"serving": None})
    jobs = source.forest_jobs(name)
    branches = source.branches(name)
    live = [(s.name, s.phase) for s in branches.siblings if not s.deleting]
    inp = ForestInput(
        name=name,
        namespace=meta.get("namespace", ""),
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
        spec=spec,
        status=ElmForestStatus.model_validate(body.get("status") or {}),
        jobs=jobs,
        branches_by_domain=branches.owners,
        pending_branches=pending_branches(live),
        require_image=source.requires_image,
        serving=source.serving_objects(name) if source.runs_servers else {},
    )
    if spec is None:
        return ObservedForest(inp, spec_error, None)
    forbidden = source.policy.problem(spec)
    if forbidden is not None:  # refused before its storage is touched or anything runs
        return ObservedForest(replace(inp, forbidden=forbidden), None, None)
    try:
        storage = source.storage(spec.storage)
    except SecretError as error:
        view = StorageView(error=str(error), error_reason=error.reason)
        return ObservedForest(replace(inp, storage=view), None, None)
    view, records = storage.observe_forest()
    mix = desired_mix(name, spec, view.manifest, inp.pending_branches)
    if mix is not None:  # the run of the mix the forest should have (planner/mix.py)
        records["mix"] = storage.records(mix.run_id)
    preparation = None
    step = seed_prepare(name, spec, view.manifest)
    if step is not None:
        job = jobs.get(step.job_name)
        preparation = storage.preparation(view.manifest, step.datasets, job, step.run)
    serving_records = _serving_records(storage) if spec.serving is not None else []
    inp = replace(
        inp,
        storage=view,
        records=records,
        preparation=preparation,
        serving_records=serving_records,
    )
    return ObservedForest(inp, None, storage)


def _serving_records(storage: ForestStorage) -> list[ServingRecord]:
    try:
        return storage.serving_records()
    except ElmError:
        return []  # unreadable now: the status shows no served revision until next time
