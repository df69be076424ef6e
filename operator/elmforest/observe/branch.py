"""A branch's planner input, observed one way for both modes.

The cluster reads through Kopf's indexes and the API, local mode through its state file; both
implement :class:`BranchSource`, and :func:`observe_branch` decides what to read and builds
the :class:`~elmforest.planner.branch.BranchInput` the pure planner takes. Blocking: the
operator calls it from an I/O thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

from pydantic import ValidationError

from elmcore.manifest import Manifest
from elmforest.adapters.errors import SecretError
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api.branch import ElmBranchSpec, ElmBranchStatus
from elmforest.api.forest import StorageSpec
from elmforest.planner.branch import (
    BranchInput,
    ForestView,
    current_prepare,
    prepare_datasets,
    spec_fingerprint,
    superseded_prepare_name,
)
from elmforest.planner.defaults import Defaults
from elmforest.planner.naming import RELEASE_ANNOTATION
from elmforest.planner.observed import JobState
from elmforest.planner.policy import Policy
from elmforest.planner.prepare import Preparation
from elmforest.planner.siblings import ForestBranches, forest_view, owner_before_deletion


class InvalidSpecError(ValueError):
    """The object's spec does not validate: a message for its status, never a retry."""


class BranchSource(Protocol):
    """What observing a branch reads, wherever this mode keeps it."""

    @property
    def defaults(self) -> Defaults | None:
        """The installation's defaults for forest fields the spec leaves out (the chart's)."""

    @property
    def policy(self) -> Policy:
        """The installation's guardrails: what a forest may name."""

    def forest(self, name: str) -> Mapping[str, Any] | None:
        """The forest object (as the API returns it), None if there is none."""

    def branches(self, forest: str) -> ForestBranches:
        """The forest's branches, as the planners see each other."""

    def reserved(self, forest: str) -> set[str]:
        """Branches given a slot so recently that ``branches`` may not show it yet."""

    def job(self, name: str) -> JobState | None:
        """A Job of this branch, as last seen (a just-created one counts as running)."""

    def storage(self, spec: StorageSpec) -> ForestStorage:
        """The forest's storage client (raises SecretError for an unusable Secret)."""

    def manifest(self, storage: ForestStorage) -> Manifest | None:
        """The manifest as read once for this pass over the forest's branches."""

    def used_versions(self, storage: ForestStorage) -> dict[str, int]:
        """Each domain's highest version in storage (one listing shared by a pass)."""


def spec_of(body: Mapping[str, Any]) -> ElmBranchSpec:
    try:
        return ElmBranchSpec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        raise InvalidSpecError(validation_message(error, "spec")) from error


def validation_message(error: ValidationError, prefix: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{prefix}.{where}: {first['msg']}" if where else f"{prefix}: {first['msg']}"


def observe_branch(source: BranchSource, body: Mapping[str, Any]) -> BranchInput:
    """Everything the planner needs about one branch, read as little as it can be: a merged
    branch whose spec has not moved reads nothing from storage, and a deleting one only the
    manifest's entry for its domain."""
    meta = body["metadata"]
    name = meta["name"]
    spec = spec_of(body)
    status = ElmBranchStatus.model_validate(body.get("status") or {})
    deleting = bool(meta.get("deletionTimestamp"))
    branches = source.branches(spec.forest)
    # A forest being deleted still holds its storage: its branches leave the manifest first.
    view = forest_view(source.forest(spec.forest), source.defaults, deleting=deleting)
    # A forest outside the guardrails is never acted on: no storage read, no Job (the forest
    # says why); its branches wait as for a forest that is not ready.
    forbidden = view is not None and source.policy.problem(view.spec) is not None
    if view is not None and forbidden:
        view = replace(view, ready=False)
    inp = BranchInput(
        name=name,
        namespace=meta.get("namespace", ""),
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
        spec=spec,
        status=status,
        forest=view,
        domain_owner=(
            owner_before_deletion(branches.siblings, name, spec.domain)
            if deleting
            else branches.owners.get(spec.domain)
        ),
        job=source.job(status.job_name) if status.job_name else None,
    )
    if deleting:
        if view is None or forbidden:
            return inp  # the forest is gone: its storage is the user's to keep or delete
        return _observe_cleanup(source, inp, view.spec.storage, meta.get("annotations") or {})
    inp = replace(
        inp,
        active_elsewhere=slots_elsewhere(source, inp),
        superseded_prepare=_job(source, superseded_prepare_name(name, spec, status)),
    )
    if (
        view is None
        or forbidden
        or (status.phase == "Merged" and status.merged_version == status.version)
    ):
        return inp  # no forest to act for, or steady: nothing in storage can change the plan
    return _observe_storage(source, inp, source.storage(view.spec.storage))


def _observe_cleanup(
    source: BranchSource, inp: BranchInput, spec: StorageSpec, annotations: Mapping[str, str]
) -> BranchInput:
    """What a deletion needs: the manifest's entry for the domain, read afresh; or why the
    storage cannot be read (the planner then waits, or lets a released branch go)."""
    release = annotations.get(RELEASE_ANNOTATION, "").lower() == "true"
    try:
        found = source.storage(spec).view()
    except SecretError as error:
        return replace(inp, storage_error=str(error), release=release)
    if found.error is not None or found.manifest is None:
        why = found.error or "the manifest is unreadable"
        return replace(inp, storage_error=why, release=release)
    return replace(inp, merged=found.manifest.experts.get(inp.spec.domain))


def slots_elsewhere(source: BranchSource, inp: BranchInput) -> int:
    """How many other branches of the forest hold a training slot. The operator counts again
    under the forest's lock, where concurrent reconciles take slots."""
    holders = source.branches(inp.spec.forest).active | source.reserved(inp.spec.forest)
    return len(holders - {inp.name})


def _observe_storage(source: BranchSource, inp: BranchInput, storage: ForestStorage) -> BranchInput:
    assert inp.forest is not None
    spec, status = inp.spec, inp.status
    manifest = source.manifest(storage)
    view: ForestView = inp.forest
    if manifest is not None and manifest.tokenizer and manifest.seed:
        # Storage is the truth: a forest whose seed is merged is ready, whether or not the
        # forest's own reconcile has written that to its status yet.
        view = replace(view, ready=True, observed=True)
    used = source.used_versions(storage) if status.version is None else None
    records, merged = storage.observe_branch(
        spec.domain, records_version(spec, status, inp.job), manifest, used
    )
    preparation = None
    if inp.job is None or inp.job.phase == "Failed":  # the planner may start a Job: prepare?
        preparation = _preparation(source, inp, storage, manifest)
    return replace(inp, forest=view, records=records, merged=merged, preparation=preparation)


def records_version(
    spec: ElmBranchSpec, status: ElmBranchStatus, job: JobState | None
) -> int | None:
    """The version whose run records the planner needs; None when it cannot use them: a new
    version never ran, and a Job with no pod yet has written nothing."""
    if status.version is None or status.spec_hash != spec_fingerprint(spec):
        return None
    if job is not None and job.phase == "Running" and not job.started:
        return None
    return status.version


def _preparation(
    source: BranchSource, inp: BranchInput, storage: ForestStorage, manifest: Manifest | None
) -> Preparation | None:
    """The prepare step of the branch's current version, as far as the planner needs it."""
    step = current_prepare(inp.name, inp.spec, inp.status)
    job = source.job(step.job_name) if step else None
    return storage.preparation(
        manifest, prepare_datasets(inp.spec), job, step.run if step else None
    )


def _job(source: BranchSource, name: str | None) -> JobState | None:
    return source.job(name) if name else None
