"""The branch planner is a pure function: every decision is tested without servers."""

from __future__ import annotations

from typing import Any

from elmcore.manifest import ExpertEntry
from elmcore.records import Metrics, Progress, Result
from elmforest.api.branch import ElmBranchSpec, ElmBranchStatus
from elmforest.api.forest import ElmForestSpec
from elmforest.planner.actions import (
    CreateJob,
    DeleteJob,
    Event,
    MergeResult,
    PatchStatus,
    RemoveExpert,
)
from elmforest.planner.branch import (
    BranchInput,
    ForestView,
    plan_branch,
    plan_deletion,
    spec_fingerprint,
)
from elmforest.planner.observed import JobState, RunRecords, job_state

IMAGE = "r.example/t@sha256:" + "a" * 64
FOREST = ElmForestSpec.model_validate(
    {"storage": {"uri": "s3://bkt/f"}, "trainer": {"image": IMAGE}, "maxConcurrentBranches": 2}
)
SPEC = ElmBranchSpec.model_validate(
    {"forest": "f", "domain": "cooking", "data": {"train": ["s3://bkt/d/cooking.txt"]}}
)


def inp(**changes: Any) -> BranchInput:
    base: dict[str, Any] = {
        "name": "cook",
        "namespace": "ns",
        "uid": "u1",
        "generation": 1,
        "spec": SPEC,
        "status": ElmBranchStatus(),
        "forest": ForestView("f", FOREST, ready=True, uid="fu"),
        "domain_owner": "cook",
    }
    return BranchInput(**{**base, **changes})


def status_of(plan_actions: list[Any]) -> ElmBranchStatus:
    patch = next(a for a in plan_actions if isinstance(a, PatchStatus))
    return ElmBranchStatus.model_validate(patch.status)


def versioned(version: int = 1, **fields: Any) -> ElmBranchStatus:
    return ElmBranchStatus(version=version, spec_hash=spec_fingerprint(SPEC), **fields)


def test_a_new_branch_starts_version_one_in_one_pass() -> None:
    # One status write (version, attempt and Job name together), one Event, then the Job.
    plan = plan_branch(inp())
    kinds = [type(a) for a in plan.actions]
    assert kinds == [PatchStatus, Event, CreateJob]
    status = status_of(plan.actions)
    assert (status.version, status.phase, status.attempt) == (1, "Initializing", 1)
    assert status.job_name == "cook-v1-a1"


def test_a_new_version_stops_the_running_job_first() -> None:
    old = versioned(attempt=1, job_name="cook-v1-a1", phase="Training")
    old.spec_hash = "stale"
    plan = plan_branch(inp(status=old, job=JobState("cook-v1-a1", "Running", started=True)))
    assert any(isinstance(a, DeleteJob) for a in plan.actions)
    assert not any(isinstance(a, CreateJob) for a in plan.actions)
    status = status_of(plan.actions)
    assert (status.version, status.phase, status.job_name) == (2, "Pending", None)


def test_then_one_job_is_created_after_the_status_names_it() -> None:
    plan = plan_branch(inp(status=versioned()))
    kinds = [type(a) for a in plan.actions]
    assert kinds.index(PatchStatus) < kinds.index(CreateJob)
    job = next(a for a in plan.actions if isinstance(a, CreateJob)).body
    assert job["metadata"]["name"] == "cook-v1-a1"
    assert status_of(plan.actions).job_name == "cook-v1-a1"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u1"


def test_waits_for_forest_and_for_a_slot() -> None:
    missing = status_of(plan_branch(inp(forest=None, status=versioned())).actions)
    assert (missing.phase, missing.conditions[0].reason) == ("Waiting", "ForestNotFound")
    unready = ForestView("f", FOREST, ready=False)
    assert status_of(plan_branch(inp(forest=unready, status=versioned())).actions).phase == (
        "Waiting"
    )
    # A forest the operator has not reconciled yet (it just started): no noise, just a requeue.
    unseen_forest = ForestView("f", FOREST, ready=False, observed=False)
    unseen = plan_branch(inp(forest=unseen_forest, status=versioned(phase="Pending")))
    assert not unseen.actions and unseen.requeue_after
    full = plan_branch(inp(status=versioned(), active_elsewhere=2))
    assert not any(isinstance(a, CreateJob) for a in full.actions)
    assert status_of(full.actions).conditions[0].reason == "ConcurrencyLimit"


