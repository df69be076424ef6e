"""A seeded sample of the crash-point sweep on the real control plane.

The same life and invariants as tests/reliability (a forest and three branches merge, one is
edited, one deleted with ``retention: Delete``; one Job per attempt, each merge exactly once,
every artifact verifies, no request refused by RBAC), but the API server, the Job controller,
the garbage collector and the scheduler are Kubernetes' own; the operator runs with the
chart's identity and is killed at chosen writes (tests/harness/apiproxy.py) and restarted.
``python -m tests.reliability.sweep --plane`` runs a larger sample.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.crash_plane import cluster_factory, standin_node
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
