"""A crash switch in front of a real API server: the operator talks to it, it to the server.

The operator's kubeconfig names this proxy (plain HTTP on loopback, the operator's own bearer
token passed through); the proxy forwards every request over TLS to the API server and streams
the answer back (watches included). Each write (POST, PUT, PATCH, DELETE of a resource) is
labelled as the emulator labels it ("POST jobs", "PATCH elmbranches/status") and counted by a
:class:`CrashSwitch`, which kills the operator before the write is sent or after the server
applied it, before the operator reads the answer. What the API server and Kubernetes'
controllers do with the writes is their own; only the operator's death is on cue.
"""

from __future__ import annotations

import collections
import json
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import aiohttp.web

from tests.harness.crashes import CrashSwitch
from tests.harness.loopserver import LoopServer

_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}
_WRITES = {"POST", "PUT", "PATCH", "DELETE"}
# /api/v1/... or /apis/<group>/<version>/..., then [namespaces/<ns>/]<plural>[/<name>[/<sub>]]
_RESOURCE = re.compile(
    r"^/(?:api/v1|apis/[^/]+/[^/]+)/(?:namespaces/[^/]+/)?(?P<plural>[^/]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)


def write_label(method: str, path: str) -> str | None:
    """``"PATCH elmbranches/status"`` for a write to a resource; None for anything else."""
    match = _RESOURCE.match(path)
    if method not in _WRITES or match is None:
        return None
    if match["plural"] == "namespaces" and match["name"] and not match["sub"]:
        return None  # a namespace's own object is not the operator's to write
    return f"{method} {match['plural']}" + (f"/{match['sub']}" if match["sub"] else "")


@dataclass
class ApiCrashProxy:
    upstream: str  # https://127.0.0.1:<port>
    ca: Path
    crashes: CrashSwitch | None = None
    created: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    _server: LoopServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return self._server.url

    def start(self) -> ApiCrashProxy:
        tls = ssl.create_default_context(cafile=str(self.ca))

        def session() -> aiohttp.ClientSession:  # no read timeout: watches stay open for minutes
            return aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=tls), timeout=aiohttp.ClientTimeout(total=None)
            )

        self._server = LoopServer(self._forward, "apiproxy", session).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    async def _forward(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        body = await request.read()
        label = write_label(request.method, request.path)
        crash = None
        if label is not None and self.crashes is not None:
            crash = self.crashes.effect(label)
            if crash == "before":  # the operator died with this request unsent
                return aiohttp.web.Response(status=503)
        try:
            return await self._upstream(request, body, label)
        finally:
            if crash == "after":  # applied by the server; the operator never read the answer
                assert self.crashes is not None
                self.crashes.kill()

    async def _upstream(
        self, request: aiohttp.web.Request, body: bytes, label: str | None
    ) -> aiohttp.web.StreamResponse:
        assert self._server is not None and self._server.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._server.session.request(
            request.method,
            self.upstream + request.rel_url.path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            reply = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
            if label is not None:  # a write: small, read whole (to count what it created)
                payload = await upstream.read()
                if request.method == "POST" and upstream.status == 201:
                    name = json.loads(payload).get("metadata", {}).get("name", "")
                    self.created[label.split()[1], name] += 1
                return aiohttp.web.Response(status=upstream.status, body=payload, headers=reply)
            response = aiohttp.web.StreamResponse(status=upstream.status, headers=reply)
            await response.prepare(request)
            self._server.stream()
            try:
                async for chunk in upstream.content.iter_any():  # a watch: event by event
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionError, aiohttp.ClientError):
                pass  # the operator is gone (killed on cue): its watches end with it
            return response
