"""Redis-specific behaviour, against the real server: dropped connections, unreachable servers,
racing consumers, and watches shared over one pub/sub connection.

The behaviour every broker shares is in test_protocol.py; these tests cover what only a
networked, multi-client backend can get wrong.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.resources
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, get_args

import pytest
import redis.asyncio as aioredis  # only to act on the server from outside, like an operator would

from offload import Offload
from offload.brokers import make_broker, make_store
from offload.brokers import redis as redis_backend
from offload.brokers.base import Broker, Delivery, OutgoingMessage, Store
from offload.brokers.redis import connection as redis_connection
from offload.brokers.redis.scripts import LIBRARIES, ScriptName
from offload.config import parse_url
from offload.errors import BrokerUnavailable
from offload.result import Status, TaskState, wait_states
from tests.conftest import REDIS_URL, require_server
from tests.support import flush_namespace


@pytest.fixture
def url() -> str:
    require_server("redis")
    return f"{REDIS_URL}?visibility_timeout=3"


@pytest.fixture
async def admin(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def opened_broker(url: str, namespace: str) -> AsyncIterator[Broker]:
    broker = make_broker(parse_url(url), namespace)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.flush_namespace()
        await broker.close()


@asynccontextmanager
async def opened_store(url: str, namespace: str) -> AsyncIterator[Store]:
    store = make_store(parse_url(url), namespace)
    await store.connect()
    try:
        yield store
    finally:
        await store.flush_namespace()
        await store.close()


def msg(queue: str = "default", priority: int = 0) -> OutgoingMessage:
    mid = uuid.uuid4().hex
    return OutgoingMessage(id=mid, queue=queue, body=b"body-" + mid.encode(), priority=priority)


async def kill(admin: aioredis.Redis, namespace: str, kind: str) -> int:
    """CLIENT KILL TYPE <kind>, narrowed to this test's connections (named after the namespace),
    so other clients of a shared server are left alone. Returns how many were cut."""
    clients = await admin.client_list(_type=kind)
    ids = [c["id"] for c in clients if c.get("name") == f"offload:{namespace}"]
    async with admin.pipeline(transaction=True) as pipe:  # all at once, like one CLIENT KILL
        for client_id in ids:
            pipe.execute_command("CLIENT", "KILL", "ID", client_id)
        await pipe.execute()
    return len(ids)


async def test_killed_connections_lose_nothing(url: str, namespace: str, admin: aioredis.Redis) -> None:
    total = 300
    sent: list[str] = []
    received: collections.Counter[str] = collections.Counter()
    reached = [asyncio.Event(), asyncio.Event()]
    killed = [asyncio.Event(), asyncio.Event()]
    kills: list[int] = []

    async with opened_broker(url, namespace) as producer, opened_broker(url, namespace) as consumer:

        async def produce() -> None:
            for i in range(total):
                m = msg()
                await producer.enqueue(m)
                sent.append(m.id)
                for step, at in enumerate((total // 3, 2 * total // 3)):
                    if i == at:
                        reached[step].set()
                        await killed[step].wait()  # continue only on connections that were cut

        async def consume() -> None:
            while len(received) < total:
                got = await consumer.fetch(["default"], 10, timeout_s=0.5)
                received.update(d.id for d in got)
                await consumer.ack(got)

        async def cut() -> None:
            for step in range(2):
                await reached[step].wait()
                kills.append(await kill(admin, namespace, "normal"))
                killed[step].set()

        # When the producer and the consumer are working, every normal connection is cut twice.
        await asyncio.wait_for(asyncio.gather(produce(), consume(), cut()), 30)

    # Then both carried on, every message arrived, and none was handed out twice.
    assert all(k > 0 for k in kills), kills
    assert len(sent) == total
    assert set(received) == set(sent)
    assert max(received.values()) == 1


async def test_dropped_pubsub_connection_resubscribes(url: str, namespace: str, admin: aioredis.Redis) -> None:
    loop = asyncio.get_running_loop()
    async with (
        opened_broker(url, namespace) as broker,
        opened_store(url, namespace) as store,
        store.subscribe("news") as news,
    ):
        # Given both pub/sub connections open (a fetch that waits opens the broker's)
        assert await broker.fetch(["default"], 1, timeout_s=0.01) == []
        fetching = asyncio.create_task(broker.fetch(["default"], 1, timeout_s=20))
        assert await kill(admin, namespace, "pubsub") == 2

        # A waiting fetch still wakes up (long before its 20 s timeout)...
        m = msg()
        await broker.enqueue(m)
        got = await asyncio.wait_for(fetching, 5)
        assert [d.id for d in got] == [m.id]

        # ...and the channel is subscribed again: a message published now arrives. Pub/sub
        # keeps no history, so publish until the new subscription is in place. One read is
        # awaited throughout: cancelling a read would close the subscription's generator.
        deadline = loop.time() + 5
        arrived = asyncio.ensure_future(news.__anext__())
        while True:
            await store.publish("news", b"after")
            done, _ = await asyncio.wait({arrived}, timeout=0.2)
            if done:
                assert arrived.result() == b"after"
                break
            assert loop.time() < deadline, "the subscription was not restored"


class Proxy:
    """A TCP relay to the Redis server that can be cut (every connection dropped, new ones
    refused) and restored, to take the server away from a client without touching the server."""

    def __init__(self) -> None:
        self.up = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._relays: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        self._writers.add(writer)
        try:
            await self._relay(reader, writer)
        finally:
            self._relays.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = parse_url(REDIS_URL)
        if not self.up:
            return
        up_reader, up_writer = await asyncio.open_connection(target.host, target.port)
        self._writers.add(up_writer)
        if not self.up:  # cut while connecting upstream
            up_writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.discard(up_writer)

    def cut(self) -> None:
        self.up = False
        for w in list(self._writers):
            w.close()

    async def close(self) -> None:
        self.cut()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.mark.slow
async def test_a_server_gone_for_long_gives_broker_unavailable_then_recovers(
    url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = Proxy()
    await proxy.start()
    behind = f"redis://127.0.0.1:{proxy.port}/0?visibility_timeout=3"
    try:
        async with opened_broker(behind, namespace) as broker, opened_broker(url, namespace) as direct:
            # Given a fetch waiting (its claim found nothing) on a broker reached through the proxy
            claimed = asyncio.Event()
            claim_once = broker._claim_once  # type: ignore[attr-defined]

            async def claim_and_tell(*args: object, **kwargs: object) -> object:
                result = await claim_once(*args, **kwargs)
                claimed.set()
                return result

            monkeypatch.setattr(broker, "_claim_once", claim_and_tell)
            waiting = asyncio.create_task(broker.fetch(["default"], 1, timeout_s=30))
            await asyncio.wait_for(claimed.wait(), 5)

            # While the server is unreachable, an operation fails after its retries, in bounded
            # time, with the offload error (not a socket error)
            proxy.cut()
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{proxy.port}"):
                await broker.enqueue(msg())
            assert time.monotonic() - started < 15

            # When it is back, the same broker object works again, and the fetch that was
            # waiting all along receives what is enqueued now
            proxy.up = True
            m = msg()
            await direct.enqueue(m)
            got = await asyncio.wait_for(waiting, 10)
            assert [d.id for d in got] == [m.id]
            await broker.ack(got)
            again = msg()
            assert await broker.enqueue(again) == again.id
    finally:
        await proxy.close()


async def test_unreachable_port_fails_fast_with_the_password_masked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = parse_url("redis://admin:s3cret-pw@127.0.0.1:1/0")
    for backend in (make_broker(url, "unreachable"), make_store(url, "unreachable")):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as info:
            await backend.connect()
        assert time.monotonic() - started < 5
        shown = "".join(traceback.format_exception(info.value))
        assert "s3cret-pw" not in shown
        assert "redis://admin:***@127.0.0.1:1/0" in str(info.value)
        await backend.close()
    assert "s3cret-pw" not in caplog.text


async def test_a_server_that_never_answers_is_an_error_not_a_hang() -> None:
    # Given a socket that accepts connections and never replies
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        broker = make_broker(parse_url(f"redis://u:pw-never-shown@127.0.0.1:{port}/0"), "mute")
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as info:
            await broker.connect()
        assert time.monotonic() - started < 6
        assert "pw-never-shown" not in "".join(traceback.format_exception(info.value))
        await broker.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_racing_consumers_never_share_a_message(url: str, namespace: str) -> None:
    total = 500
    async with (
        opened_broker(url, namespace) as producer,
        opened_broker(url, namespace) as first,
        opened_broker(url, namespace) as second,
    ):
        ids: set[str] = set()
        for _ in range(total):
            m = msg(priority=len(ids) % 3)
            ids.add(m.id)
            await producer.enqueue(m)
        seen: collections.Counter[str] = collections.Counter()
        per_consumer: dict[str, int] = {"first": 0, "second": 0}

        async def drain(name: str, broker: Broker, limit: int) -> None:
            while sum(seen.values()) < total:
                got = await broker.fetch(["default"], limit, timeout_s=0.2)
                seen.update(d.id for d in got)
                per_consumer[name] += len(got)
                await broker.ack(got)

        await asyncio.wait_for(asyncio.gather(drain("first", first, 7), drain("second", second, 3)), 30)

    assert set(seen) == ids
    assert max(seen.values()) == 1
    assert per_consumer["first"] > 0 and per_consumer["second"] > 0


async def test_watch_is_woken_by_another_store_object(url: str, namespace: str) -> None:
    async with opened_store(url, namespace) as web, opened_store(url, namespace) as worker:
        async with web.watch(["t1"]) as watch:
            assert await watch.wait(0.05) is False
            await worker.put_states([("t1", b"done")])
            assert await watch.wait(2) is True
        assert await web.get_state("t1") == b"done"


async def test_many_watchers_share_one_connection(url: str, namespace: str, admin: aioredis.Redis) -> None:
    ids = [f"task-{i}" for i in range(1000)]
    async with opened_store(url, namespace) as web, opened_store(url, namespace) as worker:

        async def wait_for_one(task_id: str, entered: asyncio.Event, all_entered: asyncio.Event) -> bool:
            async with web.watch([task_id]) as watch:
                entered.set()
                await all_entered.wait()
                return await watch.wait(5)

        entered = [asyncio.Event() for _ in ids]
        all_entered = asyncio.Event()
        waiters = [asyncio.create_task(wait_for_one(t, e, all_entered)) for t, e in zip(ids, entered, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in entered)), 10)

        clients = await admin.client_list(_type="pubsub")
        mine = [c for c in clients if c.get("name") == f"offload:{namespace}"]
        assert len(mine) == 1

        all_entered.set()
        await worker.put_states([(t, b"done") for t in ids], ttl_s=30)
        assert await asyncio.wait_for(asyncio.gather(*waiters), 10) == [True] * len(ids)


async def test_watches_coming_and_going_never_miss_a_change(url: str, namespace: str) -> None:
    # Each watcher re-enters a watch on its own task many times (its channel is unsubscribed and
    # subscribed again in quick succession) while all share one "shared" channel; a change made
    # after entering must wake the watch every time.
    async with opened_store(url, namespace) as web, opened_store(url, namespace) as worker:

        async def watcher(i: int) -> None:
            for j in range(20):
                async with web.watch(["shared", f"task-{i}"]) as watch:
                    await worker.put_states([(f"task-{i}", b"%d" % j)])
                    assert await watch.wait(2), f"watcher {i} missed change {j}"

        await asyncio.wait_for(asyncio.gather(*(watcher(i) for i in range(50))), 30)


async def test_a_final_state_comes_with_its_change_signal(url: str, namespace: str) -> None:
    async with opened_store(url, namespace) as web, opened_store(url, namespace) as worker, web.watch(["t1", "t2"]) as watch:
        await worker.put_states([("t1", b"started")])
        assert await watch.wait(2) is True
        assert watch.final_state("t1") is None  # not final: a waiter reads it
        await worker.put_states([("t1", b"succeeded"), ("t2", b"started")], final={"t1"})
        assert await watch.wait(2) is True
        assert (watch.final_state("t1"), watch.final_state("t2")) == (b"succeeded", None)


async def test_an_async_waiter_takes_the_final_state_from_the_signal_not_a_read(
    url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Offload(url, namespace=namespace)
    try:
        task_id = uuid.uuid4().hex
        queued = TaskState(id=task_id, name="t", status=Status.QUEUED)
        await app._write_states([queued])
        store = await app._store()
        reads: list[list[str]] = []
        first_read = asyncio.Event()
        original = store.get_states

        async def read(task_ids: list[str]) -> list[bytes | None]:
            reads.append(list(task_ids))
            states = await original(task_ids)
            first_read.set()
            return states

        monkeypatch.setattr(store, "get_states", read)
        waiting = asyncio.create_task(wait_states(app, [task_id], timeout=10))
        await asyncio.wait_for(first_read.wait(), 10)  # its first read: the task is still queued
        async with opened_store(url, namespace) as worker:
            done = TaskState(id=task_id, name="t", status=Status.SUCCEEDED, result=42)
            await worker.put_states([(task_id, app.encode_state(done))], final={task_id})
        [state] = await asyncio.wait_for(waiting, 10)
        assert (state.status, state.result) == (Status.SUCCEEDED, 42)
        assert reads == [[task_id]]
    finally:
        await flush_namespace(app)
        await app.aclose()


def counted(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> collections.Counter[str]:
    """Count the calls of the coroutine method ``name`` of ``target`` (an object or a class)."""
    calls: collections.Counter[str] = collections.Counter()
    original = getattr(target, name)

    async def counting(*args: object, **kwargs: object) -> object:
        calls[name] += 1
        return await original(*args, **kwargs)

    monkeypatch.setattr(target, name, counting)
    return calls


async def test_an_idle_fetch_does_not_poll(url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with opened_broker(url, namespace) as broker:
        calls = counted(monkeypatch, broker, "_claim_once")
        assert await broker.fetch(["default"], 1, timeout_s=1.0) == []
        assert calls["_claim_once"] <= 2  # one on entry, one when the wait ends


async def test_equal_priorities_follow_the_order_of_the_queues(url: str, namespace: str) -> None:
    async with opened_broker(url, namespace) as broker:
        b1, a1, b_high = msg("b"), msg("a"), msg("b", priority=5)
        for m in (b1, a1, b_high):
            await broker.enqueue(m)
        got = await broker.fetch(["a", "b"], 3, timeout_s=2)
        assert [d.id for d in got] == [b_high.id, a1.id, b1.id]


async def test_a_retried_claim_returns_the_same_leases(url: str, namespace: str) -> None:
    # A fetch whose reply is lost on a dropped connection is sent again by the client's retry,
    # with the same token; it must not strand the leases the first call took.
    async with opened_broker(url, namespace) as broker:
        for _ in range(3):
            await broker.enqueue(msg())
        claim = broker._claim_once  # type: ignore[attr-defined]
        first, _ = await claim(["default"], 2, "token-1")
        again, _ = await claim(["default"], 2, "token-1")
        assert [(d.id, d.deliveries) for d in again] == [(d.id, d.deliveries) for d in first]
        rest, _ = await claim(["default"], 2, "token-2")
        assert len(rest) == 1 and rest[0].id not in {d.id for d in first}


async def test_a_worker_whose_lease_ran_out_cannot_requeue_the_new_holders_message(url: str, namespace: str) -> None:
    async with opened_broker(url, namespace) as slow, opened_broker(url, namespace) as other:
        slow.lease_s = 0.3
        await slow.enqueue(msg())
        [stale] = await slow.fetch(["default"], 1, timeout_s=2)
        [current] = await other.fetch(["default"], 1, timeout_s=3)  # after the lease runs out
        assert (current.id, current.deliveries) == (stale.id, stale.deliveries + 1)

        await slow.requeue(stale, b"from the stale holder")
        await slow.extend([stale])
        assert await other.fetch(["default"], 1, timeout_s=0.2) == []
        await other.requeue(current, b"attempt-2")
        [again] = await other.fetch(["default"], 1, timeout_s=2)
        assert again.body == b"attempt-2"
        await other.ack([again])


async def test_a_worker_whose_lease_ran_out_cannot_ack_the_new_holders_message(url: str, namespace: str) -> None:
    short = f"{REDIS_URL}?visibility_timeout=1"
    async with (
        opened_broker(short, namespace) as slow,
        opened_broker(short, namespace) as other,
        opened_store(short, namespace) as store,
    ):
        # Given two messages leased to a slow worker, whose leases ran out, and claimed again
        sent = [msg(), msg()]
        for m in sent:
            await slow.enqueue(m)
        stale = await slow.fetch(["default"], 2, timeout_s=2)
        current = await other.fetch(["default"], 2, timeout_s=3)  # once the leases ran out
        assert [(d.id, d.deliveries) for d in current] == [(d.id, d.deliveries + 1) for d in stale]

        # When the slow worker acknowledges them with its stale receipts, on both paths
        await slow.ack([stale[0]])
        assert slow.refills_with(store)
        assert await slow.store_and_ack(store, [], 60, (), [stale[1]]) == []

        # Then both stay leased to their new holder
        stats = await slow.stats()
        assert (stats.running, stats.queued) == (2, {})
        # whose own ack works
        await other.ack([current[0]])
        assert (await slow.stats()).running == 1
        # and the one it does not acknowledge comes back when its lease runs out
        [again] = await slow.fetch(["default"], 1, timeout_s=3)
        assert (again.id, again.deliveries) == (sent[1].id, current[1].deliveries + 1)
        await slow.ack([again])
        stats = await slow.stats()
        assert (stats.running, stats.queued, stats.scheduled) == (0, {}, 0)


async def test_delayed_messages_wait_outside_any_lease(url: str, namespace: str) -> None:
    async with opened_broker(url, namespace) as broker:
        later = OutgoingMessage(id=uuid.uuid4().hex, queue="default", body=b"x", eta=time.time() + 0.5)
        await broker.enqueue(later)
        stats = await broker.stats()
        assert (stats.scheduled, stats.running, stats.queued) == (1, 0, {})
        assert await broker.cancel(later.id) is True
        assert (await broker.stats()).scheduled == 0


async def test_ack_of_unknown_deliveries_is_harmless(url: str, namespace: str) -> None:
    async with opened_broker(url, namespace) as broker:
        await broker.ack([Delivery(id="never-enqueued", queue="default", body=b"")])
        assert (await broker.stats()).running == 0


async def _registered(admin: aioredis.Redis, namespace: str, queue: str = "default") -> None:
    """Until a fetch is registered as waiting on the queue (its claim found nothing)."""
    deadline = time.monotonic() + 5
    while not await admin.zcard(f"offload:{namespace}:waiters:{queue}"):
        assert time.monotonic() < deadline, "the fetch never registered as waiting"
        await asyncio.sleep(0.005)


async def test_a_blocked_fetch_is_handed_the_message_without_claiming(
    url: str, namespace: str, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with opened_broker(url, namespace) as consumer, opened_broker(url, namespace) as producer:
        calls = counted(monkeypatch, consumer, "_claim_once")
        fetching = asyncio.create_task(consumer.fetch(["default"], 2, timeout_s=5))
        await _registered(admin, namespace)
        m = msg()
        await producer.enqueue(m)
        [got] = await asyncio.wait_for(fetching, 5)
        assert (got.id, got.body, got.deliveries, calls["_claim_once"]) == (m.id, m.body, 1, 1)
        # It is leased like a claimed message: nobody else gets it, the ack settles it.
        assert await producer.fetch(["default"], 1, timeout_s=0) == []
        assert (await producer.stats()).running == 1
        await consumer.ack([got])
        assert (await producer.stats()).running == 0
        # The registration stands for as many messages as the fetch asked for (two): the next
        # one is handed over too, and the next fetch takes it without a claim.
        second = msg()
        await producer.enqueue(second)
        [got] = await consumer.fetch(["default"], 2, timeout_s=2)
        assert (got.id, calls["_claim_once"]) == (second.id, 1)
        await consumer.ack([got])
        # Then it is used up: the third waits in the queue for a claim.
        third = msg()
        await producer.enqueue(third)
        assert (await producer.stats()).queued == {"default": 1}
        [got] = await consumer.fetch(["default"], 2, timeout_s=2)
        assert (got.id, calls["_claim_once"]) == (third.id, 2)
        await consumer.ack([got])


async def test_a_hand_off_after_the_fetch_gave_up_goes_to_the_next_fetch_or_back_at_close(
    url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with opened_broker(url, namespace) as producer, opened_broker(url, namespace) as other:
        consumer = make_broker(parse_url(url), namespace)
        await consumer.connect()
        # A fetch that timed out stays registered for a moment; what it is handed then is kept.
        assert await consumer.fetch(["default"], 1, timeout_s=0.05) == []
        first = msg()
        await producer.enqueue(first)
        [got] = await consumer.fetch(["default"], 1, timeout_s=2)
        assert got.id == first.id
        await consumer.ack([got])

        assert await consumer.fetch(["default"], 1, timeout_s=0.05) == []
        second = msg()
        await producer.enqueue(second)
        deadline = time.monotonic() + 5
        while (await producer.stats()).running != 1:  # handed to the consumer, not yet taken
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        await consumer.close()  # puts it back instead of leaving it to the lease
        [again] = await other.fetch(["default"], 1, timeout_s=2)
        assert (again.id, again.body) == (second.id, second.body)
        await other.ack([again])


async def test_a_hand_off_that_overtakes_the_claims_reply_counts_against_the_registration(
    url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The claim that registers a fetch as waiting replies on the command connection; a hand-off
    # to that registration comes on the pub/sub connection, and can arrive first when another
    # process enqueues at that moment. The registration must count it: here it stood for one
    # message, so the next message waits in the queue for a claim, which the next fetch makes.
    async with opened_broker(url, namespace) as consumer, opened_broker(url, namespace) as producer:
        assert isinstance(consumer, redis_backend.RedisBroker)
        first = msg()
        original = consumer._claim_once

        async def claim_then_race(*args: Any, **kwargs: Any) -> Any:
            reply = await original(*args, **kwargs)
            if not reply[0] and not hasattr(claim_then_race, "raced"):
                claim_then_race.raced = True  # type: ignore[attr-defined]
                # Enqueued after the claim registered the fetch, handed over, and delivered to
                # the consumer before it has read the claim's reply.
                await producer.enqueue(first)
                deadline = time.monotonic() + 5
                while not consumer._handed._items:
                    assert time.monotonic() < deadline, "the hand-off never arrived"
                    await asyncio.sleep(0.001)
            return reply

        monkeypatch.setattr(consumer, "_claim_once", claim_then_race)
        [got] = await consumer.fetch(["default"], 1, timeout_s=2)
        assert got.id == first.id
        second = msg()
        await producer.enqueue(second)
        assert (await producer.stats()).queued == {"default": 1}  # nobody is registered for it
        started = time.monotonic()
        [again] = await consumer.fetch(["default"], 1, timeout_s=0.5)
        assert again.id == second.id
        assert time.monotonic() - started < 0.4, "the fetch waited on a registration that was used up"
        await consumer.ack([got, again])


async def test_a_hand_off_nobody_receives_leaves_the_message_in_its_queue(
    url: str, namespace: str, admin: aioredis.Redis
) -> None:
    # A waiter whose connection is gone (its channel has no subscriber): the enqueue finds that
    # nobody received the message and queues it as usual, deliveries untouched.
    prefix = f"offload:{namespace}:"
    await admin.zadd(f"{prefix}waiters:default", {"gone": time.time() + 60})
    await admin.set(f"{prefix}waiting:gone", '[3, "' + prefix + 'hand:nobody", ["default"]]', px=60_000)
    async with opened_broker(url, namespace) as broker:
        m = msg()
        await broker.enqueue(m)
        assert (await broker.stats()).queued == {"default": 1}
        [got] = await broker.fetch(["default"], 1, timeout_s=0)
        assert (got.id, got.deliveries) == (m.id, 1)
        await broker.ack([got])


async def test_acks_can_bring_the_next_messages_in_the_same_round_trip(url: str, namespace: str) -> None:
    async with opened_broker(url, namespace) as broker, opened_store(url, namespace) as store:
        sent = [msg() for _ in range(5)]
        for m in sent:
            await broker.enqueue(m)
        first = await broker.fetch(["default"], 2, timeout_s=1)
        states = [(d.id, b"done " + d.id.encode()) for d in first]
        more = await broker.store_and_ack(store, states, 60, {d.id for d in first}, first, refill=(["default"], 2))
        # Stored and acknowledged first, then the next two leased, in queue order.
        assert await store.get_states([d.id for d in first]) == [s for _, s in states]
        assert [d.id for d in more] == [m.id for m in sent[2:4]]
        stats = await broker.stats()
        assert (stats.running, stats.queued) == (2, {"default": 1})
        # The rest, and then nothing: a refill never waits.
        last = await broker.store_and_ack(store, [], 60, (), more, refill=(["default"], 2))
        assert [d.id for d in last] == [sent[4].id]
        assert await broker.store_and_ack(store, [], 60, (), last, refill=(["default"], 2)) == []
        assert (await broker.stats()).running == 0


def test_a_busy_worker_takes_its_next_messages_with_its_acks(
    url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offload.brokers.redis import RedisBroker
    from tests.support import drain_then_close, enqueue_noops

    app = Offload(url, namespace=namespace)
    ids = enqueue_noops(app, 200)
    calls = counted(monkeypatch, RedisBroker, "fetch")  # every fetch, the worker's first included
    drain_then_close(app, ids, concurrency=2)
    fetches = calls["fetch"]
    # Claiming on its own, the fetch loop would need one fetch per two tasks (it claims once
    # half of its four places are free); the acks' refills take most of that over.
    assert fetches < len(ids) / 5, fetches


def test_a_worker_with_one_place_takes_each_next_message_with_the_ack_of_the_last(
    url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refill that rides with a batch's acks brings the next message, and never more than
    the worker's places: with -c 1 and no prefetch, one message leased at a time."""
    from offload.brokers.redis import RedisBroker
    from offload.worker.consumer import Worker
    from tests.support import drain_then_close, enqueue_noops

    app = Offload(url, namespace=namespace)
    ids = enqueue_noops(app, 50)
    brought: list[int] = []
    held: list[int] = []
    store_and_ack, start = RedisBroker.store_and_ack, Worker._start

    async def recording(self: RedisBroker, *args: Any, **kwargs: Any) -> list[Delivery]:
        got = await store_and_ack(self, *args, **kwargs)
        brought.append(len(got))
        return got

    def starting(self: Worker, deliveries: list[Delivery]) -> None:
        start(self, deliveries)
        held.append(len(self._held))

    monkeypatch.setattr(RedisBroker, "store_and_ack", recording)
    monkeypatch.setattr(Worker, "_start", starting)
    drain_then_close(app, ids, concurrency=1, prefetch=0)
    assert sum(brought) >= len(ids) - 2, brought  # every batch but the last brought the next
    assert max(held) == 1, held


