"""The cluster set planner (c-BTM, issue 30): wait for the forest, fit, assign, branch, Ready.

Each step is done when storage says so (the committed clusterer of this version; one
assignment record per worker naming that clusterer), not when a Job says so: a restarted
operator, or a Job deleted after it finished, picks up where the files are. A failed step's Job
fails the set with the trainer's own message (bad input is never retried); a changed spec is a
new version with new Job names, which starts over. The generated branches are applied only
once every document is assigned, so a new version's branches switch their data at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError

from elmforest.api.branch import ElmBranchSpec
from elmforest.api.clusterset import ElmClusterSetSpec, ElmClusterSetStatus
from elmforest.api.forest import ElmForestSpec
from elmforest.planner import cluster_steps as steps
from elmforest.planner.actions import ApplyObject, CreateJob, DeleteObject, Event, PatchStatus, Plan
from elmforest.planner.conditions import READY, set_condition
from elmforest.planner.jobs import Owner
from elmforest.planner.observed import JobState, RunRecords

POLL_SECONDS = 10.0
SETTLED = frozenset({"Merged", "Failed"})


@dataclass(frozen=True)
class AssignmentCounts:
    """One assignment worker's record: the clusterer it used and its documents per cluster."""

    clusterer: str
    index: int
    train: list[int]
    valid: list[int]


@dataclass(frozen=True)
class GeneratedBranch:
    """A branch this set created, as last seen."""

    spec: dict[str, object]
    phase: str
    current: bool  # its status describes its current generation
    deleting: bool = False


@dataclass(frozen=True)
class ClusterSetInput:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: ElmClusterSetSpec | None
    status: ElmClusterSetStatus
    forest: ElmForestSpec | None = None  # None: missing or invalid
    forest_ready: bool = False
    jobs: dict[str, JobState] = field(default_factory=dict)
    clusterer: str | None = None  # the version's committed clusterer (sha256), if fitted
    assignments: list[AssignmentCounts] = field(default_factory=list)
    records: dict[str, RunRecords] = field(default_factory=dict)  # "fit" / "assign"
    branches: dict[str, GeneratedBranch] = field(default_factory=dict)
    taken: frozenset[str] = frozenset()  # branch names in the namespace that are not the set's
    storage_error: str | None = None


def plan_cluster_set(inp: ClusterSetInput, spec_error: str | None = None) -> Plan:
    status = inp.status.model_copy(deep=True)
    status.observed_generation = inp.generation
    spec = inp.spec
    if spec is None or spec_error:
        return _settle(inp, status, "Failed", "InvalidSpec", spec_error or "the spec is invalid")
    if inp.forest is None or not inp.forest_ready:
        state = "not found" if inp.forest is None else "not Ready yet"
        message = f"waiting for ElmForest {spec.forest!r} ({state})"
        return _settle(inp, status, "Pending", "WaitingForForest", message, POLL_SECONDS * 3)
    if inp.storage_error:
        return _settle(inp, status, "Failed", "StorageError", inp.storage_error, POLL_SECONDS * 3)
    key = steps.storage_name(inp.name, spec)
    fingerprint = steps.fingerprint(spec)
    if status.spec_hash != fingerprint:  # a new version: its own files, Jobs and counts
        status.version = (status.version or 0) + 1
        status.spec_hash, status.storage_name = fingerprint, key
        status.clusterer_sha256, status.documents, status.cluster_sizes = None, None, []
    owner = steps.set_owner(inp.name, inp.uid)
    sha = inp.clusterer
    if sha is None:
        argv = steps.fit_argv(inp.forest, spec, key)
        name = steps.fit_job_name(inp.name, spec)
        return _step(inp, status, owner, "Fitting", name, steps.fit_run(key), argv, 1)
    status.clusterer_sha256 = sha
    # Only records of this clusterer, shaped for its k (a foreign or torn record is not done).
    fits = [a for a in inp.assignments if a.clusterer == sha]
    counts = {a.index: a for a in fits if len(a.train) == len(a.valid) == spec.clusters}
    if set(counts) != set(range(spec.parallelism)):
        argv = steps.assign_argv(inp.forest, spec, key, sha)
        name = steps.assign_job_name(inp.name, spec)
        run = steps.assign_run(key)
        return _step(inp, status, owner, "Assigning", name, run, argv, spec.parallelism)
    train = [sum(c.train[i] for c in counts.values()) for i in range(spec.clusters)]
    valid = [sum(c.valid[i] for c in counts.values()) for i in range(spec.clusters)]
    status.cluster_sizes = [t + v for t, v in zip(train, valid, strict=True)]
    status.documents = sum(status.cluster_sizes)
    return _branch(inp, spec, inp.forest, status, owner, key, sha, train, valid)


