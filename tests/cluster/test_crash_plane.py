"""A seeded sample of the crash-point sweep on the real control plane.

The same life and invariants as tests/reliability (a forest and three branches merge, one is
edited, one deleted with ``retention: Delete``; one Job per attempt, each merge exactly once,
every artifact verifies, no request refused by RBAC), but the API server, the Job controller,
the garbage collector and the scheduler are Kubernetes' own; the operator runs with the
chart's identity and is killed at chosen writes (tests/harness/apiproxy.py) and restarted.
``python -m tests.reliability.sweep --plane`` runs a larger sample.

Across handovers (issue 29, point 3): the same life with the chart's two replicas behind its
Lease; each crash kills the leader, the standby takes over once the Lease expires, and the same
invariants hold (no Job created twice, no merge doubled or lost).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.crash_plane import HandoverCluster, PlaneCluster, cluster_factory, standin_node
from tests.harness.kubectl import Kube
from tests.harness.nodeagent import ProcessKubelet
from tests.reliability.scenario import Rig
from tests.reliability.sweep import base_env, run_all, sample_points, summary
from tests.reliability.test_crash_sweep import NOMINAL

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
SEED = int(os.environ.get("ELMFOREST_SWEEP_SEED", "20261129"))
RUNS, POINTS_PER_RUN = 2, 3


@pytest.fixture(scope="module")
def node_for_standin(
    kube: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessKubelet]:
    if kube.plane is None:
        pytest.skip("the process kubelet joins the local control plane only")
    agent = standin_node(kube, tmp_path_factory.mktemp("node-standin"))
    yield agent
    agent.stop()
    kube.kubectl("delete", "node", agent.name, "--wait=false", check=False)


@pytest.mark.timeout(900)
def test_crash_points_sample_on_a_real_control_plane(
    kube: Kube,
    node_for_standin: ProcessKubelet,
    s3_endpoint: str,
    seeded_forest: Path,
    tmp_path: Path,
) -> None:
    rig = Rig(s3_endpoint, seeded_forest, tmp_path / "runs", base_env())
    points = sample_points(NOMINAL, RUNS * POINTS_PER_RUN, SEED)
    runs = [
        (f"p{i}", set(points[i * POINTS_PER_RUN : (i + 1) * POINTS_PER_RUN])) for i in range(RUNS)
    ]
    outcomes = run_all(
        rig, runs, 1, progress=False, make_cluster=cluster_factory(kube, node_for_standin)
    )
    report = summary(outcomes)
    assert report["violations"] == {}, f"seed {SEED}: {report}"
    fired = [str(p) for o in outcomes for p in o.fired]
    assert len(fired) == len(points), f"seed {SEED}: only {fired} of {points} were reached"
    print(f"seed {SEED}: {len(fired)} crash points on the real plane, invariants held: {fired}")


@pytest.mark.timeout(900)
def test_crash_points_sample_across_leader_handovers(
    kube: Kube,
    node_for_standin: ProcessKubelet,
    s3_endpoint: str,
    seeded_forest: Path,
    tmp_path: Path,
) -> None:
    rig = Rig(s3_endpoint, seeded_forest, tmp_path / "runs", base_env())
    points = sample_points(NOMINAL, POINTS_PER_RUN, SEED + 1)
    lives: list[PlaneCluster] = []
    make = cluster_factory(kube, node_for_standin, HandoverCluster)

    def made(workdir: Path, env: dict[str, str]) -> PlaneCluster:
        lives.append(make(workdir, env))
        return lives[-1]

    outcomes = run_all(rig, [("h0", set(points))], 1, progress=False, make_cluster=made)
    report = summary(outcomes)
    assert report["violations"] == {}, f"seed {SEED + 1}: {report}"
    fired = [str(p) for o in outcomes for p in o.fired]
    assert len(fired) == len(points), f"seed {SEED + 1}: only {fired} of {points} were reached"
    # Each crash killed the replica that held the Lease, a different one each time: the
    # standby had taken over (and written) before the next crash.
    (life,) = lives
    assert isinstance(life, HandoverCluster)
    killed = life.killed_leaders
    assert len(killed) == len(points) and len(set(killed)) == len(killed), killed
    print(f"seed {SEED + 1}: {len(fired)} crashes, leaders killed in turn: {killed}")