async def test_a_script_the_server_forgot_is_loaded_again(url: str, namespace: str, admin: aioredis.Redis) -> None:
    async with opened_store(url, namespace) as store:
        await store.put_states([("a", b"one")])  # the script is loaded, the connection up
        await admin.script_flush()  # what a restarted server does to them
        await store.put_states([("b", b"two")])
        assert await store.get_states(["a", "b"]) == [b"one", b"two"]


async def test_a_connection_cut_between_scripts_is_replaced(url: str, namespace: str, admin: aioredis.Redis) -> None:
    async with opened_store(url, namespace) as store:
        await store.put_states([("a", b"one")])
        assert await kill(admin, namespace, "normal") >= 1
        await store.put_states([("b", b"two")])
        assert await store.get_states(["a", "b"]) == [b"one", b"two"]


async def test_a_script_given_up_on_leaves_no_reply_for_the_next_command(
    url: str, namespace: str, admin: aioredis.Redis
) -> None:
    async with opened_store(url, namespace) as store:
        await store.put_states([("a", b"one")])
        # The server holds scripts back (reads go on): the caller gives up before the reply.
        await admin.execute_command("CLIENT", "PAUSE", 300, "WRITE")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await store.put_states([("b", b"two")])
        # Had the connection stayed, this read would get the script's late reply.
        assert await store.get_states(["a"]) == [b"one"]


