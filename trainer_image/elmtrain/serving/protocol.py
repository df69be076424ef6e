"""OpenAI's completions API as pydantic models: what a request may say, what answers look like.

A prompt is a string, a list of strings, a list of token ids or a list of such lists; ``echo``
and ``logprobs`` (0 to 20) are the scoring API that evaluation harnesses use (serving/scoring.py).
Parameters OpenAI defines but this server does not implement are accepted only at their neutral
value (``n=1``, penalties 0), so a client that asks for more is told so with a 400 instead of being
answered as if it had not asked.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from elmcore.names import DNS1123_LABEL, DNS1123_LABEL_MAX

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 1024  # per stop sequence: text this long is held back from a stream
# OpenAI's seed is a 64-bit signed integer; the engine maps it (plus the choice's index) onto
# torch's generator seeds, 0 to 2**64 - 1.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_PROMPTS = 32
MAX_LOGPROBS = 20  # as OpenAI's legacy completions
MAX_EXPERT_NAMES = 256  # of one request's allow or exclude list
TokenIds = list[int]
PromptText = str | TokenIds
Domain = Annotated[str, StringConstraints(pattern=DNS1123_LABEL, max_length=DNS1123_LABEL_MAX)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ExpertChoice(BaseModel):
    """Which experts a request lets serve it (the data owners' opt-out, as FlexOlmo promises):
    every one but ``exclude``, or only ``allow``. Names of experts the forest does not have
    (yet) exclude nothing; an ``allow`` that leaves none is refused (serving/optout.py)."""

    model_config = ConfigDict(extra="forbid")
    exclude: list[Domain] | None = Field(None, max_length=MAX_EXPERT_NAMES)
    allow: list[Domain] | None = Field(None, min_length=1, max_length=MAX_EXPERT_NAMES)

    @model_validator(mode="after")
    def _one_of(self) -> ExpertChoice:
        if self.exclude is not None and self.allow is not None:
            raise ValueError("either exclude or allow, not both")
        return self


Routing = Literal["posterior", "clusters"]


class ElmforestOptions(BaseModel):
    """The request's own extension (OpenAI's clients send it as ``extra_body``). ``routing``:
    how the ensemble and the average pick and weigh experts for this request, by the prompt's
    posterior or its cluster weights (c-BTM); None: the server's ``--routing``."""

    model_config = ConfigDict(extra="forbid")
    experts: ExpertChoice = ExpertChoice()
    routing: Routing | None = None


class CompletionRequest(BaseModel):
    """Every value bounded here, where the request is read: the engine, which every request
    shares, is never handed a number it cannot use (NaN, infinities, a seed out of range)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    # Token ids before strings: a list of numbers is token ids, never refused as strings.
    prompt: str | list[str] | TokenIds | list[TokenIds] = ""
    max_tokens: int | None = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Literal[1] | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    suffix: None = None
    elmforest: ElmforestOptions = ElmforestOptions()

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        stops = [value] if isinstance(value, str) else value or []
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("prompt")
    @classmethod
    def _some_prompts(
        cls, value: str | list[str] | TokenIds | list[TokenIds]
    ) -> str | list[str] | TokenIds | list[TokenIds]:
        if isinstance(value, list) and value and isinstance(value[0], int):
            if any(token < 0 for token in value):
                raise ValueError("token ids are not negative")
            return value
        if isinstance(value, list) and not 1 <= len(value) <= MAX_PROMPTS:
            raise ValueError(f"a list prompt needs 1 to {MAX_PROMPTS} prompts")
        for item in value if isinstance(value, list) else []:
            if isinstance(item, list) and any(token < 0 for token in item):
                raise ValueError("token ids are not negative")
        return value

    @model_validator(mode="after")
    def _scoring(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 only with echo (the prompt scored, nothing generated)")
        if self.stream and self.scores:
            raise ValueError("stream: echo and logprobs are answered whole, not streamed")
        return self

    @property
    def scores(self) -> bool:
        """Whether the answer carries the prompt (echo) or log-probabilities."""
        return self.echo or self.logprobs is not None

    @property
    def prompts(self) -> list[PromptText]:
        """Each prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(item, int) for item in prompt):
            return [[item for item in prompt if isinstance(item, int)]]
        return [item for item in prompt if not isinstance(item, int)]

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ApiError(Exception):
    """An answer with OpenAI's error body: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status,
            message,
            kind,
            param,
            code,
        )

    def headers(self) -> dict[str, str]:
        """Extra response headers (a 429's Retry-After)."""
        return {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def parse_request(data: object) -> CompletionRequest:
    """A validated request, or an ApiError naming the first offending parameter."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
            raise ApiError(400, message, param=param) from None
        if first["type"] == "missing":
            raise ApiError(400, f"you must provide a {param} parameter", param=param) from None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        raise ApiError(400, message, param=param) from None


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def completion_body(
    ident: str,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, int] | None,
    routing: list[dict[str, Any]],
    revision: int | None = None,
    experts: dict[str, Any] | None = None,
    routed_by: str | None = None,
) -> dict[str, Any]:
    """A completion (or, streaming, one chunk of it). ``elmforest`` is ours: the manifest
    revision that served it, which experts served each choice with what weight (``routing``),
    which the request allowed and which not (``experts``), and, for the ensemble and the
    average, what chose the experts (``routed_by``: posterior or clusters); OpenAI's clients
    keep unknown fields as extras."""
    body: dict[str, Any] = {
        "id": ident,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    if routing or experts:
        body["elmforest"] = {"revision": revision, "routing": routing}
        if experts:
            body["elmforest"]["experts"] = experts
        if routed_by:
            body["elmforest"]["routed_by"] = routed_by
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
