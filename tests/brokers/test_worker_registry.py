"""The worker registry every result store keeps (`Store.put_worker`, `drop_worker`,
`workers`) and `offload.workers` on top of it, on each kind's store."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from offload.brokers import open_backends
from offload.brokers.base import Store
from offload.config import parse_url
from offload.workers import Registration, consuming, live_workers
from tests.conftest import urls_for


@pytest.fixture
async def stores(kind: str, tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores of one kind on one server, in two namespaces."""
    broker_url, results_url = urls_for(kind, tmp_path)
    url = parse_url(results_url or broker_url)
    opened = [await open_backends(parse_url(broker_url), url, f"t{uuid.uuid4().hex[:12]}") for _ in range(2)]
    try:
        yield opened[0].store, opened[1].store
    finally:
        for o in opened:
            await o.store.flush_namespace()
            await o.broker.flush_namespace()
            await o.close()


async def test_records_are_listed_renewed_and_dropped(stores: tuple[Store, Store]) -> None:
    store, other = stores
    await store.put_worker("w1", b"one", 30)
    await store.put_worker("w2", b"two", 30)
    assert sorted(await store.workers()) == [b"one", b"two"]
    # A renewal replaces the record
    await store.put_worker("w1", b"one again", 30)
    assert sorted(await store.workers()) == [b"one again", b"two"]
    # Another namespace sees none of them
    assert await other.workers() == []
    await store.drop_worker("w1")
    assert await store.workers() == [b"two"]


async def test_a_record_not_renewed_runs_out(stores: tuple[Store, Store]) -> None:
    store, _ = stores
    await store.put_worker("short", b"short", 0.3)
    await store.put_worker("long", b"long", 30)
    assert sorted(await store.workers()) == [b"long", b"short"]
    deadline = time.monotonic() + 5
    while b"short" in await store.workers():
        assert time.monotonic() < deadline, "a record whose time ran out is still listed"
        await asyncio.sleep(0.05)
    assert await store.workers() == [b"long"]


async def test_registration_round_trips_worker_info(stores: tuple[Store, Store]) -> None:
    store, _ = stores
    before = dt.datetime.now(dt.UTC)
    reg = Registration(store, queues=["images", "default"], concurrency=4, pool="process", timeout_s=30)
    await reg.beat(["t1", "t2"])
    await store.put_worker("garbage", b"\xff not json", 30)
    [info] = await live_workers(store)
    assert info.id == reg.id and info.queues == ("images", "default") and info.running == ("t1", "t2")
    assert info.concurrency == 4 and info.pool == "process"
    assert before <= info.started_at <= info.last_seen <= dt.datetime.now(dt.UTC)
    assert info.last_seen.tzinfo is not None
    assert consuming([info], "images") == [info] and consuming([info], "exports") == []
    await reg.leave()
    assert await live_workers(store) == []
