"""The branch planner: wait, train (one Job per attempt), verify, merge exactly once.

A version is a fingerprint of what determines the expert (data, init, training); an edit to
those fields trains version n+1, which replaces version n in the manifest when it merges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from elmcore.manifest import ExpertEntry
from elmcore.names import RunId
from elmcore.records import Progress, Result
from elmforest.api import BRANCH
from elmforest.api.branch import (
    BranchPhase,
    CheckpointStatus,
    ElmBranchSpec,
    ElmBranchStatus,
    InitStatus,
    MetricsStatus,
    ProgressStatus,
)
from elmforest.api.forest import ElmForestSpec
from elmforest.planner.actions import (
    ApplyObject,
    CreateJob,
    DeleteExpertFiles,
    DeleteJob,
    Event,
    MergeResult,
    PatchStatus,
    Plan,
    RemoveExpert,
)
from elmforest.planner.conditions import READY, set_condition
from elmforest.planner.forest import artifact_uri
from elmforest.planner.jobs import JobRequest, Owner, build_job, build_service, merge_trainer
from elmforest.planner.naming import RELEASE_ANNOTATION, branch_job_name, child_name, digest
from elmforest.planner.nodes import node_job_name, node_service_name
from elmforest.planner.observed import JobState, RunRecords
from elmforest.planner.prepare import Preparation, PrepareStep, prepare_job, progress_summary
from elmforest.planner.trainer_args import branch_argv, overrides

POLL_SECONDS = 5.0
CLEANUP_RETRY_SECONDS = 30.0  # a deleting branch whose storage is unreachable tries again
ACTIVE: frozenset[str] = frozenset({"Initializing", "Training", "Evaluating", "Merging"})
_PROGRESS_PHASE: dict[str, BranchPhase] = {
    "preparing": "Initializing",
    "initializing": "Initializing",
    "training": "Training",
    "evaluating": "Evaluating",
    "done": "Evaluating",
    "failed": "Training",
}


@dataclass(frozen=True)
class ForestView:
    name: str
    spec: ElmForestSpec
    ready: bool
    uid: str = ""
    observed: bool = True  # False: the operator has not written the forest's status yet


@dataclass(frozen=True)
class BranchInput:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: ElmBranchSpec
    status: ElmBranchStatus
    forest: ForestView | None
    domain_owner: str | None  # the branch that owns this domain in the forest (oldest wins)
    active_elsewhere: int = 0  # other branches of the forest holding a training slot
    job: JobState | None = None  # the Job of status.jobName, if it exists
    records: RunRecords = field(default_factory=RunRecords)  # of the current version's run
    merged: ExpertEntry | None = None  # the manifest's entry for this domain
    # The version's prepare step; None: not observed (its text counts as prepared).
    preparation: Preparation | None = None
    # While the spec changes: the prepare Job of the version it supersedes, if it exists.
    superseded_prepare: JobState | None = None
    # On deletion: why the forest's storage could not be read (the cleanup waits for it),
    # and whether the user released the branch from its cleanup (RELEASE_ANNOTATION).
    storage_error: str | None = None
    release: bool = False


def spec_fingerprint(spec: ElmBranchSpec) -> str:
    """What determines the expert's weights; resources, suspend and retention do not."""
    return digest(
        {
            "data": spec.data.model_dump(mode="json", exclude={"test"}),  # reports only
            "init": spec.init.model_dump(mode="json"),
            "training": overrides(spec.training),
        },
        12,
    )


def prepare_job_name(branch: str, version: int) -> str:
    return child_name(branch, f"v{version}-prep")


def prepare_datasets(spec: ElmBranchSpec) -> tuple[list[str], list[str]]:
    """The location lists (training, validation) a branch's prepare step turns into shards."""
    return spec.data.train, spec.data.validation


def current_prepare(name: str, spec: ElmBranchSpec, status: ElmBranchStatus) -> PrepareStep | None:
    """The status' version's prepare step; None when the spec has moved on (a new version
    comes first) or there is no version yet."""
    if status.version is None or status.spec_hash != spec_fingerprint(spec):
        return None
    return PrepareStep(
        prepare_job_name(name, status.version),
        RunId.prepare(spec.domain, status.version),
        prepare_datasets(spec),
    )


def superseded_prepare_name(name: str, spec: ElmBranchSpec, status: ElmBranchStatus) -> str | None:
    """The status' version's prepare Job once the spec has moved on (it is to be stopped)."""
    if status.version is None or status.spec_hash == spec_fingerprint(spec):
        return None
    return prepare_job_name(name, status.version)


