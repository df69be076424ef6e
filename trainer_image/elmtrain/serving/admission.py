"""Back-pressure: how many requests, prompts and requests of one client the server takes on.

A request is counted twice, because it costs twice: as a request from the moment its headers
arrive (a handler, its body in memory, a connection) and by its prompts once they are known
(each prompt is a sequence the engine decodes). Past a limit the answer is 429 with
``Retry-After``, before any tokenizing or decoding is spent on it.

Each request belongs to a key, and ``max_per_key`` caps one key's share of the requests in
flight. Until the server authenticates its clients, the key is the bearer token when the request
carries one, else the client's address (``client_key``): any client may claim a new token, so
this spreads the load of honest clients fairly but does not stop a determined one. The
authentication layer is where a verified key would come from; the accounting stays here.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field
from types import TracebackType

from elmtrain.serving.protocol import ApiError

# Retry-After is a guess at when room will be free: the recent mean time a request takes,
# within these bounds (seconds).
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1, 60


class RefusedError(ApiError):
    """429: a limit is reached; ``retry_after`` seconds is a hint for when to try again."""

    def __init__(self, message: str, retry_after: int, code: str) -> None:
        super().__init__(429, message, "rate_limit_error", code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


def client_key(authorization: str | None, address: str | None) -> str:
    """Whose request this is: a digest of the bearer token (the token itself is never kept or
    logged), else the client's address."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "token:" + hashlib.sha256(token.strip().encode()).hexdigest()[:16]
    return f"address:{address or 'unknown'}"


@dataclass
class Ticket:
    """One admitted request: released (its counts returned) exactly once, on ``leave``."""

    admission: Admission
    key: str
    prompts: int = 0
    left: bool = field(default=False)

    def take_prompts(self, count: int) -> None:
        self.admission._take_prompts(self, count)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.admission._leave(self)


class Admission:
    def __init__(self, max_requests: int, max_prompts: int, max_per_key: int | None) -> None:
        self.max_requests, self.max_prompts, self.max_per_key = (
            max_requests,
            max_prompts,
            max_per_key,
        )
        self.requests = 0
        self.prompts = 0
        self.per_key: dict[str, int] = {}
        self._mean_seconds = 1.0
        self._lock = threading.Lock()  # the event loop's only, but cheap and future-proof

    def enter(self, key: str) -> Ticket:
        """Count a request that has just arrived, or refuse it (429)."""
        with self._lock:
            if self.requests >= self.max_requests:
                raise RefusedError(
                    f"the server is busy ({self.requests} requests in flight)",
                    self._retry_after(),
                    "server_busy",
                )
            mine = self.per_key.get(key, 0)
            if self.max_per_key is not None and mine >= self.max_per_key:
                raise RefusedError(
                    f"too many concurrent requests from one client ({mine}; at most "
                    f"{self.max_per_key})",
                    self._retry_after(),
                    "too_many_concurrent_requests",
                )
            self.requests += 1
            self.per_key[key] = mine + 1
        return Ticket(self, key)

    def observe(self, seconds: float) -> None:
        """A request's duration: what Retry-After estimates from."""
        if math.isfinite(seconds):
            self._mean_seconds = 0.9 * self._mean_seconds + 0.1 * seconds

    def _retry_after(self) -> int:
        return max(RETRY_AFTER_MIN, min(RETRY_AFTER_MAX, math.ceil(self._mean_seconds)))

    def _take_prompts(self, ticket: Ticket, count: int) -> None:
        if count > self.max_prompts:  # could never be admitted: waiting would not help
            raise ApiError(
                400,
                f"this server takes at most {self.max_prompts} prompts at once ({count} sent)",
                param="prompt",
            )
        with self._lock:
            if self.prompts + count > self.max_prompts:
                raise RefusedError(
                    f"the server is busy ({self.prompts} prompts in flight; this request "
                    f"has {count})",
                    self._retry_after(),
                    "server_busy",
                )
            self.prompts += count
            ticket.prompts += count

    def _leave(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.left:
                return
            ticket.left = True
            self.requests -= 1
            self.prompts -= ticket.prompts
            remaining = self.per_key.get(ticket.key, 1) - 1
            if remaining > 0:
                self.per_key[ticket.key] = remaining
            else:
                self.per_key.pop(ticket.key, None)  # the table holds only keys in flight
