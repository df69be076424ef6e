"""The ElmClusterSet planner (c-BTM, issue 30), pure: wait for the forest, fit, assign, branch.

Each case builds the planner's input as observation would and checks the actions: which Jobs
(CPU, owned by the set, labelled), which branches (owned, labelled, their data the clusters'
folders, their cluster recorded), which status, and that nothing is created twice.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from elmcore.records import Progress
from elmforest.api.branch import ElmBranchSpec
from elmforest.api.clusterset import ElmClusterSetSpec, ElmClusterSetStatus
from elmforest.api.forest import ElmForestSpec
from elmforest.planner import cluster_steps as steps
from elmforest.planner.actions import (
    ApplyObject,
    CreateJob,
    DeleteObject,
    Event,
    PatchStatus,
    Plan,
)
from elmforest.planner.clusterset import (
    AssignmentCounts,
    ClusterSetInput,
    GeneratedBranch,
    plan_cluster_set,
)
from elmforest.planner.naming import LABEL_CLUSTER_SET
from elmforest.planner.observed import JobState, RunRecords
from elmforest.planner.serving import deployment
from elmforest.planner.trainer_args import branch_argv

SHA = "ab" * 32
FOREST = ElmForestSpec.model_validate(
    {
        "storage": {"uri": "s3://bucket/forests/f1"},
        "trainer": {"image": "registry.example.com/t@sha256:" + "0" * 64},
    }
)


def set_spec(**changes: Any) -> ElmClusterSetSpec:
    body = {"forest": "f1", "data": ["s3://bucket/crawl/"], "clusters": 3, "sample": 1000}
    body.update(changes)
    return ElmClusterSetSpec.model_validate(body)


def given(spec: ElmClusterSetSpec | None = None, **fields: Any) -> ClusterSetInput:
    base = ClusterSetInput(
        name="topics",
        namespace="ns",
        uid="uid-1",
        generation=1,
        spec=spec or set_spec(),
        status=ElmClusterSetStatus(),
        forest=FOREST,
        forest_ready=True,
    )
    return replace(base, **fields)


def of(plan: Plan, kind: type[Any]) -> list[Any]:
    return [a for a in plan.actions if isinstance(a, kind)]


def status_of(plan: Plan) -> ElmClusterSetStatus:
    return ElmClusterSetStatus.model_validate(of(plan, PatchStatus)[-1].status)


def assigned(spec: ElmClusterSetSpec, train: list[int], valid: list[int]) -> list[AssignmentCounts]:
    """Every worker's record; worker 0 holds the counts, the others none."""
    zeros = [0] * len(train)
    return [
        AssignmentCounts(SHA, i, train if i == 0 else zeros, valid if i == 0 else zeros)
        for i in range(spec.parallelism)
    ]


def test_waits_for_its_forest() -> None:
    for inp in (given(forest=None), given(forest_ready=False)):
        plan = plan_cluster_set(inp)
        assert not of(plan, CreateJob) and not of(plan, ApplyObject)
        status = status_of(plan)
        assert status.phase == "Pending" and "ElmForest 'f1'" in status.message


def test_an_invalid_spec_fails_at_once() -> None:
    plan = plan_cluster_set(given(spec=None), "spec.clusters: must be at least 1")
    assert status_of(plan).phase == "Failed" and not of(plan, CreateJob)
    assert of(plan, Event)[0].type == "Warning"


def test_fit_job_first_a_cpu_job_owned_by_the_set() -> None:
    spec = set_spec()
    plan = plan_cluster_set(given(spec))
    (job,) = [a.body for a in of(plan, CreateJob)]
    key = steps.storage_name("topics", spec)
    assert job["metadata"]["name"] == steps.fit_job_name("topics", spec)
    assert job["metadata"]["ownerReferences"][0]["kind"] == "ElmClusterSet"
    assert job["metadata"]["labels"][LABEL_CLUSTER_SET] == "topics"
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "cluster-fit" and args[args.index("--set") + 1] == key
    assert args[args.index("--clusters") + 1] == "3" and "--balance" in args
    assert "nvidia.com/gpu" not in str(container.get("resources", {}))
    status = status_of(plan)
    assert (status.phase, status.version, status.storage_name) == ("Fitting", 1, key)


def test_a_running_fit_is_not_created_again() -> None:
    spec = set_spec()
    job = JobState(steps.fit_job_name("topics", spec), "Running")
    plan = plan_cluster_set(given(spec, jobs={job.name: job}))
    assert not of(plan, CreateJob) and status_of(plan).phase == "Fitting"