def _set_phase(
    inp: BranchInput, status: ElmBranchStatus, phase: BranchPhase, reason: str, message: str
) -> None:
    status.phase, status.message = phase, message
    ready: Literal["True", "False"] = "True" if phase == "Merged" else "False"
    status.conditions = set_condition(
        status.conditions, READY, ready, reason, message, inp.generation
    )


def _finish(
    plan: Plan, inp: BranchInput, status: ElmBranchStatus, *, status_last: bool = False
) -> Plan:
    """Add the status patch (only if it changed) and an Event on each phase change.

    The patch goes first (before a Job is created, it names that Job) unless ``status_last``
    (after a merge: a crash before the patch only repeats the merge, which is a no-op).
    """
    old = inp.status
    if status.phase != old.phase or (
        status.phase in ("Failed", "Waiting") and status.message != old.message
    ):
        kind: Literal["Normal", "Warning"] = "Warning" if status.phase == "Failed" else "Normal"
        plan.actions.insert(0, Event(kind, status.phase, status.message))
    if status.to_api() != old.to_api():
        patch = PatchStatus(status.to_api())
        plan.actions.insert(len(plan.actions) if status_last else 0, patch)
    return plan


def plan_branch(inp: BranchInput) -> Plan:
    status = inp.status.model_copy(deep=True)
    status.observed_generation = inp.generation
    plan = Plan()
    if inp.forest is None:
        _set_phase(inp, status, "Waiting", "ForestNotFound", f"no ElmForest {inp.spec.forest!r}")
        return _finish(plan, inp, status)
    if inp.domain_owner is not None and inp.domain_owner != inp.name:
        message = f"domain {inp.spec.domain!r} is owned by ElmBranch {inp.domain_owner!r}"
        _set_phase(inp, status, "Failed", "DomainConflict", message)
        return _finish(plan, inp, status)

    fingerprint = spec_fingerprint(inp.spec)
    if status.spec_hash != fingerprint:
        return _new_version(inp, status, fingerprint)
    assert status.version is not None  # set together with spec_hash
    if status.phase == "Merged" and status.merged_version == status.version:
        return _finish(plan, inp, status)  # steady state: nothing to watch
    if status.phase == "Failed":
        return _finish(plan, inp, status)  # final until the spec changes

    result = inp.records.result
    if result is not None:
        return _merge(inp, status, result)
    if inp.job is not None:
        return _watch(inp, status, inp.job)
    return _start(inp, status, attempt=max(status.attempt, 1))


def _new_version(inp: BranchInput, status: ElmBranchStatus, fingerprint: str) -> Plan:
    plan = Plan(requeue_after=0.0)
    previous = status.version or 0
    ran = status.attempt > 0 or inp.superseded_prepare is not None  # its Jobs own the number
    if not ran and previous and status.merged_version != previous:
        version = previous  # that version never ran: reuse its number
    else:
        version = previous + 1
    if inp.merged is not None:
        version = max(version, inp.merged.version + 1)
    version = max(version, inp.records.used_version + 1)  # never an earlier branch's number
    status.version, status.spec_hash, status.attempt = version, fingerprint, 0
    status.job_name = None
    status.progress = status.checkpoint = status.init = None
    status.metrics = None
    running = [j for j in (inp.job, inp.superseded_prepare) if j and j.phase == "Running"]
    if not running:
        # Nothing to stop first: start the new version in this same pass (one status write).
        return _start(inp, status, attempt=1)
    for job in running:
        plan.add(DeleteJob(job.name, "superseded by a newer spec"))
    message = f"version {version}" + (" (spec changed)" if previous else "")
    _set_phase(inp, status, "Pending", "NewVersion", message)
    return _finish(plan, inp, status)


def _merge(inp: BranchInput, status: ElmBranchStatus, result: Result) -> Plan:
    assert inp.forest is not None
    policy = inp.forest.spec.merge_policy
    ppl_after, ppl_before = result.metrics.val_ppl_after, result.metrics.val_ppl_before
    status.checkpoint = CheckpointStatus(
        uri=artifact_uri(inp.forest.spec, result.path), sha256=result.sha256
    )
    status.metrics = MetricsStatus(
        val_perplexity_before=ppl_before,
        val_perplexity_after=ppl_after,
        train_tokens=result.metrics.train_tokens,
        seconds=result.metrics.seconds,
    )
    status.init = InitStatus(
        strategy=result.init_strategy or inp.spec.init.strategy.value,
        weights={_parent_key(p.kind, p.domain, p.version): p.weight for p in result.parents},
    )
    steps = result.metrics.steps
    status.progress = _progress(
        Progress(run_id=result.run_id, phase="done", step=steps, total_steps=steps)
    )
    rejected = None
    if policy.max_val_perplexity is not None and (ppl_after or float("inf")) > (
        policy.max_val_perplexity
    ):
        rejected = f"validation perplexity {ppl_after} exceeds {policy.max_val_perplexity}"
    if policy.require_improvement and not (
        ppl_after is not None and ppl_before is not None and ppl_after < ppl_before
    ):
        rejected = f"validation perplexity did not improve ({ppl_before} -> {ppl_after})"
    if rejected:
        _set_phase(inp, status, "Failed", "MergeRejected", rejected)
        return _finish(Plan(), inp, status)
    plan = Plan()
    already = inp.merged is not None and (inp.merged.version, inp.merged.sha256) == (
        result.version,
        result.sha256,
    )
    if not already:
        plan.add(MergeResult(result))
    status.merged_version = result.version
    _set_phase(inp, status, "Merged", "Merged", f"v{result.version} merged into the forest")
    return _finish(plan, inp, status, status_last=True)


