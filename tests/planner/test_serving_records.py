"""What the servers say in storage (``serving/<replica>.json``), as the operator reads it: a
replica that cannot load a revision is reported on the forest (``status.serving.message`` and a
``ServingDegraded`` Event, once per message), and a record the operator cannot read is reported
and skipped, never raised (before, an unreadable ``updated_at`` made every reconcile raise)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from elmcore.records import ServingRecord
from elmforest.adapters.forest_storage import ForestStorage
from elmforest.api.forest import ElmForestStatus, StorageSpec
from elmforest.planner.actions import Event, PatchStatus
from elmforest.planner.forest import ForestInput, plan_forest
from elmforest.planner.observed import StorageView
from tests.planner.test_serving import READY, spec

FAILING = "revision 8 failed to load: IntegrityError: experts/law/v2: sha256; serving revision 7"


def plan(
    records: list[ServingRecord], status: ElmForestStatus | None = None
) -> tuple[list[Event], ElmForestStatus]:
    result = plan_forest(
        ForestInput(
            name="books",
            namespace="ns",
            uid="uid-1",
            generation=1,
            spec=spec({}),
            status=status or ElmForestStatus(),
            storage=StorageView(manifest=READY),
            serving_records=records,
        )
    )
    patches = [a.status for a in result.actions if isinstance(a, PatchStatus)]
    new = ElmForestStatus.model_validate(patches[-1]) if patches else status or ElmForestStatus()
    return [a for a in result.actions if isinstance(a, Event)], new


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def test_a_failing_load_is_reported_once_per_message() -> None:
    records = [ServingRecord(replica="a", revision=7, message=FAILING, updated_at=now())]
    events, status = plan(records)
    assert status.serving is not None and status.serving.message == FAILING
    assert status.serving.revision == 7  # the last good revision still serves
    degraded = [e for e in events if e.reason == "ServingDegraded"]
    assert [(e.type, e.message) for e in degraded] == [("Warning", FAILING)]
    again, _ = plan(records, status)  # the same failure at the next reconcile: no new Event
    assert not [e for e in again if e.reason == "ServingDegraded"]
    healed = [ServingRecord(replica="a", revision=8, updated_at=now())]
    events, status = plan(healed, status)
    assert status.serving is not None and status.serving.message == ""
    assert status.serving.revision == 8 and not events


def test_an_unreadable_updated_at_is_reported_and_skipped() -> None:
    records = [
        ServingRecord(replica="good", revision=7, updated_at=now()),
        ServingRecord(replica="garbled", revision=3, updated_at="yesterday-ish"),
        ServingRecord(replica="naive", revision=2, updated_at="2030-01-01T00:00:00"),
    ]
    events, status = plan(records)
    assert status.serving is not None
    assert status.serving.revision == 7  # only the readable, live record counts
    assert "serving/garbled.json" in status.serving.message
    assert any(e.reason == "ServingDegraded" for e in events)
    # Both unreadable ones are reported, the first in the status (it holds one message).
    _, alone = plan(records[2:])
    assert alone.serving is not None and "serving/naive.json" in alone.serving.message


def test_a_foreign_file_among_the_records_is_reported_and_skipped(tmp_path: Path) -> None:
    storage = ForestStorage(StorageSpec(uri=f"file://{tmp_path}"))
    good = ServingRecord(replica="a", revision=7)
    storage.storage.write_bytes("serving/a.json", good.model_dump_json().encode())
    foreign: dict[str, Any] = {"replica": "b", "revision": "seven", "updated_at": []}
    storage.storage.write_bytes("serving/b.json", repr(foreign).encode())
    records = storage.serving_records()
    assert {r.replica for r in records} == {"a", "b"}
    (bad,) = [r for r in records if r.replica == "b"]
    assert bad.revision is None and "serving/b.json is not a serving record" in bad.message
    _, status = plan(records)
    assert status.serving is not None and status.serving.revision == 7
    assert "serving/b.json" in status.serving.message
