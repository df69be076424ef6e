"""Cluster and local mode observe one way: the same world gives the same plans in both.

Each scenario describes a forest, its branches, their Jobs and the forest's storage in neutral
terms. The cluster's sources are fed what Kopf's indexes would hold (the Jobs as batch/v1
objects, read with ``job_state``); local mode's engine is fed its own state file records and
reads the Jobs through its process runner. Both observe through ``elmforest.observe``, and
the plans the pure planners make of what they saw must be equal, action for action.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest

from elmcore import layout
from elmcore.manifest import ArtifactEntry, ExpertEntry, Manifest
from elmcore.records import AssignmentRecord, Metrics, Progress, Result
from elmcore.storage import open_storage
from elmcore.storage.commit import commit_dir
from elmcore.storage.manifest_store import update_manifest
from elmforest.adapters.kube import Kube
from elmforest.api.branch import ElmBranchSpec
from elmforest.api.clusterset import ElmClusterSetSpec
from elmforest.local import cluster_sets
from elmforest.local.engine import Engine
from elmforest.local.runner import ProcessRunner
from elmforest.local.state import JobRecord, LocalState, ObjectRecord
from elmforest.observe import observe_branch, observe_forest
from elmforest.observe.branch import slots_elsewhere
from elmforest.observe.clusterset import observe_cluster_set
from elmforest.observe.reads import PassReads
from elmforest.planner.actions import Action, PatchStatus, Plan
from elmforest.planner.branch import plan_branch, plan_deletion, spec_fingerprint
from elmforest.planner.cluster_steps import storage_name
from elmforest.planner.clusterset import plan_cluster_set
from elmforest.planner.forest import plan_forest
from elmforest.planner.observed import job_state
from elmforest.planner.siblings import ForestBranches, sibling
from elmforest.reconcile.context import OperatorContext
from elmforest.reconcile.sources import ClusterBranchSource, ClusterForestSource, ClusterSetSource

IMAGE = "r.example/t@sha256:" + "a" * 64
SHA = "b" * 64
BRANCH_SPEC: dict[str, Any] = {
    "forest": "f",
    "domain": "cooking",
    "data": {"train": ["file:///data/cooking.txt"]},
}
FINGERPRINT = spec_fingerprint(ElmBranchSpec.model_validate(BRANCH_SPEC))
SECOND = {**BRANCH_SPEC, "domain": "baking", "data": {"train": ["file:///data/baking.txt"]}}


def _failed(reason: str, message: str, failed: int) -> dict[str, Any]:
    condition = {"type": "Failed", "status": "True", "reason": reason, "message": message}
    return {"failed": failed, "conditions": [condition]}


# A Job's state in neutral words -> (batch/v1 status, the local runner's record fields).
_JOB_STATES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "queued": ({}, {"phase": "Pending"}),  # no pod yet / no process yet
    "running": ({"active": 1}, {"phase": "Running"}),
    "succeeded": (
        {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
        {"phase": "Succeeded"},
    ),
    "retryable": (
        _failed("BackoffLimitExceeded", "crashed", 4),
        {"phase": "Failed", "reason": "BackoffLimitExceeded", "message": "crashed"},
    ),
    "bad-input": (
        _failed("PodFailurePolicy", "exit 65", 1),
        {"phase": "Failed", "reason": "PodFailurePolicy", "message": "exit 65"},
    ),
}


@dataclass(frozen=True)
class Branch:
    name: str
    spec: dict[str, Any] = field(default_factory=lambda: dict(BRANCH_SPEC))
    status: dict[str, Any] = field(default_factory=dict)
    deleting: bool = False


@dataclass(frozen=True)
class World:
    branches: list[Branch]
    jobs: dict[str, str] = field(default_factory=dict)  # Job name -> a key of _JOB_STATES
    experts: list[str] = field(default_factory=list)  # domains merged in the manifest
    files: dict[str, Any] = field(default_factory=dict)  # storage key -> JSON (or bytes)
    prepared: bool = True  # the branches' text is recorded as tokenized
    forest_deleting: bool = False
    forest_missing: bool = False
    forest: dict[str, Any] = field(default_factory=dict)  # extra forest spec fields


def _status(**fields: Any) -> dict[str, Any]:
    return {"version": 1, "specHash": FINGERPRINT, **fields}


def _result(version: int = 1) -> dict[str, Any]:
    return Result(
        run_id=f"branch.cooking.v{version}",
        kind="expert",
        path=f"experts/cooking/v{version}",
        sha256=SHA,
        domain="cooking",
        version=version,
        metrics=Metrics(val_ppl_before=9.0, val_ppl_after=5.0),
    ).model_dump(mode="json")


SCENARIOS = {
    "new branch": World([Branch("cook")]),
    "re-created branch (Keep left v2)": World(
        [Branch("cook")], files={"runs/branch.cooking.v2/progress.json": {}}
    ),
    "a queued Job": World(
        [Branch("cook", status=_status(attempt=1, jobName="cook-v1-a1", phase="Initializing"))],
        jobs={"cook-v1-a1": "queued"},
    ),
    "a running Job with progress": World(
        [Branch("cook", status=_status(attempt=1, jobName="cook-v1-a1", phase="Initializing"))],
        jobs={"cook-v1-a1": "running"},
        files={
            "runs/branch.cooking.v1/progress.json": Progress(
                run_id="branch.cooking.v1", phase="training", step=5, total_steps=10
            ).model_dump(mode="json")
        },
    ),
    "a finished Job merges": World(
        [Branch("cook", status=_status(attempt=1, jobName="cook-v1-a1", phase="Evaluating"))],
        jobs={"cook-v1-a1": "succeeded"},
        files={"runs/branch.cooking.v1/result.json": _result()},
    ),
    "a failed Job is retried": World(
        [Branch("cook", status=_status(attempt=1, jobName="cook-v1-a1", phase="Training"))],
        jobs={"cook-v1-a1": "retryable"},
    ),
    "a Job failed on bad input": World(
        [Branch("cook", status=_status(attempt=1, jobName="cook-v1-a1", phase="Training"))],
        jobs={"cook-v1-a1": "bad-input"},
    ),
    "superseded spec stops its Jobs": World(
        [
            Branch(
                "cook",
                status=_status(specHash="stale", attempt=1, jobName="cook-v1-a1", phase="Training"),
            )
        ],
        jobs={"cook-v1-a1": "running", "cook-v1-prep": "running"},
        files={"runs/branch.cooking.v1/progress.json": {"run_id": "branch.cooking.v1"}},
    ),
    "prepare step first": World([Branch("cook", status=_status(phase="Pending"))], prepared=False),
    "prepare Job running": World(
        [Branch("cook", status=_status(phase="Preparing"))],
        jobs={"cook-v1-prep": "running"},
        prepared=False,
        files={
            "runs/prepare.cooking.v1/progress.json": Progress(
                run_id="prepare.cooking.v1", phase="preparing", step=5, total_steps=10
            ).model_dump(mode="json")
        },
    ),
    "prepare Job failed on bad input": World(
        [Branch("cook", status=_status(phase="Preparing"))],
        jobs={"cook-v1-prep": "bad-input"},
        prepared=False,
    ),
    "no free slot": World(
        [
            Branch("bake", spec=SECOND, status={"phase": "Training"}),
            Branch("cook"),
        ],
        forest={"maxConcurrentBranches": 1},
    ),
    "merged and steady": World(
        [Branch("cook", status=_status(phase="Merged", mergedVersion=1))], experts=["cooking"]
    ),
    "a younger branch of a taken domain": World(
        [Branch("cook"), Branch("cook2")], experts=["cooking"]
    ),
    "no forest yet": World([Branch("cook")], forest_missing=True),
    "deletion with Keep": World(
        [Branch("cook", status=_status(phase="Merged", mergedVersion=1), deleting=True)],
        experts=["cooking"],
    ),
    "deletion with Delete": World(
        [
            Branch(
                "cook",
                spec={**BRANCH_SPEC, "retention": "Delete"},
                status=_status(phase="Merged", mergedVersion=1),
                deleting=True,
            )
        ],
        experts=["cooking"],
    ),
    "deletion while storage is unreadable": World(
        [Branch("cook", status=_status(phase="Merged", mergedVersion=1), deleting=True)],
        experts=["cooking"],
        files={"manifest.json": {"experts": "not a mapping"}},
    ),
    "deletion while the forest is deleted too": World(
        [Branch("cook", status=_status(phase="Merged", mergedVersion=1), deleting=True)],
        experts=["cooking"],
        forest_deleting=True,
    ),
}


def _forest_spec(root: Path, world: World) -> dict[str, Any]:
    return {
        "storage": {"uri": f"file://{root}"},
        "trainer": {"image": IMAGE},
        "tokenizer": {"data": ["file:///data/mix.txt"]},
        "seed": {"data": ["file:///data/mix.txt"]},
        **world.forest,
    }


def _fill_storage(root: Path, world: World) -> None:
    storage = open_storage(f"file://{root}")
    artifact = ArtifactEntry(path="tokenizer", sha256=SHA)

    def manifest(current: Manifest) -> Manifest:
        experts = {
            domain: ExpertEntry(path=f"experts/{domain}/v1", sha256=SHA, domain=domain, version=1)
            for domain in world.experts
        }
        return current.model_copy(
            update={"tokenizer": artifact, "seed": artifact, "experts": experts, "revision": 3}
        )

    update_manifest(storage, manifest)
    if world.prepared:
        for spec in (BRANCH_SPEC, SECOND):
            storage.write_bytes(layout.dataset_record(SHA, spec["data"]["train"]), b"{}")
    for key, value in world.files.items():
        storage.write_bytes(key, json.dumps(value).encode())


def _bodies(world: World) -> list[dict[str, Any]]:
    """The branches as ObjectRecords make them (creation order = list order)."""
    return [record.body() for record in _records(world).values()]


def _records(world: World) -> dict[str, ObjectRecord]:
    return {
        b.name: ObjectRecord(
            kind="ElmBranch",
            name=b.name,
            uid=f"uid-{b.name}",
            created=f"2026-01-01T00:00:0{i}Z",
            source="branch.yaml",
            spec=b.spec,
            status=b.status,
            deleting=b.deleting,
        )
        for i, b in enumerate(world.branches)
    }


def _forest_record(root: Path, world: World) -> ObjectRecord:
    return ObjectRecord(
        kind="ElmForest",
        name="f",
        uid="uid-f",
        created="2026-01-01T00:00:00Z",
        source="forest.yaml",
        spec=_forest_spec(root, world),
        status={"phase": "Ready"},
        deleting=world.forest_deleting,
    )


def _k8s_job(name: str, state: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {}, "status": _JOB_STATES[state][0]}


def cluster_plans(root: Path, world: World) -> list[Plan]:
    ctx = OperatorContext(kube=cast(Kube, None))  # file storage: no Secret is ever read
    forest = None if world.forest_missing else _forest_record(root, world).body()
    bodies = _bodies(world)
    reads, branches = PassReads(), ForestBranches([sibling(b) for b in bodies])
    jobs = {name: job_state(_k8s_job(name, state)) for name, state in world.jobs.items()}
    plans = []
    for body in bodies:
        source = ClusterBranchSource(
            ctx, "local", forest_body=forest, forest_branches=branches, jobs=jobs, reads=reads
        )
        inp = observe_branch(source, body)
        if body["metadata"].get("deletionTimestamp"):
            plans.append(plan_deletion(inp) if inp.forest is not None else Plan())
        else:  # what reconcile_branch does under the forest's lock
            plans.append(plan_branch(replace(inp, active_elsewhere=slots_elsewhere(source, inp))))
    return plans


def local_plans(root: Path, world: World) -> list[Plan]:
    forests = {} if world.forest_missing else {"f": _forest_record(root, world)}
    state = LocalState(forests=forests, branches=_records(world))
    for name, kind in world.jobs.items():
        record = JobRecord(name=name, owner="ElmBranch/cook", run_id="r", command=["x"])
        state.jobs[name] = record.model_copy(update=_JOB_STATES[kind][1])
    runner = ProcessRunner(logs=root / "logs", cache=root / "cache", parallel=1)
    engine = Engine(state, runner, on_event=lambda *_: None, on_log=lambda _: None)
    plans = []
    for record in state.branches.values():
        inp = observe_branch(engine, record.body())
        if record.deleting:
            plans.append(plan_deletion(inp) if inp.forest is not None else Plan())
        else:
            plans.append(plan_branch(inp))
    return plans


def _comparable(action: Action) -> Any:
    """An action without what differs by the moment it was made (condition times)."""
    if isinstance(action, PatchStatus):
        status = json.loads(json.dumps(action.status))
        for condition in status.get("conditions", []):
            condition.pop("lastTransitionTime", None)
        return ("PatchStatus", status)
    return action


@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=str)
def test_both_modes_plan_the_same(scenario: str, tmp_path: Path) -> None:
    world = SCENARIOS[scenario]
    _fill_storage(tmp_path, world)
    cluster, local = cluster_plans(tmp_path, world), local_plans(tmp_path, world)
    assert [[_comparable(a) for a in p.actions] for p in cluster] == [
        [_comparable(a) for a in p.actions] for p in local
    ]
    assert [p.requeue_after for p in cluster] == [p.requeue_after for p in local]
    assert any(p.actions for p in cluster), "a scenario that plans nothing proves nothing"


def test_the_scenarios_reach_the_plans_they_are_named_for(tmp_path: Path) -> None:
    """The table covers what it says: a few plans checked by hand (the rest by name)."""
    kinds: dict[str, list[str]] = {}
    for name, world in SCENARIOS.items():
        root = tmp_path / str(len(kinds))
        _fill_storage(root, world)
        kinds[name] = [type(a).__name__ for p in local_plans(root, world) for a in p.actions]
    assert "CreateJob" in kinds["new branch"]
    assert "MergeResult" in kinds["a finished Job merges"]
    assert kinds["deletion with Keep"] == ["RemoveExpert", "Event"]
    assert kinds["deletion with Delete"] == ["RemoveExpert", "Event", "DeleteExpertFiles"]
    assert kinds["deletion while the forest is deleted too"] == ["RemoveExpert", "Event"]
    assert kinds["superseded spec stops its Jobs"].count("DeleteJob") == 2
    assert kinds["deletion while storage is unreadable"] == ["Event", "PatchStatus"]
    root = tmp_path / "recreated"
    world = SCENARIOS["re-created branch (Keep left v2)"]
    _fill_storage(root, world)
    patch = next(a for a in local_plans(root, world)[0].actions if isinstance(a, PatchStatus))
    assert patch.status["version"] == 3


@pytest.mark.parametrize("seeded", [False, True], ids=["seed to train", "ready"])
def test_both_modes_plan_the_same_forest(seeded: bool, tmp_path: Path) -> None:
    world = World([Branch("cook")], experts=["cooking"])
    _fill_storage(tmp_path, world)
    if not seeded:
        storage = open_storage(f"file://{tmp_path}")
        update_manifest(storage, lambda m: m.model_copy(update={"seed": None}))
    body = _forest_record(tmp_path, world).body()
    branches = ForestBranches([sibling(b) for b in _bodies(world)])
    ctx = OperatorContext(kube=cast(Kube, None))
    cluster = observe_forest(ClusterForestSource(ctx, "local", forest_branches=branches), body)
    state = LocalState(forests={"f": _forest_record(tmp_path, world)}, branches=_records(world))
    runner = ProcessRunner(logs=tmp_path / "logs", cache=tmp_path / "cache", parallel=1)
    engine = Engine(state, runner, on_event=lambda *_: None, on_log=lambda _: None)
    local = observe_forest(engine, body)
    # By design, only a cluster's Jobs need an image; this spec has one, so nothing differs.
    assert replace(cluster.input, require_image=False) == local.input
    plans = [plan_forest(o.input, o.spec_error) for o in (cluster, local)]
    assert [_comparable(a) for a in plans[0].actions] == [_comparable(a) for a in plans[1].actions]
    assert plans[0].actions


SET_SPEC: dict[str, Any] = {
    "forest": "f",
    "data": ["file:///data/crawl/"],
    "clusters": 2,
    "sample": 100,
    "parallelism": 2,
}


def _set_storage(root: Path, stage: str, clusterer_dir: Path) -> None:
    """The set's files at ``stage``: nothing; the committed clusterer; and every record."""
    storage = open_storage(f"file://{root}")
    key = storage_name("topics", ElmClusterSetSpec.model_validate(SET_SPEC))
    if stage == "fit":
        return
    clusterer_dir.mkdir()
    (clusterer_dir / "clusterer.json").write_text("{}")
    sha = commit_dir(storage, clusterer_dir, layout.clusterer(key))
    if stage == "assign":
        return
    for index in range(2):
        record = AssignmentRecord(
            clusterer=sha, index=index, count=2, train=[3, 4], valid=[1, 0], files=[]
        )
        key_of = layout.cluster_assignment(key, index)
        storage.write_bytes(key_of, record.model_dump_json().encode())


