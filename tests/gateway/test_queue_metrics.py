"""What ``GET /metrics`` reads from the broker and the worker registry at each scrape: how long
each queue's oldest ready task has waited, and the live workers with what they hold."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from offload import Offload
from offload.workers import Registration
from tests.gateway.conftest import client_for

pytestmark = pytest.mark.parametrize("kind", ["sqlite", "redis"], indirect=True)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> list[frozenset[tuple[str, str]]]:
    return [labels for (found, labels) in samples if found == name]


async def test_a_waiting_task_ages_its_queue_until_it_is_taken(app: Offload) -> None:
    await app.ref("tests.gateway.job").options(queue="images").adelay()
    async with client_for(app.asgi()) as client:
        first = await scrape(client)
        await asyncio.sleep(0.3)  # the age itself is what is tested
        second = await scrape(client)
        # Given the task taken (as a worker's fetch would), its queue has nothing ready to age.
        broker = await app._broker()
        [delivery] = await broker.fetch(["images"], 1, timeout_s=5)
        taken = await scrape(client)
        await broker.ack([delivery])
    age = value(first, "offload_queue_oldest_age_seconds", queue="images")
    assert age is not None and 0 < age < 5
    later = value(second, "offload_queue_oldest_age_seconds", queue="images")
    assert later is not None and later >= age + 0.25
    assert value(second, "offload_queue_depth", queue="images") == 1
    assert series(taken, "offload_queue_oldest_age_seconds") == []
    assert value(taken, "offload_tasks_running") == 1
    assert value(taken, "offload_broker_up") == 1


async def test_a_registered_worker_shows_as_live_with_what_it_holds(app: Offload) -> None:
    registration = Registration(
        await app._store(), queues=["images", "default"], concurrency=4, pool="thread", timeout_s=30
    )
    async with client_for(app.asgi()) as client:
        before = await scrape(client)
        await registration.beat(["task-1", "task-2"])
        live = await scrape(client)
        await registration.leave()
        gone = await scrape(client)
    assert value(before, "offload_workers_live") == 0
    assert value(live, "offload_workers_live") == 1
    assert value(live, "offload_queue_workers", queue="images") == 1
    assert value(live, "offload_queue_workers", queue="default") == 1
    worker = {"worker": registration.id, "hostname": socket.gethostname()}
    assert value(live, "offload_worker_tasks_held", **worker) == 2
    assert value(live, "offload_worker_concurrency", **worker) == 4
    seen = value(live, "offload_worker_last_seen_age_seconds", **worker)
    assert seen is not None and 0 <= seen < 5
    # A worker that left is gone from every series at the next scrape.
    assert value(gone, "offload_workers_live") == 0
    for name in ("offload_queue_workers", "offload_worker_tasks_held", "offload_worker_last_seen_age_seconds"):
        assert series(gone, name) == []
