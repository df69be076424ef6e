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

import asyncio
import collections
import json
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import aiohttp.web

from tests.harness.crashes import CrashSwitch

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
    url: str = ""
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _runner: aiohttp.web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None
    _streams: set[asyncio.Task[object]] = field(default_factory=set)

    def start(self) -> ApiCrashProxy:
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True, name="apiproxy").start()
        if not ready.wait(10):
            raise RuntimeError("the API proxy did not start")
        return self

    def stop(self) -> None:
        async def close() -> None:
            for task in self._streams:  # open watches: the server's cleanup would wait on them
                task.cancel()
            if self._session is not None:
                await self._session.close()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        ready.set()
        self._loop.run_forever()

    async def _listen(self) -> None:
        app = aiohttp.web.Application(client_max_size=1 << 26)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        await aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        tls = ssl.create_default_context(cafile=str(self.ca))
        # No read timeout: watches stay open for minutes.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls), timeout=aiohttp.ClientTimeout(total=None)
        )

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
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._session.request(
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
            task = asyncio.current_task()
            assert task is not None
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)
            try:
                async for chunk in upstream.content.iter_any():  # a watch: event by event
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionError, aiohttp.ClientError):
                pass  # the operator is gone (killed on cue): its watches end with it
            return response
