"""The process kubelet's container mode (issue 29 point 2): pods run from the images built here.

A control plane of this module's own (so it runs beside the cluster tier, not in its unit),
one node in container mode: a pod whose image was built
by ``make images`` (``localhost/...``) runs in it, by podman, as its spec says (uid 10001,
read-only root, every capability dropped, emptyDir volumes, the service-account token at its
real path, limits). ``helm install`` the chart with the built operator image: the operator
reads its in-cluster config from that token and reconciles; a forest with the built trainer
image trains its tokenizer, seed and a branch in containers, and the branch merges. A pod whose
image does not exist ends as a kubelet reports it: terminated, reason ``StartError``, exit 128,
never retried in place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from elmcore.manifest import Manifest
from tests.cluster import quickstart
from tests.cluster.conftest import install_chart, own_plane, start_node
from tests.harness.kubectl import Kube, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
wait = partial(wait_for, timeout=420, every=1.0)


@pytest.fixture(scope="module")
def containers_kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    with own_plane(tmp_path_factory, "containers", "container mode runs on its own plane") as kube:
        yield kube


def _start_error(kube: Kube, ns: str) -> dict[str, Any] | None:
    pod = kube.json("get", "pod", "no-such-image", "-n", ns)
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    terminated = statuses[0].get("state", {}).get("terminated")
    return {**terminated, "phase": pod["status"]["phase"]} if terminated else None


@pytest.mark.timeout(900)
def test_the_chart_and_a_forest_run_in_containers_of_the_built_images(
    containers_kube: Kube, image_digests: dict[str, str], s3_endpoint: str, s3_bucket: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    kube = containers_kube
    assert kube.plane is not None
    node = start_node(kube.plane, kube, tmp_path / "node", containers=True)
    try:
        settings = quickstart.node_chart(**quickstart.built_images(image_digests))
        release = install_chart(kube, "ctr", "ctr", settings=settings)
        ns = release.watched
        folder = quickstart.on_s3(kube, ns, s3_endpoint, s3_bucket, tmp_path / "q", seed_steps=10)
        kube.kubectl("apply", "-f", str(folder / "forest.yaml"), "-n", ns)
        kube.apply(yaml.safe_load((folder / "branch-quotes.yaml").read_text()), "-n", ns)

        wait("quotes merged", lambda: quickstart.all_merged(kube, ns, ("quotes",)))
        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        body = s3.get_object(Bucket=s3_bucket, Key="forests/quickstart/manifest.json")["Body"]
        assert sorted(Manifest.model_validate(json.loads(body.read())).experts) == ["quotes"]
        # Every pod of the operator and of the forest ran in a container of the built images.
        ran = {
            **quickstart.container_ids(kube, release.namespace),
            **quickstart.container_ids(kube, ns),
        }
        assert any(name.startswith("ctr-elmforest-") for name in ran), ran
        assert {name.split("-")[0] for name in ran} >= {"ctr", "quickstart", "quotes"}, ran
        assert all(cid.startswith("podman://") for cid in ran.values()), ran

        # An image that is not there: StartError, exit 128, the pod Failed (restartPolicy Never).
        pod = {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "no-such-image"},
            "spec": {
                "restartPolicy": "Never", "automountServiceAccountToken": False,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "c", "image": "localhost/elmforest-absent@sha256:" + "0" * 64,
                    "securityContext": {"allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"]}},
                }],
            },
        }  # fmt: skip
        kube.apply(pod, "-n", ns)
        failed = wait("the StartError reported", lambda: _start_error(kube, ns), timeout=60)
        outcome = (failed["reason"], failed["exitCode"], failed["phase"])
        assert outcome == ("StartError", 128, "Failed"), failed
    finally:
        node.stop()