def _parent_key(kind: str, domain: str | None, version: int | None) -> str:
    return "seed" if kind == "seed" else f"{domain}.v{version}"


def _progress(progress: Progress) -> ProgressStatus:
    total = progress.total_steps
    percent = f" ({100 * progress.step // total}%)" if total else ""
    return ProgressStatus(
        step=progress.step,
        total_steps=total,
        tokens_per_second=round(progress.tokens_per_second, 1),
        eta_seconds=None if progress.eta_seconds is None else round(progress.eta_seconds, 1),
        summary=f"{progress.step}/{total}{percent}",
    )


def _watch(inp: BranchInput, status: ElmBranchStatus, job: JobState) -> Plan:
    plan = Plan(requeue_after=POLL_SECONDS)
    if job.phase == "Running":
        progress = inp.records.progress
        phase: BranchPhase = "Initializing"
        if progress is not None:
            status.progress = _progress(progress)
            phase = _PROGRESS_PHASE[progress.phase]
        message = f"Job {job.name} (attempt {status.attempt})"
        if job.suspended and not job.started:
            # Created suspended for its queue; Kueue's admission (unsuspend) wakes us.
            why = f"{message} waits for admission by queue {job.queue or '(none)'}"
            _set_phase(inp, status, "Waiting", "Queued", why)
            plan.requeue_after = None
        elif not job.started:
            # No pod, no progress to poll: the pod's start is a Job change and wakes us.
            _set_phase(inp, status, phase, "JobCreated", message)
            plan.requeue_after = None
        else:
            _set_phase(inp, status, phase, phase, message)
        return _finish(plan, inp, status)
    if job.phase == "Succeeded":
        # Exit 0 without a committed result breaks the trainer's contract: count it as failed.
        job = JobState(job.name, "Failed", "NoResult", "the Job succeeded but left no result")
    if job.permanent:
        # The trainer's own words name the file; the Job's only say "exit code 65".
        progress = inp.records.progress
        why = progress.message if progress and progress.phase == "failed" else ""
        _set_phase(inp, status, "Failed", "BadInput", f"Job {job.name}: {why or job.message}")
        return _finish(Plan(), inp, status)
    if status.attempt >= inp.spec.max_attempts:
        message = f"{status.attempt} attempts failed; last: {job.reason} {job.message}".strip()
        _set_phase(inp, status, "Failed", "AttemptsExhausted", message)
        return _finish(Plan(), inp, status)
    plan.add(Event("Warning", "AttemptFailed", f"Job {job.name}: {job.reason} {job.message}"))
    return _start(inp, status, attempt=status.attempt + 1)


