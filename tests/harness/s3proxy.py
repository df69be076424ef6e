"""A fault-injecting HTTP proxy in front of the moto S3 server.

Clients (boto3 in the trainer) talk to the proxy; it forwards every request to moto unchanged,
except those matching a rule, which get an S3 error (500, 503 SlowDown, 412) or a stall first.
moto does not check SigV4 signatures, so forwarding with another Host header is fine.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from functools import partial

import aiohttp
import aiohttp.web

from tests.harness.crashes import CrashSwitch
from tests.harness.loopserver import LoopServer

_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


@dataclass
class S3Fault:
    method: str  # GET, PUT, HEAD, POST, DELETE
    key: str  # a regular expression searched in the request path
    status: int  # 0: stall for ``stall_seconds``, then forward
    times: int = 1
    code: str = "InternalError"  # the S3 error code in the XML body (SlowDown, ...)
    stall_seconds: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.search(self.key, path) is not None


@dataclass
class S3FaultProxy:
    upstream: str
    faults: list[S3Fault] = field(default_factory=list)
    crashes: CrashSwitch | None = None  # counts writes (PUT, POST, DELETE), kills at chosen ones
    requests: int = 0
    _server: LoopServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return self._server.url

    def start(self) -> S3FaultProxy:
        session = partial(aiohttp.ClientSession, auto_decompress=False)
        self._server = LoopServer(self._forward, "s3proxy", session).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def _fault(self, method: str, path: str) -> S3Fault | None:
        for fault in self.faults:
            if fault.hits < fault.times and fault.matches(method, path):
                fault.hits += 1
                return fault
        return None

    async def _forward(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        body = await request.read()
        self.requests += 1
        fault = self._fault(request.method, request.path)
        if fault is not None and fault.status:
            xml = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                f"<Message>injected by the test</Message></Error>"
            )
            return aiohttp.web.Response(
                status=fault.status, text=xml, content_type="application/xml"
            )
        if fault is not None:
            await asyncio.sleep(fault.stall_seconds)
        crash = None
        if self.crashes is not None and request.method in ("PUT", "POST", "DELETE"):
            name = _object_name(request.rel_url.path_qs)
            crash = self.crashes.effect(f"{request.method} s3:{name}")
            if crash == "before":
                return aiohttp.web.Response(status=503)
        try:
            return await self._upstream(request, body)
        finally:
            if crash == "after":
                assert self.crashes is not None
                self.crashes.kill()

    async def _upstream(self, request: aiohttp.web.Request, body: bytes) -> aiohttp.web.Response:
        assert self._server is not None and self._server.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._server.session.request(
            request.method,
            self.upstream + request.rel_url.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            reply = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
            if request.method == "HEAD" and "Content-Length" in upstream.headers:
                # No body comes back, but the object's size must (boto3 plans downloads by it).
                reply["Content-Length"] = upstream.headers["Content-Length"]
            return aiohttp.web.Response(status=upstream.status, body=payload, headers=reply)


def _object_name(path: str) -> str:
    """The last part of a key (``manifest.json``) or a bucket operation (``bucket?delete``)."""
    return path.split("=", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "/"
