"""An aiohttp server on a free loopback port, in an event loop on a thread of its own (the
test's thread stays free to block), with one client session made inside that loop: what the
proxies in front of moto (s3proxy.py) and kube-apiserver (apiproxy.py) share."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import aiohttp.web

Handler = Callable[[aiohttp.web.Request], Awaitable[aiohttp.web.StreamResponse]]


@dataclass
class LoopServer:
    handler: Handler  # every request, any method and path
    name: str  # the thread's, and the error's if it does not start
    make_session: Callable[[], aiohttp.ClientSession] = aiohttp.ClientSession
    url: str = ""
    session: aiohttp.ClientSession | None = None
    streams: set[asyncio.Task[object]] = field(default_factory=set)  # cancelled first on stop
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _runner: aiohttp.web.AppRunner | None = None

    def start(self) -> LoopServer:
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True, name=self.name).start()
        if not ready.wait(10):
            raise RuntimeError(f"{self.name} did not start")
        return self

    def stop(self) -> None:
        async def close() -> None:
            for task in self.streams:  # open streams: the server's cleanup would wait on them
                task.cancel()
            if self.session is not None:
                await self.session.close()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def stream(self) -> None:
        """Mark the calling request's task as a long stream (a watch), to cancel on stop."""
        task = asyncio.current_task()
        assert task is not None
        self.streams.add(task)
        task.add_done_callback(self.streams.discard)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        ready.set()
        self._loop.run_forever()

    async def _listen(self) -> None:
        app = aiohttp.web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handler)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        await aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self.session = self.make_session()
