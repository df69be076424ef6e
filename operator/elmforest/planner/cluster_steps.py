"""What an ``ElmClusterSet`` runs and creates, rendered purely: its version's storage name, the
fit Job, the Indexed assignment Job and the generated ``ElmBranch`` objects.

A version is keyed by a digest of everything that decides the clusters (data, k, sample,
features, balance, seed, validation share, the assignment's workers): its files live under
``clusters/<set>-<digest8>/``, so a changed spec never reads or overwrites another version's
clusterer or documents, and a restarted operator finds the same names from the spec alone.
"""

from __future__ import annotations

from typing import Any

from elmcore import layout
from elmforest.api import API_VERSION, BRANCH, CLUSTER_SET
from elmforest.api.branch import ClusterRef, DataSpec, ElmBranchSpec
from elmforest.api.clusterset import ElmClusterSetSpec
from elmforest.api.forest import ElmForestSpec
from elmforest.planner.jobs import JobRequest, Owner, build_job
from elmforest.planner.naming import (
    LABEL_CLUSTER_SET,
    LABEL_FOREST,
    MANAGED_BY,
    OPERATOR,
    child_name,
    digest,
)
from elmforest.planner.prepare import prepare_trainer
from elmforest.planner.trainer_args import forest_args


def fingerprint(spec: ElmClusterSetSpec) -> str:
    """What decides the clusters and their files; the branches' template does not."""
    return digest(spec.model_dump(mode="json", exclude={"branch_template"}), 12)


def storage_name(set_name: str, spec: ElmClusterSetSpec) -> str:
    """The version's folder under ``clusters/`` (a DNS label, as the trainer's ``--set``)."""
    return child_name(set_name, fingerprint(spec)[:8])


def fit_job_name(set_name: str, spec: ElmClusterSetSpec) -> str:
    return child_name(set_name, f"fit-{fingerprint(spec)[:6]}")


def assign_job_name(set_name: str, spec: ElmClusterSetSpec) -> str:
    return child_name(set_name, f"assign-{fingerprint(spec)[:6]}")


def fit_run(key: str) -> str:
    """The run whose progress records the fit's bad input (``runs/<id>/progress.json``)."""
    return f"cluster-fit.{key}"


def assign_run(key: str) -> str:
    return f"cluster-assign.{key}"


def branch_name(set_name: str, cluster: int) -> str:
    return child_name(set_name, f"c{cluster}")


def fit_argv(forest: ElmForestSpec, spec: ElmClusterSetSpec, key: str) -> list[str]:
    features = spec.features
    return [
        "cluster-fit", *forest_args(forest), "--set", key, "--run-id", fit_run(key),
        "--data", *spec.data, "--clusters", str(spec.clusters), "--sample", str(spec.sample),
        "--max-features", str(features.max_features),
        "--ngram", f"{features.ngram_min},{features.ngram_max}",
        "--balance" if spec.balance else "--no-balance", "--seed", str(spec.seed),
    ]  # fmt: skip


def assign_argv(forest: ElmForestSpec, spec: ElmClusterSetSpec, key: str, sha: str) -> list[str]:
    # Each pod of the Indexed Job reads its worker index from JOB_COMPLETION_INDEX.
    return [
        "cluster-assign", *forest_args(forest), "--set", key, "--run-id", assign_run(key),
        "--data", *spec.data, "--count", str(spec.parallelism),
        "--validation-fraction", str(spec.validation_fraction), "--sha256", sha,
    ]  # fmt: skip


def step_job(
    owner: Owner,
    namespace: str,
    forest_name: str,
    forest: ElmForestSpec,
    job_name: str,
    run_id: str,
    argv: list[str],
    completions: int = 1,
) -> dict[str, Any]:
    """A CPU Job of the set (fit or assignment), placed and sized as the forest's prepare
    step (spec.prepare: the text work of the forest), in the forest's trainer image."""
    request = JobRequest(
        name=job_name,
        namespace=namespace,
        owner=owner,
        forest=forest_name,
        role=argv[0],
        run_id=run_id,
        argv=argv,
        trainer=prepare_trainer(forest),
        storage=forest.storage,
        completions=completions,
        cluster_set=owner.name,
    )
    return build_job(request)


def data_location(forest: ElmForestSpec, key: str, cluster: int, split: str) -> str:
    """A cluster's folder of JSON lines, as a branch's data location (a prefix: every worker's
    part file is read)."""
    return f"{forest.storage.uri.rstrip('/')}/{layout.cluster_data(key, cluster, split)}/"


def branch_spec(
    forest_name: str,
    forest: ElmForestSpec,
    spec: ElmClusterSetSpec,
    key: str,
    sha: str,
    cluster: int,
    domain: str,
    validation: bool,
) -> ElmBranchSpec:
    template = spec.branch_template
    return ElmBranchSpec(
        forest=forest_name,
        domain=domain,
        data=DataSpec(
            train=[data_location(forest, key, cluster, "train")],
            validation=[data_location(forest, key, cluster, "valid")] if validation else [],
        ),
        init=template.init,
        training=template.training,
        trainer=template.trainer,
        retention=template.retention,
        max_attempts=template.max_attempts,
        cluster=ClusterRef(set=key, index=cluster, clusterer_sha256=sha),
    )


def branch_body(
    owner: Owner, namespace: str, name: str, forest_name: str, spec: ElmBranchSpec
) -> dict[str, Any]:
    """The generated ElmBranch, owned by the set (deleting the set deletes it: Kubernetes'
    garbage collector, then the branch's own finalizer takes its expert out)."""
    return {
        "apiVersion": API_VERSION,
        "kind": BRANCH.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                MANAGED_BY: OPERATOR,
                LABEL_FOREST: forest_name,
                LABEL_CLUSTER_SET: owner.name,
            },
            "ownerReferences": [owner.reference()],
        },
        "spec": spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }


def set_owner(name: str, uid: str) -> Owner:
    return Owner(CLUSTER_SET.kind, name, uid)