async def test_a_script_that_times_out_is_reported_not_sent_again(
    url: str, namespace: str, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with opened_store(url, namespace) as store:
        await store.put_states([("a", b"one")])
        monkeypatch.setattr(redis_connection, "OPERATION_TIMEOUT_S", 0.05)
        usual = counted(monkeypatch, redis_connection.Commands, "run")
        await admin.execute_command("CLIENT", "PAUSE", 300, "WRITE")
        with pytest.raises(BrokerUnavailable, match="timed out"):
            await store.put_states([("b", b"two")])
        assert usual["run"] == 0  # not handed to the usual path for another full timeout
        monkeypatch.undo()  # the clean-up below waits out the pause with the real timeout


def test_every_lua_file_is_a_script_or_a_library_of_one_and_says_what_it_takes() -> None:
    folder = importlib.resources.files("offload.brokers.redis").joinpath("lua")
    files = {e.name.removesuffix(".lua"): e.read_text() for e in folder.iterdir() if e.name.endswith(".lua")}
    scripts = set(get_args(ScriptName))
    assert set(LIBRARIES) == scripts
    assert set(files) == scripts | {lib for libs in LIBRARIES.values() for lib in libs}
    for name, text in files.items():
        assert text.startswith("-- "), f"{name}.lua opens without its header comment"
        if name in scripts and name not in ("incr", "set_many_if_absent"):
            assert "KEYS[1]: the namespace prefix" in text, name
