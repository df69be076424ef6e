"""The prepare step, planned purely: a CPU-only Job of ``elmtrain prepare`` before a branch's or
the seed's training Job, skipped when the shards are recorded, stopped when superseded."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from elmcore.manifest import ArtifactEntry, Manifest
from elmcore.names import RunId
from elmcore.records import Progress
from elmforest.api.branch import ElmBranchStatus
from elmforest.api.forest import ElmForestSpec, ElmForestStatus
from elmforest.planner.actions import CreateJob, DeleteJob, PatchStatus
from elmforest.planner.branch import ForestView, plan_branch, spec_fingerprint
from elmforest.planner.forest import (
    ForestInput,
    plan_forest,
    seed_prepare,
    seed_prepare_job_name,
)
from elmforest.planner.naming import ANNOTATION_RUN
from elmforest.planner.observed import JobState, RunRecords, StorageView
from elmforest.planner.prepare import Preparation, PrepareStep
from tests.planner.test_branch_planner import FOREST, SPEC, inp, status_of

NEEDED = Preparation(needed=True)


def created(actions: list[Any]) -> list[dict[str, Any]]:
    return [a.body for a in actions if isinstance(a, CreateJob)]


def container(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return dict(spec["containers"][0])


def test_a_branch_prepares_its_text_first_in_a_cpu_job() -> None:
    plan = plan_branch(inp(preparation=NEEDED))
    (job,) = created(plan.actions)
    assert job["metadata"]["name"] == "cook-v1-prep"
    args = container(job)["args"]
    assert args[0] == "prepare" and "--data" in args and SPEC.data.train[0] in args
    assert args[args.index("--run-id") + 1] == "prepare.cooking.v1"
    limits = container(job).get("resources", {}).get("limits", {})
    assert "nvidia.com/gpu" not in limits  # tokenizing never holds a GPU
    status = status_of(plan.actions)
    assert (status.phase, status.version, status.job_name) == ("Preparing", 1, None)


def test_prepared_or_disabled_text_goes_straight_to_training() -> None:
    disabled = FOREST.model_copy(
        update={"prepare": FOREST.prepare.model_copy(update={"enabled": False})}
    )
    for given in (
        inp(preparation=Preparation(needed=False)),
        inp(preparation=NEEDED, forest=ForestView("f", disabled, ready=True, uid="fu")),
    ):
        (job,) = created(plan_branch(given).actions)
        assert job["metadata"]["name"] == "cook-v1-a1"


def test_a_running_prepare_job_shows_its_progress() -> None:
    status = ElmBranchStatus(version=1, spec_hash=spec_fingerprint(SPEC), phase="Preparing")
    progress = Progress(run_id="prepare.cooking.v1", phase="preparing", step=5_000_000,
                        total_steps=20_000_000)  # fmt: skip
    running = Preparation(
        True, JobState("cook-v1-prep", "Running", started=True), RunRecords(progress=progress)
    )
    plan = plan_branch(inp(status=status, preparation=running))
    assert not created(plan.actions)
    assert plan.requeue_after is not None  # polls its progress
    after = status_of(plan.actions)
    assert after.phase == "Preparing" and "25% of 20.0 MB of text" in (after.message or "")


def test_a_finished_prepare_job_is_followed_by_training() -> None:
    status = ElmBranchStatus(version=1, spec_hash=spec_fingerprint(SPEC), phase="Preparing")
    done = Preparation(True, JobState("cook-v1-prep", "Succeeded", started=True))
    (job,) = created(plan_branch(inp(status=status, preparation=done)).actions)
    assert job["metadata"]["name"] == "cook-v1-a1"


def test_a_failed_prepare_job_fails_the_branch_and_says_why() -> None:
    status = ElmBranchStatus(version=1, spec_hash=spec_fingerprint(SPEC), phase="Preparing")
    said = Progress(run_id="prepare.cooking.v1", phase="failed", message="cooking.txt: not UTF-8")
    cases = {
        "BadInput": JobState("cook-v1-prep", "Failed", "PodFailurePolicy", "exit code 65"),
        "PrepareFailed": JobState("cook-v1-prep", "Failed", "BackoffLimitExceeded", "OOMKilled"),
    }
    for reason, job in cases.items():
        failed = Preparation(True, job, RunRecords(progress=said))
        plan = plan_branch(inp(status=status, preparation=failed))
        assert not created(plan.actions) and plan.requeue_after is None  # never retried
        after = status_of(plan.actions)
        (ready,) = after.conditions
        assert (after.phase, ready.reason) == ("Failed", reason)
        assert "cooking.txt: not UTF-8" in (after.message or "")


def test_a_new_spec_stops_the_superseded_prepare_job() -> None:
    old = ElmBranchStatus(version=1, spec_hash="stale", phase="Preparing")
    running = JobState("cook-v1-prep", "Running", started=True)
    plan = plan_branch(inp(status=old, superseded_prepare=running))
    assert [a.name for a in plan.actions if isinstance(a, DeleteJob)] == ["cook-v1-prep"]
    assert not created(plan.actions)
    assert status_of(plan.actions).version == 2
    # Once it is gone, version 2 prepares under its own name.
    moved = status_of(plan.actions)
    (job,) = created(plan_branch(inp(status=moved, preparation=NEEDED)).actions)
    assert job["metadata"]["name"] == "cook-v2-prep"


READY_TOKENIZER = Manifest(revision=2, tokenizer=ArtifactEntry(path="tokenizer", sha256="a" * 64))
SEEDED = ElmForestSpec.model_validate(
    {
        "storage": {"uri": "s3://bkt/f"},
        "trainer": {"image": FOREST.trainer.image, "gpus": 1},
        "tokenizer": {"from": "s3://bkt/tok"},
        "seed": {"data": ["s3://bkt/mix.txt"]},
    }
)


def forest_plan(preparation: Preparation | None, jobs: dict[str, JobState] | None = None) -> Any:
    return plan_forest(
        ForestInput(
            name="books",
            namespace="ns",
            uid="u",
            generation=1,
            spec=SEEDED,
            status=ElmForestStatus(),
            storage=StorageView(manifest=READY_TOKENIZER),
            jobs=jobs or {},
            preparation=preparation,
        )
    )


def forest_status(plan: Any) -> ElmForestStatus:
    patches = [a.status for a in plan.actions if isinstance(a, PatchStatus)]
    return ElmForestStatus.model_validate(patches[-1])


def test_the_seed_prepares_the_mixture_before_its_gpu_job() -> None:
    plan = forest_plan(NEEDED)
    (job,) = created(plan.actions)
    assert job["metadata"]["name"] == seed_prepare_job_name("books", SEEDED)
    assert container(job)["args"][0] == "prepare"
    assert "nvidia.com/gpu" not in container(job).get("resources", {}).get("limits", {})
    assert forest_status(plan).phase == "Preparing"
    # What the cluster and local adapters observe for it: that Job and the seed's two lists.
    step = seed_prepare("books", SEEDED, READY_TOKENIZER)
    assert step == PrepareStep(
        job["metadata"]["name"], RunId.seed_prepare(), (SEEDED.seed.data, SEEDED.seed.val_data)
    )
    assert str(step.run) == "prepare.seed"
    assert job["metadata"]["annotations"][ANNOTATION_RUN] == "prepare.seed"
    seeded = READY_TOKENIZER.model_copy(
        update={"seed": ArtifactEntry(path="seed", sha256="0" * 64)}
    )
    assert seed_prepare("books", SEEDED, seeded) is None  # the seed trained: nothing to prepare
    assert seed_prepare("books", SEEDED, None) is None


def test_the_seed_trains_once_its_text_is_prepared() -> None:
    name = seed_prepare_job_name("books", SEEDED)
    for preparation in (
        Preparation(needed=False),
        Preparation(True, JobState(name, "Succeeded", started=True)),
    ):
        (job,) = created(forest_plan(preparation).actions)
        assert container(job)["args"][0] == "seed"
        assert "nvidia.com/gpu" in container(job)["resources"]["limits"]


def test_bad_seed_text_fails_the_forest_at_once() -> None:
    name = seed_prepare_job_name("books", SEEDED)
    failed = JobState(name, "Failed", "PodFailurePolicy", "exit code 65")
    said = Progress(run_id="prepare.seed", phase="failed", message="mix.txt:3: not JSON")
    plan = forest_plan(Preparation(True, failed, RunRecords(progress=said)))
    status = forest_status(plan)
    assert not created(plan.actions)
    assert status.phase == "Failed" and "mix.txt:3: not JSON" in (status.message or "")
    assert [c.reason for c in status.conditions] == ["BadInput"]


def _parallel(forest: ElmForestSpec, workers: int) -> ElmForestSpec:
    return forest.model_copy(
        update={"prepare": forest.prepare.model_copy(update={"parallelism": workers})}
    )


def test_parallel_prepare_is_one_indexed_job_of_n_pods() -> None:
    """spec.prepare.parallelism N: the same prepare Job, Indexed, N completions at once, each
    pod told `--workers N` (its index comes from JOB_COMPLETION_INDEX); one pod: as before."""
    single = created(plan_branch(inp(preparation=NEEDED)).actions)[0]
    assert "--workers" not in container(single)["args"]
    assert not {"completionMode", "completions", "parallelism"} & set(single["spec"])

    forest = ForestView("f", _parallel(FOREST, 3), ready=True, uid="fu")
    (job,) = created(plan_branch(inp(preparation=NEEDED, forest=forest)).actions)
    assert job["metadata"]["name"] == "cook-v1-prep"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    args = container(job)["args"]
    assert args[args.index("--workers") + 1] == "3" and "--worker-index" not in args
    assert args[: len(container(single)["args"])] == container(single)["args"]
    assert spec["podFailurePolicy"] == single["spec"]["podFailurePolicy"]  # 65 still final
    # Nothing follows it but training: the Job succeeds once every index (the last combines).
    status = ElmBranchStatus(version=1, spec_hash=spec_fingerprint(SPEC), phase="Preparing")
    done = Preparation(True, JobState("cook-v1-prep", "Succeeded", started=True))
    (train,) = created(plan_branch(inp(status=status, preparation=done, forest=forest)).actions)
    assert train["metadata"]["name"] == "cook-v1-a1" and "completionMode" not in train["spec"]


def test_the_seed_prepares_in_parallel_too() -> None:
    parallel = _parallel(SEEDED, 4)
    plan = plan_forest(
        ForestInput(
            name="books",
            namespace="ns",
            uid="u",
            generation=1,
            spec=parallel,
            status=ElmForestStatus(),
            storage=StorageView(manifest=READY_TOKENIZER),
            jobs={},
            preparation=NEEDED,
        )
    )
    (job,) = created(plan.actions)
    assert job["metadata"]["name"] == seed_prepare_job_name("books", SEEDED)  # same name
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 4)
    args = container(job)["args"]
    assert args[args.index("--workers") + 1] == "4"


@pytest.mark.parametrize("workers", [0, -1, 1001])
def test_parallelism_is_bounded(workers: int) -> None:
    body = FOREST.model_dump(by_alias=True, exclude_none=True)
    with pytest.raises(ValidationError, match="parallelism"):
        ElmForestSpec.model_validate({**body, "prepare": {"parallelism": workers}})
