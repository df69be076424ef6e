"""The HTTP side: OpenAI's ``/v1/completions`` and ``/v1/models``, probes, Prometheus metrics.

Handlers validate, tokenize and hand jobs to the engine thread; its events come back through an
asyncio queue per request. Every failure answers with OpenAI's error body: a malformed request
is a 400 naming the parameter, never a crash.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from elmtrain.serving.engine import Engine, Event, Job, OverloadedError
from elmtrain.serving.metrics import ServeMetrics
from elmtrain.serving.modelset import ModelSet
from elmtrain.serving.protocol import (
    ApiError,
    CompletionRequest,
    completion_body,
    completion_id,
    parse_request,
    usage,
)

log = structlog.get_logger(__name__)
MAX_BODY = 1 << 20  # bytes of one request


class ServingState:
    """The model set new requests get; swapped whole by the follower (an assignment)."""

    def __init__(self) -> None:
        self.current: ModelSet | None = None
        self.load_error: str | None = None


@dataclass
class _Choices:
    """The jobs of one request and the queue their events arrive on, tagged by choice."""

    jobs: list[Job]
    events: asyncio.Queue[tuple[int, Event]]

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()


def _tokenize(model_set: ModelSet, request: CompletionRequest) -> list[tuple[list[int], int]]:
    """(prompt ids with the leading end-of-text, max new tokens) per prompt; too long: 400."""
    limit = model_set.context_length - 1  # the leading end-of-text takes one position
    out = []
    for prompt in request.prompts:
        ids = model_set.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        wanted = request.max_tokens if request.max_tokens is not None else limit - len(ids)
        if len(ids) + wanted > limit or wanted < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens, however you requested "
                f"{len(ids) + wanted} tokens ({len(ids)} in your prompt; {wanted} for the "
                "completion). Please reduce your prompt or completion length.",
                param="prompt" if len(ids) >= limit else "max_tokens",
                code="context_length_exceeded",
            )
        out.append(([model_set.eos, *ids], wanted))
    return out


class Server:
    def __init__(self, engine: Engine, state: ServingState, metrics: ServeMetrics) -> None:
        self.engine, self.state, self.metrics = engine, state, metrics

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.prometheus)
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as error:
            return web.json_response(error.body(), status=error.status)
        except web.HTTPException as error:  # unknown route, wrong method, body too large
            kind = "invalid_request_error" if error.status < 500 else "server_error"
            body = ApiError(error.status, error.reason, kind).body()
            return web.json_response(body, status=error.status)
        except Exception:
            log.exception("serve.handler_failed", path=request.path)
            body = ApiError(500, "internal error", "server_error").body()
            return web.json_response(body, status=500)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON ({error})") from None
        parsed = parse_request(data)
        model_set = self.state.current
        if model_set is None:
            raise ApiError(503, "the forest is not loaded yet", "server_error", code="not_ready")
        target = model_set.resolve(parsed.model)
        if target is None:
            raise ApiError(
                404,
                f"The model `{parsed.model}` does not exist (GET /v1/models lists them)",
                param="model",
                code="model_not_found",
            )
        prompts = _tokenize(model_set, parsed)
        choices = self._submit(parsed, model_set, target, prompts)
        self.metrics.in_flight.inc()
        self.metrics.tokens.labels("prompt").inc(sum(len(ids) - 1 for ids, _ in prompts))
        code = 200
        try:
            if parsed.stream:
                return await self._stream(request, parsed, choices, started)
            return await self._whole(parsed, choices, started)
        except ApiError as error:
            code = error.status
            raise
        finally:
            choices.cancel()  # whatever is still running (the client went away) stops
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(parsed.model, str(code)).inc()
            self.metrics.latency.observe(time.monotonic() - started)

    def _submit(
        self,
        request: CompletionRequest,
        model_set: ModelSet,
        target: Any,
        prompts: list[tuple[list[int], int]],
    ) -> _Choices:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        choices = _Choices([], events)
        for index, (ids, max_tokens) in enumerate(prompts):

            def emit(event: Event, index: int = index) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))

            job = Job(
                model_set=model_set,
                target=target,
                prompt_ids=ids,
                max_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=request.stops,
                seed=None if request.seed is None else request.seed + index,
                emit=emit,
                stream=request.stream,
            )
            try:
                self.engine.submit(job)
            except OverloadedError as error:
                choices.cancel()
                raise ApiError(503, f"the server is overloaded: {error}", "server_error") from None
            choices.jobs.append(job)
        return choices

    async def _events(self, choices: _Choices, started: float) -> Any:
        """Events until every choice is done; an engine error ends the request."""
        open_choices, first = len(choices.jobs), True
        while open_choices:
            index, event = await choices.events.get()
            if event.kind == "error":
                raise ApiError(500, event.text, "server_error")
            if event.kind == "text" and first and choices.jobs[0].stream:
                self.metrics.first_token.observe(time.monotonic() - started)
                first = False
            if event.kind == "done":
                open_choices -= 1
            yield index, event

    async def _whole(
        self, request: CompletionRequest, choices: _Choices, started: float
    ) -> web.Response:
        texts = [""] * len(choices.jobs)
        reasons: list[str | None] = [None] * len(choices.jobs)
        routing: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = 0
        async for index, event in self._events(choices, started):
            if event.kind == "routed":
                routing.append({"index": index, "experts": event.routing})
            elif event.kind == "text":
                texts[index] += event.text
            elif event.kind == "done":
                reasons[index] = event.finish_reason
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
        body = completion_body(
            completion_id(),
            request.model,
            [
                {"text": t, "index": i, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ],
            usage(prompt_tokens, completion_tokens),
            routing,
            choices.jobs[0].model_set.revision,
        )
        return web.json_response(body)

    async def _stream(
        self, http: web.Request, request: CompletionRequest, choices: _Choices, started: float
    ) -> web.StreamResponse:
        """Server-sent events: one chunk per piece of text, as OpenAI streams completions."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(http)
        ident = completion_id()
        prompt_tokens = completion_tokens = 0

        async def send(body: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps(body)}\n\n".encode())

        try:
            async for index, event in self._events(choices, started):
                routing = [{"index": index, "experts": event.routing}]
                if event.kind == "routed":
                    choice = {"text": "", "index": index, "logprobs": None, "finish_reason": None}
                    revision = choices.jobs[0].model_set.revision
                    await send(
                        completion_body(ident, request.model, [choice], None, routing, revision)
                    )
                elif event.kind in ("text", "done"):
                    choice = {
                        "text": event.text,
                        "index": index,
                        "logprobs": None,
                        "finish_reason": event.finish_reason,
                    }
                    await send(completion_body(ident, request.model, [choice], None, []))
                if event.kind == "done":
                    prompt_tokens += event.prompt_tokens
                    completion_tokens += event.completion_tokens
        except ApiError as error:  # the stream has begun: the error is its last event
            await send(error.body())
        else:
            if request.stream_options and request.stream_options.include_usage:
                final = completion_body(
                    ident, request.model, [], usage(prompt_tokens, completion_tokens), []
                )
                await send(final)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(self, _: web.Request) -> web.Response:
        model_set = self.state.current
        if model_set is None:
            raise ApiError(503, "the forest is not loaded yet", "server_error", code="not_ready")
        experts = [{"expert": m.domain or "seed", "version": m.version} for m in model_set.experts]
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "elmforest",
                "elmforest": {"revision": model_set.revision, "experts": experts},
            }
            for name in model_set.model_names()
        ]
        return web.json_response({"object": "list", "data": data})

    async def healthz(self, _: web.Request) -> web.Response:
        if not self.engine.alive:
            return web.json_response({"status": "engine stopped"}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        model_set = self.state.current
        if model_set is None:
            reason = self.state.load_error or "loading the forest"
            return web.json_response({"ready": False, "reason": reason}, status=503)
        return web.json_response({"ready": True, "revision": model_set.revision})

    async def prometheus(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
