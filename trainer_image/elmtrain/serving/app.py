"""The HTTP side: OpenAI's ``/v1/completions`` and ``/v1/models``, vLLM's tokenizer endpoints,
probes, Prometheus metrics.

With ``--api-key-file``, every path but the probes and ``/metrics`` needs a bearer key first
(serving/auth.py). Handlers validate (serving/protocol.py), admit (serving/admission.py),
tokenize (off the event loop: serving/prompts.py) and hand completions to the engine thread;
its updates come back through an asyncio queue per request. A request with ``echo`` or
``logprobs`` has its prompt and completion scored on a thread of its own (serving/scoring.py)
once the engine is done with it. Every failure answers with OpenAI's error body: a malformed
request is a 400 naming the parameter, never a crash; every request ends, answered or refused,
within ``request_timeout`` seconds; a client that goes away stops its work at once
(aiohttp cancels the handler: ``handler_cancellation``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from elmtrain.clusters.routing import DEFAULT_TEMPERATURE
from elmtrain.serving import tokenizing
from elmtrain.serving.admission import Admission, Ticket, client_key
from elmtrain.serving.auth import OPEN_PATHS, ApiKeys
from elmtrain.serving.completion import Completion, Done, Failed, Routed, Text, Update
from elmtrain.serving.engine import Engine
from elmtrain.serving.metrics import ServeMetrics
from elmtrain.serving.modelset import AVERAGE, ENSEMBLE, ModelSet, Target
from elmtrain.serving.optout import Scope, scope
from elmtrain.serving.prompts import Prompt, check_lengths, tokenize
from elmtrain.serving.protocol import (
    ApiError,
    CompletionRequest,
    completion_body,
    completion_id,
    parse_request,
    usage,
)
from elmtrain.serving.scoring import logprobs_body, score

log = structlog.get_logger(__name__)
MAX_BODY = 1 << 20  # bytes of one request
# Past its deadline, a stream still gets this long to take its error event and the end.
CLOSING_SECONDS = 5.0
ROUTING = "elmforest.routing"
CLIENT_CLOSED = 499  # the status metrics count a request with when its client went away


class ServingState:
    """The model set new requests get; swapped whole by the follower (an assignment). When the
    newest revision fails to load, what failed and how often (``/readyz`` shows it)."""

    def __init__(self) -> None:
        self.current: ModelSet | None = None
        self.load_error: str | None = None
        self.failing_revision: int | None = None
        self.failures = 0  # consecutive failed attempts


@dataclass(frozen=True)
class _Asked:
    """A validated request with what it asks for: the model set it is served from (the one
    current when it arrived), the model it names, the experts it lets serve it."""

    request: CompletionRequest
    model_set: ModelSet
    target: Target
    scope: Scope
    # The ensemble and the average: "posterior" or "clusters" (what picks their experts).
    routed_by: str | None = None

    def experts_body(self) -> dict[str, Any]:
        return self.scope.body(self.model_set)

    @property
    def by_cluster(self) -> bool:
        return self.routed_by == "clusters"


@dataclass(frozen=True)
class _Update:
    """An update of one choice (``index``) of a request."""

    index: int
    update: Update


@dataclass
class _Choices:
    """The completions of one request and the queue their updates arrive on."""

    completions: list[Completion]
    updates: asyncio.Queue[_Update]
    deadline: float  # the event loop's clock
    started: float  # time.monotonic() when the request arrived

    def cancel(self) -> None:
        for completion in self.completions:
            completion.cancelled.set()


def _timed_out(timeout: float) -> ApiError:
    return ApiError(
        504, f"the request took longer than {timeout:g} s", "timeout", code="request_timeout"
    )


class Server:
    def __init__(
        self,
        engine: Engine,
        state: ServingState,
        metrics: ServeMetrics,
        admission: Admission,
        request_timeout: float = 600.0,
        api_keys: ApiKeys | None = None,
        routing: str = "posterior",
        cluster_temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        self.engine, self.state, self.metrics = engine, state, metrics
        self.api_keys = api_keys  # None: no authentication (a trusted network only)
        self.admission, self.request_timeout = admission, request_timeout
        # The routing of requests that do not say (``elmforest.routing``), and c-BTM's
        # temperature when routing by cluster.
        self.routing, self.cluster_temperature = routing, cluster_temperature
        # Tokenizing has its own two threads: a burst of long prompts waits for them, it
        # does not take every thread of the loop's default executor.
        self._tokenizers = ThreadPoolExecutor(2, thread_name_prefix="tokenize")
        # Scoring (echo, logprobs) has one: its forward passes queue there, not in the engine.
        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="score")

    def app(self) -> web.Application:
        middlewares = [self._errors, self._authenticate]  # errors outermost: 401s get a body
        app = web.Application(client_max_size=MAX_BODY, middlewares=middlewares)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/tokenizer_info", self.tokenizer_info)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.prometheus)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, _: web.Application) -> None:
        self._tokenizers.shutdown(wait=False, cancel_futures=True)
        self._scorer.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as error:
            return web.json_response(error.body(), status=error.status, headers=error.headers())
        except web.HTTPException as error:  # unknown route, wrong method, body too large
            kind = "invalid_request_error" if error.status < 500 else "server_error"
            body = ApiError(error.status, error.reason, kind).body()
            return web.json_response(body, status=error.status)
        except Exception:
            log.exception("serve.handler_failed", path=request.path)
            body = ApiError(500, "internal error", "server_error").body()
            return web.json_response(body, status=500)

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # Before the body is read: a request without a key costs the server nothing more.
        if self.api_keys is not None and request.path not in OPEN_PATHS:
            self.api_keys.check(request.headers.get("Authorization"))
        return await handler(request)

    async def completions(self, http: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        label, code = "unknown", 200  # a model label only for models served (bounded)
        try:
            with self.admission.enter(
                client_key(http.headers.get("Authorization"), http.remote)
            ) as ticket:
                asked = await self._read(http, deadline)
                label = asked.request.model
                return await self._complete(http, ticket, asked, deadline, started)
        except ApiError as error:
            code = error.status
            raise
        except asyncio.CancelledError:
            code = CLIENT_CLOSED
            raise
        except Exception:
            code = 500
            raise
        finally:
            seconds = time.monotonic() - started
            if code == 200:  # what a request that is served takes: Retry-After's estimate
                self.admission.observe(seconds)
            self.metrics.requests.labels(label, str(code)).inc()
            self.metrics.latency.observe(seconds)

    async def _json(self, http: web.Request, deadline: float) -> object:
        try:
            async with asyncio.timeout_at(deadline):  # a body that trickles in ends too
                return json.loads(await http.text())
        except TimeoutError:
            raise _timed_out(self.request_timeout) from None
        except (ValueError, RecursionError) as error:  # JSON, UTF-8, digits, nesting
            message = f"the request body is not valid JSON ({str(error)[:200]})"
            raise ApiError(400, message) from None

    def _model_set(self) -> ModelSet:
        model_set = self.state.current
        if model_set is None:
            raise ApiError(503, "the forest is not loaded yet", "server_error", code="not_ready")
        return model_set

    async def _read(self, http: web.Request, deadline: float) -> _Asked:
        """The request, validated, with the model set, the model and the experts it asks for."""
        request = parse_request(await self._json(http, deadline))
        model_set = self._model_set()
        target = model_set.resolve(request.model)
        if target is None:
            raise ApiError(
                404,
                f"The model `{request.model[:256]}` does not exist (GET /v1/models lists them)",
                param="model",
                code="model_not_found",
            )
        experts = scope(model_set, target, request.elmforest.experts)
        for domain in experts.excluded:
            if domain not in model_set.excluded:  # the request's own opt-outs
                self.metrics.expert_excluded.labels(domain).inc()
        return _Asked(
            request, model_set, target, experts, self._routed_by(request, model_set, target)
        )

    def _routed_by(
        self, request: CompletionRequest, model_set: ModelSet, target: Target
    ) -> str | None:
        """What picks the experts of an ensemble or average request: the request's routing,
        else the server's. Clusters asked by the request of a forest whose experts cannot be
        routed by cluster: a 400 that says why; asked only by the server's default: the
        posterior (the model set's load logged why)."""
        if target.kind not in (ENSEMBLE, AVERAGE):
            return None
        asked = request.elmforest.routing
        if (asked or self.routing) != "clusters":
            return "posterior"
        if model_set.router is not None:
            return "clusters"
        if asked == "clusters" and model_set.expert_dirs:
            message = f"{ROUTING}: clusters: {model_set.router_error}"
            raise ApiError(400, message, param=ROUTING, code="routing_unavailable")
        return "posterior"  # no experts yet (the seed alone), or the server's default

    async def _complete(
        self, http: web.Request, ticket: Ticket, asked: _Asked, deadline: float, started: float
    ) -> web.StreamResponse:
        request, model_set = asked.request, asked.model_set
        ticket.take_prompts(len(request.prompts))
        check_lengths(model_set, request)
        loop = asyncio.get_running_loop()
        weights: list[tuple[float, ...] | None] = []
        try:
            async with asyncio.timeout_at(deadline):
                prompts = await loop.run_in_executor(self._tokenizers, tokenize, model_set, request)
                if asked.by_cluster and request.max_tokens != 0:
                    weights = await loop.run_in_executor(
                        self._tokenizers, self._cluster_weights, asked, prompts
                    )
        except TimeoutError:
            raise _timed_out(self.request_timeout) from None
        choices = _Choices([], asyncio.Queue(), deadline, started)
        self.metrics.in_flight.inc()
        self.metrics.tokens.labels("prompt").inc(sum(len(p.ids) - 1 for p in prompts))
        try:
            if request.max_tokens == 0:  # scored only: the engine has nothing to do
                return await self._scored_only(asked, prompts, deadline)
            self._submit(asked, prompts, choices, weights)
            if request.stream:
                return await self._stream(http, asked, choices)
            return await self._whole(asked, prompts, choices)
        finally:
            choices.cancel()  # whatever is still running (the client went away) stops
            self.metrics.in_flight.dec()

    def _cluster_weights(
        self, asked: _Asked, prompts: list[Prompt]
    ) -> list[tuple[float, ...] | None]:
        """Each prompt's weight of each expert by cluster (0 for those it does not allow),
        computed on a tokenizer thread: tf-idf features of the prompt's text."""
        router = asked.model_set.router
        assert router is not None
        allowed = asked.scope.allowed
        texts = [p.text for p in prompts]
        rows = router.weights(texts, self.cluster_temperature, among=allowed)
        return [tuple(float(w) for w in row) for row in rows]

    def _submit(
        self,
        asked: _Asked,
        prompts: list[Prompt],
        choices: _Choices,
        weights: list[tuple[float, ...] | None] | None = None,
    ) -> None:
        request = asked.request
        loop = asyncio.get_running_loop()
        for index, prompt in enumerate(prompts):

            def emit(update: Update, index: int = index) -> None:
                loop.call_soon_threadsafe(choices.updates.put_nowait, _Update(index, update))

            completion = Completion(
                model_set=asked.model_set,
                target=asked.target,
                prompt_ids=prompt.ids,
                max_tokens=prompt.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=request.stops,
                seed=None if request.seed is None else request.seed + index,
                emit=emit,
                stream=request.stream,
                experts=asked.scope.allowed,
                cluster_weights=weights[index] if weights else None,
            )
            self.engine.submit(completion)
            choices.completions.append(completion)

    async def _updates(self, choices: _Choices) -> AsyncIterator[_Update]:
        """Updates until every choice is done; a failed choice or the deadline ends the
        request."""
        open_choices, first = len(choices.completions), True
        while open_choices:
            try:
                async with asyncio.timeout_at(choices.deadline):
                    tagged = await choices.updates.get()
            except TimeoutError:
                raise _timed_out(self.request_timeout) from None
            update = tagged.update
            if isinstance(update, Failed):
                raise ApiError(500, update.message, "server_error")
            if isinstance(update, Text) and first and choices.completions[0].stream:
                self.metrics.first_token.observe(time.monotonic() - choices.started)
                first = False
            if isinstance(update, Done):
                open_choices -= 1
            yield tagged

    async def _whole(self, asked: _Asked, prompts: list[Prompt], choices: _Choices) -> web.Response:
        request = asked.request
        texts = [""] * len(choices.completions)
        reasons: list[str | None] = [None] * len(choices.completions)
        generated: list[tuple[int, ...]] = [()] * len(choices.completions)
        routing: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = 0
        async for tagged in self._updates(choices):
            index, update = tagged.index, tagged.update
            if isinstance(update, Routed):
                routing.append({"index": index, "experts": update.routing})
            elif isinstance(update, Text):
                texts[index] += update.text
            elif isinstance(update, Done):
                reasons[index] = update.finish_reason
                generated[index] = update.tokens
                prompt_tokens += update.prompt_tokens
                completion_tokens += update.completion_tokens
        logprobs: list[dict[str, Any] | None] = [None] * len(texts)
        if request.scores:
            for index, prompt in enumerate(prompts):
                logprobs[index] = await self._logprobs(
                    asked, prompt, list(generated[index]), choices.deadline
                )
                if request.echo:
                    texts[index] = prompt.text + texts[index]
        body = completion_body(
            completion_id(),
            request.model,
            [
                {"text": t, "index": i, "logprobs": lp, "finish_reason": r}
                for i, (t, lp, r) in enumerate(zip(texts, logprobs, reasons, strict=True))
            ],
            usage(prompt_tokens, completion_tokens),
            routing,
            asked.model_set.revision,
            asked.experts_body(),
            asked.routed_by,
        )
        return web.json_response(body)

    async def _scored_only(
        self, asked: _Asked, prompts: list[Prompt], deadline: float
    ) -> web.Response:
        """``echo`` with ``max_tokens`` 0: each prompt back, scored."""
        request = asked.request
        choices = []
        for index, prompt in enumerate(prompts):
            logprobs = None
            if request.logprobs is not None:
                logprobs = await self._logprobs(asked, prompt, [], deadline)
            choices.append(
                {
                    "text": prompt.text,
                    "index": index,
                    "logprobs": logprobs,
                    "finish_reason": "length",
                }
            )
        prompt_tokens = sum(len(p.ids) - 1 for p in prompts)
        body = completion_body(
            completion_id(),
            request.model,
            choices,
            usage(prompt_tokens, 0),
            [],
            asked.model_set.revision,
            asked.experts_body(),
            asked.routed_by,
        )
        return web.json_response(body)

    async def _logprobs(
        self, asked: _Asked, prompt: Prompt, generated: list[int], deadline: float
    ) -> dict[str, Any] | None:
        """OpenAI's ``logprobs`` of one choice: the prompt's tokens too with ``echo`` (the
        first of them has no context: null), else the completion's alone, whose text offsets
        count from the prompt's end. An empty prompt's completion is scored after the
        end-of-text it was generated after."""
        request, model_set = asked.request, asked.model_set
        if request.logprobs is None:
            return None
        ids = prompt.ids[1:] + generated
        hidden = 0
        if len(prompt.ids) == 1:  # no prompt: the end-of-text is the first token's context
            ids, hidden = prompt.ids + generated, 1
        first = hidden if request.echo else len(ids) - len(generated)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                scores = await loop.run_in_executor(
                    self._scorer,
                    score,
                    model_set,
                    asked.target,
                    self.engine.top_k,
                    ids,
                    request.logprobs,
                    asked.scope.allowed,
                    self.metrics.ran,
                    self.cluster_temperature if asked.by_cluster else None,
                )
        except TimeoutError:
            raise _timed_out(self.request_timeout) from None
        offset = 0 if request.echo else len(prompt.text)
        return logprobs_body(model_set.tokenizer, ids, scores, first, offset)

    async def _stream(
        self, http: web.Request, asked: _Asked, choices: _Choices
    ) -> web.StreamResponse:
        """Server-sent events: one chunk per piece of text, as OpenAI streams completions."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(http)
        request = asked.request
        ident = completion_id()
        revision = choices.completions[0].model_set.revision
        prompt_tokens = completion_tokens = 0

        async def send(data: bytes) -> None:
            # A client that stops reading blocks the write: it too ends by the deadline.
            async with asyncio.timeout_at(choices.deadline + CLOSING_SECONDS):
                await response.write(data)

        def event(body: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(body)}\n\n".encode()

        def chunk(index: int, text: str, reason: str | None) -> dict[str, Any]:
            return {"text": text, "index": index, "logprobs": None, "finish_reason": reason}

        try:
            try:
                async for tagged in self._updates(choices):
                    index, update = tagged.index, tagged.update
                    if isinstance(update, Routed):
                        routing = [{"index": index, "experts": update.routing}]
                        body = completion_body(
                            ident,
                            request.model,
                            [chunk(index, "", None)],
                            None,
                            routing,
                            revision,
                            asked.experts_body(),
                            asked.routed_by,
                        )
                        await send(event(body))
                    elif isinstance(update, Text):
                        body = completion_body(
                            ident, request.model, [chunk(index, update.text, None)], None, []
                        )
                        await send(event(body))
                    elif isinstance(update, Done):
                        body = completion_body(
                            ident,
                            request.model,
                            [chunk(index, "", update.finish_reason)],
                            None,
                            [],
                        )
                        await send(event(body))
                        prompt_tokens += update.prompt_tokens
                        completion_tokens += update.completion_tokens
            except ApiError as error:  # the stream has begun: the error is its last event
                await send(event(error.body()))
            else:
                if request.stream_options and request.stream_options.include_usage:
                    final = completion_body(
                        ident, request.model, [], usage(prompt_tokens, completion_tokens), []
                    )
                    await send(event(final))
            await send(b"data: [DONE]\n\n")
            await response.write_eof()
        except TimeoutError:  # the client does not read: drop the connection
            if http.transport is not None:
                http.transport.close()
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
                "elmforest": {
                    "revision": model_set.revision,
                    "experts": experts,
                    "excluded": list(model_set.excluded),  # the endpoint's opt-outs
                },
            }
            for name in model_set.model_names()
        ]
        return web.json_response({"object": "list", "data": data})

    async def tokenize(self, http: web.Request) -> web.Response:
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        data = await self._json(http, deadline)
        model_set = self._model_set()
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(self._tokenizers, tokenizing.tokenize, model_set, data)
        return web.json_response(answer)

    async def detokenize(self, http: web.Request) -> web.Response:
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        data = await self._json(http, deadline)
        model_set = self._model_set()
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(
            self._tokenizers, tokenizing.detokenize, model_set, data
        )
        return web.json_response(answer)

    async def tokenizer_info(self, _: web.Request) -> web.Response:
        return web.json_response(tokenizing.tokenizer_info(self._model_set()))

    async def healthz(self, _: web.Request) -> web.Response:
        if not self.engine.alive:
            return web.json_response({"status": "engine stopped"}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        state = self.state
        model_set = state.current
        if model_set is None:
            reason = state.load_error or "loading the forest"
            return web.json_response({"ready": False, "reason": reason}, status=503)
        body: dict[str, Any] = {"ready": True, "revision": model_set.revision}
        if state.load_error:  # still serving the last good revision: say what fails
            body["load_error"] = {
                "message": state.load_error,
                "revision": state.failing_revision,
                "attempts": state.failures,
            }
        return web.json_response(body)

    async def prometheus(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
