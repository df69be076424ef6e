"""The follower never dies (elmtrain/serving/follow.py): whatever fails while reading the
manifest or loading a revision keeps the last good revision serving, shows in ``/readyz``, a
metric and the replica's record in storage, and is retried with a doubling delay; a fixed or
newer revision is then served.

Each fault is made for real in a copy of the session's seeded forest (an invalid manifest, an
expert whose files are missing, an expert whose weights are corrupt), and out of memory and an
unexpected bug by making the loader raise.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from elmcore import layout
from elmcore.manifest import ExpertEntry, Manifest
from elmcore.records import ServingRecord
from elmcore.storage.base import sha256_bytes
from elmcore.storage.manifest_store import update_manifest
from elmtrain.forest import Forest
from elmtrain.runtime import Runtime
from elmtrain.serving import follow, modelset
from elmtrain.serving.admission import Admission
from elmtrain.serving.app import Server, ServingState
from elmtrain.serving.engine import Engine
from elmtrain.serving.follow import Follower
from elmtrain.serving.metrics import ServeMetrics

POLL = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Served:
    """A follower on a forest copy, with its state, metrics and the server's /readyz."""

    def __init__(self, root: Path) -> None:
        self.forest = Forest.open(str(root))
        self.state, self.metrics, self.clock = ServingState(), ServeMetrics(), Clock()
        self.follower = Follower(
            self.forest,
            "forest",
            Runtime(device=torch.device("cpu")),
            self.state,
            self.metrics,
            POLL,
            report_as="replica-0",
            clock=self.clock,
        )
        self.server = Server(Engine(1), self.state, self.metrics, Admission(4, 4, None))

    def readyz(self) -> tuple[int, dict[str, Any]]:
        response = asyncio.run(self.server.readyz(None))  # type: ignore[arg-type]
        assert response.text is not None
        return response.status, json.loads(response.text)

    def failures(self) -> float:
        return self.metrics.load_failures._value.get()  # type: ignore[no-any-return]

    def record(self) -> ServingRecord:
        data = self.forest.storage.read_bytes(layout.serving("replica-0"))
        return ServingRecord.model_validate_json(data)

    def later(self, seconds: float) -> None:
        self.clock.now += seconds
        self.follower.poll()


@pytest.fixture
def served(seeded_forest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Served:
    monkeypatch.setenv("ELMTRAIN_CACHE", str(tmp_path / "cache"))  # fetches happen here
    root = tmp_path / "forest"
    shutil.copytree(seeded_forest, root)
    served = Served(root)
    served.follower.poll()
    assert served.state.current is not None and served.state.load_error is None
    return served


def bump(forest: Forest, change: Callable[[Manifest], Manifest] = lambda m: m) -> int:
    """A new revision of the manifest, with ``change`` applied."""
    manifest = update_manifest(
        forest.storage, lambda m: change(m).model_copy(update={"revision": m.revision + 1})
    )
    return manifest.revision


def with_expert(path: str, sha256: str) -> Callable[[Manifest], Manifest]:
    entry = ExpertEntry(domain="law", version=1, path=path, sha256=sha256)
    return lambda m: m.model_copy(update={"experts": {**m.experts, "law": entry}})


def corrupt_copy_of_the_seed(forest: Forest, root: Path) -> tuple[str, str]:
    """The seed's files as an expert, one byte of its weights changed; its commit marker
    rewritten (same content, another sha256) so that no cached copy of the seed stands in."""
    seed = forest.manifest().seed
    assert seed is not None
    target = root / "experts" / "law" / "v1"
    shutil.copytree(root / seed.path, target)
    weights = next(target.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    marker = target / layout.COMMIT_MARKER
    marker.write_text(json.dumps(json.loads(marker.read_text())))
    return "experts/law/v1", sha256_bytes(marker.read_bytes())


def assert_fails_then_serves_the_last_good(served: Served, good: int, bad: int | None) -> None:
    state = served.state
    assert state.current is not None and state.current.revision == good
    assert state.load_error and state.failing_revision == bad and state.failures == 1
    status, body = served.readyz()
    assert status == 200 and body["revision"] == good
    assert body["load_error"]["revision"] == bad and body["load_error"]["attempts"] == 1
    assert served.failures() == 1
    record = served.record()  # told to the operator at once, not at the next heartbeat
    assert record.revision == good and record.message == state.load_error


def fault(kind: str, served: Served, root: Path, monkeypatch: pytest.MonkeyPatch) -> int | None:
    """Make the fault; the revision that fails to load (None: the manifest itself)."""
    forest = served.forest
    if kind == "invalid manifest":
        forest.storage.write_bytes(layout.MANIFEST, b'{"revision": "seven", "seed": 1}')
        return None
    if kind == "missing expert files":
        return bump(forest, with_expert("experts/law/v9", "0" * 64))
    if kind == "corrupt expert weights":
        return bump(forest, with_expert(*corrupt_copy_of_the_seed(forest, root)))

    def raising(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError() if kind == "out of memory" else KeyError("a bug")

    monkeypatch.setattr(follow, "load_model_set", raising)
    return bump(forest, lambda m: m.model_copy(update={"experts": {}}))


FAULTS = [
    "invalid manifest",
    "missing expert files",
    "corrupt expert weights",
    "out of memory",
    "any other exception",
]


@pytest.mark.parametrize("kind", FAULTS)
def test_a_revision_that_fails_to_load_leaves_the_last_good_one_serving(
    kind: str, served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = served.state.current.revision  # type: ignore[union-attr]
    manifest = served.forest.manifest()
    loader = modelset.load_model_set
    bad = fault(kind, served, tmp_path / "forest", monkeypatch)
    served.later(POLL)
    assert_fails_then_serves_the_last_good(served, good, bad)

    # Retried with a doubling delay: not at the next poll, then after it.
    served.later(POLL / 2)
    assert served.state.failures == 1
    served.later(POLL)
    assert served.state.failures == 2 and served.failures() == 2
    served.later(POLL * 1.5)
    assert served.state.failures == 2  # 4 s after the second failure: still waiting
    served.later(POLL)
    assert served.state.failures == 3

    # Fixed: a newer revision is loaded without waiting out the delay (an unreadable
    # manifest cannot say it is newer: that waits).
    monkeypatch.setattr(follow, "load_model_set", loader)
    fixed = manifest.model_copy(update={"revision": max(good, bad or 0) + 1})
    served.forest.storage.write_bytes(layout.MANIFEST, fixed.model_dump_json().encode())
    served.later(follow.BACKOFF_MAX_SECONDS if bad is None else 0.1)
    assert served.state.current is not None and served.state.current.revision == fixed.revision
    assert served.state.load_error is None and served.failures() == 0
    status, body = served.readyz()
    assert status == 200 and "load_error" not in body
    assert served.record().message == ""
