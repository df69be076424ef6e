"""A floor for bench.operator: the fastest operator Kopf allows, one Job per ElmBranch.

Not a baseline anyone would ship: it handles ``on.event`` only (so Kopf writes nothing to the
objects: no progress annotations, no finalizer, no status) and posts each Job with one shared
aiohttp session instead of the threaded kubernetes client. What it costs is Kopf's own
processing of one watch event per object; elmforest, which must also observe its Jobs and the
echoes of its status and finalizer writes, cannot be faster than this per branch.

Run as ``kopf run --standalone --namespace NS bench/floor_operator.py``.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import yaml

_session: dict[str, Any] = {}


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.scanning.disabled = True  # the emulator has no CRD objects to scan
    config = yaml.safe_load(Path(os.environ["KUBECONFIG"]).read_text())
    cluster = config["clusters"][0]["cluster"]
    _session["url"] = cluster["server"]
    token = config["users"][0]["user"]["token"]
    ca = cluster.get("certificate-authority")  # a real API server's CA (https)
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca)) if ca else None
    _session["http"] = aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {token}"}, connector=connector
    )


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    await _session["http"].close()


@kopf.on.event("btm.elmforest.io", "v1alpha1", "elmbranches")
async def create_job(
    type: str, name: str, namespace: str | None, body: kopf.Body, **_: Any
) -> None:
    if type not in (None, "ADDED"):  # None: the initial listing
        return
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
    url = f"{_session['url']}/apis/batch/v1/namespaces/{namespace}/jobs"
    async with _session["http"].post(url, json=job) as response:
        if response.status >= 300 and response.status != 409:  # 409: a repeated ADDED
            raise kopf.TemporaryError(f"{response.status}: {await response.text()}", delay=1)