def test_a_second_branch_for_a_domain_fails_with_a_clear_reason() -> None:
    plan = plan_branch(inp(domain_owner="older"))
    status = status_of(plan.actions)
    assert status.phase == "Failed" and "older" in status.message
    assert any(isinstance(a, Event) and a.type == "Warning" for a in plan.actions)


def test_progress_is_shown_while_the_job_runs() -> None:
    progress = Progress(
        run_id="r",
        phase="training",
        step=40,
        total_steps=100,
        tokens_per_second=1234.5,
        eta_seconds=12.0,
    )
    plan = plan_branch(
        inp(
            status=versioned(attempt=1, job_name="cook-v1-a1"),
            job=JobState("cook-v1-a1", "Running"),
            records=RunRecords(progress=progress),
        )
    )
    status = status_of(plan.actions)
    assert status.phase == "Training" and status.progress is not None
    assert status.progress.summary == "40/100 (40%)"


def test_a_job_held_by_its_queue_waits_and_says_so() -> None:
    held = {
        "metadata": {"name": "cook-v1-a1", "labels": {"kueue.x-k8s.io/queue-name": "gpus"}},
        "spec": {"suspend": True},
    }
    plan = plan_branch(inp(status=versioned(attempt=1, job_name="cook-v1-a1"), job=job_state(held)))
    status = status_of(plan.actions)
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert (status.phase, ready.status, ready.reason) == ("Waiting", "False", "Queued")
    assert "admission by queue gpus" in status.message
    assert any(isinstance(a, Event) and a.reason == "Waiting" for a in plan.actions)
    assert plan.requeue_after is None  # admission changes the Job, and that wakes the branch


def result(version: int = 1, sha: str = "c" * 64) -> Result:
    return Result(
        run_id=f"branch.cooking.v{version}",
        kind="expert",
        path=f"experts/cooking/v{version}",
        sha256=sha,
        domain="cooking",
        version=version,
        metrics=Metrics(val_ppl_before=50.0, val_ppl_after=20.0, steps=30),
    )


def test_a_result_is_merged_once_then_the_status_says_merged() -> None:
    running = versioned(attempt=1, job_name="cook-v1-a1")
    plan = plan_branch(inp(status=running, records=RunRecords(result=result())))
    kinds = [type(a) for a in plan.actions]
    assert kinds.count(MergeResult) == 1 and kinds[-1] is PatchStatus  # status last
    merged = status_of(plan.actions)
    assert merged.phase == "Merged" and merged.merged_version == 1
    # Seen again with the manifest already holding it: nothing is merged twice.
    entry = ExpertEntry(path="experts/cooking/v1", sha256="c" * 64, domain="cooking", version=1)
    again = plan_branch(inp(status=running, records=RunRecords(result=result()), merged=entry))
    assert not any(isinstance(a, MergeResult) for a in again.actions)
    steady = plan_branch(inp(status=merged, merged=entry))
    assert steady.actions == []


