"""Two operator replicas, one leader, on the real control plane (issue 29, point 3).

Two ``elmforest operator`` processes with the chart's args (leader election on, its default
durations) and identities: the first leads and reconciles, the second waits. SIGKILL of the
leader: the standby takes over once the Lease expires (lease duration + retry period at
most); SIGTERM (a drain, a rolling update): the leader releases the Lease and the standby
takes over at once. After each handover the new leader reconciles new forests, and no forest
ever gets a second Job. The measured takeover times are printed (docs/install.md quotes them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.chart_operator import operator_command, token_kubeconfig
from tests.cluster.conftest import Release, install_chart, tiny_forest
from tests.harness.kubectl import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
UNSCHEDULABLE = {"nodeSelector.elmforest-test/unschedulable": "true"}  # we run the operators
LEASE_DURATION, RETRY_PERIOD = 15.0, 2.0  # the chart's defaults


@pytest.fixture
def release(kube: Kube, installed_crds: Kube) -> Release:
    return install_chart(kube, "elected", "elected", strings=UNSCHEDULABLE)


class Candidates:
    """Operator processes as the chart's pods would run them, each with its own identity."""

    def __init__(self, kube: Kube, release: Release, folder: Path) -> None:
        self.kube, self.release, self.folder = kube, release, folder
        self.args, self.env = operator_command(kube, release, election=True)
        assert "--leader-election" in self.args  # the chart's default
        self.kubeconfig = token_kubeconfig(kube, release, folder)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, identity: str) -> None:
        env = {
            **os.environ,
            **self.env,
            "KUBECONFIG": str(self.kubeconfig),
            "POD_NAME": identity,  # the chart's downward API values
            "POD_NAMESPACE": self.release.namespace,
        }
        with (self.folder / f"{identity}.log").open("wb") as out:
            self.processes[identity] = subprocess.Popen(
                [sys.executable, "-m", "elmforest", *self.args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self, identity: str) -> str:
        return (self.folder / f"{identity}.log").read_text(errors="replace")

    def holder(self) -> str | None:
        done = self.kube.kubectl(
            "get",
            "lease",
            self.release.account,
            "-n",
            self.release.namespace,
            "-o",
            "jsonpath={.spec.holderIdentity}",
            check=False,
        )
        return done.stdout.strip() if done.returncode == 0 else None

    def stop_all(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture
def candidates(kube: Kube, release: Release, tmp_path: Path) -> Iterator[Candidates]:
    group = Candidates(kube, release, tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


def _takeover(group: Candidates, heir: str, limit: float) -> float:
    start = time.monotonic()
    wait_for(f"{heir} to hold the Lease", lambda: group.holder() == heir, limit, every=0.1)
    return time.monotonic() - start


@pytest.mark.timeout(240)
def test_the_standby_takes_over_after_a_kill_and_a_drain(
    kube: Kube, release: Release, candidates: Candidates, s3_endpoint: str, s3_bucket: str
) -> None:
    ns = release.watched
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-creds"},
        "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
    }
    kube.apply([secret], "-n", ns)

    def jobs(forest: str) -> list[Any]:
        selector = f"btm.elmforest.io/forest={forest}"
        found: list[Any] = kube.json("get", "jobs", "-n", ns, "-l", selector)["items"]
        return found

    def reconciled(forest: str) -> None:
        kube.apply([tiny_forest(forest, s3_bucket, s3_endpoint)], "-n", ns)
        wait_for(f"{forest}'s first Job", lambda: jobs(forest), timeout=60)

    candidates.start("a")
    wait_for("a to lead", lambda: candidates.holder() == "a", timeout=60)
    candidates.start("b")
    reconciled("before")
    wait_for("b waiting", lambda: "waiting for lease" in candidates.log("b"), timeout=30)
    assert candidates.holder() == "a"
    assert "acquired" not in candidates.log("b")  # the standby never acted

    # A crash: nothing releases the Lease; b waits for it to expire.
    os.killpg(candidates.processes["a"].pid, signal.SIGKILL)
    killed = _takeover(candidates, "b", LEASE_DURATION + RETRY_PERIOD + 10)
    reconciled("after-kill")
    candidates.start("c")  # the restarted pod comes back as a standby

    # A drain: SIGTERM; Kopf stops, the Lease is released, c takes it at its next try.
    os.killpg(candidates.processes["b"].pid, signal.SIGTERM)
    drained = _takeover(candidates, "c", RETRY_PERIOD + 15)
    assert candidates.processes["b"].wait(30) == 0, candidates.log("b")[-3000:]
    assert "released lease" in candidates.log("b")
    reconciled("after-drain")

    sys.stderr.write(f"takeover after SIGKILL: {killed:.1f} s, after SIGTERM: {drained:.1f} s\n")
    assert killed <= LEASE_DURATION + RETRY_PERIOD + 3, killed
    # Kopf first stops its handlers and the forests' daemons (about 2 s here, idle), then the
    # Lease is released: within the lease time a crash costs (issue 29's promise), with margin
    # for a machine busy with other tests (11 s measured under a load of 7 on 2 cores).
    assert drained < LEASE_DURATION, drained
    # Every forest's Jobs: one each, whoever led when it was reconciled and since.
    time.sleep(3)
    for forest in ("before", "after-kill", "after-drain"):
        names = [j["metadata"]["name"] for j in jobs(forest)]
        assert len(names) == len(set(names)) == 1, (forest, names)
    for identity in ("a", "b", "c"):
        assert "Traceback" not in candidates.log(identity), candidates.log(identity)[-3000:]
