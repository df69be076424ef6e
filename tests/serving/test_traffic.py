"""Many raw HTTP clients at once, and an expert merged into the forest while they run.

Requests decode in shared batches (a greedy answer amid traffic equals the same request alone);
the server follows the manifest to the new revision without failing a request, and a stream
that began before the swap ends on the set it started with.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.serve import serving
from tests.serving.conftest import NAME, train_expert
from tests.textgen import domain_text

PROMPTS = {d: domain_text(d, 1, seed=9)[:50] for d in ("cooking", "sailing", "poetry")}
CLIENTS = 12


async def complete(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> dict[str, Any]:
    """One request; a stream is read to its end and summed up like a whole answer."""
    async with session.post(url + "/v1/completions", json=body) as answer:
        if not body.get("stream"):
            return {"status": answer.status, **await answer.json()}
        text, revision, routing, reason, errors = "", None, [], None, []
        async for raw in answer.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                errors.append(chunk["error"])
                continue
            if "elmforest" in chunk:
                revision, routing = chunk["elmforest"]["revision"], chunk["elmforest"]["routing"]
            text += chunk["choices"][0]["text"]
            reason = chunk["choices"][0]["finish_reason"] or reason
        return {
            "status": answer.status,
            "stream_errors": errors,
            "choices": [{"text": text, "finish_reason": reason}],
            "elmforest": {"revision": revision, "routing": routing},
        }


async def traffic(
    url: str, stop: asyncio.Event, results: list[dict[str, Any]], client: int
) -> None:
    async with aiohttp.ClientSession() as session:
        turn = 0
        while not stop.is_set():
            domain = list(PROMPTS)[(client + turn) % len(PROMPTS)]
            body = {
                "model": NAME,
                "prompt": PROMPTS[domain],
                "max_tokens": 8 + (client % 3) * 4,
                "seed": client * 1000 + turn,
                "stream": turn % 2 == 1,
            }
            result = await complete(session, url, body)
            results.append({"domain": domain, **result})
            turn += 1


def greedy(model: str, domain: str) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPTS[domain], "max_tokens": 10, "temperature": 0}


def test_concurrent_clients_and_a_merge_during_traffic(
    expert_forest: Path, corpus: Path, tmp_path: Path
) -> None:
    forest = tmp_path / "forest"
    shutil.copytree(expert_forest, forest)
    with serving(str(forest), tmp_path, "--name", NAME, "--poll-seconds", "0.2") as server:
        before = server.get("/readyz")[1]["revision"]

        async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
            async with aiohttp.ClientSession() as session:
                alone = {
                    m: await complete(session, server.url, greedy(m, "cooking"))
                    for m in (NAME, f"{NAME}/expert/cooking")
                }
            stop, results = asyncio.Event(), []
            clients = [
                asyncio.create_task(traffic(server.url, stop, results, c)) for c in range(CLIENTS)
            ]
            async with aiohttp.ClientSession() as session:
                amid = {m: await complete(session, server.url, greedy(m, "cooking")) for m in alone}
            # A merge while the clients run: the real CLI trains the poetry expert and merges it.
            merged = threading.Event()
            trainer = threading.Thread(
                target=lambda: (train_expert(forest, corpus, "poetry", steps=20), merged.set())
            )
            trainer.start()
            while not merged.is_set():
                await asyncio.sleep(0.2)
            trainer.join()
            await asyncio.to_thread(server.wait_revision, before + 1)
            seen = len(results)
            while len(results) < seen + 3 * CLIENTS:  # everyone makes requests on the new set
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*clients)
            return results, alone, amid

        results, alone, amid = asyncio.run(scenario())
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as answer:
            metrics = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}

    # Not one request failed, before, during or after the swap; each answer is whole.
    assert len(results) >= 4 * CLIENTS
    failed = [r for r in results if r["status"] != 200 or r.get("stream_errors")]
    assert not failed, failed[:3]
    assert all(r["choices"][0]["finish_reason"] in ("stop", "length") for r in results)
    revisions = {r["elmforest"]["revision"] for r in results}
    assert revisions == {before, before + 1}
    # Streams that began on the old set finished there; afterwards poetry has its own expert.
    old_streams = [
        r for r in results if r["elmforest"]["revision"] == before and "stream_errors" in r
    ]
    assert old_streams
    new_poetry = [
        r for r in results if r["elmforest"]["revision"] == before + 1 and r["domain"] == "poetry"
    ]
    assert new_poetry
    for result in new_poetry:
        experts = result["elmforest"]["routing"][0]["experts"]
        assert max(experts, key=lambda e: e["weight"])["expert"] == "poetry"
    # Batching changes nothing a request gets: greedy answers amid traffic equal those alone.
    for model in alone:
        assert amid[model]["choices"][0]["text"] == alone[model]["choices"][0]["text"], model
    batches = {s.name: s.value for s in metrics["elmserve_decode_batch_size"].samples}
    mean_batch = (
        batches["elmserve_decode_batch_size_sum"] / batches["elmserve_decode_batch_size_count"]
    )
    assert mean_batch > 2, f"requests did not decode together (mean batch {mean_batch:.2f})"
    reloads = {
        s.labels["outcome"]: s.value
        for s in metrics["elmserve_reloads"].samples
        if s.name.endswith("_total")
    }
    assert reloads["loaded"] == 2


def test_a_forest_without_a_seed_is_alive_but_not_ready(tmp_path: Path) -> None:
    """Nothing to serve yet: alive, not ready, and completions say why (503, OpenAI's body)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with serving(str(empty), tmp_path, "--name", NAME, ready=False) as server:
        status, body = server.get("/readyz")
        assert status == 503 and not body["ready"]
        request = urllib.request.Request(
            server.url + "/v1/completions", data=json.dumps({"model": NAME}).encode()
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 503
        assert json.loads(refused.value.read())["error"]["code"] == "not_ready"
