"""RabbitMQ-specific behaviour of the amqp broker, against the real server.

A memory:// store stands in for the results store: the broker only uses its key-value
primitives, and these tests are about RabbitMQ. Connections are closed from the server side with
``rabbitmqctl close_connection``, which is what ``close_all_connections`` does to each
connection, but only to this test's own connections, so other suites sharing the server are left
alone.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio

from offload import Offload
from offload.brokers import make_broker, make_store
from offload.brokers.amqp import AmqpBroker
from offload.brokers.amqp.acks import Acker, Ledger, Settled
from offload.brokers.amqp.records import Records
from offload.brokers.base import Delivery, OutgoingMessage, Verdict
from offload.config import parse_url
from offload.errors import BrokerError, BrokerUnavailable, ConfigError
from offload.result import Status, TaskState
from offload.task import Options
from tests.conftest import AMQP_URL, REDIS_URL, require_program, require_server
from tests.support import flush_namespace, free_port

MakeBroker = Callable[..., Awaitable[AmqpBroker]]


def msg(
    queue: str = "default", priority: int = 0, eta: float | None = None, expires: float | None = None
) -> OutgoingMessage:
    mid = uuid.uuid4().hex
    return OutgoingMessage(
        id=mid, queue=queue, body=b"body-" + mid.encode(), priority=priority, eta=eta, expires=expires
    )


@pytest.fixture
async def amqp(namespace: str) -> AsyncIterator[MakeBroker]:
    """Connected brokers on one namespace and one store; the namespace is flushed afterwards."""
    require_server("amqp")
    store = make_store(parse_url(f"memory://{namespace}"), namespace)
    await store.connect()
    made: list[AmqpBroker] = []

    async def make(url: str = AMQP_URL) -> AmqpBroker:
        broker = make_broker(parse_url(url), namespace)
        assert isinstance(broker, AmqpBroker)
        broker.bind_store(store)
        await broker.connect()
        made.append(broker)
        return broker

    try:
        yield make
    finally:
        # The others close first: a consumer still attached when its queue is deleted would
        # have aio-pika declare the queue again.
        for broker in made[1:]:
            await broker.close()
        if made:
            await made[0].flush_namespace()
            await made[0].close()
        await store.close()


async def rabbitmqctl(*args: str) -> str:
    program = require_program("rabbitmqctl", "Debian's rabbitmq-server package")
    proc = await asyncio.create_subprocess_exec(
        program, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if proc.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {err.decode()[-500:]}")
    return out.decode()


async def close_connections(prefix: str) -> int:
    """Have RabbitMQ force-close (CONNECTION_FORCED) every connection whose name starts with
    ``prefix``; returns how many it closed."""
    listing = await rabbitmqctl("list_connections", "pid", "client_properties", "-q")
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if f'{{"connection_name","{prefix}' in line]
    for pid in pids:
        await rabbitmqctl("close_connection", pid, "offload test: forced close")
    return len(pids)


async def test_forced_close_of_every_connection_loses_nothing(amqp: MakeBroker, namespace: str) -> None:
    producer, consumer = await amqp(), await amqp()
    sent: list[str] = []
    seen: set[str] = set()
    underway, closed = asyncio.Event(), asyncio.Event()

    async def produce() -> None:
        after_close = 0
        while after_close < 100:
            m = msg()
            await producer.enqueue(m)  # returns once RabbitMQ confirmed it
            sent.append(m.id)
            if len(sent) == 50:
                underway.set()
            if closed.is_set():
                after_close += 1
            await asyncio.sleep(0.002)  # a steady trickle, so the close lands mid-stream

    async def consume() -> None:
        while not producing.done() or not set(sent) <= seen:
            got = await consumer.fetch(["default"], 10, timeout_s=0.5)
            seen.update(d.id for d in got)
            await consumer.ack(got)

    # Given a producer and a consumer at work
    producing = asyncio.create_task(produce())
    consuming = asyncio.create_task(consume())
    await asyncio.wait_for(underway.wait(), 10)
    # When RabbitMQ closes all their connections
    assert await close_connections(f"offload {namespace} ") >= 2
    closed.set()
    # Then both carry on, and every confirmed message is consumed
    await asyncio.wait_for(producing, 60)
    await asyncio.wait_for(consuming, 60)
    assert set(sent) <= seen
    assert len(sent) >= 150


async def test_unacked_messages_go_to_another_consumer_when_the_connection_closes(
    amqp: MakeBroker,
) -> None:
    first, second = await amqp(), await amqp()
    m1, m2 = msg(), msg()
    await first.enqueue(m1)
    await first.enqueue(m2)
    taken = await first.fetch(["default"], 10, timeout_s=2)
    while len(taken) < 2:
        more = await first.fetch(["default"], 10, timeout_s=2)
        assert more, "message missing"
        taken += more
    assert {d.id for d in taken} == {m1.id, m2.id}
    assert await second.fetch(["default"], 10, timeout_s=0.1) == []  # consuming, nothing to get

    # When the first consumer's connection dies before it acks
    assert await close_connections(f"{first.client_name} consumer") == 1

    # Then RabbitMQ hands both messages to the second consumer, marked as delivered again
    again = await second.fetch(["default"], 10, timeout_s=10)
    while len(again) < 2:
        more = await second.fetch(["default"], 10, timeout_s=10)
        assert more, "message not redelivered"
        again += more
    assert {d.id for d in again} == {m1.id, m2.id}
    assert all(d.deliveries >= 2 for d in again)
    await first.ack(taken)  # too late: logged, not raised
    await second.ack(again)
    assert await second.fetch(["default"], 10, timeout_s=0.3) == []


async def test_a_redelivery_to_the_same_process_joins_the_running_task(amqp: MakeBroker) -> None:
    worker, other = await amqp(), await amqp()
    m = msg()
    await worker.enqueue(m)
    [running] = await worker.fetch(["default"], 1, timeout_s=2)
    old_receipt = running.receipt

    # When its connection is closed while the task runs, and the consumer reconnects alone
    assert await close_connections(f"{worker.client_name} consumer") == 1
    deadline = time.monotonic() + 15
    while running.receipt is old_receipt:
        assert time.monotonic() < deadline, "the message did not come back"
        # Then the redelivered copy is not handed out a second time
        assert await worker.fetch(["default"], 1, timeout_s=0.2) == []

    # And the running task's ack settles it for good
    await worker.ack([running])
    assert await other.fetch(["default"], 1, timeout_s=0.5) == []


async def test_an_unreachable_broker_fails_fast_without_showing_the_password(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    broker = make_broker(parse_url(f"amqp://guest:s3cret-pw@127.0.0.1:{free_port()}/?connect_timeout=1"), namespace)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        await broker.connect()
    assert time.monotonic() - started < 4
    assert "guest:***@127.0.0.1" in str(info.value)
    assert "s3cret-pw" not in str(info.value)
    assert "s3cret-pw" not in caplog.text


async def test_a_wrong_password_is_refused_at_once(namespace: str) -> None:
    require_server("amqp")
    url = AMQP_URL.replace("guest:guest@", "guest:wr0ng-pw@")
    broker = make_broker(parse_url(url), namespace)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        await broker.connect()
    assert time.monotonic() - started < 4
    assert "login refused" in str(info.value)
    assert "wr0ng-pw" not in str(info.value)


async def test_the_vhost_comes_from_the_path(amqp: MakeBroker, namespace: str) -> None:
    broker = await amqp(AMQP_URL.rstrip("/") + "/%2F")  # "/" spelled out
    await broker.enqueue(msg())
    assert len(await broker.fetch(["default"], 1, timeout_s=2)) == 1
    missing = make_broker(parse_url(AMQP_URL.rstrip("/") + f"/no-such-vhost-{namespace}?connect_timeout=1"), namespace)
    with pytest.raises(BrokerUnavailable, match="virtual host 'no-such-vhost-"):
        await missing.connect()


async def test_a_queue_declared_without_priorities_is_refused(amqp: MakeBroker, namespace: str) -> None:
    # aio-pika stands in for another application that declared the queue its own way.
    import aio_pika

    broker = await amqp()
    name = f"offload.{namespace}.legacy"
    conn = await aio_pika.connect(AMQP_URL)
    try:
        channel = await conn.channel()
        await channel.declare_queue(name, durable=True)
        with pytest.raises(BrokerError, match="x-max-priority") as info:
            await broker.enqueue(msg(queue="legacy"))
        assert name in str(info.value)
        with pytest.raises(BrokerError, match="x-max-priority"):
            await broker.fetch(["legacy"], 1, timeout_s=0.1)
        # The broker keeps working for its other queues
        m = msg()
        await broker.enqueue(m)
        assert [d.id for d in await broker.fetch(["default"], 1, timeout_s=2)] == [m.id]
    finally:
        await channel.queue_delete(name)
        await conn.close()


async def test_priorities_are_honoured(amqp: MakeBroker) -> None:
    broker = await amqp()
    # Given a backlog enqueued in mixed priority order
    backlog = [msg(priority=p) for p in (3, 0, 9, 5, 3, 7, 0, 9, 1, 5)]
    for m in backlog:
        await broker.enqueue(m)
    # When a worker takes them one at a time
    order = []
    for _ in backlog:
        got = await broker.fetch(["default"], 1, timeout_s=2)
        assert got, "message missing"
        order.append(got[0].id)
        await broker.ack(got)
    # Then the highest priority comes first, first in first out within a priority
    assert order == [m.id for m in sorted(backlog, key=lambda m: -m.priority)]


async def test_a_fetch_for_other_queues_gives_back_what_was_buffered(amqp: MakeBroker) -> None:
    worker, other = await amqp(AMQP_URL + "?prefetch=10"), await amqp()
    backlog = [msg(queue="a") for _ in range(3)]
    for m in backlog:
        await worker.enqueue(m)
    [running] = await worker.fetch(["a"], 1, timeout_s=2)  # the rest may sit in its buffer
    # When the worker turns to another queue
    assert await worker.fetch(["b"], 1, timeout_s=0.1) == []
    # Then what it held of "a" but had not handed out is free for others
    rest: list[str] = []
    while len(rest) < 2:
        got = await other.fetch(["a"], 10, timeout_s=5)
        assert got, "buffered messages were not given back"
        rest += [d.id for d in got]
        await other.ack(got)
    assert {running.id, *rest} == {m.id for m in backlog}
    await worker.ack([running])


async def test_a_delayed_message_is_not_visible_before_its_eta(amqp: MakeBroker) -> None:
    broker = await amqp()
    eta = time.time() + 1.5
    m = msg(eta=eta)
    await broker.enqueue(m)
    # Counted as scheduled while it waits (read well before its eta: near it, the message may
    # already be on its way to this process's buffer, where no count sees it)
    assert (await broker.stats()).scheduled == 1
    assert await broker.fetch(["default"], 1, timeout_s=eta - time.time() - 0.05) == []
    got = await broker.fetch(["default"], 1, timeout_s=5)
    arrived = time.time()
    assert [d.id for d in got] == [m.id]
    assert eta <= arrived < eta + 0.5  # the smallest delay level is 64 ms


async def test_a_retry_delay_holds_the_message_back(amqp: MakeBroker) -> None:
    broker = await amqp()
    await broker.enqueue(msg())
    [first] = await broker.fetch(["default"], 1, timeout_s=2)
    due = time.time() + 1.0
    await broker.requeue(first, b"attempt-2", delay_s=1.0)
    assert await broker.fetch(["default"], 1, timeout_s=due - time.time() - 0.05) == []
    [again] = await broker.fetch(["default"], 1, timeout_s=5)
    assert time.time() >= due
    assert (again.id, again.body, again.deliveries) == (first.id, b"attempt-2", 2)


async def test_cancel_is_true_only_before_the_message_is_handed_out(amqp: MakeBroker) -> None:
    broker = await amqp()
    scheduled, queued = msg(eta=time.time() + 0.5), msg()
    await broker.enqueue(scheduled)
    await broker.enqueue(queued)
    [running] = await broker.fetch(["default"], 1, timeout_s=2)
    assert running.id == queued.id
    assert await broker.cancel(queued.id) is False  # already running
    assert await broker.cancel(scheduled.id) is True
    # The cancelled message is dropped when it comes due
    assert await broker.fetch(["default"], 1, timeout_s=1.5) == []
    await broker.ack([running])
    assert (await broker.stats()).scheduled == 0


async def test_a_worker_gets_the_verdict_after_the_message(amqp: MakeBroker) -> None:
    broker = await amqp()
    broker.hands_out_early = True  # as the worker sets it
    revoked, kept = msg(), msg()
    await broker.enqueue(revoked)
    await broker.enqueue(kept)
    assert await broker.cancel(revoked.id) is True
    got = await broker.fetch(["default"], 2, timeout_s=2)
    assert all(d.admitted is not None for d in got)
    verdicts = {d.id: await d.admitted for d in got if d.admitted is not None}
    assert verdicts == {revoked.id: Verdict.REVOKED, kept.id: Verdict.RUN}
    assert await broker.cancel(kept.id) is False  # its claim is in: it runs
    await broker.ack(got)
    assert await broker.fetch(["default"], 2, timeout_s=0.2) == []


async def test_expiring_during_a_delay_ends_the_delay(amqp: MakeBroker) -> None:
    broker = await amqp()
    # Given a message due in a minute that expires much sooner
    expires = time.time() + 0.3
    m = msg(eta=time.time() + 60, expires=expires)
    await broker.enqueue(m)
    # Then it reaches a worker once expired, which records it as expired, not after a minute
    [d] = await broker.fetch(["default"], 1, timeout_s=5)
    assert d.id == m.id and time.time() >= expires
    await broker.ack([d])
    assert (await broker.stats()).scheduled == 0


async def test_another_process_sees_the_queues_and_purges_them(amqp: MakeBroker) -> None:
    web, cli = await amqp(), await amqp()
    for _ in range(3):
        await web.enqueue(msg(queue="images"))
    await web.enqueue(msg(queue="images", eta=time.time() + 60))
    await web.enqueue(msg(queue="default"))
    stats = await cli.stats()
    assert stats.queued == {"images": 3, "default": 1}
    assert stats.scheduled == 1
    assert await cli.purge("images") == 4
    stats = await cli.stats()
    assert stats.queued == {"default": 1} and stats.scheduled == 0


async def test_purge_releases_dedup_keys(amqp: MakeBroker) -> None:
    broker = await amqp()
    first = OutgoingMessage(id=uuid.uuid4().hex, queue="default", body=b"x", key="report")
    await broker.enqueue(first)
    assert await broker.purge("default") == 1
    second = OutgoingMessage(id=uuid.uuid4().hex, queue="default", body=b"y", key="report")
    assert await broker.enqueue(second) == second.id


async def test_dedup_keys_need_a_store(namespace: str) -> None:
    require_server("amqp")
    broker = make_broker(parse_url(AMQP_URL), namespace)
    await broker.connect()
    try:
        with pytest.raises(ConfigError, match="results="):
            await broker.enqueue(OutgoingMessage(id="a", queue="default", body=b"x", key="k"))
        assert await broker.cancel("a") is False
    finally:
        await broker.flush_namespace()
        await broker.close()


def test_amqp_cannot_be_the_result_store() -> None:
    with pytest.raises(ConfigError, match=r"add results='redis://localhost:6379/0'"):
        make_store(parse_url(AMQP_URL), "default")


async def test_what_another_process_deleted_is_declared_again(amqp: MakeBroker) -> None:
    broker, admin = await amqp(), await amqp()
    # Given a broker that has published to its queue, a delay level and the dead letters
    await broker.enqueue(msg())
    await broker.enqueue(msg(eta=time.time() + 60))
    [before] = await broker.fetch(["default"], 1, timeout_s=2)
    await broker.dead_letter(before, "before")
    # When another process flushes the namespace behind this broker's back
    await admin.flush_namespace()
    # Then enqueueing, delaying and dead-lettering declare what they need again
    m = msg()
    await broker.enqueue(m)
    await broker.enqueue(msg(eta=time.time() + 60))
    [d] = await broker.fetch(["default"], 1, timeout_s=2)
    assert d.id == m.id
    await broker.dead_letter(d, "boom")
    assert [x.reason for x in await broker.dead_letters()] == ["boom"]
    assert (await broker.stats()).scheduled == 1


async def test_consumers_start_again_after_their_channel_closes(amqp: MakeBroker) -> None:
    broker = await amqp()
    # Given a consumer at work
    first = msg()
    await broker.enqueue(first)
    assert [d.id for d in await broker.fetch(["default"], 1, timeout_s=5)] == [first.id]
    # When RabbitMQ closes its channel (here for an ack of a tag it never delivered)
    assert broker.consumer.channel is not None
    channel = await broker.consumer.channel.get_underlay_channel()
    await channel.basic_ack(999_999)
    # Then the channel is reopened and the consumer started again: the next message arrives
    second = msg()
    await broker.enqueue(second)
    assert [d.id for d in await broker.fetch(["default"], 1, timeout_s=15)] == [second.id]


async def test_cancel_releases_the_dedup_key(amqp: MakeBroker) -> None:
    broker = await amqp()
    first = OutgoingMessage(id=uuid.uuid4().hex, queue="default", body=b"x", key="nightly")
    await broker.enqueue(first)
    assert (
        await broker.enqueue(OutgoingMessage(id=uuid.uuid4().hex, queue="default", body=b"y", key="nightly"))
        == first.id
    )
    assert await broker.cancel(first.id) is True
    second = OutgoingMessage(id=uuid.uuid4().hex, queue="default", body=b"z", key="nightly")
    assert await broker.enqueue(second) == second.id
    [d] = await broker.fetch(["default"], 10, timeout_s=2)  # the cancelled one is dropped
    assert d.id == second.id


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:s3cret-pw@10.255.255.1:5672/?connect_timeout=1",  # nothing answers
        "amqps://guest:s3cret-pw@127.0.0.1:5672/?connect_timeout=1",  # TLS to a plain port
    ],
)
async def test_connect_never_hangs(url: str, namespace: str) -> None:
    if url.startswith("amqps"):
        require_server("amqp")
    broker = make_broker(parse_url(url), namespace)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        await broker.connect()
    assert time.monotonic() - started < 4
    assert "s3cret-pw" not in str(info.value)


async def test_a_batch_of_acks_settles_only_its_own_deliveries(amqp: MakeBroker) -> None:
    other, worker = await amqp(), await amqp()  # the first one flushes the namespace at the end
    backlog = [msg() for _ in range(5)]
    for m in backlog:
        await worker.enqueue(m)
    got: list[Delivery] = []
    while len(got) < 5:
        fetched = await worker.fetch(["default"], 5, timeout_s=2)
        assert fetched, "messages missing"
        got += fetched
    # One queue, one priority: handed out in delivery order, so in delivery-tag order
    first, second, held, fourth, fifth = got
    # When two batches are acked around a delivery still held
    await worker.ack([second, first])
    await worker.ack([fifth, fourth])
    # Then closing the worker's connection gives back the held one only
    await worker.close()
    again = await other.fetch(["default"], 5, timeout_s=5)
    assert [d.id for d in again] == [held.id]
    await other.ack(again)
    assert await other.fetch(["default"], 5, timeout_s=0.3) == []


class _FakeChannel:
    is_closed = False


class _FakeMessage:
    """What Acker uses of an incoming message; records the frames it would send."""

    def __init__(self, channel: _FakeChannel, tag: int, sent: list[tuple[str, int, bool]], fail: bool = False) -> None:
        self.channel, self.delivery_tag, self._sent, self._fail = channel, tag, sent, fail

    async def ack(self, multiple: bool = False) -> None:
        if self._fail:
            raise ConnectionError("connection lost")
        self._sent.append(("ack", self.delivery_tag, multiple))

    async def nack(self, requeue: bool = True) -> None:
        self._sent.append(("nack", self.delivery_tag, False))


def _fakes(count: int, fail: bool = False) -> tuple[list[Any], list[tuple[str, int, bool]]]:
    channel, sent = _FakeChannel(), list[tuple[str, int, bool]]()
    messages: list[Any] = [_FakeMessage(channel, tag, sent, fail) for tag in range(1, count + 1)]
    return messages, sent


async def test_acks_of_a_run_of_tags_go_out_as_one_multiple_ack() -> None:
    acker, (m1, m2, m3, m4, m5), sent = Acker(), *_fakes(5)
    for m in (m1, m2, m3, m4, m5):
        acker.track(m)
    # Tags 1-2 in one frame; 4 is not covered while 3 is held
    assert await acker.ack([m2, m1, m4]) == [Settled.ACKED] * 3
    assert sent == [("ack", 2, True), ("ack", 4, False)]
    sent.clear()
    # Once 3 goes, a frame naming 5 covers 3 and 5 (4 is settled already)
    assert await acker.ack([m5, m3]) == [Settled.ACKED] * 2
    assert sent == [("ack", 5, True)]
    sent.clear()
    # Settled deliveries send nothing again, acked or put back
    assert await acker.ack([m1, m5]) == [Settled.BEFORE] * 2
    await acker.give_back(m3)
    assert sent == []


async def test_an_unsettled_lower_tag_stops_the_multiple_ack() -> None:
    acker, (m1, m2, m3), sent = Acker(), *_fakes(3)
    acker.track(m2)
    # Tag 1 was delivered but is neither settled nor in the batch (say, its callback has not
    # run yet): a multiple ack would settle it behind its back
    assert await acker.ack([m2, m3]) == [Settled.ACKED] * 2
    assert sent == [("ack", 2, False), ("ack", 3, False)]
    sent.clear()
    await acker.give_back(m1)
    assert sent == [("nack", 1, False)]


async def test_a_batch_whose_frames_fail_is_reported_lost() -> None:
    acker, (m1, m2), _ = Acker(), *_fakes(2, fail=True)
    acker.track(m1)
    assert await acker.ack([m1, m2]) == [Settled.LOST] * 2


def test_the_ledger_stays_small_behind_a_long_held_delivery() -> None:
    ledger = Ledger()
    # Tag 1 is held (a long task) while the next hundred thousand are acked in order
    for tag in range(2, 100_002):
        ledger.settle(tag)
    assert not ledger.is_settled(1) and ledger.is_settled(2) and ledger.is_settled(100_001)
    assert len(ledger.runs) == 1
    assert ledger.multiple_upto({1}) == 1  # its own tag only: everything after it is settled
    ledger.settle(1)
    assert (ledger.floor, ledger.runs) == (100_001, [])
    # Out of order too: the gaps close into one run, then into the floor
    for tag in [*range(100_004, 100_100, 2), *range(100_003, 100_100, 2)]:
        ledger.settle(tag)
    assert ledger.runs == [[100_003, 100_099]]
    ledger.settle(100_002)
    assert (ledger.floor, ledger.runs) == (100_099, [])


def test_the_ledger_agrees_with_a_plain_set_of_settled_tags() -> None:
    rng = random.Random(7)
    ledger, settled = Ledger(), set[int]()
    for _ in range(3000):
        tag = rng.randint(1, 200)
        batch = {t for t in rng.sample(range(1, 201), 4) if t not in settled}
        below = [t for t in range(1, 202) if t not in settled and t not in batch]
        reach = min(below) - 1  # every tag up to here is settled or in the batch
        expected = max((t for t in batch if t <= reach), default=0)
        assert ledger.multiple_upto(batch) == expected
        ledger.settle(tag)
        settled.add(tag)
        assert all(ledger.is_settled(t) == (t in settled) for t in range(1, 202))


async def test_a_message_due_within_the_slack_is_not_handed_out_before_its_eta(amqp: MakeBroker) -> None:
    broker = await amqp()
    assert await broker.fetch(["default"], 1, timeout_s=0.01) == []  # the consumer runs
    for _ in range(10):
        # Due so soon that it goes straight to its queue, and reaches the consumer before its eta
        m = msg(eta=time.time() + 0.0019)
        await broker.enqueue(m)
        [d] = await broker.fetch(["default"], 1, timeout_s=2)
        assert d.id == m.id
        assert m.eta is not None and time.time() >= m.eta
        await broker.ack([d])


# -- the app on amqp: the message and its QUEUED state go out together -------------------------
async def test_the_queued_state_never_replaces_a_state_already_stored(namespace: str) -> None:
    """A worker can store a task's outcome before the QUEUED state written beside the publish
    lands: the outcome stays."""
    require_server("amqp")
    require_server("redis")
    app = Offload(AMQP_URL, namespace=namespace, results=REDIS_URL)
    try:
        env = app.build("tests.apps.basic.add", (1, 2), {}, Options(), task_id=uuid.uuid4().hex)
        finished = TaskState(id=env.id, name=env.name, status=Status.SUCCEEDED, result=3)
        await app._write_states([finished])
        result = await app.enqueue_envelope(env)
        assert (await result.astate()).status is Status.SUCCEEDED
        fresh = await app.enqueue_envelope(app.build("tests.apps.basic.add", (1, 2), {}, Options()))
        assert (await fresh.astate()).status is Status.QUEUED
        assert (await (await app._backends()).broker.stats()).queued == {"default": 2}
    finally:
        await flush_namespace(app)
        await app.aclose()


async def test_a_results_store_that_refuses_the_queued_state_is_reported_and_the_task_still_sent(
    namespace: str,
) -> None:
    require_server("amqp")
    require_server("redis")
    admin = redis.asyncio.Redis.from_url(REDIS_URL)
    user, password = f"offload-test-{namespace}", uuid.uuid4().hex
    # Everything but scripts: connecting and loading them work, storing a state does not.
    await admin.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
        commands=["+@all", "-evalsha", "-eval"],
    )  # fmt: skip
    results = REDIS_URL.replace("redis://", f"redis://{user}:{password}@", 1)
    app = Offload(AMQP_URL, namespace=namespace, results=results)
    try:
        with pytest.raises(BrokerError, match=r"no permissions to run the 'evalsha' command") as info:
            await app.enqueue_envelope(app.build("tests.apps.basic.add", (1, 2), {}, Options()))
        assert password not in str(info.value)
        assert any("was sent all the same" in note for note in getattr(info.value, "__notes__", []))
        assert (await (await app._backends()).broker.stats()).queued == {"default": 1}
    finally:
        await (await app._backends()).broker.flush_namespace()
        await app.aclose()
        await admin.acl_deluser(user)
        await admin.aclose()


# -- the prefetch window and the acks' refill -------------------------------------------------
async def _consumer_prefetch(queue_name: str) -> int:
    listing = await rabbitmqctl("list_consumers", "queue_name", "prefetch_count", "-q")
    counts = [int(line.split("\t")[1]) for line in listing.splitlines() if line.split("\t")[0] == queue_name]
    assert len(counts) == 1, listing
    return counts[0]


async def test_rabbitmq_pushes_twice_the_workers_places(amqp: MakeBroker, namespace: str) -> None:
    broker, tuned = await amqp(), await amqp(AMQP_URL + "?prefetch=10")
    assert await broker.fetch(["a"], 4, timeout_s=0.05) == []
    assert await tuned.fetch(["b"], 4, timeout_s=0.05) == []
    assert await _consumer_prefetch(f"offload.{namespace}.a") == 8
    assert await _consumer_prefetch(f"offload.{namespace}.b") == 10


async def _buffered(broker: AmqpBroker, count: int) -> None:
    deadline = time.monotonic() + 10
    while broker.local_ready(["default"]) < count:
        assert time.monotonic() < deadline, "RabbitMQ did not push the messages"
        await asyncio.sleep(0.01)


async def test_a_refill_hands_out_buffered_messages_claimed_beside_the_outcomes(amqp: MakeBroker) -> None:
    broker = await amqp(AMQP_URL + "?prefetch=10")  # a fetch of one: RabbitMQ pushes the rest too
    first, second, third = msg(), msg(), msg()
    for m in (first, second, third):
        await broker.enqueue(m)
    [running] = await broker.fetch(["default"], 1, timeout_s=2)
    assert running.id == first.id
    await _buffered(broker, 2)
    # Given a cancel that reaches the third before any claim
    assert await broker.cancel(third.id) is True
    store = broker.records.store
    assert store is not None
    # When the first one's outcome is stored with a refill
    refilled = await broker.store_and_ack(store, [(first.id, b"done")], 60, {first.id}, [running], (["default"], 4))
    # Then the second is handed out, claimed; the cancelled third is dropped, never handed out
    assert [d.id for d in refilled] == [second.id]
    assert await store.get_states([first.id]) == [b"done"]
    assert await store.get_value(f"amqp:claim:{second.id}") == b"leased"
    assert await broker.cancel(second.id) is False
    assert broker.local_ready(["default"]) == 0
    await broker.ack(refilled)
    stats = await broker.stats()
    assert (stats.queued, stats.running) == ({}, 0)


def test_a_busy_worker_claims_its_next_messages_with_its_outcomes(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_server("amqp")
    require_server("redis")
    from tests.support import drain_then_close, enqueue_noops

    app = Offload(AMQP_URL, namespace=namespace, results=REDIS_URL)
    ids = enqueue_noops(app, 200)
    claims: list[int] = []
    original = Records.claim

    async def counting(self: Records, message_ids: list[str]) -> list[bool]:
        if message_ids:
            claims.append(len(message_ids))
        return await original(self, message_ids)

    monkeypatch.setattr(Records, "claim", counting)
    drain_then_close(app, ids, concurrency=2)
    # Claiming on its own, the fetch loop claims one or two messages at a time (about 110
    # claims for 200 tasks); with the refill most ride along with the outcomes (10 to 25 claims
    # of its own here, under load too; up to 67 with a window of half again the places).
    assert len(claims) < len(ids) / 4, claims