def test_a_recreated_branch_never_reuses_an_earlier_branchs_version() -> None:
    """Deleted with retention Keep and re-created (a GitOps revert and re-add): the domain's
    runs and files of v1..v3 stay in storage, so the new branch starts at v4 and never resumes
    or merges what the earlier one left."""
    plan = plan_branch(inp(records=RunRecords(used_version=3)))
    status = status_of(plan.actions)
    assert (status.version, status.job_name) == (4, "cook-v4-a1")
    job = next(a for a in plan.actions if isinstance(a, CreateJob)).body
    assert "4" in job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_bad_input_fails_at_once_other_failures_retry() -> None:
    running = versioned(attempt=1, job_name="cook-v1-a1")
    bad = JobState("cook-v1-a1", "Failed", "PodFailurePolicy", "exit code 65")
    failed = status_of(plan_branch(inp(status=running, job=bad)).actions)
    assert failed.phase == "Failed" and failed.conditions[0].reason == "BadInput"
    # The trainer's record names the file; the condition (and its Event) carry its words.
    why = Progress(run_id="branch.cooking.v1", phase="failed", message="x.txt: no text")
    named = plan_branch(inp(status=running, job=bad, records=RunRecords(progress=why)))
    assert status_of(named.actions).conditions[0].message == "Job cook-v1-a1: x.txt: no text"
    assert any(isinstance(a, Event) and "x.txt: no text" in a.message for a in named.actions)
    flaky = JobState("cook-v1-a1", "Failed", "BackoffLimitExceeded", "")
    retry = plan_branch(inp(status=running, job=flaky))
    job = next(a for a in retry.actions if isinstance(a, CreateJob)).body
    assert job["metadata"]["name"] == "cook-v1-a2"
    last = versioned(attempt=3, job_name="cook-v1-a3")
    exhausted = plan_branch(inp(status=last, job=JobState("cook-v1-a3", "Failed", "X", "")))
    assert status_of(exhausted.actions).conditions[0].reason == "AttemptsExhausted"


def test_a_spec_edit_makes_a_new_version_and_stops_the_old_job() -> None:
    running = versioned(attempt=1, job_name="cook-v1-a1")
    edited = ElmBranchSpec.model_validate(
        {**SPEC.model_dump(by_alias=True, exclude_none=True), "training": {"steps": 7}}
    )
    plan = plan_branch(inp(spec=edited, status=running, job=JobState("cook-v1-a1", "Running")))
    assert any(isinstance(a, DeleteJob) for a in plan.actions)
    assert status_of(plan.actions).version == 2
    # Fingerprints ignore fields that do not change the weights.
    assert spec_fingerprint(SPEC) == spec_fingerprint(SPEC.model_copy(update={"suspend": True}))


def test_suspend_stops_new_jobs() -> None:
    suspended = SPEC.model_copy(update={"suspend": True})
    plan = plan_branch(inp(spec=suspended, status=versioned()))
    assert not any(isinstance(a, CreateJob) for a in plan.actions)
    assert status_of(plan.actions).phase == "Suspended"


def test_deletion_removes_only_an_owned_merged_expert() -> None:
    entry = ExpertEntry(path="experts/cooking/v1", sha256="c" * 64, domain="cooking", version=1)
    assert any(isinstance(a, RemoveExpert) for a in plan_deletion(inp(merged=entry)).actions)
    other = plan_deletion(inp(merged=entry, domain_owner="older"))
    assert not any(isinstance(a, RemoveExpert) for a in other.actions)


def test_job_state_reads_kubernetes_conditions() -> None:
    failed = {
        "metadata": {"name": "j"},
        "status": {
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "65"}
            ]
        },
    }
    assert job_state(failed).permanent
    done = {
        "metadata": {"name": "j"},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }
    assert job_state(done).phase == "Succeeded"
    assert job_state({"metadata": {"name": "j"}}).phase == "Running"


def test_a_deletion_whose_storage_is_unreachable_waits_and_says_so_until_released() -> None:
    merged = versioned(phase="Merged", merged_version=1)
    blocked = plan_deletion(inp(status=merged, storage_error="connection refused"))
    assert blocked.requeue_after is not None  # the finalizer stays; nothing is removed
    assert [type(a) for a in blocked.actions] == [Event, PatchStatus]
    message = status_of(blocked.actions).message or ""
    assert "connection refused" in message and "btm.elmforest.io/release=true" in message
    # Said once: the same message again patches nothing and sends no second Event.
    again = plan_deletion(
        inp(status=status_of(blocked.actions), storage_error="connection refused")
    )
    assert again.actions == [] and again.requeue_after is not None
    released = plan_deletion(inp(status=merged, storage_error="connection refused", release=True))
    assert released.requeue_after is None  # the finalizer goes; the user chose to release
    assert [(a.type, a.reason) for a in released.actions if isinstance(a, Event)] == [
        ("Warning", "Released")
    ]
