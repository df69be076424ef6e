"""The baseline of bench.operator: the least a Kopf operator can do, one Job per ElmBranch.

Run as ``kopf run --standalone --namespace NS bench/minimal_operator.py``; Kopf's defaults
otherwise, as a first operator would have them.
"""

from __future__ import annotations

from typing import Any

import kopf
import kubernetes


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.scanning.disabled = True  # the emulator has no CRD objects to scan
    kubernetes.config.load_kube_config()


@kopf.on.create("btm.elmforest.io", "v1alpha1", "elmbranches")
def create_job(name: str, namespace: str | None, body: kopf.Body, **_: Any) -> None:
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"train-{name}"},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "trainer", "image": "trainer:latest"}],
                }
            }
        },
    }
    kopf.adopt(job, owner=body)
    kubernetes.client.BatchV1Api().create_namespaced_job(namespace, job)
