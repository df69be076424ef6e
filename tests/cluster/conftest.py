"""The real-Kubernetes tier: a control plane built from source, or any cluster by kubeconfig.

With ``ELMFOREST_TEST_KUBECONFIG`` the tests run against that cluster (kind, k3d, a cloud one),
with the built kubectl and helm where Go is here, else those on PATH. Without it, the pinned
control plane is built (once; cached) and started for the session. Where Go is missing the
tier is skipped with one line saying so, unless ``ELMFOREST_REQUIRE_CLUSTER=1`` (CI), where
that is an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from elmforest.api import BRANCH, FOREST
from tests.harness import kubebuild
from tests.harness.controlplane import ControlPlane, host_address
from tests.harness.kubectl import Kube
from tests.harness.nodeagent import ProcessKubelet

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]


@pytest.hookimpl(trylast=True)  # after ``-m``/``-k`` deselected: only what will run counts
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Build the control plane and Kueue (once; cached) when a selected test needs them: here,
    outside any test's time limit, since a cold build takes many minutes."""
    needed = {name for item in items for name in getattr(item, "fixturenames", ())}
    with contextlib.suppress(kubebuild.GoMissingError):  # the fixtures skip, saying why
        if needed & {"kube", "kueue_kube"}:
            kubebuild.binary()
        if "kueue" in needed:
            kubebuild.build(kubebuild.KUEUE)
        if "cluster_dns" in needed:
            kubebuild.build(kubebuild.COREDNS)