SET_STAGES = {  # stage -> what its plan must hold
    "fit": "CreateJob",
    "assign": "CreateJob",
    "branch": "ApplyObject",
    "name taken": "Event",
}


@pytest.mark.parametrize("stage", list(SET_STAGES))
def test_both_modes_plan_the_same_cluster_set(stage: str, tmp_path: Path) -> None:
    """A set's observation is one path too: its forest, Jobs, generated branches (and the
    namespace's other branch names) and storage give equal inputs and plans in both modes."""
    world = World([])
    _fill_storage(tmp_path, world)
    _set_storage(tmp_path, "branch" if stage == "name taken" else stage, tmp_path / "clusterer")
    theirs = "topics-c1" if stage == "name taken" else "other"  # a user's own branch
    record = ObjectRecord(
        kind="ElmClusterSet", name="topics", uid="uid-s", created="2026-01-01T00:00:01Z",
        source="set.yaml", spec=SET_SPEC,
    )  # fmt: skip
    generated = ObjectRecord(
        kind="ElmBranch", name="topics-c0", uid="uid-c0", created="2026-01-01T00:00:02Z",
        source="set.yaml", spec=BRANCH_SPEC, status={"phase": "Training", "observedGeneration": 1},
        owner=cluster_sets.owner_of("topics"), labels={"btm.elmforest.io/cluster-set": "topics"},
    )  # fmt: skip
    mine = ObjectRecord(
        kind="ElmBranch", name=theirs, uid="uid-c1", created="2026-01-01T00:00:03Z",
        source="branch.yaml", spec=SECOND,
    )  # fmt: skip
    forest = _forest_record(tmp_path, world)
    ctx = OperatorContext(kube=cast(Kube, None))
    source = ClusterSetSource(
        ctx, "local", forest_body=forest.body(), generated=[generated.body()],
        names={"topics-c0", theirs},
    )  # fmt: skip
    cluster = observe_cluster_set(source, record.body())
    state = LocalState(
        forests={"f": forest},
        cluster_sets={"topics": record},
        branches={"topics-c0": generated, theirs: mine},
    )
    runner = ProcessRunner(logs=tmp_path / "logs", cache=tmp_path / "cache", parallel=1)
    engine = Engine(state, runner, on_event=lambda *_: None, on_log=lambda _: None)
    local = observe_cluster_set(engine, record.body())
    assert cluster.input == local.input
    plans = [plan_cluster_set(o.input, o.spec_error) for o in (cluster, local)]
    assert [_comparable(a) for a in plans[0].actions] == [_comparable(a) for a in plans[1].actions]
    kinds = [type(a).__name__ for a in plans[0].actions]
    assert SET_STAGES[stage] in kinds, kinds
