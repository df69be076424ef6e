"""Prometheus text metrics, served by a tiny aiohttp endpoint (Kopf brings aiohttp)."""

from __future__ import annotations

from collections import Counter

from aiohttp import web


class Metrics:
    def __init__(self) -> None:
        self.counters: Counter[tuple[str, str]] = Counter()
        self.phases: dict[tuple[str, str, str], str] = {}  # (kind, ns, name) -> phase

    def count(self, name: str, kind: str, amount: int = 1) -> None:
        self.counters[name, kind] += amount

    def phase(self, kind: str, namespace: str, name: str, phase: str | None) -> None:
        if phase is None:
            self.phases.pop((kind, namespace, name), None)
        else:
            self.phases[kind, namespace, name] = phase

    def render(self) -> str:
        lines = []
        for (name, kind), value in sorted(self.counters.items()):
            lines.append(f'elmforest_{name}_total{{kind="{kind}"}} {value}')
        by_phase = Counter((kind, phase) for (kind, _, _), phase in self.phases.items())
        for (kind, phase), value in sorted(by_phase.items()):
            lines.append(f'elmforest_resources{{kind="{kind}",phase="{phase}"}} {value}')
        return "\n".join(lines) + "\n"

    async def serve(self, host: str, port: int) -> web.AppRunner:
        async def handle(_: web.Request) -> web.Response:
            return web.Response(text=self.render(), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner
