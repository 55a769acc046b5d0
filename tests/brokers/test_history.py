"""The history every result store keeps (`Store.history`): states listed by what they were
written with, newest queued first, filtered, paged, and gone with their state."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from offload.brokers import open_backends
from offload.brokers.base import OutgoingMessage, Store
from offload.brokers.states import HistoryQuery, Listing, StateRow
from offload.config import parse_url
from tests.conftest import urls_for


@pytest.fixture
async def store(kind: str, tmp_path: Path, namespace: str) -> AsyncIterator[Store]:
    broker_url, results_url = urls_for(kind, tmp_path)
    opened = await open_backends(parse_url(broker_url), parse_url(results_url or broker_url), namespace)
    try:
        yield opened.store
    finally:
        await opened.store.flush_namespace()
        await opened.broker.flush_namespace()
        await opened.close()


T0 = 1_700_000_000.0


def row(task_id: str, status: str, at: float, name: str = "tasks.resize", queue: str = "default") -> StateRow:
    return StateRow(task_id, f"{task_id}:{status}".encode(), Listing(status, name, queue, T0 + at))


def ids(found: list[tuple[str, bytes]]) -> list[str]:
    return [task_id for task_id, _ in found]


async def test_lists_newest_queued_first_with_each_filter(store: Store) -> None:
    await store.put_states([
        row("a", "succeeded", 1), row("b", "failed", 2, name="tasks.mail"), row("c", "queued", 3, queue="images"),
        row("d", "failed", 4, queue="images"), row("e", "started", 5),
    ], ttl_s=60)
    assert ids(await store.history(HistoryQuery())) == ["e", "d", "c", "b", "a"]
    assert ids(await store.history(HistoryQuery(status="failed"))) == ["d", "b"]
    assert ids(await store.history(HistoryQuery(name="tasks.mail"))) == ["b"]
    assert ids(await store.history(HistoryQuery(queue="images"))) == ["d", "c"]
    assert ids(await store.history(HistoryQuery(status="failed", queue="images"))) == ["d"]
    assert ids(await store.history(HistoryQuery(status="failed", name="tasks.nothing"))) == []
    assert ids(await store.history(HistoryQuery(limit=2))) == ["e", "d"]
    assert ids(await store.history(HistoryQuery(limit=2, before=T0 + 4))) == ["c", "b"]
    assert await store.history(HistoryQuery(limit=0)) == []
    # The states come with their ids, as stored
    assert dict(await store.history(HistoryQuery(status="started"))) == {"e": b"e:started"}


async def test_a_new_status_moves_a_task_between_filters_and_keeps_its_place(store: Store) -> None:
    await store.put_states([row("a", "queued", 1), row("b", "queued", 2)], ttl_s=60)
    await store.put_states([row("a", "started", 1)], ttl_s=60)
    await store.put_states([row("a", "failed", 1)], ttl_s=60, final={"a"})
    assert ids(await store.history(HistoryQuery(status="queued"))) == ["b"]
    assert ids(await store.history(HistoryQuery(status="started"))) == []
    assert await store.history(HistoryQuery(status="failed")) == [("a", b"a:failed")]
    assert ids(await store.history(HistoryQuery())) == ["b", "a"]


async def test_states_written_if_absent_and_with_their_message_are_listed(store: Store, kind: str) -> None:
    await store.put_states([row("done", "succeeded", 1)], ttl_s=60)
    # An if-absent write lists only the states it stores
    await store.put_states_if_absent([row("done", "queued", 1), row("new", "queued", 2)], ttl_s=60)
    assert ids(await store.history(HistoryQuery(status="queued"))) == ["new"]
    assert ids(await store.history(HistoryQuery(status="succeeded"))) == ["done"]


async def test_pages_by_before_lose_nothing_even_at_equal_times(store: Store) -> None:
    # 600 tasks, three to each queued time: more than one page of the stores that page inside
    rows = [row(f"t{i:04d}", "succeeded", i // 3) for i in range(600)]
    for i in range(0, len(rows), 100):
        await store.put_states(rows[i : i + 100], ttl_s=60)
    whole = ids(await store.history(HistoryQuery(limit=1000)))
    assert sorted(whole) == sorted(r.id for r in rows) and len(whole) == 600
    ats = [T0 + int(t[1:]) // 3 for t in whole]
    assert ats == sorted(ats, reverse=True)
    # The filtered walk (status) crosses the same equal scores
    assert sorted(ids(await store.history(HistoryQuery(status="succeeded", limit=1000)))) == sorted(whole)


async def test_an_unlisted_state_is_kept_but_not_listed(store: Store) -> None:
    await store.put_states([("plain", b"no listing"), row("listed", "queued", 1)], ttl_s=60)
    assert ids(await store.history(HistoryQuery())) == ["listed"]
    assert await store.get_states(["plain"]) == [b"no listing"]
    # A later state without a listing takes the task out of the history
    await store.put_states([("listed", b"now unlisted")], ttl_s=60)
    assert await store.history(HistoryQuery()) == []


async def test_an_expired_state_leaves_the_history(store: Store) -> None:
    await store.put_states([row("short", "succeeded", 1)], ttl_s=0.3)
    await store.put_states([row("long", "succeeded", 2)], ttl_s=60)
    assert ids(await store.history(HistoryQuery())) == ["long", "short"]
    deadline = time.monotonic() + 5
    while "short" in ids(await store.history(HistoryQuery())):
        assert time.monotonic() < deadline, "an expired state is still listed"
        await asyncio.sleep(0.05)
    assert ids(await store.history(HistoryQuery(status="succeeded"))) == ["long"]


async def test_a_later_state_is_listed_for_its_own_ttl(store: Store) -> None:
    # A task's first state would have expired by now, its final one keeps 60 s: the prune,
    # which later writes run, must keep it listed.
    await store.put_states([row("task", "queued", 1)], ttl_s=0.3)
    await store.put_states([row("task", "succeeded", 1)], ttl_s=60)
    await asyncio.sleep(0.4)  # past the first state's expiry: time itself is the input here
    for i in range(10):
        await store.put_states([row(f"later{i}", "queued", 2)], ttl_s=60)
    assert ids(await store.history(HistoryQuery(status="succeeded"))) == ["task"]
    assert "task" in ids(await store.history(HistoryQuery(limit=100)))


async def test_a_namespace_lists_only_its_own(store: Store, kind: str, tmp_path: Path) -> None:
    broker_url, results_url = urls_for(kind, tmp_path)
    other = await open_backends(parse_url(broker_url), parse_url(results_url or broker_url), f"t{uuid.uuid4().hex[:12]}")
    try:
        await other.store.put_states([row("theirs", "queued", 1)], ttl_s=60)
        await store.put_states([row("ours", "queued", 1)], ttl_s=60)
        assert ids(await store.history(HistoryQuery())) == ["ours"]
        assert ids(await other.store.history(HistoryQuery())) == ["theirs"]
    finally:
        await other.store.flush_namespace()
        await other.close()


async def test_the_first_state_sent_with_its_message_is_listed(kind: str, tmp_path: Path, namespace: str) -> None:
    broker_url, results_url = urls_for(kind, tmp_path)
    if results_url is not None:
        pytest.skip(f"{kind} keeps its results elsewhere: the app writes the first state")
    url = parse_url(broker_url)
    opened = await open_backends(url, url, namespace)
    try:
        listing = Listing("queued", "tasks.resize", "default", T0)
        await opened.broker.enqueue(OutgoingMessage(id="m1", queue="default", body=b"b", state=b"queued",
                                                    state_ttl_s=60, state_listing=listing))
        assert await opened.store.history(HistoryQuery(status="queued")) == [("m1", b"queued")]
    finally:
        await opened.broker.flush_namespace()
        await opened.store.flush_namespace()
        await opened.close()