def _step(
    inp: ClusterSetInput,
    status: ElmClusterSetStatus,
    owner: Owner,
    phase: Literal["Fitting", "Assigning"],
    job_name: str,
    run_id: str,
    argv: list[str],
    completions: int,
) -> Plan:
    """Run (or watch) the Job of the fit or the assignment; its end is read from storage."""
    assert inp.spec is not None and inp.forest is not None
    job = inp.jobs.get(job_name)
    records = inp.records.get("fit" if phase == "Fitting" else "assign", RunRecords())
    progress = records.progress
    if job is not None and job.phase == "Failed":
        said = progress.message if progress and progress.phase == "failed" else job.message
        failed = {"Fitting": "FitFailed", "Assigning": "AssignFailed"}[phase]
        reason = "BadInput" if job.permanent else failed
        return _settle(inp, status, "Failed", reason, f"{job_name}: {said}")
    if job is not None and job.phase == "Succeeded":
        # The trainer commits its files before it exits: a finished Job without them lost
        # them (deleted storage?). Say so instead of running the step forever.
        missing = "clusterer" if phase == "Fitting" else "assignment records"
        message = f"{job_name} succeeded but its {missing} are not in storage"
        return _settle(inp, status, "Failed", "Missing", message)
    plan = Plan(requeue_after=POLL_SECONDS)
    if job is None:
        forest = inp.spec.forest
        body = steps.step_job(
            owner, inp.namespace, forest, inp.forest, job_name, run_id, argv, completions
        )
        plan.add(CreateJob(body))
    return _settle(inp, status, phase, phase, f"Job {job_name}", plan=plan)


def _branch(
    inp: ClusterSetInput,
    spec: ElmClusterSetSpec,
    forest: ElmForestSpec,
    status: ElmClusterSetStatus,
    owner: Owner,
    key: str,
    sha: str,
    train: list[int],
    valid: list[int],
) -> Plan:
    """Apply one branch per cluster that has training documents; remove the others."""
    plan = Plan()
    wanted: dict[str, ElmBranchSpec] = {}
    for cluster in range(spec.clusters):
        if train[cluster]:
            name = steps.branch_name(inp.name, cluster)
            wanted[name] = steps.branch_spec(
                spec.forest, forest, spec, key, sha, cluster, name, valid[cluster] > 0
            )
    clashes = sorted(inp.taken & set(wanted))
    if clashes:  # never take over a branch someone else made (server-side apply would)
        message = (
            f"ElmBranch {', '.join(clashes)} exists and is not this set's: delete or rename it "
            "(the set names its branches <set>-c<i>)"
        )
        return _settle(inp, status, "Failed", "NameTaken", message, POLL_SECONDS * 3)
    for name, branch_spec in wanted.items():
        seen = inp.branches.get(name)
        if seen is None or not _same_spec(seen.spec, branch_spec):
            body = steps.branch_body(owner, inp.namespace, name, spec.forest, branch_spec)
            plan.add(ApplyObject(body))
    for name, seen in inp.branches.items():
        if name not in wanted and not seen.deleting:
            plan.add(DeleteObject("ElmBranch", name))
    status.branches = sorted(wanted)
    empty = spec.clusters - len(wanted)
    note = f" ({empty} empty clusters have no branch)" if empty else ""
    phases = {name: _current_phase(inp.branches.get(name)) for name in wanted}
    merged = sum(1 for phase in phases.values() if phase == "Merged")
    failed = [name for name, phase in phases.items() if phase == "Failed"]
    settled = all(phase in SETTLED for phase in phases.values())
    if settled and not failed:
        message = f"{merged} branches merged{note}"
        return _settle(inp, status, "Ready", "BranchesMerged", message, plan=plan)
    if settled:
        message = f"branches failed: {', '.join(failed)} ({merged} merged){note}"
        return _settle(inp, status, "Failed", "BranchFailed", message, plan=plan)
    plan.requeue_after = POLL_SECONDS * 3
    message = f"{merged} of {len(wanted)} branches merged{note}"
    return _settle(inp, status, "Branching", "Branching", message, plan=plan)


def _current_phase(branch: GeneratedBranch | None) -> str | None:
    """The branch's phase for its current spec; None while it is missing or not caught up."""
    return branch.phase if branch is not None and branch.current else None


def _same_spec(stored: dict[str, object], wanted: ElmBranchSpec) -> bool:
    """Equal as specs: the API server fills the schema's defaults into what it stores."""
    try:
        return ElmBranchSpec.model_validate(stored) == wanted
    except ValidationError:
        return False


def _settle(
    inp: ClusterSetInput,
    status: ElmClusterSetStatus,
    phase: Literal["Pending", "Fitting", "Assigning", "Branching", "Ready", "Failed"],
    reason: str,
    message: str,
    requeue: float | None = None,
    plan: Plan | None = None,
) -> Plan:
    """Set the phase and Ready condition; an Event on a change of phase; the status patch."""
    plan = plan or Plan(requeue_after=requeue)
    status.phase, status.message = phase, message
    ready: Literal["True", "False"] = "True" if phase == "Ready" else "False"
    status.conditions = set_condition(
        status.conditions, READY, ready, reason, message, inp.generation
    )
    if phase != inp.status.phase:
        kind: Literal["Normal", "Warning"] = "Warning" if phase == "Failed" else "Normal"
        plan.actions.insert(0, Event(kind, reason if phase == "Failed" else phase, message))
    if status.to_api() != inp.status.to_api():
        plan.add(PatchStatus(status.to_api()))
    return plan
