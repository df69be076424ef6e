"""One forest's life, with the operator killed at chosen side effects and restarted each time.

The life: a forest and three branches train and merge; one branch is edited (version 2 trains
and replaces version 1); one is deleted (its finalizer removes its expert and its files). The
real operator runs against the emulator, its S3 traffic through the fault proxy; Jobs run the
stand-in trainer (``tests/harness/standin.py``). After it converges, the invariants hold or the
run reports which did not.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from elmcore import layout
from elmcore.manifest import Manifest
from elmcore.records import Result
from elmcore.storage import Storage, open_storage
from elmcore.storage.commit import fetch_committed
from elmcore.storage.manifest_store import load_manifest
from tests.harness.cluster import ApiError, Cluster
from tests.harness.crashes import CrashPoint, CrashSwitch
from tests.harness.moto import create_bucket
from tests.harness.s3proxy import S3FaultProxy
from tests.operator.conftest import branch_body, forest_body

FOREST = "sweep"
BRANCHES = {"sweep-alpha": "alpha", "sweep-beta": "beta", "sweep-gamma": "gamma"}
EDITED, DELETED = "sweep-beta", "sweep-gamma"
# tokenizer, seed, three merges, beta's version 2, gamma's removal: one revision each, so a
# merge or removal applied twice shows up here.
EXPECTED_REVISION = 7
STANDIN = [sys.executable, "-m", "tests.harness.standin"]
TRAINING = {"steps": 8, "checkpointInterval": 4}
EDIT = {"spec": {"training": {"steps": 12}}}  # what determines the expert changed: version 2


class ScenarioCluster(Protocol):
    """What a life needs of a cluster: the emulator's (tests/harness/cluster.py) or a real
    control plane's (tests/cluster/crash_plane.py)."""

    workdir: Path
    operator_starts: int

    def start(self) -> ScenarioCluster: ...
    def stop(self) -> None: ...
    def start_operator(self) -> object: ...
    def kill_operator(self) -> None: ...
    def operator_alive(self) -> bool: ...
    def set_crashes(self, switch: CrashSwitch) -> None: ...
    def jobs_created(self) -> dict[str, int]: ...
    def job_runs(self, job: str) -> int: ...
    def unpermitted_requests(self) -> list[tuple[str, str, str]]: ...
    def create(self, body: dict[str, Any]) -> Any: ...
    def get(self, kind: str, name: str) -> Any: ...
    def list(self, kind: str) -> list[dict[str, Any]]: ...
    def patch(self, kind: str, name: str, patch: Any) -> Any: ...
    def delete(self, kind: str, name: str) -> Any: ...
    def secret(self, name: str, data: dict[str, str]) -> Any: ...


@dataclass
class Rig:
    """What every run shares: S3, the stand-in's artifacts, a work folder, the environment."""

    s3_endpoint: str
    templates: Path  # a forest folder with a real tokenizer/ and seed/ (see standin.py)
    workdir: Path
    base_env: dict[str, str]
    keep_logs: bool = False


@dataclass
class Outcome:
    run: str
    points: list[CrashPoint]
    fired: list[CrashPoint] = field(default_factory=list)
    effects: dict[str, int] = field(default_factory=dict)  # writes per label
    operator_starts: int = 0
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


