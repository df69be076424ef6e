"""The chart's operator container, run as a process here with the chart's identity."""

from __future__ import annotations

import base64
from pathlib import Path

from tests.cluster.conftest import Release
from tests.harness.controlplane import kubeconfig
from tests.harness.kubectl import Kube


def token_kubeconfig(kube: Kube, release: Release, folder: Path, server: str = "") -> Path:
    """A kubeconfig with a TokenRequest token of the chart's ServiceAccount; ``server``
    replaces the cluster's address (a proxy in front of it)."""
    token = kube.kubectl(
        "create", "token", release.account, "-n", release.namespace, "--duration=1h"
    ).stdout.strip()
    view = kube.json("config", "view", "--raw", "--minify")
    cluster = view["clusters"][0]["cluster"]
    ca = folder / "ca.crt"
    if "certificate-authority-data" in cluster:
        ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    else:
        ca.write_bytes(Path(cluster["certificate-authority"]).read_bytes())
    path = folder / "operator.kubeconfig"
    path.write_text(kubeconfig(server or cluster["server"], ca, {"token": token}))
    return path


ELECTION_FLAGS = ("--leader-election", "--lease-", "--renew-deadline", "--retry-period")


def operator_command(
    kube: Kube, release: Release, election: bool = False
) -> tuple[list[str], dict[str, str]]:
    """``elmforest`` arguments and environment from the chart's Deployment, with no liveness
    file or metrics port (several may run on one machine) and a 1 s resync. Without
    ``election`` the chart's leader-election flags are dropped: those tests run one operator
    and check its exact requests against the watched namespace's Role
    (tests/cluster/test_leader_election.py runs the election)."""
    deployment = kube.json("get", "deployment", release.account, "-n", release.namespace)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = [
        a
        for a in container["args"]
        if not a.startswith(("--liveness", "--metrics-port", "--resync"))
        and (election or not a.startswith(ELECTION_FLAGS))
    ]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.pop("TMPDIR", None)
    return [*args, "--liveness", "", "--metrics-port", "0", "--resync", "1"], env