def _unavailable(why: str) -> None:
    if os.environ.get("ELMFOREST_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"the cluster tier is required here (ELMFOREST_REQUIRE_CLUSTER=1): {why}")
    pytest.skip(f"real-cluster tests skipped: {why}")


def tools() -> tuple[Path, Path]:
    try:
        return kubebuild.tool("kubectl"), kubebuild.tool("helm")
    except kubebuild.GoMissingError as error:
        kubectl, helm = shutil.which("kubectl"), shutil.which("helm")
        if os.environ.get("ELMFOREST_TEST_KUBECONFIG") and kubectl and helm:
            return Path(kubectl), Path(helm)
        _unavailable(str(error))
        raise


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    external = os.environ.get("ELMFOREST_TEST_KUBECONFIG", "")
    if external and not Path(external).is_file():
        pytest.fail(f"ELMFOREST_TEST_KUBECONFIG={external}: no such file")
    kubectl, helm = tools()
    home = tmp_path_factory.mktemp("helm-home")
    if external:
        client = Kube(Path(external), kubectl, helm, home)
        yield client
        client.cleanup()
        return
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    try:
        plane.start()
        client = Kube(plane.kubeconfig, kubectl, helm, home, plane)
        yield client
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def installed_crds(kube: Kube) -> Kube:
    """The CRDs of crds/, applied server-side and Established (as a user installs them)."""
    kube.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    for kind in (FOREST, BRANCH):
        kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{kind.crd_name}")
    return kube


RESTRICTED = {
    f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")
}
OPERATOR_DIGEST = "sha256:" + "ab" * 32
TRAINER_IMAGE = "registry.example.com/elmforest/trainer@sha256:" + "cd" * 32


@contextlib.contextmanager
def own_plane(tmp_path_factory: pytest.TempPathFactory, name: str, why: str) -> Iterator[Kube]:
    """A control plane of one test module's own (what it installs must not reach the session's
    plane); skipped, saying ``why``, against an external cluster."""
    if os.environ.get("ELMFOREST_TEST_KUBECONFIG"):
        pytest.skip(why)
    kubectl, helm = tools()
    plane = ControlPlane(tmp_path_factory.mktemp(f"{name}-plane"))
    try:
        plane.start()
        yield Kube(plane.kubeconfig, kubectl, helm, tmp_path_factory.mktemp(f"{name}-helm"), plane)
    finally:
        plane.stop()


def tiny_forest(name: str, bucket: str, endpoint: str, **trainer: Any) -> dict[str, Any]:
    """An ElmForest of a tiny model whose storage is ``bucket`` behind ``endpoint`` (the
    Secret ``s3-creds`` holds its keys); ``trainer``: more fields of ``spec.trainer``."""
    return {
        "apiVersion": "btm.elmforest.io/v1alpha1",
        "kind": "ElmForest",
        "metadata": {"name": name},
        "spec": {
            "storage": {
                "uri": f"s3://{bucket}/forests/{name}",
                "endpoint": endpoint,
                "region": "us-east-1",
                "credentialsSecret": "s3-creds",
            },
            "model": {"dModel": 48, "nLayers": 2, "nHeads": 2, "contextLength": 64},
            "tokenizer": {"vocabSize": 320},
            "seed": {"data": [f"s3://{bucket}/data/seed.txt"]},
            "trainer": {"image": TRAINER_IMAGE, "gpus": 0, **trainer},
        },
    }


@dataclass(frozen=True)
class Release:
    """The chart, installed by helm into a namespace that enforces Pod Security restricted."""

    name: str
    namespace: str  # the operator's
    watched: str  # the one namespace it watches (a Role there), also restricted
    crds_before: bool  # the CRDs were there before helm ran (helm skips existing CRDs)

    @property
    def account(self) -> str:
        """The chart's fullname: the release's name if it holds "elmforest", else with it."""
        return self.name if "elmforest" in self.name else f"{self.name}-elmforest"


def install_chart(
    kube: Kube,
    name: str,
    prefix: str,
    strings: dict[str, str] | None = None,
    chart: Path = ROOT / "helm" / "elmforest",
    settings: dict[str, str] | None = None,
    **values: str,
) -> Release:
    """``helm install`` of ``chart`` (this repository's) into a new restricted namespace,
    watching another; ``settings`` and ``values``: ``--set``s (settings' dotted names are
    no identifiers)."""
    crds_before = all(
        kube.kubectl("get", f"crd/{kind.crd_name}", check=False).returncode == 0
        for kind in (FOREST, BRANCH)
    )
    namespace = kube.namespace(f"{prefix}-system", RESTRICTED)
    watched = kube.namespace(prefix, RESTRICTED)
    values = {
        "image.digest": OPERATOR_DIGEST,
        "watchNamespaces": f"{{{watched}}}",
        "trainer.image": TRAINER_IMAGE,
        **(settings or {}),
        **values,
    }
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    sets += [a for k, v in (strings or {}).items() for a in ("--set-string", f"{k}={v}")]
    kube.helm("install", name, str(chart), "-n", namespace, *sets)
    return Release(name, namespace, watched, crds_before)


@pytest.fixture(scope="session")
def release(kube: Kube) -> Release:
    # Admitted, never scheduled: the RBAC test runs this operator itself, and no node (the
    # process kubelet of other tests) may start a second one on the same namespace.
    return install_chart(
        kube, "elmforest", "team", strings={"nodeSelector.elmforest-test/unschedulable": "true"}
    )


def start_node(
    plane: ControlPlane,
    kube: Kube,
    folder: Path,
    name: str = "node-0",
    **settings: Any,
) -> ProcessKubelet:
    """A process kubelet joined to ``plane``, Ready; ``settings``: ProcessKubelet's fields."""
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "ELMTRAIN_CACHE")
    with contextlib.suppress(RuntimeError):  # no such address: Services get no endpoints
        settings.setdefault("pod_ip", host_address())
    agent = ProcessKubelet(
        plane.node_kubeconfig(name),
        name,
        folder,
        plane.server,
        plane.ca,
        base_env={k: os.environ[k] for k in keep if k in os.environ} | {"OMP_NUM_THREADS": "1"},
        **settings,
    ).start()
    kube.kubectl("wait", "--for=condition=Ready", f"node/{name}", "--timeout=60s")
    return agent


@pytest.fixture(scope="session")
def node(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessKubelet]:
    """One node whose pods run as processes here (the local control plane only); in container
    mode, so a pod of an image built here (``make images``) runs in it, by podman."""
    if kube.plane is None:
        pytest.skip("the process kubelet joins the local control plane only")
    agent = start_node(kube.plane, kube, tmp_path_factory.mktemp("node-0"), containers=True)
    yield agent
    agent.stop()
