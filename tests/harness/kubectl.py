"""The real clients against a real API server: kubectl and helm as a user runs them.

Tests drive the cluster through the built ``kubectl`` and ``helm`` (what users type), and read
results back as JSON. The same object works for the local control plane and for any cluster
named by ``ELMFOREST_TEST_KUBECONFIG``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.harness.controlplane import ControlPlane


class CommandError(AssertionError):
    def __init__(self, argv: list[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-4000:]}"
            f"\n{result.stdout[-2000:]}"
        )
        self.result = result


def documents(objects: dict[str, Any] | list[dict[str, Any]] | str) -> str:
    if isinstance(objects, str):
        return objects
    items = objects if isinstance(objects, list) else [objects]
    return yaml.safe_dump_all(items, sort_keys=False)


@dataclass
class Kube:
    kubeconfig: Path
    kubectl_path: Path
    helm_path: Path
    home: Path  # helm's config, cache and data folders
    plane: ControlPlane | None = None  # None: an external cluster (no audit log to read)
    namespaces: list[str] = field(default_factory=list)

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(kubeconfig or self.kubeconfig),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }

    def _run(
        self, argv: list[str], stdin: str | None, check: bool, kubeconfig: Path | None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(kubeconfig),
            timeout=180,
            check=False,
        )
        if check and result.returncode != 0:
            raise CommandError(argv, result)
        return result

    def kubectl(
        self,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.kubectl_path), *args], stdin, check, kubeconfig)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.helm_path), *args], None, check, None)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(
        self, objects: dict[str, Any] | list[dict[str, Any]] | str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.kubectl(
            "apply", "--server-side", "-f", "-", *args, stdin=documents(objects), check=check
        )

    def namespace(self, prefix: str, labels: dict[str, str] | None = None) -> str:
        """A new namespace of the test's own (a shared cluster may hold others' objects)."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        meta: dict[str, Any] = {"name": name, "labels": labels or {}}
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        self.namespaces.append(name)
        return name

    def cleanup(self) -> None:
        if self.namespaces:
            self.kubectl("delete", "namespace", "--wait=false", *self.namespaces, check=False)
            self.namespaces.clear()


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float = 120,
    every: float = 0.5,
    alive: Callable[[], str | None] = lambda: None,
) -> Any:
    """Poll ``check`` until it returns something truthy; ``alive`` may name why to stop early
    (a process that died), and its words go into the failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if (dead := alive()) is not None:
            raise AssertionError(f"{dead} while waiting for {what}")
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