def _start(inp: BranchInput, status: ElmBranchStatus, attempt: int) -> Plan:
    assert inp.forest is not None and status.version is not None
    plan = Plan(requeue_after=POLL_SECONDS)
    if inp.spec.suspend:
        _set_phase(inp, status, "Suspended", "Suspended", "spec.suspend is true")
        return _finish(Plan(), inp, status)
    if not inp.forest.ready and not inp.forest.observed and inp.status.phase in (None, "Pending"):
        # The operator has just started and not yet looked at the forest: its status comes
        # within moments and wakes this branch. A "Waiting" now would be two writes of noise
        # per branch (a thousand branches: two thousand).
        return Plan(requeue_after=POLL_SECONDS)
    if not inp.forest.ready:
        _set_phase(inp, status, "Waiting", "ForestNotReady", f"forest {inp.forest.name} not ready")
        return _finish(plan, inp, status)
    # Tokenizing takes no training slot: a branch waiting for one may prepare meanwhile.
    preparation = inp.preparation
    if preparation is not None and preparation.needed and inp.forest.spec.prepare.enabled:
        preparing = _prepare(inp, status, preparation)
        if preparing is not None:
            return preparing
    limit = inp.forest.spec.max_concurrent_branches
    if inp.active_elsewhere >= limit:
        _set_phase(inp, status, "Waiting", "ConcurrencyLimit", f"{limit} branches are training")
        return _finish(plan, inp, status)
    forest = inp.forest.spec
    trainer = merge_trainer(forest.trainer, overrides(inp.spec.trainer))
    nodes = trainer.nodes
    name = (
        node_job_name(inp.name, status.version, attempt, nodes)
        if nodes > 1
        else branch_job_name(inp.name, status.version, attempt)
    )
    request = JobRequest(
        name=name,
        namespace=inp.namespace,
        owner=Owner(BRANCH.kind, inp.name, inp.uid),
        forest=inp.forest.name,
        role="branch",
        run_id=str(RunId.branch(inp.spec.domain, status.version)),
        argv=branch_argv(forest, inp.spec, status.version),
        trainer=trainer,
        storage=forest.storage,
        branch=inp.name,
        nodes=nodes,
        service=node_service_name(inp.name) if nodes > 1 else None,
    )
    status.attempt, status.job_name = attempt, name
    _set_phase(inp, status, "Initializing", "JobCreated", f"Job {name} (attempt {attempt})")
    # Status first: a crash after it re-creates the same Job name (409, a no-op).
    _finish(plan, inp, status)
    if nodes > 1:
        # The Service before the Job: its pods' names resolve from their first lookup.
        plan.add(ApplyObject(build_service(request)))
    return plan.add(CreateJob(build_job(request)))


def _prepare(inp: BranchInput, status: ElmBranchStatus, preparation: Preparation) -> Plan | None:
    """Run or watch the version's prepare Job; None once it is done (train next)."""
    assert inp.forest is not None and status.version is not None
    name = prepare_job_name(inp.name, status.version)
    job = preparation.job
    plan = Plan(requeue_after=POLL_SECONDS)
    if job is None:
        status.progress = None
        _set_phase(inp, status, "Preparing", "Preparing", f"Job {name} tokenizes the text")
        _finish(plan, inp, status)
        body = prepare_job(
            name,
            inp.namespace,
            Owner(BRANCH.kind, inp.name, inp.uid),
            inp.forest.name,
            inp.forest.spec,
            RunId.prepare(inp.spec.domain, status.version),
            prepare_datasets(inp.spec),
            branch=inp.name,
        )
        return plan.add(CreateJob(body))
    if job.phase == "Running":
        summary = progress_summary(preparation.records)
        message = f"Job {name} tokenizes the text" + (f": {summary}" if summary else "")
        if not job.started:
            plan.requeue_after = None  # its pod's start wakes us
        _set_phase(inp, status, "Preparing", "Preparing", message)
        return _finish(plan, inp, status)
    if job.phase == "Failed":
        progress = preparation.records.progress
        why = progress.message if progress and progress.phase == "failed" else job.message
        reason = "BadInput" if job.permanent else "PrepareFailed"
        _set_phase(inp, status, "Failed", reason, f"Job {name}: {why}")
        return _finish(Plan(), inp, status)
    return None  # Succeeded: the shards are there


def plan_deletion(inp: BranchInput) -> Plan:
    """On deletion: leave the manifest (if this branch owns the domain), then maybe the files.
    A plan with ``requeue_after`` set is blocked: the branch keeps its finalizer."""
    if inp.storage_error is not None:
        return _cleanup_blocked(inp, inp.storage_error)
    plan = Plan()
    owns = inp.domain_owner in (None, inp.name)
    if owns and inp.merged is not None:
        plan.add(RemoveExpert(inp.spec.domain))
        plan.add(Event("Normal", "Removed", f"expert {inp.spec.domain} left the forest"))
    if owns and inp.spec.retention == "Delete":
        plan.add(DeleteExpertFiles(inp.spec.domain))
    return plan


def _cleanup_blocked(inp: BranchInput, error: str) -> Plan:
    """The storage that holds the branch's expert cannot be read: say so on the branch and
    retry, never silently leave the expert behind; the user may release the branch instead."""
    domain = inp.spec.domain
    if inp.release:
        message = f"released without cleanup: expert {domain} may remain in storage ({error})"
        return Plan().add(Event("Warning", "Released", message))
    message = (
        f"cannot remove expert {domain} from the forest: {error}; retrying. To let the branch "
        f"go without cleaning up, annotate it {RELEASE_ANNOTATION}=true"
    )
    plan = Plan(requeue_after=CLEANUP_RETRY_SECONDS)
    if inp.status.message != message:
        status = inp.status.model_copy(update={"message": message})
        plan.add(Event("Warning", "CleanupBlocked", message), PatchStatus(status.to_api()))
    return plan
