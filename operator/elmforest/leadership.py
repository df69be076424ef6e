"""Leader election on a ``coordination.k8s.io`` Lease: two operator replicas, one writer.

Kopf's peering freezes lower-priority operators when it sees a peer, but it has no fencing: two
operators that start together, or lose sight of each other, both act. This module gives the
guarantee client-go's leaderelection gives: every write to the Lease carries the
resourceVersion that was read, so of two candidates exactly one wins (the other gets 409
Conflict); the leader renews every ``retry_period`` and, when it has not renewed for
``renew_deadline`` (shorter than ``lease_duration``), or finds another holder, it exits the
process at once (non-zero, so the pod restarts as a standby) before any standby may take
over. A graceful stop releases the Lease (no holder) so the standby takes over at once.

``decide`` holds the decisions and is pure (unit-tested without a cluster); ``Elector`` does
the API calls with the blocking ``kubernetes`` client, in a thread beside Kopf's loop.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ElectionSettings:
    """Typed settings; the chart passes them as CLI flags (identity: the pod's name)."""

    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        # client-go's rule: the leader must give up before a standby may take over.
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("need 0 < retry period < renew deadline < lease duration")
        if not self.identity:
            raise ValueError("leader election needs an identity (the pod's name)")


@dataclass(frozen=True)
class LeaseRecord:
    """What the Lease says; ``renew_time`` None when never held or released."""

    holder: str
    duration: float
    renew_time: datetime | None
    transitions: int
    resource_version: str


class Action(enum.Enum):
    CREATE = "create"  # no Lease yet
    TAKE = "take"  # free, released or expired: become its holder
    RENEW = "renew"  # ours: extend it
    WAIT = "wait"  # someone else holds it and it has not expired


def decide(record: LeaseRecord | None, identity: str, now: datetime) -> Action:
    """What a candidate does with the Lease as read at ``now`` (the write then decides)."""
    if record is None:
        return Action.CREATE
    if record.holder == identity:
        return Action.RENEW
    if not record.holder or record.renew_time is None:
        return Action.TAKE
    if now >= record.renew_time + timedelta(seconds=record.duration):
        return Action.TAKE
    return Action.WAIT


def _micro_time(t: datetime) -> str:
    # MicroTime always with six fractional digits (datetime.isoformat drops them at .000000).
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _record(lease: Any) -> LeaseRecord:
    spec = lease.spec
    renew = spec.renew_time or spec.acquire_time
    return LeaseRecord(
        holder=spec.holder_identity or "",
        duration=float(spec.lease_duration_seconds or 0),
        renew_time=renew,
        transitions=int(spec.lease_transitions or 0),
        resource_version=str(lease.metadata.resource_version),
    )


def standby_health(url: str) -> Any:
    """Answer the liveness probe while waiting (Kopf's endpoint starts only with the leader).

    Without it the kubelet would restart every standby after the probe's failure threshold.
    Returns the server; ``shutdown()`` and ``server_close()`` it before Kopf binds the port.
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlparse

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"standby\n")

        def log_message(self, *args: Any) -> None:
            pass

    parsed = urlparse(url)
    server = ThreadingHTTPServer((parsed.hostname or "0.0.0.0", parsed.port or 80), Ok)
    threading.Thread(target=server.serve_forever, name="standby-health", daemon=True).start()
    return server


class Elector:
    """Acquire (blocking), renew in a thread (exit on loss), release on a graceful stop."""

    def __init__(self, settings: ElectionSettings, api: Any = None) -> None:
        if api is None:
            from kubernetes import client

            api = client.CoordinationV1Api()
        self.settings = settings
        self.api = api
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_renew = 0.0  # monotonic
        # A hung request must not keep a leader acting past its renew deadline.
        self._timeout = settings.retry_period

    def _body(self, record: LeaseRecord | None, now: datetime, acquire: bool) -> dict[str, Any]:
        s = self.settings
        spec: dict[str, Any] = {
            "holderIdentity": s.identity,
            "leaseDurationSeconds": max(1, round(s.lease_duration)),
            "renewTime": _micro_time(now),
        }
        if acquire:
            spec["acquireTime"] = _micro_time(now)
            spec["leaseTransitions"] = (record.transitions + 1) if record else 0
        meta: dict[str, Any] = {"name": s.name, "namespace": s.namespace}
        if record is not None:
            # Optimistic concurrency: the write fails with 409 if anyone wrote since the read.
            meta["resourceVersion"] = record.resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": spec,
        }

    def _read(self) -> LeaseRecord | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return _record(
                self.api.read_namespaced_lease(
                    self.settings.name, self.settings.namespace, _request_timeout=self._timeout
                )
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def try_once(self) -> bool:
        """One read and at most one write; True when we hold the Lease afterwards."""
        from kubernetes.client.exceptions import ApiException

        s = self.settings
        record = self._read()
        now = datetime.now(UTC)
        action = decide(record, s.identity, now)
        if action is Action.WAIT:
            return False
        try:
            if action is Action.CREATE:
                self.api.create_namespaced_lease(
                    s.namespace, self._body(None, now, True), _request_timeout=self._timeout
                )
            else:
                body = self._body(record, now, acquire=action is Action.TAKE)
                if action is Action.RENEW and record is not None:
                    body["spec"]["leaseTransitions"] = record.transitions
                self.api.replace_namespaced_lease(
                    s.name, s.namespace, body, _request_timeout=self._timeout
                )
        except ApiException as e:
            if e.status in (409, 422) or (e.status == 404 and action is not Action.CREATE):
                return False  # someone else wrote first: they won this round
            raise
        if action is Action.TAKE:
            log.info("leader election: %s acquired lease %s/%s", s.identity, s.namespace, s.name)
        self._last_renew = time.monotonic()
        return True

    def acquire(self) -> None:
        """Block until this candidate holds the Lease (the standby waits here)."""
        s = self.settings
        log.info("leader election: %s waiting for lease %s/%s", s.identity, s.namespace, s.name)
        while True:
            try:
                if self.try_once():
                    return
            except Exception:  # an unreachable API server: keep trying, as client-go does
                log.exception("leader election: acquire attempt failed")
            time.sleep(s.retry_period)

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        s = self.settings
        while not self._stop.wait(s.retry_period):
            try:
                held = self.try_once()
            except Exception:
                log.exception("leader election: renew failed")
                held = None  # unknown: keep trying until the deadline
            if held is False:
                self._lost("another holder or a conflicting write")
            if time.monotonic() - self._last_renew > s.renew_deadline:
                self._lost(f"not renewed for {s.renew_deadline}s")

    def _lost(self, why: str) -> None:
        if self._stop.is_set():
            return  # a graceful stop is releasing it
        log.critical("leader election: lost lease (%s); exiting so a standby takes over", why)
        # Never two writers: stop at once, without running Kopf's graceful shutdown (which
        # could still patch objects); the pod restarts as a standby.
        os._exit(3)

    def release(self) -> None:
        """Graceful stop: give the Lease up so the standby needs not wait for it to expire."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.retry_period + 5)
        s = self.settings
        try:
            record = self._read()
            if record is None or record.holder != s.identity:
                return
            body = self._body(record, datetime.now(UTC), acquire=False)
            body["spec"] = {
                "holderIdentity": None,
                "leaseDurationSeconds": 1,
                "leaseTransitions": record.transitions,
            }
            self.api.replace_namespaced_lease(s.name, s.namespace, body)
            log.info("leader election: %s released lease %s/%s", s.identity, s.namespace, s.name)
        except Exception:  # it then expires after lease_duration: slower, still safe
            log.exception("leader election: release failed")
