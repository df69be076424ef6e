"""``helm upgrade`` with forests running (issue 29, point 5): from the chart before the
production-install work (this repository has no release tag yet: ``PREVIOUS``) to this one.

On a control plane of this module's own (the old chart installs the old CRDs), the previous
chart is installed and its operator pod runs the previous commit's code (the process kubelet
maps the old image's digest to that tree: ``ProcessKubelet.images``). Two branches merge; two
more start training and are held mid-run (the stand-in trainer waits for a gate file). Then the
upgrade a user makes: this repository's CRDs applied server-side (helm never upgrades a chart's
``crds/``), ``helm upgrade`` to this chart and the current operator. The held runs are released
and merge. Checked: no Job was created again (every Job's uid is the one from before the upgrade,
and no Job is new), the experts merged before the upgrade are untouched in the manifest (same
version, same files), every branch merged once at version 1, and every stored ElmForest and
ElmBranch reads back with the spec it was applied with.
"""

from __future__ import annotations

import json
import sys
import tarfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import pytest

from elmcore.manifest import Manifest
from tests.cluster import quickstart
from tests.cluster.conftest import ROOT, install_chart, own_plane, start_node
from tests.harness.controlplane import free_port
from tests.harness.kubectl import Kube, wait_for
from tests.harness.nodeagent import PROGRAMS, ProcessKubelet
from tests.reliability.scenario import STANDIN

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
wait = partial(wait_for, timeout=300, every=1.0)
# The chart (and operator) before issue 29's production-install work.
PREVIOUS = "870f372"
OLD_DIGEST = "sha256:" + "01" * 32
NEW_DIGEST = "sha256:" + "ab" * 32
FIRST, HELD = ("code", "legal"), ("quotes", "scripture")


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous commit's chart, CRDs and operator code: kept in the repository (CI's copy
    of it may have no git history), made by ``git archive --format=tar.gz -o
    tests/cluster/previous/870f372.tar.gz 870f372 operator/elmforest core/elmcore helm crds``."""
    tree = tmp_path_factory.mktemp("previous")
    with tarfile.open(Path(__file__).with_name("previous") / f"{PREVIOUS}.tar.gz") as archive:
        archive.extractall(tree, filter="data")
    return tree


@pytest.fixture(scope="module")
def upgrade_kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    why = "the old CRDs are installed on a local control plane of the test's own only"
    with own_plane(tmp_path_factory, "upgrade", why) as kube:
        yield kube


@pytest.fixture(scope="module")
def upgrade_node(
    upgrade_kube: Kube,
    previous: Path,
    tmp_path_factory: pytest.TempPathFactory,
    seeded_forest: Path,
) -> Iterator[ProcessKubelet]:
    assert upgrade_kube.plane is not None
    code = ":".join(str(previous / part) for part in ("operator", "core"))
    agent = start_node(
        upgrade_kube.plane,
        upgrade_kube,
        tmp_path_factory.mktemp("upgrade-node"),
        programs={**PROGRAMS, "elmtrain": STANDIN},
        # The old operator image runs the old code (its PYTHONPATH comes first).
        images={
            OLD_DIGEST: ["/usr/bin/env", f"PYTHONPATH={code}", sys.executable, "-m", "elmforest"]
        },
    )
    agent.base_env.update(
        PYTHONPATH=str(ROOT),  # python -m tests.harness.standin
        STANDIN_TEMPLATES=str(seeded_forest),
        STANDIN_SECONDS="1",
        STANDIN_GATE=str(tmp_path_factory.mktemp("gate") / "open"),
    )
    yield agent
    agent.stop()


def _jobs(kube: Kube, ns: str) -> dict[str, str]:
    return {
        j["metadata"]["name"]: j["metadata"]["uid"]
        for j in kube.json("get", "jobs", "-n", ns)["items"]
    }


def _specs(kube: Kube, ns: str) -> dict[str, Any]:
    items = kube.json("get", "elmforests,elmbranches", "-n", ns)["items"]
    return {f"{o['kind']}/{o['metadata']['name']}": o["spec"] for o in items}


def _operators(kube: Kube, namespace: str) -> list[tuple[str, bool]]:
    """The operator pods: (image, ready) each."""
    pods = kube.json("get", "pods", "-n", namespace)["items"]
    found = []
    for pod in pods:
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (pod.get("status") or {}).get("conditions") or []
        )
        found.append((pod["spec"]["containers"][0]["image"], ready))
    return found


@pytest.mark.timeout(1200)
def test_helm_upgrade_with_forests_running(
    upgrade_kube: Kube,
    upgrade_node: ProcessKubelet,
    previous: Path,
    s3_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    kube = upgrade_kube
    gate = Path(upgrade_node.base_env["STANDIN_GATE"])
    gate.touch()  # the first branches run through
    settings = {
        "resyncSeconds": "2",
        "trainer.gpus": "0",
        "trainer.resources.requests.cpu": "1",
        "trainer.resources.requests.memory": "1Gi",
    }
    release = install_chart(
        kube,
        "prod",
        "upgrade",
        chart=previous / "helm" / "elmforest",
        healthPort=str(free_port()),
        settings={"image.digest": OLD_DIGEST, "metrics.port": str(free_port()), **settings},
    )
    ns = release.watched
    folder = quickstart.on_s3(
        kube, ns, s3_endpoint, s3_bucket, tmp_path / "quickstart", seed_steps=20
    )
    kube.kubectl("apply", "-f", str(folder / "forest.yaml"), "-n", ns)
    for domain in FIRST:
        kube.kubectl("apply", "-f", str(folder / f"branch-{domain}.yaml"), "-n", ns)
    wait("the first branches merged", lambda: quickstart.all_merged(kube, ns, FIRST), timeout=600)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def manifest() -> Manifest:
        data = s3.get_object(Bucket=s3_bucket, Key=f"forests/{quickstart.FOREST}/manifest.json")
        return Manifest.model_validate(json.loads(data["Body"].read()))

    merged_before = {d: manifest().experts[d] for d in FIRST}
    # The next two are held mid-run: their training Jobs run when the upgrade comes.
    gate.unlink()
    for domain in HELD:
        kube.kubectl("apply", "-f", str(folder / f"branch-{domain}.yaml"), "-n", ns)

    def held_training() -> bool:
        statuses = quickstart.branches(kube, ns)
        return all(statuses.get(d, {}).get("phase") in ("Initializing", "Training") for d in HELD)

    wait("the held branches training", held_training, timeout=600)
    jobs_before, specs_before = _jobs(kube, ns), _specs(kube, ns)
    assert any(name.startswith("quotes-") and not name.endswith("-prep") for name in jobs_before)

    # The upgrade: CRDs first (helm installs a chart's crds/ only once), then the chart. New
    # ports: the process kubelet runs pods in this machine's network, and the old pod still
    # holds its ports while the new one starts (a rolling update).
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    values = {
        "image.digest": NEW_DIGEST,
        "watchNamespaces": f"{{{ns}}}",
        "trainer.image": "registry.example.com/elmforest/trainer@sha256:" + "cd" * 32,
        "healthPort": str(free_port()),
        "metrics.port": str(free_port()),
        "replicas": "1",
        **settings,
    }
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    kube.helm(
        "upgrade", release.name, str(ROOT / "helm" / "elmforest"), "-n", release.namespace, *sets
    )

    def upgraded() -> bool:
        pods = _operators(kube, release.namespace)
        return bool(pods) and all(image.endswith(NEW_DIGEST) and ready for image, ready in pods)

    wait("only the new operator, ready", upgraded, timeout=300)
    gate.touch()  # the held runs commit, under the new operator
    wait(
        "every branch merged",
        lambda: quickstart.all_merged(kube, ns, quickstart.DOMAINS),
        timeout=600,
    )

    # No Job created again, none new: every one is the object from before the upgrade.
    assert _jobs(kube, ns) == jobs_before
    after = manifest()
    for domain, entry in merged_before.items():
        assert after.experts[domain] == entry, domain  # not retrained, not merged again
    assert {d: after.experts[d].version for d in quickstart.DOMAINS} == dict.fromkeys(
        quickstart.DOMAINS, 1
    )
    statuses = quickstart.branches(kube, ns)
    assert all(statuses[d].get("version") == 1 for d in quickstart.DOMAINS), statuses
    # What was stored under the old CRDs reads back, spec for spec, under the new ones.
    assert _specs(kube, ns) == specs_before
