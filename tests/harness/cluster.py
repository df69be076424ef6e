"""A test cluster: the emulator on loopback HTTP, the local kubelet, and the real operator.

The emulator and kubelet run in a background thread's event loop; tests talk to the API over
HTTP like kubectl does, and the operator runs as a subprocess (``elmforest operator``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml

from elmforest.adapters.kube import PERMISSIONS
from elmforest.api import BRANCH, FOREST, GROUP, VERSION, Kind
from tests.harness.crashes import CrashSwitch
from tests.harness.emulator import TEST_CLIENT, ClusterEmulator
from tests.harness.kubelet import Kubelet

T = TypeVar("T")
NAMESPACE = "team-a"
PATHS = {
    "ElmForest": f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{FOREST.plural}",
    "ElmBranch": f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{BRANCH.plural}",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "Event": "/api/v1/namespaces/{ns}/events",
}


class _Server(kmock.Server):
    """kmock.Server without its DNS interception. It patches aiohttp's resolver for the whole
    process and must be unwound last-in-first-out; clusters in parallel threads (the crash
    sweep) would unwind it out of order. Clients here connect by IP, so it is not needed."""

    _dns_lock = threading.Lock()

    async def __aenter__(self) -> _Server:
        with self._dns_lock:
            await super().__aenter__()
            assert self._managed_interceptor is not None
            await self._managed_interceptor.__aexit__(None, None, None)
            self._managed_interceptor = _Unpatched()  # type: ignore[assignment]
        return self


class _Unpatched:
    async def __aexit__(self, *_: object) -> None:
        pass


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class Cluster:
    def __init__(
        self,
        workdir: Path,
        base_env: dict[str, str],
        programs: dict[str, list[str]] | None = None,
        kubelet: bool = True,
    ) -> None:
        self.workdir = workdir
        self.run_kubelet = kubelet  # False: Jobs are created but never run (bench/operator)
        self.base_env = base_env
        self.programs = programs  # what the kubelet runs for a container command (None: real)
        self.operator_starts = 0
        self.url = ""
        self.emulator: ClusterEmulator | None = None
        self.kubelet: Kubelet | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="cluster", daemon=True)
        self.operator: subprocess.Popen[bytes] | None = None
        self._operator_logs: list[Path] = []

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Cluster:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the emulator did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with ClusterEmulator() as emulator, _Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            for kind in (FOREST, BRANCH):
                emulator.declare(
                    f"{GROUP}/{VERSION}/{kind.plural}",
                    kind.kind,
                    status=True,
                    shortnames={kind.short_name},
                    categories={"btm"},
                )
            emulator.declare("batch/v1/jobs", "Job", status=True)
            emulator.declare("v1/secrets", "Secret")
            emulator.declare("v1/events", "Event")
            emulator.declare("v1/pods", "Pod", status=True)
            # Kopf's observers wait for these two to exist (it lists namespaces and watches CRDs).
            emulator.declare("v1/namespaces", "Namespace", namespaced=False)
            emulator.declare(
                "apiextensions.k8s.io/v1/customresourcedefinitions",
                "CustomResourceDefinition",
                namespaced=False,
            )
            emulator.objects["v1/namespaces", None, NAMESPACE] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": NAMESPACE, "uid": "ns-uid"},
            }
            self.kubelet = Kubelet(emulator, self.workdir / "pods", self.base_env)
            if self.programs is not None:
                self.kubelet.programs.update(self.programs)
            task = asyncio.create_task(self.kubelet.run()) if self.run_kubelet else None
            self._ready.set()
            await self._stop.wait()
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the cluster's loop (for reading emulator state consistently)."""

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(30)

    def await_(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine (a kubelet action, say) in the cluster's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self) -> None:
        self.stop_operator()
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def kubeconfig(self) -> Path:
        path = self.workdir / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": "test-token"}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {"cluster": "emulator", "user": "tester"},
                        }
                    ],
                    "current-context": "emulator",
                }
            )
        )
        return path

    # ---- the operator -------------------------------------------------------------------------

    def start_operator(self, resync: float = 1.0) -> subprocess.Popen[bytes]:
        log = self.workdir / f"operator-{len(self._operator_logs)}.log"
        self._operator_logs.append(log)
        env = {
            **self.base_env,
            "KUBECONFIG": str(self.kubeconfig()),
            "ELMFOREST_LOG_FORMAT": "json",
        }
        argv = [sys.executable, "-m", "elmforest", "operator", "--namespace", NAMESPACE]
        argv += ["--resync", str(resync), "--liveness", "", "--metrics-port", "0"]
        with log.open("wb") as out:
            self.operator = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.operator_starts += 1
        return self.operator

    def kill_operator(self) -> None:
        """SIGKILL the operator now, from any thread, without waiting (a crash)."""
        process = self.operator
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def operator_alive(self) -> bool:
        return self.operator is not None and self.operator.poll() is None

    def stop_operator(self, hard: bool = False) -> None:
        process, self.operator = self.operator, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGKILL if hard else signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def unpermitted_requests(self) -> list[tuple[str, str, str]]:
        """The operator's requests that its RBAC rules (PERMISSIONS) would have refused."""
        allowed = {(p.group, p.resource, verb) for p in PERMISSIONS for verb in p.verbs}
        assert self.emulator is not None
        return sorted(set(self.emulator.audit) - allowed)

    def set_crashes(self, switch: CrashSwitch) -> None:
        assert self.emulator is not None
        self.emulator.crashes = switch

    def jobs_created(self) -> dict[str, int]:
        """Job name -> how many creations the API server accepted."""
        assert self.emulator is not None
        return {name: n for (plural, name), n in self.emulator.created.items() if plural == "jobs"}

    def job_runs(self, job: str) -> int:
        """How many pods of ``job`` the kubelet started."""
        assert self.kubelet is not None
        return self.kubelet.started.count(job)

    def operator_log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-20000:] for p in self._operator_logs)

    # ---- a tiny kubectl -----------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, ctype: str = "") -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", ctype or "application/json")
        request.add_header("User-Agent", TEST_CLIENT)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise ApiError(error.code, error.read().decode(errors="replace")) from None

    def create(self, body: dict[str, Any], namespace: str = NAMESPACE) -> Any:
        path = PATHS[body["kind"]].format(ns=namespace)
        return self._request("POST", path, body)

    def get(self, kind: str, name: str, namespace: str = NAMESPACE) -> Any:
        return self._request("GET", f"{PATHS[kind].format(ns=namespace)}/{name}")

    def list(self, kind: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._request("GET", PATHS[kind].format(ns=namespace))[
            "items"
        ]
        return items

    def patch(self, kind: str, name: str, patch: Any, namespace: str = NAMESPACE) -> Any:
        path = f"{PATHS[kind].format(ns=namespace)}/{name}"
        return self._request("PATCH", path, patch, "application/merge-patch+json")

    def delete(self, kind: str, name: str, namespace: str = NAMESPACE) -> Any:
        return self._request("DELETE", f"{PATHS[kind].format(ns=namespace)}/{name}")

    def secret(self, name: str, data: dict[str, str], namespace: str = NAMESPACE) -> Any:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        return self.create(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": encoded},
            namespace,
        )

    def wait_for(
        self, what: str, check: Callable[[], Any], timeout: float = 300, every: float = 0.5
    ) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if self.operator is not None and self.operator.poll() is not None:
                raise AssertionError(
                    f"the operator exited while waiting for {what}:\n" + self.operator_log()[-5000:]
                )
            time.sleep(every)
        raise AssertionError(f"timed out waiting for {what}\n{self.operator_log()[-8000:]}")


def printer_table(crd: dict[str, Any], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What ``kubectl get`` shows: the CRD's printer columns evaluated on each object."""
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    rows = []
    for item in items:
        row: dict[str, Any] = {"Name": item["metadata"]["name"]}
        for column in columns:
            value: Any = item
            for part in column["jsonPath"].strip(".").split("."):
                value = value.get(part) if isinstance(value, dict) else None
            row[column["name"]] = value
        rows.append(row)
    return rows


def kind_of(name: str) -> Kind:
    return {FOREST.kind: FOREST, BRANCH.kind: BRANCH}[name]
