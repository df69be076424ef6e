"""The branch worker's parts that need no server: its work queue and its expectations."""

from __future__ import annotations

import asyncio
import time

import pytest

from elmforest.planner.observed import job_state
from elmforest.scheduling.expectations import Expectations
from elmforest.scheduling.queue import WorkQueue


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_a_key_added_many_times_is_taken_once_in_order() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        for key in ("b", "a", "b", "c", "a"):
            queue.add(key)
        return await queue.take()

    assert run(scenario()) == ["b", "a", "c"]


def test_a_key_in_flight_runs_again_after_it_is_done_never_twice_at_once() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        first = await queue.take()
        queue.add("a")  # a change while "a" is being reconciled
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(queue.take(), 0.05)  # not handed out while in flight
        queue.done("a")
        return first, await asyncio.wait_for(queue.take(), 1)

    assert run(scenario()) == (["a"], ["a"])


def test_add_after_keeps_the_earliest_retry() -> None:
    async def scenario() -> tuple[list[str], float]:
        queue: WorkQueue[str] = WorkQueue()
        started = time.monotonic()
        queue.add_after("a", 5.0)
        queue.add_after("a", 0.05)  # sooner: replaces the 5 s retry
        queue.add_after("a", 3.0)  # later: ignored
        keys = await asyncio.wait_for(queue.take(), 1)
        return keys, time.monotonic() - started

    keys, waited = run(scenario())  # type: ignore[misc]
    assert keys == ["a"] and waited < 1


def test_a_burst_within_the_window_comes_as_one_batch() -> None:
    async def scenario() -> list[int]:
        queue: WorkQueue[int] = WorkQueue()

        async def burst() -> None:
            for i in range(5):
                queue.add(i)
                await asyncio.sleep(0.005)

        adding = asyncio.create_task(burst())
        batch = await queue.take(window=0.2)
        await adding
        return batch

    assert run(scenario()) == [0, 1, 2, 3, 4]


def test_our_own_writes_are_recognised_when_they_come_back() -> None:
    expect = Expectations()
    key = ("ns", "b1")
    assert not expect.behind(key, "7") and not expect.echo(key, "7")
    expect.wrote(key, "8")  # the finalizer
    expect.wrote(key, "9")  # the status
    assert expect.behind(key, "7") and expect.behind(key, "8")
    # The watch may fold both into its latest event: that one clears both.
    assert expect.echo(key, "9") and not expect.behind(key, "9")
    assert not expect.echo(key, "8")  # a foreign change later is news


def test_a_write_the_server_found_to_be_a_no_op_is_caught_up_at_once() -> None:
    expect = Expectations()
    expect.wrote(("ns", "b1"), "7")  # the same version the reconcile read: nothing changed
    assert not expect.behind(("ns", "b1"), "7")


def test_an_echo_that_never_comes_expires() -> None:
    expect = Expectations(expiry=0.0)
    expect.wrote(("ns", "b1"), "8")
    time.sleep(0.01)
    assert not expect.behind(("ns", "b1"), "7")
    expect.created_job(("ns", "j1"))
    time.sleep(0.01)
    assert not expect.job_pending(("ns", "j1"))


def test_a_created_job_is_expected_until_the_watch_shows_it() -> None:
    expect = Expectations()
    expect.created_job(("ns", "j1"))
    assert expect.job_pending(("ns", "j1")) and not expect.job_pending(("ns", "j2"))
    expect.job_seen(("ns", "j1"))
    assert not expect.job_pending(("ns", "j1"))


def test_a_job_has_started_once_it_has_a_pod() -> None:
    assert not job_state({"metadata": {"name": "j"}}).started
    assert not job_state({"metadata": {"name": "j"}, "status": {"active": 0}}).started
    assert job_state({"metadata": {"name": "j"}, "status": {"active": 1}}).started
    assert not job_state({"metadata": {"name": "j"}, "status": {"active": "1"}}).started