def test_bad_input_fails_the_set_with_the_trainers_words() -> None:
    spec = set_spec()
    name = steps.fit_job_name("topics", spec)
    job = JobState(name, "Failed", reason="PodFailurePolicy", message="exit code 65")
    words = "s3://bucket/crawl/: 2 documents, fewer than 3 clusters"
    progress = Progress(run_id="cluster-fit.x", phase="failed", message=words)
    inp = given(spec, jobs={name: job}, records={"fit": RunRecords(progress=progress)})
    plan = plan_cluster_set(inp)
    status = status_of(plan)
    assert status.phase == "Failed" and words in status.message
    assert status.conditions[0].reason == "BadInput" and not of(plan, CreateJob)


def test_assignment_is_one_indexed_job_with_the_clusterer_pinned() -> None:
    spec = set_spec(parallelism=3)
    plan = plan_cluster_set(given(spec, clusterer=SHA))
    (job,) = [a.body for a in of(plan, CreateJob)]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 3
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "cluster-assign" and args[args.index("--sha256") + 1] == SHA
    assert args[args.index("--count") + 1] == "3"
    assert status_of(plan).phase == "Assigning" and status_of(plan).clusterer_sha256 == SHA


def test_records_of_another_clusterer_do_not_count() -> None:
    spec = set_spec(parallelism=2)
    stale = [AssignmentCounts("cd" * 32, i, [1, 1, 1], [0, 0, 0]) for i in range(2)]
    plan = plan_cluster_set(given(spec, clusterer=SHA, assignments=stale))
    assert status_of(plan).phase == "Assigning" and not of(plan, ApplyObject)
    misshapen = [AssignmentCounts(SHA, i, [1, 1], [0, 0]) for i in range(2)]  # k = 2, not 3
    plan = plan_cluster_set(given(spec, clusterer=SHA, assignments=misshapen))
    assert status_of(plan).phase == "Assigning" and not of(plan, ApplyObject)


def test_one_branch_per_cluster_with_its_data_and_cluster() -> None:
    spec = set_spec(parallelism=2, branchTemplate={"training": {"steps": 7}})
    inp = given(spec, clusterer=SHA, assignments=assigned(spec, [40, 30, 20], [1, 0, 2]))
    plan = plan_cluster_set(inp)
    bodies = {a.body["metadata"]["name"]: a.body for a in of(plan, ApplyObject)}
    assert sorted(bodies) == ["topics-c0", "topics-c1", "topics-c2"]
    key = steps.storage_name("topics", spec)
    c1 = ElmBranchSpec.model_validate(bodies["topics-c1"]["spec"])
    assert c1.forest == "f1" and c1.domain == "topics-c1"
    assert c1.data.train == [f"s3://bucket/forests/f1/clusters/{key}/data/c1/train/"]
    assert c1.data.validation == []  # cluster 1 kept no validation documents
    assert c1.cluster is not None and (c1.cluster.set, c1.cluster.index) == (key, 1)
    assert c1.cluster.clusterer_sha256 == SHA
    assert c1.training is not None and c1.training.model_dump()["steps"] == 7
    meta = bodies["topics-c1"]["metadata"]
    assert meta["ownerReferences"][0]["name"] == "topics"
    assert meta["labels"][LABEL_CLUSTER_SET] == "topics"
    status = status_of(plan)
    assert status.cluster_sizes == [41, 30, 22] and status.documents == 93
    assert status.phase == "Branching" and status.branches == sorted(bodies)


def generated(plan: Plan, phase: str, current: bool = True) -> dict[str, GeneratedBranch]:
    """The branches as the API server stores them: defaults filled in, camelCase."""
    out = {}
    for action in of(plan, ApplyObject):
        spec = ElmBranchSpec.model_validate(action.body["spec"])
        stored = spec.model_dump(by_alias=True, mode="json")  # every default written out
        out[action.body["metadata"]["name"]] = GeneratedBranch(stored, phase, current)
    return out


def test_ready_once_every_branch_merged_and_nothing_reapplied() -> None:
    spec = set_spec()
    inp = given(spec, clusterer=SHA, assignments=assigned(spec, [5, 5, 5], [1, 1, 1]))
    first = plan_cluster_set(inp)
    merged = replace(inp, branches=generated(first, "Merged"), status=status_of(first))
    plan = plan_cluster_set(merged)
    assert not of(plan, ApplyObject) and status_of(plan).phase == "Ready"
    settled = replace(merged, status=status_of(plan))
    assert plan_cluster_set(settled).actions == []  # nothing changed: no patch, no event
    # A branch still showing its previous generation's status is not merged yet.
    behind = generated(first, "Merged")
    behind["topics-c2"] = replace(behind["topics-c2"], current=False)
    assert status_of(plan_cluster_set(replace(inp, branches=behind))).phase == "Branching"


