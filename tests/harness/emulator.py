"""KMock's KubernetesEmulator, extended with the API-server semantics our operator relies on.

KMock stores objects and serves list/watch/get/create/patch/delete with finalizers. Real API
servers also: assign uid, creationTimestamp and resourceVersion; refuse stale writes with 409;
bump metadata.generation on spec changes only; separate the status subresource (status writes
go through /status, and the main endpoint ignores status); and garbage-collect dependents whose
owner is gone. Writes are handled here, reads and watches by KMock.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import datetime
import itertools
import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import aiohttp.web
import jsonpatch
from kmock import KubernetesEmulator, Request, ResourceInfo, resource
from kmock._internal import dicts, rendering
from kmock._internal.k8s import KubernetesError, KubernetesObjectNotFoundError

from tests.harness.crashes import CrashSwitch

Key = tuple[resource, str | None, str]


@dataclasses.dataclass
class Fault:
    """Answer the next ``times`` matching requests with ``status`` (0: stall, then serve)."""

    method: str  # GET, POST, PATCH, PUT, DELETE
    resource: str  # plural, or plural/subresource
    status: int
    times: int = 1
    stall_seconds: float = 0.0
    hits: int = 0


TEST_CLIENT = "elmforest-tests"  # the User-Agent of the tests' own kubectl: not audited
WRITES = ("POST", "PATCH", "PUT", "DELETE")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conflict(message: str, reason: str = "Conflict") -> KubernetesError:
    return KubernetesError(status=409, reason=reason, message=message)


class ClusterEmulator(KubernetesEmulator):
    """Thread-unsafe by design: it runs in one event loop, like KMock itself."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1000)
        self._write_lock = asyncio.Lock()
        # Every (group, resource[/subresource], verb) a client other than the tests asked for:
        # what RBAC must allow the operator.
        self.audit: set[tuple[str, str, str]] = set()
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()  # (resource, verb)
        self.faults: list[Fault] = []  # injected API errors and stalls (reliability tests)
        self.crashes: CrashSwitch | None = None  # kills the operator at chosen writes
        # Watch streams end after this many seconds (None: never), like an API server's
        # timeouts or a flaky load balancer; the soak test sets it. Counted in ``watches``.
        self.watch_lifetime: tuple[float, float] | None = None
        self.watches = 0
        self.created: collections.Counter[tuple[str, str]] = collections.Counter()  # plural, name
        self._watch_random = random.Random(0)

    # ---- helpers usable in-process (the kubelet uses them) --------------------------------

    def declare(
        self, path: str, kind: str, *, status: bool = False, namespaced: bool = True, **extra: Any
    ) -> resource:
        res = resource(path)
        self.resources[res] = ResourceInfo(
            kind=kind,
            namespaced=namespaced,
            subresources={"status"} if status else set(),
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
            **extra,
        )
        return res

    def has_status(self, res: resource) -> bool:
        try:
            return "status" in self.resources[res].subresources
        except KeyError:
            return False

    def live(self, res: resource, namespace: str | None = None) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(obj.raw)
            for (r, ns, _), obj in list(self.objects.items())
            if r == res and not obj.deleted and (namespace is None or ns == namespace)
        ]

    def count(self, res: resource) -> int:
        """How many live objects of ``res`` there are (no copies: a cheap poll)."""
        wanted = resource(res) if isinstance(res, str) else res
        # Plain attribute compares: ``resource ==`` costs a typing.Protocol check per object.
        group, plural = wanted.group, wanted.plural
        return sum(
            1
            for (r, _, _), obj in list(self.objects.items())
            if r.plural == plural and r.group == group and not obj.deleted
        )

    # The object lookup the tests use; it shadows kmock's HTTP client helper of the same name.
    def get(  # type: ignore[override]
        self, res: resource, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        key = (res, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    async def write_status(self, res: resource, namespace: str, name: str, status: Any) -> None:
        """What a controller does: replace an object's status (the kubelet uses this)."""
        async with self._write_lock:
            current = self.get(res, namespace, name)
            if current is None:
                return
            current["status"] = status
            await self._store(res, namespace, name, current, "MODIFIED")

    # ---- request handling -------------------------------------------------------------------

    @staticmethod
    def _client_resource(request: Request) -> str | None:
        """``plural[/subresource]`` of a request from a client under test (not the tests' own
        kubectl, not discovery, which every authenticated user may read)."""
        res = request.resource
        if res is None or not res.plural:
            return None
        if request.headers.get("User-Agent", "").startswith(TEST_CLIENT):
            return None
        return res.plural + (f"/{request.subresource}" if request.subresource else "")

    def _record(self, request: Request, name: str) -> None:
        method = request.method.value
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update"}.get(method, "")
        if method == "GET":
            watching = str(request.params.get("watch", "")).lower() in ("true", "1")
            verb = "get" if request.name else ("watch" if watching else "list")
        elif method == "DELETE":
            verb = "delete" if request.name else "deletecollection"
        assert request.resource is not None
        self.audit.add((request.resource.group or "", name, verb))
        self.calls[name, verb] += 1

    def _fault_for(self, request: Request, name: str) -> Fault | None:
        for fault in self.faults:
            matches = (fault.method, fault.resource) == (request.method.value, name)
            if matches and fault.hits < fault.times:
                fault.hits += 1
                return fault
        return None

    async def _handle(self, request: Request) -> aiohttp.web.StreamResponse:
        name = self._client_resource(request)
        fault = None
        if name is not None:
            self._record(request, name)
            fault = self._fault_for(request, name)
        if fault is not None and fault.status:
            status: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "status": "Failure"}
            status.update(code=fault.status, reason="Injected", message="injected by the test")
            headers = {"Retry-After": "1"} if fault.status == 429 else {}
            return aiohttp.web.json_response(status, status=fault.status, headers=headers)
        if fault is not None:
            await asyncio.sleep(fault.stall_seconds)  # a slow API server, then a real answer
        method = request.method.value
        if request.resource is None or method not in WRITES:
            return await super()._handle(request)
        crash = None
        if name is not None and self.crashes is not None:
            crash = self.crashes.effect(f"{method} {name}")
            if crash == "before":  # the operator died before its write arrived
                return aiohttp.web.json_response({"kind": "Status"}, status=503)
        try:
            return await self._write(request, method)
        finally:
            if crash == "after":  # the write took effect; the operator never saw the answer
                assert self.crashes is not None
                self.crashes.kill()

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        self.watches += 1
        stream = super()._serve_watch(request)
        if self.watch_lifetime is None:
            async for item in stream:
                yield item
            return
        lifetime = self._watch_random.uniform(*self.watch_lifetime)
        deadline = asyncio.get_running_loop().time() + lifetime
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                try:
                    item = await asyncio.wait_for(anext(stream), max(left, 0.0))
                except (TimeoutError, StopAsyncIteration):
                    return  # the stream ends: the client must watch again
                yield item
        finally:
            await cast(AsyncGenerator[rendering.Payload, None], stream).aclose()

    async def _write(self, request: Request, method: str) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        async with self._write_lock:
            if method == "POST":
                obj, code = await self._create(request), 201
            elif method == "DELETE" and request.name is None:
                obj, code = await self._delete_collection(request), 200
            elif method == "DELETE":
                assert request.name is not None  # a named DELETE (the collection's is above)
                obj, code = (
                    await self._delete(request.resource, request.namespace, request.name),
                    200,
                )
            else:
                obj, code = await self._update(request, replace=method == "PUT"), 200
        return aiohttp.web.json_response(obj, status=code)

    async def _store(
        self, res: resource, namespace: str | None, name: str, body: dict[str, Any], event: str
    ) -> dict[str, Any]:
        body.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
        key: Key = (res, namespace, name)
        if key in self.objects:
            self.objects[key].create(body)
        else:
            self.objects[key] = body
        await self._buses[res].put({"type": event, "object": copy.deepcopy(body)})
        return body

    async def _create(self, request: Request) -> dict[str, Any]:
        assert request.resource is not None
        body = copy.deepcopy(request.data or {})
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        namespace = request.namespace or meta.get("namespace")
        if namespace:
            meta["namespace"] = namespace
        name: str | None = meta.get("name")
        if not name:
            raise KubernetesError(status=422, reason="Invalid", message="metadata.name required")
        if self.get(request.resource, namespace, name) is not None:
            raise _conflict(f"{request.resource.plural} {name!r} already exists", "AlreadyExists")
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        for field in ("deletionTimestamp", "resourceVersion"):
            meta.pop(field, None)
        if self.has_status(request.resource):
            body.pop("status", None)
        self.created[request.resource.plural or "", name] += 1
        return await self._store(request.resource, namespace, name, body, "ADDED")

    async def _update(self, request: Request, *, replace: bool) -> dict[str, Any]:
        res, namespace, name = request.resource, request.namespace, request.name
        assert res is not None and name is not None
        current = self.get(res, namespace, name)
        if current is None:
            raise KubernetesObjectNotFoundError()
        change = request.data
        if isinstance(change, dict):
            wanted_version = (change.get("metadata") or {}).get("resourceVersion")
            if wanted_version and wanted_version != current["metadata"]["resourceVersion"]:
                raise _conflict(
                    f"Operation cannot be fulfilled on {res.plural} {name!r}: the object has "
                    "been modified; please apply your changes to the latest version and try again"
                )
        if replace:
            proposed = copy.deepcopy(change)
        else:
            try:
                proposed = dict(dicts.patch_dict(copy.deepcopy(current), change))
            except jsonpatch.JsonPatchException as error:
                # A failed "test" op (Kopf tests resourceVersion before adding finalizers) is
                # 422 Invalid on a real API server; clients re-read and try again.
                raise KubernetesError(status=422, reason="Invalid", message=str(error)) from None
        updated = self._admit(res, current, proposed, status_only=request.subresource == "status")
        if updated == current:
            return current  # a no-op write changes nothing, not even the resourceVersion
        meta = updated["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return await self._remove(res, namespace, name, updated)
        return await self._store(res, namespace, name, updated, "MODIFIED")

    def _admit(
        self, res: resource, current: dict[str, Any], proposed: dict[str, Any], status_only: bool
    ) -> dict[str, Any]:
        """Apply the API server's rules to a proposed new state."""
        if status_only:
            updated = copy.deepcopy(current)
            updated["status"] = proposed.get("status")
            if updated["status"] is None:
                updated.pop("status")
            return updated
        updated = copy.deepcopy(proposed)
        if self.has_status(res):
            updated.pop("status", None)
            if "status" in current:
                updated["status"] = copy.deepcopy(current["status"])
        meta = updated.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp"):
            if field in current["metadata"]:
                meta[field] = current["metadata"][field]
            else:
                meta.pop(field, None)
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        generation = int(current["metadata"].get("generation", 1))
        spec_before = {k: v for k, v in current.items() if k not in ("metadata", "status")}
        spec_after = {k: v for k, v in updated.items() if k not in ("metadata", "status")}
        meta["generation"] = generation + 1 if spec_before != spec_after else generation
        return updated

    async def _delete(self, res: resource, namespace: str | None, name: str) -> dict[str, Any]:
        current = self.get(res, namespace, name)
        if current is None:
            raise KubernetesObjectNotFoundError()
        meta = current["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = _now()
                return await self._store(res, namespace, name, current, "MODIFIED")
            return current
        return await self._remove(res, namespace, name, current)

    async def _remove(
        self, res: resource, namespace: str | None, name: str, last: dict[str, Any]
    ) -> dict[str, Any]:
        self.objects[res, namespace, name].delete()
        await self._buses[res].put({"type": "DELETED", "object": copy.deepcopy(last)})
        await self._collect_garbage(last["metadata"].get("uid"))
        return last

    async def _collect_garbage(self, owner_uid: str | None) -> None:
        """Background cascading deletion: dependents whose every owner is gone are deleted."""
        if not owner_uid:
            return
        live_uids = {
            obj.raw["metadata"].get("uid") for obj in list(self.objects.values()) if not obj.deleted
        }
        for (res, namespace, name), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            owners = obj.raw["metadata"].get("ownerReferences") or []
            uids = {ref.get("uid") for ref in owners}
            if owner_uid in uids and not (uids & live_uids):
                await self._delete(res, namespace, name)

    async def _delete_collection(self, request: Request) -> dict[str, Any]:
        assert request.resource is not None
        selector = dict(
            item.split("=", 1)
            for item in (request.params.get("labelSelector") or "").split(",")
            if "=" in item
        )
        items = []
        for body in self.live(request.resource, request.namespace):
            labels = body["metadata"].get("labels") or {}
            if all(labels.get(k) == v for k, v in selector.items()):
                meta = body["metadata"]
                items.append(
                    await self._delete(request.resource, meta.get("namespace"), meta["name"])
                )
        return {"kind": "Status", "apiVersion": "v1", "status": "Success", "items": items}
