"""Pub/sub across processes on every broker: subscribers in the test, publishers in real worker
processes (memory://: worker threads) and in the test itself."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from offload import Offload
from tests import flows_harness
from tests.flows_harness import Harness
from tests.support import flush_namespace

harness = flows_harness.harness
shared = flows_harness.shared

T = 15


def channel() -> str:
    return f"news-{uuid.uuid4().hex[:8]}"


async def next_message(sub: AsyncIterator[Any]) -> Any:
    return await asyncio.wait_for(anext(sub), T)


@pytest.mark.parametrize("task", ["publish_to", "apublish_to"])
async def test_a_task_in_a_worker_publishes_to_every_subscriber(shared: Harness, task: str) -> None:
    h = shared
    name = channel()
    async with h.app.subscribe(name) as first, h.app.subscribe(name) as second:
        result = await h.app.ref(f"tests.apps.flows.{task}").adelay(name, "hello")
        for sub in (first, second):
            assert await next_message(sub) == {"data": "hello", "task": result.id}
        await result.wait(T)
    await h.app.aclose()


async def test_messages_arrive_in_order_and_only_on_their_channel(shared: Harness) -> None:
    h = shared
    name, other = channel(), channel()
    async with h.app.subscribe(name) as sub:
        await h.app.apublish(other, "elsewhere")
        for i in range(5):
            await h.app.apublish(name, {"n": i})
        assert [await next_message(sub) for _ in range(5)] == [{"n": i} for i in range(5)]
    await h.app.aclose()


async def test_the_sync_face_publishes_too(shared: Harness) -> None:
    h = shared
    name = channel()
    async with h.app.subscribe(name) as sub:
        await asyncio.to_thread(h.app.publish, name, [1, "two", None])
        assert await next_message(sub) == [1, "two", None]
    await h.app.aclose()


async def test_namespaces_do_not_hear_each_other(shared: Harness) -> None:
    h = shared
    name = channel()
    neighbour = Offload(h.url, namespace=f"{h.namespace}x", results=h.results)
    async with h.app.subscribe(name) as sub:
        await neighbour.apublish(name, "from the neighbour")
        await h.app.apublish(name, "ours")
        assert await next_message(sub) == "ours"
    await flush_namespace(neighbour)
    await neighbour.aclose()
    await h.app.aclose()


async def test_a_task_in_a_process_pool_child_publishes(harness: Harness) -> None:
    h = harness
    if h.kind == "memory":
        pytest.skip("memory:// cannot reach a process pool")
    h.worker("--pool", "process", "-c", "1")
    name = channel()
    async with h.app.subscribe(name) as sub:
        result = await h.app.ref("tests.apps.flows.publish_to").adelay(name, "from a child")
        assert await next_message(sub) == {"data": "from a child", "task": result.id}
    await h.app.aclose()