def test_a_failed_branch_fails_the_set_once_all_settled() -> None:
    spec = set_spec()
    inp = given(spec, clusterer=SHA, assignments=assigned(spec, [5, 5, 5], [1, 1, 1]))
    branches = generated(plan_cluster_set(inp), "Merged")
    branches["topics-c0"] = replace(branches["topics-c0"], phase="Failed")
    status = status_of(plan_cluster_set(replace(inp, branches=branches)))
    assert status.phase == "Failed" and "topics-c0" in status.message


def test_an_empty_cluster_gets_no_branch() -> None:
    spec = set_spec(balance=False)
    inp = given(spec, clusterer=SHA, assignments=assigned(spec, [9, 0, 4], [0, 0, 1]))
    plan = plan_cluster_set(inp)
    names = [a.body["metadata"]["name"] for a in of(plan, ApplyObject)]
    assert names == ["topics-c0", "topics-c2"] and "1 empty" in status_of(plan).message


def test_a_changed_spec_is_a_new_version_that_keeps_the_old_branches_until_assigned() -> None:
    old_spec = set_spec()
    old = given(old_spec, clusterer=SHA, assignments=assigned(old_spec, [5, 5, 5], [0, 0, 0]))
    first = plan_cluster_set(old)
    branches, status = generated(first, "Merged"), status_of(first)
    new_spec = set_spec(clusters=2)
    fitting = given(new_spec, branches=branches, status=status)  # the new version's clusterer: none
    plan = plan_cluster_set(fitting)
    new_status = status_of(plan)
    assert new_status.version == 2 and new_status.storage_name != status.storage_name
    assert new_status.phase == "Fitting" and not of(plan, ApplyObject)
    assert not of(plan, DeleteObject)  # the old branches serve until the new data is there
    (job,) = [a.body for a in of(plan, CreateJob)]
    assert job["metadata"]["name"] == steps.fit_job_name("topics", new_spec)
    done = replace(
        fitting,
        status=new_status,
        clusterer=SHA,
        assignments=assigned(new_spec, [7, 8], [0, 0]),
    )
    plan = plan_cluster_set(done)
    assert [a.name for a in of(plan, DeleteObject)] == ["topics-c2"]
    applied = {a.body["metadata"]["name"]: a.body["spec"] for a in of(plan, ApplyObject)}
    assert sorted(applied) == ["topics-c0", "topics-c1"]  # their data moved to the new folders
    assert new_status.storage_name in applied["topics-c0"]["data"]["train"][0]


def test_a_generated_branch_trains_with_its_cluster_and_others_without() -> None:
    spec = set_spec()
    inp = given(spec, clusterer=SHA, assignments=assigned(spec, [5, 5, 5], [1, 1, 1]))
    body = next(a.body for a in of(plan_cluster_set(inp), ApplyObject))
    generated_spec = ElmBranchSpec.model_validate(body["spec"])
    argv = branch_argv(FOREST, generated_spec, 1)
    key = steps.storage_name("topics", spec)
    assert argv[argv.index("--cluster") + 1] == f"{key}:0:{SHA}"
    plain = generated_spec.model_copy(update={"cluster": None})
    assert "--cluster" not in branch_argv(FOREST, plain, 1)


def test_serving_routes_by_clusters_only_when_asked() -> None:
    def args(serving: dict[str, Any]) -> list[str]:
        forest = ElmForestSpec.model_validate(
            {**FOREST.model_dump(by_alias=True, exclude_none=True), "serving": serving}
        )
        owner = steps.set_owner("f1", "uid")
        container = deployment("f1", "ns", owner, forest)["spec"]["template"]["spec"]
        return list(container["containers"][0]["args"])

    assert "--routing" not in args({})  # an unchanged forest keeps its servers' arguments
    routed = args({"routing": "clusters"})
    assert routed[routed.index("--routing") + 1] == "clusters"


def test_a_branch_of_the_same_name_made_by_someone_else_is_never_taken_over() -> None:
    spec = set_spec()
    inp = given(
        spec,
        clusterer=SHA,
        assignments=assigned(spec, [5, 5, 5], [1, 1, 1]),
        taken=frozenset({"topics-c1", "unrelated"}),
    )
    plan = plan_cluster_set(inp)
    assert not of(plan, ApplyObject) and not of(plan, DeleteObject)
    status = status_of(plan)
    assert status.phase == "Failed" and "topics-c1" in status.message
    assert "unrelated" not in status.message


def test_a_step_failed_beyond_its_retries_names_the_step() -> None:
    spec = set_spec()
    for step, name, inp in (
        ("FitFailed", steps.fit_job_name("topics", spec), given(spec)),
        ("AssignFailed", steps.assign_job_name("topics", spec), given(spec, clusterer=SHA)),
    ):
        job = JobState(name, "Failed", reason="BackoffLimitExceeded", message="too many")
        status = status_of(plan_cluster_set(replace(inp, jobs={name: job})))
        assert status.phase == "Failed" and status.conditions[0].reason == step
        assert "too many" in status.message
