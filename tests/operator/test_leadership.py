"""The leader election's decisions and writes, without a cluster (a fake Lease API)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from elmforest.leadership import Action, ElectionSettings, Elector, LeaseRecord, decide

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _rec(holder: str, age: float, duration: float = 15.0) -> LeaseRecord:
    return LeaseRecord(holder, duration, NOW - timedelta(seconds=age), 3, "7")


def test_decisions() -> None:
    assert decide(None, "a", NOW) is Action.CREATE
    assert decide(_rec("", 0), "a", NOW) is Action.TAKE  # released
    assert decide(_rec("b", 16), "a", NOW) is Action.TAKE  # expired
    assert decide(_rec("b", 14), "a", NOW) is Action.WAIT  # held by a live leader
    assert decide(_rec("a", 14), "a", NOW) is Action.RENEW


def test_settings_need_deadline_below_duration() -> None:
    with pytest.raises(ValueError):
        ElectionSettings("l", "ns", "a", lease_duration=10, renew_deadline=10, retry_period=2)
    with pytest.raises(ValueError):
        ElectionSettings("l", "ns", "", lease_duration=15, renew_deadline=10, retry_period=2)


class FakeLeases:
    """One Lease with resourceVersion checks, as the API server does them."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0

    def _obj(self) -> Any:
        assert self.lease is not None
        spec = self.lease["spec"]
        renew = spec.get("renewTime")
        return SimpleNamespace(
            metadata=SimpleNamespace(resource_version=str(self.version)),
            spec=SimpleNamespace(
                holder_identity=spec.get("holderIdentity"),
                lease_duration_seconds=spec.get("leaseDurationSeconds"),
                renew_time=datetime.strptime(renew, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
                if renew
                else None,
                acquire_time=None,
                lease_transitions=spec.get("leaseTransitions"),
            ),
        )

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> Any:
        if self.lease is None:
            raise ApiException(status=404)
        return self._obj()

    def create_namespaced_lease(self, namespace: str, body: dict[str, Any], **_: Any) -> None:
        if self.lease is not None:
            raise ApiException(status=409)
        self.lease, self.version = body, self.version + 1

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: dict[str, Any], **_: Any
    ) -> None:
        if body["metadata"].get("resourceVersion") != str(self.version):
            raise ApiException(status=409)
        self.lease, self.version = body, self.version + 1


def _elector(api: FakeLeases, identity: str) -> Elector:
    return Elector(ElectionSettings("op", "ns", identity), api=api)


def test_one_winner_and_release_hands_over() -> None:
    api = FakeLeases()
    a, b = _elector(api, "a"), _elector(api, "b")
    assert a.try_once()  # creates
    assert not b.try_once()  # a's lease is live
    assert a.try_once()  # renews
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "a"
    a.release()
    assert api.lease["spec"]["holderIdentity"] is None
    assert b.try_once()  # at once, without waiting for expiry
    assert api.lease["spec"]["holderIdentity"] == "b"
    assert api.lease["spec"]["leaseTransitions"] == 1


def test_stale_read_loses_with_conflict() -> None:
    api = FakeLeases()
    a, b = _elector(api, "a"), _elector(api, "b")
    assert a.try_once()
    a.release()
    stale = b._read()
    assert c_takes(api)  # a third candidate writes between b's read and b's write
    b._read = lambda: stale  # type: ignore[method-assign]
    assert not b.try_once()  # b's write carries the old resourceVersion: 409, b waits
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "c"


def c_takes(api: FakeLeases) -> bool:
    return _elector(api, "c").try_once()
