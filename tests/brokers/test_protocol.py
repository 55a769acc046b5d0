"""The Broker and Store protocols, test by test, against every backend kind.

Every broker keeps the state machine drawn in `offload.brokers.base`'s docstring; the broker
tests below check it rule by rule:

* A lease belongs to the receipt of the claim that made it. Once a lease has run out and the
  message was claimed again, an ack, requeue, extend or dead letter carrying the old receipt
  changes nothing: the new holder keeps the message, its key and its lease.
* When a lease runs out, the next claim takes the message back by itself, with its delivery
  count one higher.
* A delayed message is invisible until its time; it never waits inside a lease.
* A fetch from several queues takes the highest priority (0..9) first; at equal priority the
  queues in the order given; within a queue and priority, first in, first out.
* A dedup key is held from `enqueue` through every requeue (delayed or not) until its message
  is acked or dead-lettered; an enqueue with a held key stores nothing and returns the holder's
  id.

RabbitMQ (``amqp``) has no leases: it holds a delivery until its ack or until its channel
closes, so the tests of leases skip on it (test_amqp covers redelivery on a closed channel).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from offload.brokers import open_backends
from offload.brokers.base import Broker, OutgoingMessage, Store
from offload.config import parse_url
from tests.conftest import urls_for


@pytest.fixture
async def backends(kind: str, tmp_path: Path, namespace: str) -> AsyncIterator[tuple[Broker, Store]]:
    broker_url, results_url = urls_for(kind, tmp_path)
    opened = await open_backends(parse_url(broker_url), parse_url(results_url or broker_url), namespace)
    try:
        yield opened.broker, opened.store
    finally:
        await opened.broker.flush_namespace()
        await opened.store.flush_namespace()
        await opened.close()


def msg(
    queue: str = "default", priority: int = 0, eta: float | None = None, key: str | None = None, body: bytes | None = None
) -> OutgoingMessage:
    mid = uuid.uuid4().hex
    body = b"body-" + mid.encode() if body is None else body
    return OutgoingMessage(id=mid, queue=queue, body=body, priority=priority, eta=eta, key=key)


#: A lease that runs out within a test, yet long enough that the checks made while it holds
#: (each well under a quarter of it) cannot race with its end.
SHORT_LEASE_S = 1.0

NO_LEASES = "RabbitMQ has no leases: it holds a delivery until its ack or until its channel closes"


async def test_enqueue_then_fetch_returns_the_body(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    m = msg()
    assert await broker.enqueue(m) == m.id
    got = await broker.fetch(["default"], 10, timeout_s=2)
    assert [(d.id, d.body, d.queue, d.deliveries) for d in got] == [(m.id, m.body, "default", 1)]
    await broker.ack(got)
    assert await broker.fetch(["default"], 10, timeout_s=0.2) == []


async def test_higher_priority_first_fifo_within(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    low1, high, low2 = msg(priority=1), msg(priority=9), msg(priority=1)
    for m in (low1, high, low2):
        await broker.enqueue(m)
    seen = []
    while len(seen) < 3:
        got = await broker.fetch(["default"], 1, timeout_s=2)
        assert got, "message missing"
        seen.append(got[0].id)
        await broker.ack(got)
    assert seen == [high.id, low1.id, low2.id]


async def test_priority_then_the_order_of_the_queues_then_arrival(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    # Arrival order differs from both the queue order and the priority order: b1, a1, b5, a2.
    b1, a1, b5, a2 = msg("b", priority=1), msg("a", priority=1), msg("b", priority=5), msg("a", priority=1)
    for m in (b1, a1, b5, a2):
        await broker.enqueue(m)
    seen = []
    while len(seen) < 4:
        got = await broker.fetch(["a", "b"], 1, timeout_s=2)
        assert got, "message missing"
        seen.append(got[0].id)
        await broker.ack(got)
    # b's priority 5 beats the queue order; at priority 1 queue a before b, FIFO within a.
    assert seen == [b5.id, a1.id, a2.id, b1.id]


#: Well under every broker's safety poll (sqlite re-reads each second without a wake-up), so a
#: fetch that was not woken by the enqueue cannot pass for one that was.
WOKEN_WITHIN_S = 0.5


async def test_fetch_waits_and_wakes_on_enqueue(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    m = msg()
    fetching = asyncio.create_task(broker.fetch(["default"], 1, timeout_s=5))
    await asyncio.sleep(0.1)  # let the fetch start waiting; the wake-up is what is tested
    assert not fetching.done()
    started = time.monotonic()
    await broker.enqueue(m)
    got = await fetching
    assert [d.id for d in got] == [m.id]
    assert time.monotonic() - started < WOKEN_WITHIN_S


async def test_eta_hides_until_due(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    due = time.time() + 1.0
    later, now = msg(eta=due, priority=9), msg()
    await broker.enqueue(later)
    await broker.enqueue(now)
    # Neither its priority nor its place puts the delayed message before its time, nor does it
    # hold back the ready one behind it.
    assert [d.id for d in await broker.fetch(["default"], 10, timeout_s=2)] == [now.id]
    assert await broker.fetch(["default"], 1, timeout_s=0.3) == []
    assert (await broker.stats()).scheduled == 1
    got = await broker.fetch(["default"], 1, timeout_s=3)
    assert [d.id for d in got] == [later.id]
    assert time.time() >= due - 0.01  # not early (the slack is for brokers that round to ms)


async def test_due_within_sees_a_scheduled_message_that_comes_due_soon(backends: tuple[Broker, Store], kind: str) -> None:
    broker, _ = backends
    await broker.enqueue(msg("images", eta=time.time() + 60))
    assert not await broker.due_within(["images"], 1.0)
    soon = msg("images", eta=time.time() + 0.5)
    await broker.enqueue(soon)
    assert await broker.due_within(["images"], 1.0)
    assert await broker.due_within(["default", "images"], 1.0)
    assert not await broker.due_within(["images"], 0.1)
    if kind != "amqp":  # RabbitMQ's delay levels are shared by the namespace's queues
        assert not await broker.due_within(["default"], 1.0)
    [got] = await broker.fetch(["images"], 1, timeout_s=3)
    assert got.id == soon.id
    assert not await broker.due_within(["images"], 1.0)  # leased now: not waiting any more


async def test_a_lease_that_runs_out_is_delivered_again(backends: tuple[Broker, Store], kind: str) -> None:
    broker, _ = backends
    if kind == "amqp":
        pytest.skip("RabbitMQ redelivers when the consumer's connection closes, tested in test_amqp")
    broker.lease_s = SHORT_LEASE_S
    m = msg()
    await broker.enqueue(m)
    leased_at = time.monotonic()
    [first] = await broker.fetch(["default"], 1, timeout_s=2)
    assert first.deliveries == 1
    # Not while the lease holds...
    assert await broker.fetch(["default"], 10, timeout_s=SHORT_LEASE_S / 2) == []
    # ... and then the waiting claim takes it back by itself when it runs out, once, as it was.
    again = await broker.fetch(["default"], 10, timeout_s=3)
    assert SHORT_LEASE_S - 0.05 <= time.monotonic() - leased_at < SHORT_LEASE_S * 1.25
    assert [(d.id, d.body, d.deliveries) for d in again] == [(m.id, m.body, 2)]
    stats = await broker.stats()
    assert (stats.running, stats.queued.get("default", 0)) == (1, 0)
    # The new lease is a whole one: it is not handed out a third time at once.
    assert await broker.fetch(["default"], 1, timeout_s=0.1) == []


@pytest.mark.parametrize("late", ["ack", "requeue", "extend", "dead_letter"])
async def test_only_the_current_lease_holder_settles_a_message(backends: tuple[Broker, Store], kind: str, late: str) -> None:
    broker, _ = backends
    if kind == "amqp":
        pytest.skip(NO_LEASES)
    # Given a message whose first lease ran out, held now by a second claim
    broker.lease_s = SHORT_LEASE_S
    m = msg(key="held")
    await broker.enqueue(m)
    [first] = await broker.fetch(["default"], 1, timeout_s=2)
    [second] = await broker.fetch(["default"], 1, timeout_s=SHORT_LEASE_S + 3)
    second_leased_at = time.monotonic()
    assert (second.id, second.deliveries) == (m.id, first.deliveries + 1)
    # When the first holder, unaware, settles it half way through the second lease
    await asyncio.sleep(SHORT_LEASE_S / 2)
    if late == "ack":
        await broker.ack([first])
    elif late == "requeue":
        await broker.requeue(first, b"late attempt")
    elif late == "extend":
        # ... and the extend says the lease is lost, so the worker settles nothing of it
        assert await broker.extend([first]) == [first]
    else:
        await broker.dead_letter(first, "late")
    # Then nothing changed: the second holds the message and its key...
    assert await broker.fetch(["default"], 1, timeout_s=0.1) == []
    assert await broker.enqueue(msg(key="held")) == m.id
    assert await broker.dead_letters() == []
    # ... until its own lease runs out (an extend would have moved that half a lease later),
    # when the message comes again as it was.
    [third] = await broker.fetch(["default"], 1, timeout_s=SHORT_LEASE_S)
    assert time.monotonic() - second_leased_at < SHORT_LEASE_S * 1.25
    assert (third.id, third.body, third.deliveries) == (m.id, m.body, second.deliveries + 1)
    # The holder's ack still works.
    await broker.ack([third])
    stats = await broker.stats()
    assert (stats.running, stats.scheduled, stats.queued.get("default", 0)) == (0, 0, 0)
    fresh = msg(key="held")
    assert await broker.enqueue(fresh) == fresh.id


async def test_extend_keeps_the_lease(backends: tuple[Broker, Store], kind: str) -> None:
    broker, _ = backends
    if kind == "amqp":
        pytest.skip(NO_LEASES)
    # Four extensions of 0.3 s outlast the 0.6 s lease: without them the message comes back
    # (test_a_lease_that_runs_out_is_delivered_again).
    broker.lease_s = 0.6
    await broker.enqueue(msg())
    got = await broker.fetch(["default"], 1, timeout_s=2)
    for _ in range(4):
        await asyncio.sleep(0.3)
        assert await broker.extend(got) == []
    assert await broker.fetch(["default"], 1, timeout_s=0.1) == []
    await broker.ack(got)


async def test_requeue_with_new_body_and_delay(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    m = msg()
    await broker.enqueue(m)
    [d] = await broker.fetch(["default"], 1, timeout_s=2)
    await broker.requeue(d, b"attempt-2", delay_s=0.5)
    assert await broker.fetch(["default"], 1, timeout_s=0.2) == []
    [again] = await broker.fetch(["default"], 1, timeout_s=3)
    assert again.id == m.id and again.body == b"attempt-2"


async def test_dedup_key_held_until_ack(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    first, second = msg(key="k1"), msg(key="k1")
    assert await broker.enqueue(first) == first.id
    assert await broker.enqueue(second) == first.id
    [d] = await broker.fetch(["default"], 10, timeout_s=2)
    assert await broker.enqueue(msg(key="k1")) == first.id  # still running
    await broker.ack([d])
    third = msg(key="k1")
    assert await broker.enqueue(third) == third.id


@pytest.mark.parametrize("settle", ["ack", "dead_letter"])
async def test_dedup_key_held_through_requeues_until_ack_or_dead_letter(backends: tuple[Broker, Store], settle: str) -> None:
    broker, _ = backends
    m = msg(key="k")
    assert await broker.enqueue(m) == m.id
    [d] = await broker.fetch(["default"], 1, timeout_s=2)
    await broker.requeue(d, b"attempt-2")
    assert await broker.enqueue(msg(key="k")) == m.id  # ready again
    [d] = await broker.fetch(["default"], 1, timeout_s=2)
    await broker.requeue(d, b"attempt-3", delay_s=0.3)
    assert await broker.enqueue(msg(key="k")) == m.id  # delayed
    [d] = await broker.fetch(["default"], 1, timeout_s=3)
    assert (d.id, d.body) == (m.id, b"attempt-3")
    assert await broker.enqueue(msg(key="k")) == m.id  # leased
    if settle == "ack":
        await broker.ack([d])
    else:
        await broker.dead_letter(d, "gave up")
    after = msg(key="k")
    assert await broker.enqueue(after) == after.id
    [d] = await broker.fetch(["default"], 10, timeout_s=2)
    assert d.id == after.id


async def test_dead_letters_keep_body_and_reason_and_replay(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    m = msg()
    await broker.enqueue(m)
    [d] = await broker.fetch(["default"], 1, timeout_s=2)
    await broker.dead_letter(d, "malformed: bad magic")
    [dead] = await broker.dead_letters()
    assert (dead.id, dead.body, dead.reason, dead.queue) == (m.id, m.body, "malformed: bad magic", "default")
    assert (await broker.stats()).dead == 1
    replayed = await broker.replay([m.id])
    assert [r.id for r in replayed] == [m.id]
    assert await broker.dead_letters() == []


async def test_dead_letters_keep_the_exact_bytes_and_the_reason(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    body = b"\x00\xff\xfe not utf-8 \x80\x00"
    reason = "undecodable: invalid start byte 0xff at 1 \u2014 kept as received"
    m = msg(body=body)
    await broker.enqueue(m)
    [d] = await broker.fetch(["default"], 1, timeout_s=2)
    assert d.body == body
    await broker.dead_letter(d, reason)
    [dead] = await broker.dead_letters()
    assert (dead.id, dead.queue, dead.body, dead.reason) == (m.id, "default", body, reason)
    [replayed] = await broker.replay()
    assert (replayed.body, replayed.reason) == (body, reason)


async def test_cancel_removes_a_queued_message(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    m = msg()
    await broker.enqueue(m)
    assert await broker.cancel(m.id) is True
    assert await broker.fetch(["default"], 1, timeout_s=0.3) == []


async def test_purge_and_stats(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    for _ in range(3):
        await broker.enqueue(msg(queue="images"))
    await broker.enqueue(msg(queue="default"))
    stats = await broker.stats()
    assert stats.queued.get("images") == 3 and stats.queued.get("default") == 1
    assert await broker.purge("images") == 3
    assert (await broker.stats()).queued.get("images", 0) == 0


async def test_queues_are_isolated(backends: tuple[Broker, Store]) -> None:
    broker, _ = backends
    await broker.enqueue(msg(queue="a"))
    assert await broker.fetch(["b"], 1, timeout_s=0.2) == []
    assert len(await broker.fetch(["b", "a"], 1, timeout_s=2)) == 1


async def test_namespaces_are_isolated(kind: str, tmp_path: Path, backends: tuple[Broker, Store]) -> None:
    broker, store = backends
    broker_url, results_url = urls_for(kind, tmp_path)
    if kind == "memory":
        broker_url = broker.url.raw
    other = await open_backends(parse_url(broker_url), parse_url(results_url or broker_url), broker.namespace + "x")
    try:
        await broker.enqueue(msg())
        await store.put_states([("t1", b"mine")])
        assert await other.broker.fetch(["default"], 1, timeout_s=0.3) == []
        assert await other.store.get_state("t1") is None
    finally:
        await other.broker.flush_namespace()
        await other.close()


async def test_states_round_trip_and_watch_wakes(backends: tuple[Broker, Store]) -> None:
    _, store = backends
    assert await store.get_states(["a", "b"]) == [None, None]
    async with store.watch(["a"]) as watch:
        assert await watch.wait(0.1) is False
        await store.put_states([("a", b"state-1")])
        assert await watch.wait(2) is True
    assert await store.get_states(["a", "b"]) == [b"state-1", None]


async def test_put_states_if_absent_keeps_a_state_already_stored(backends: tuple[Broker, Store]) -> None:
    _, store = backends
    await store.put_states([("finished", b"succeeded")], ttl_s=60, final={"finished"})
    async with store.watch(["new"]) as watch:
        await store.put_states_if_absent([("finished", b"queued"), ("new", b"queued")], ttl_s=60)
        assert await watch.wait(2) is True
    assert await store.get_states(["finished", "new"]) == [b"succeeded", b"queued"]
    # An expired state counts as absent.
    await store.put_states([("old", b"succeeded")], ttl_s=0.2)
    await asyncio.sleep(0.4)  # the TTL itself is what is tested
    await store.put_states_if_absent([("old", b"queued")])
    assert await store.get_states(["old"]) == [b"queued"]


async def test_pubsub_reaches_every_subscriber(backends: tuple[Broker, Store]) -> None:
    _, store = backends
    async with store.subscribe("news") as sub1, store.subscribe("news") as sub2:
        await store.publish("news", b"one")
        await store.publish("news", b"two")
        got1 = [await asyncio.wait_for(sub1.__anext__(), 2) for _ in range(2)]
        got2 = [await asyncio.wait_for(sub2.__anext__(), 2) for _ in range(2)]
    assert got1 == got2 == [b"one", b"two"]


async def test_key_value_primitives(backends: tuple[Broker, Store]) -> None:
    _, store = backends
    assert await store.set_if_absent("lock", b"1", ttl_s=5) is True
    assert await store.set_if_absent("lock", b"2", ttl_s=5) is False
    assert await store.get_value("lock") == b"1"
    await store.delete_value("lock")
    assert await store.get_value("lock") is None
    assert await store.incr("n") == 1
    assert await store.incr("n", 5) == 6
    assert await store.set_if_absent("short", b"x", ttl_s=0.2) is True
    await asyncio.sleep(0.4)  # the TTL itself is what is tested
    assert await store.set_if_absent("short", b"y", ttl_s=5) is True


async def test_set_many_if_absent_stores_the_free_keys_and_reads_the_held_ones(backends: tuple[Broker, Store]) -> None:
    _, store = backends
    assert await store.set_many_if_absent([]) == []
    assert await store.set_if_absent("held", b"old") is True
    got = await store.set_many_if_absent([("free", b"a"), ("held", b"b"), ("free", b"c")], ttl_s=5)
    # The second "free" finds the value the first one stored a moment before.
    assert got == [None, b"old", b"a"]
    assert await store.get_value("free") == b"a"
    assert await store.get_value("held") == b"old"
    assert await store.set_many_if_absent([("short", b"x")], ttl_s=0.2) == [None]
    await asyncio.sleep(0.4)  # the TTL itself is what is tested
    assert await store.set_many_if_absent([("short", b"y")]) == [None]


async def test_states_and_keys_are_stored_together(backends: tuple[Broker, Store]) -> None:
    _, store = backends
    assert await store.set_if_absent("held", b"revoked") is True
    async with store.watch(["done"]) as watch:
        got = await store.put_states_and_set_many_if_absent(
            [("done", b"succeeded")], 60, {"done"}, [("free", b"leased"), ("held", b"leased")], 60
        )
        assert await watch.wait(2) is True
    assert got == [None, b"revoked"]
    assert await store.get_states(["done"]) == [b"succeeded"]
    assert [await store.get_value(k) for k in ("free", "held")] == [b"leased", b"revoked"]
    # Nothing to set: the states alone.
    assert await store.put_states_and_set_many_if_absent([("other", b"failed")], None, (), []) == []
    assert await store.get_states(["other"]) == [b"failed"]


async def test_first_state_is_stored_with_the_message(backends: tuple[Broker, Store]) -> None:
    broker, store = backends
    if not broker.writes_initial_state:
        pytest.skip(f"{type(broker).__name__} leaves the first state to the app")
    first = OutgoingMessage(id="with-state", queue="default", body=b"b", key="k", state=b"queued", state_ttl_s=60)
    loser = OutgoingMessage(id="loser", queue="default", body=b"b", key="k", state=b"queued")
    assert await broker.enqueue(first) == "with-state"
    assert await broker.enqueue(loser) == "with-state"
    assert await store.get_states(["with-state", "loser"]) == [b"queued", None]


async def test_an_extend_after_the_lease_ran_out_keeps_a_message_nobody_took(backends: tuple[Broker, Store], kind: str) -> None:
    broker, _ = backends
    if kind == "amqp":
        pytest.skip(NO_LEASES)
    # Given a lease that ran out while its holder was slow (a stalled loop), nobody else fetching
    broker.lease_s = SHORT_LEASE_S
    await broker.enqueue(msg())
    got = await broker.fetch(["default"], 1, timeout_s=2)
    await asyncio.sleep(SHORT_LEASE_S * 1.5)
    # When the holder's late heartbeat comes, it keeps the message: it is not reported lost,
    # and no other fetch gets it while the renewed lease lasts
    assert await broker.extend(got) == []
    assert await broker.fetch(["default"], 1, timeout_s=SHORT_LEASE_S / 2) == []


async def test_stats_age_the_oldest_ready_message_of_each_queue(backends: tuple[Broker, Store], kind: str) -> None:
    broker, _ = backends
    if kind == "amqp":
        pytest.skip("RabbitMQ does not tell a queue's message ages over AMQP: oldest_age_s stays empty")
    # Given a low-priority message that has waited, a newer high-priority one that would run
    # first, and a delayed one (not ready, so not aged)
    await broker.enqueue(msg("aging", priority=0))
    await asyncio.sleep(0.3)  # the age itself is what is tested
    await broker.enqueue(msg("aging", priority=9))
    await broker.enqueue(msg("aging", eta=time.time() + 60))
    await broker.enqueue(msg("other"))
    first = await broker.stats()
    # The age is the oldest message's, whatever its priority, and it grows while it waits.
    assert first.queued["aging"] == 2
    assert 0.25 <= first.oldest_age_s["aging"] < 5
    assert first.oldest_age_s["other"] < first.oldest_age_s["aging"]
    await asyncio.sleep(0.2)
    assert (await broker.stats()).oldest_age_s["aging"] >= first.oldest_age_s["aging"] + 0.15
    # Once nothing in it is ready, the queue has no age (the delayed message waits still).
    got = await broker.fetch(["aging"], 10, timeout_s=2)
    assert len(got) == 2
    await broker.ack(got)
    emptied = await broker.stats()
    assert "aging" not in emptied.oldest_age_s and "aging" not in emptied.queued
    assert emptied.scheduled == 1 and "other" in emptied.oldest_age_s
