"""Guardrails (the chart's policy values): each rule refuses what it should, names the value and
the rule, and a refused forest is neither read nor run."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from elmcore.errors import BadInputError
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.adapters.kube import Kube
from elmforest.api.forest import ElmForestSpec, ElmForestStatus, StorageSpec
from elmforest.observe import observe_branch, observe_forest
from elmforest.planner.actions import CreateJob, PatchStatus
from elmforest.planner.branch import plan_branch
from elmforest.planner.forest import ForestInput, plan_forest
from elmforest.planner.policy import CLUSTER_WIDE_ENV, POLICY_ENV, Policy
from elmforest.reconcile.context import OperatorContext, Settings
from elmforest.reconcile.sources import ClusterBranchSource, ClusterForestSource

IMAGE = "registry.example.com/ml/trainer@sha256:" + "a" * 64
RULES = {
    "trainerImageRepositories": ["registry.example.com/ml/"],
    "storageEndpoints": ["https://minio.storage:9000"],
    "buckets": ["team-a-*"],
    "serviceAccounts": ["trainer"],
}


def spec(**changes: Any) -> ElmForestSpec:
    trainer = {"image": IMAGE, "serviceAccountName": "trainer"}
    storage = {
        "uri": "s3://team-a-forests/f",
        "endpoint": "https://minio.storage:9000",
        "credentialsSecret": "s3",
    }
    body: dict[str, Any] = {"storage": storage, "trainer": trainer}
    for path, value in changes.items():
        section, key = path.split(".")
        if value is None:
            body[section].pop(key, None)
        else:
            body[section][key] = value
    return ElmForestSpec.model_validate(body)


def policy(**env: str) -> Policy:
    return Policy.from_env({POLICY_ENV: json.dumps(RULES), **env})


def test_a_forest_inside_every_rule_passes_and_no_rules_allow_anything() -> None:
    assert policy().problem(spec()) is None
    anything = spec(**{"storage.uri": "file:///tmp/f", "trainer.image": "x@sha256:" + "0" * 64})
    assert Policy().problem(anything) is None
    assert Policy.from_env({}).problem(anything) is None


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"trainer.image": "docker.io/evil/t@sha256:" + "b" * 64}, "trainerImageRepositories"),
        # A prefix is a prefix of the whole reference: a look-alike host does not pass.
        ({"trainer.image": "registry.example.com/mlx@sha256:" + "b" * 64}, "trainerImage"),
        ({"trainer.serviceAccountName": "admin"}, "serviceAccounts"),
        ({"trainer.serviceAccountName": None}, "'default'"),
        ({"storage.endpoint": "https://elsewhere:9000"}, "storageEndpoints"),
        ({"storage.endpoint": None}, "(none: AWS)"),
        ({"storage.uri": "s3://team-b-forests/f"}, "policy.buckets"),
        ({"storage.uri": "file:///var/forest"}, "policy.buckets"),
    ],
)
def test_each_rule_refuses_naming_the_value_and_the_rule(
    changes: dict[str, Any], names: str
) -> None:
    problem = policy().problem(spec(**changes))
    assert problem is not None and names in problem, problem


def test_the_operators_own_storage_identity_is_not_lent_cluster_wide_by_default() -> None:
    no_secret = spec(**{"storage.credentialsSecret": None})
    cluster_wide = policy(**{CLUSTER_WIDE_ENV: "true"}).problem(no_secret)
    assert cluster_wide is not None and "credentialsSecret is required" in cluster_wide
    assert policy(**{CLUSTER_WIDE_ENV: "false"}).problem(no_secret) is None
    lent = Policy.from_env(
        {POLICY_ENV: json.dumps({"operatorStorageIdentity": True}), CLUSTER_WIDE_ENV: "true"}
    )
    assert lent.problem(no_secret) is None
    kept = Policy.from_env({POLICY_ENV: json.dumps({"operatorStorageIdentity": False})})
    assert kept.problem(no_secret) is not None


def test_bad_policy_values_fail_at_start_naming_the_variable() -> None:
    with pytest.raises(BadInputError, match=POLICY_ENV):
        Policy.from_env({POLICY_ENV: json.dumps({"buckets": "team-a-*"})})  # not a list
    with pytest.raises(BadInputError, match=POLICY_ENV):
        Policy.from_env({POLICY_ENV: "{"})


def test_a_forbidden_forest_fails_with_reason_forbidden_and_creates_nothing() -> None:
    refused = spec(**{"trainer.image": "docker.io/evil/t@sha256:" + "b" * 64})
    problem = policy().problem(refused)
    inp = ForestInput("f", "ns", "u", 1, refused, ElmForestStatus(), forbidden=problem)
    plan = plan_forest(inp)
    assert not any(isinstance(a, CreateJob) for a in plan.actions)
    status = next(a.status for a in plan.actions if isinstance(a, PatchStatus))
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (status["phase"], ready["status"], ready["reason"]) == ("Failed", "False", "Forbidden")
    assert "trainerImageRepositories" in ready["message"]


def _untouched(spec: StorageSpec) -> ForestStorage:
    raise AssertionError("a forbidden forest's storage was touched")


class _ForestSource(ClusterForestSource):
    storage = staticmethod(_untouched)  # type: ignore[assignment]


class _BranchSource(ClusterBranchSource):
    storage = staticmethod(_untouched)  # type: ignore[assignment]


def test_neither_a_forbidden_forest_nor_its_branches_touch_storage_or_run() -> None:
    ctx = OperatorContext(kube=cast(Kube, None), settings=Settings(policy=policy()))
    refused = spec(**{"storage.uri": "s3://team-b-forests/f"}).model_dump(
        by_alias=True, exclude_none=True
    )
    forest = {"metadata": {"name": "f", "namespace": "ns"}, "spec": refused, "status": {}}
    observed = observe_forest(_ForestSource(ctx, "ns"), forest)
    assert observed.storage is None and "policy.buckets" in (observed.input.forbidden or "")
    branch = {
        "metadata": {"name": "cook", "namespace": "ns"},
        "spec": {"forest": "f", "domain": "cooking", "data": {"train": ["s3://b/c.txt"]}},
    }
    source = _BranchSource(ctx, "ns", forest_body={**forest, "status": {"phase": "Ready"}})
    inp = observe_branch(source, branch)
    assert inp.forest is not None and not inp.forest.ready  # waits, as for a forest not ready
    assert not any(isinstance(a, CreateJob) for a in plan_branch(inp).actions)
    deleting = {**branch, "metadata": {**branch["metadata"], "deletionTimestamp": "now"}}
    assert observe_branch(source, deleting).merged is None