class _Life:
    """The checks the run waits on, reading the API (as a user would) and S3 (past the proxy)."""

    def __init__(self, cluster: ScenarioCluster, storage: Storage) -> None:
        self.cluster, self.storage = cluster, storage

    def status(self, kind: str, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.cluster.get(kind, name).get("status") or {}
        return status

    def manifest(self) -> Manifest:
        return load_manifest(self.storage)[0]

    def _merged(self, name: str, version: int) -> bool:
        status = self.status("ElmBranch", name)
        if status.get("phase") == "Failed":
            raise AssertionError(f"{name} failed: {status.get('message')}")
        return status.get("phase") == "Merged" and status.get("mergedVersion") == version

    def all_merged(self) -> bool:
        forest = self.status("ElmForest", FOREST)
        return (
            all(self._merged(name, 1) for name in BRANCHES)
            and forest.get("phase") == "Ready"
            and forest.get("expertCount") == 3
        )

    def edited_merged(self) -> bool:
        entry = self.manifest().experts.get(BRANCHES[EDITED])
        return self._merged(EDITED, 2) and entry is not None and entry.version == 2

    def deleted_gone(self) -> bool:
        names = {b["metadata"]["name"] for b in self.cluster.list("ElmBranch")}
        return (
            DELETED not in names
            and BRANCHES[DELETED] not in self.manifest().experts
            and self.status("ElmForest", FOREST).get("expertCount") == 2
        )


def converge(cluster: ScenarioCluster, check: Callable[[], bool], timeout: float) -> bool:
    """Wait for ``check``, restarting the operator whenever it died (as its Deployment would)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not cluster.operator_alive():
            cluster.start_operator()
        try:
            if check():
                return True
        except (ApiError, KeyError):
            pass  # not there yet
        time.sleep(0.25)
    return False


def invariants(cluster: ScenarioCluster, life: _Life) -> list[str]:
    """What must hold however the operator was killed."""
    problems = []
    created = cluster.jobs_created()
    for name, count in sorted(created.items()):
        attempt = re.search(r"-v\d+-a(\d+)$", name)  # branch Jobs; a seed's hash may read "a01857"
        if count != 1 or cluster.job_runs(name) != 1:
            problems.append(f"Job {name}: created {count}x, ran {cluster.job_runs(name)}x")
        if attempt is not None and attempt.group(1) != "1":
            problems.append(f"Job {name}: a second attempt although no run failed")
    expected_jobs = {
        "sweep-alpha-v1-a1",
        "sweep-beta-v1-a1",
        "sweep-beta-v2-a1",
        "sweep-gamma-v1-a1",
    }
    if missing := expected_jobs - set(created):
        problems.append(f"Jobs never created: {sorted(missing)}")
    manifest = life.manifest()
    if manifest.revision != EXPECTED_REVISION:
        problems.append(f"manifest revision {manifest.revision} != {EXPECTED_REVISION}")
    versions = {domain: entry.version for domain, entry in manifest.experts.items()}
    if versions != {"alpha": 1, "beta": 2}:
        problems.append(f"manifest experts {versions} != alpha v1, beta v2")
    for domain, entry in manifest.experts.items():
        run_id = f"branch.{domain}.v{entry.version}"
        result = Result.model_validate_json(life.storage.read_bytes(layout.run_result(run_id)))
        if (result.path, result.sha256) != (entry.path, entry.sha256):
            problems.append(f"manifest entry {domain} is not its run's result")
    artifacts = [(e.path, e.sha256) for e in manifest.experts.values()]
    artifacts += [(a.path, a.sha256) for a in (manifest.tokenizer, manifest.seed) if a is not None]
    if len(artifacts) != 4:
        problems.append("the manifest lacks the tokenizer or the seed")
    for path, sha in artifacts:
        try:
            fetch_committed(life.storage, path, cluster.workdir / "verify" / path, sha)
        except Exception as error:  # any failure to verify is a finding, not a crash of the run
            problems.append(f"artifact {path} does not verify: {error}")
    if life.storage.list_children(f"experts/{BRANCHES[DELETED]}"):
        problems.append("the deleted branch's files are still there (retention: Delete)")
    if unpermitted := cluster.unpermitted_requests():
        problems.append(f"requests outside RBAC: {unpermitted}")
    return problems


def _emulated(workdir: Path, env: dict[str, str]) -> ScenarioCluster:
    return Cluster(workdir, env, programs={"elmtrain": STANDIN})


def run_scenario(
    rig: Rig,
    run: str,
    points: set[CrashPoint],
    timeout: float = 90,
    make_cluster: Callable[[Path, dict[str, str]], ScenarioCluster] = _emulated,
) -> Outcome:
    """Live the forest's life with the operator killed at ``points``; return what held.
    ``make_cluster`` gives the API server and nodes: the emulator's by default."""
    started = time.monotonic()
    outcome = Outcome(run, sorted(points))
    bucket = create_bucket(rig.s3_endpoint, f"sweep-{run}")
    storage = open_storage(f"s3://{bucket}/forests/{FOREST}", endpoint=rig.s3_endpoint)
    env = {
        **rig.base_env,
        "STANDIN_TEMPLATES": str(rig.templates),
        "STANDIN_S3_ENDPOINT": rig.s3_endpoint,
        "STANDIN_SECONDS": "0.3",
    }
    workdir = rig.workdir / run
    workdir.mkdir(parents=True, exist_ok=True)
    proxy = S3FaultProxy(rig.s3_endpoint).start()
    cluster = make_cluster(workdir, env).start()
    switch = CrashSwitch(set(points), kill=cluster.kill_operator)
    cluster.set_crashes(switch)
    proxy.crashes = switch
    try:
        cluster.secret("s3-creds", {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"})
        forest = forest_body(FOREST, f"s3://{bucket}", proxy.url, maxConcurrentBranches=2)
        forest["spec"]["branchDefaults"] = TRAINING
        cluster.start_operator()
        cluster.create(forest)
        for name, domain in BRANCHES.items():
            retention = {"retention": "Delete"} if name == DELETED else {}
            cluster.create(branch_body(name, FOREST, domain, f"s3://{bucket}", **retention))
        life = _Life(cluster, storage)
        # What to wait for, then what the user does next.
        acts: list[tuple[str, Callable[[], bool], Callable[[], Any]]] = [
            (
                "three experts merged",
                life.all_merged,
                lambda: cluster.patch("ElmBranch", EDITED, EDIT),
            ),
            (
                "the edit to merge as v2",
                life.edited_merged,
                lambda: cluster.delete("ElmBranch", DELETED),
            ),
            ("the deleted branch to leave", life.deleted_gone, lambda: None),
        ]
        for what, check, then in acts:
            try:
                done = converge(cluster, check, timeout)
            except AssertionError as error:
                outcome.violations.append(str(error))
                break
            if not done:
                outcome.violations.append(f"did not converge within {timeout:.0f} s: {what}")
                break
            then()
        else:
            outcome.violations += invariants(cluster, life)
    finally:
        outcome.fired = list(switch.fired)
        outcome.effects = switch.counts()
        outcome.operator_starts = cluster.operator_starts
        cluster.stop()
        proxy.stop()
        outcome.seconds = round(time.monotonic() - started, 1)
    if outcome.ok and not rig.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    return outcome
