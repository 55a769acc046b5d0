"""What RabbitMQ and its Python client cost before offload does anything: the floor under
offload's figures on amqp://.

    python benchmarks/amqp_floor.py                       # amqp://guest:guest@127.0.0.1:5672/
    python benchmarks/amqp_floor.py --url amqp://user:pw@host:5672/vhost -n 1000

1. Publish latency: one aio-pika publisher with confirms, one consumer waiting on the same
   queue (in this process, prefetch 4, acking each message): per message, the time until the
   broker's confirm and the time until the consumer has it, as medians. For a persistent and a
   transient message, on a classic queue with ``x-max-priority=10`` (what offload declares) and
   without it, and with classic queue storage version 2; then on offload's kind of queue with a
   py-amqp publisher in a thread of its own, as offload's sync `delay()` publishes.
2. Confirms across processes: a py-amqp publisher here and a py-amqp consumer in a process of
   its own, as a caller and a worker are. A persistent message, published with and without
   confirms (offload's `delay()` waits for one; Dramatiq's does not by default), on offload's
   queue kind and on a plain durable queue (Dramatiq's): the median time until the consumer has
   it, the variants interleaved over rounds so that the machine's drift weighs on each alike.
3. Consumer CPU: a queue filled with N messages shaped like offload's (headers, 300 bytes),
   then consumed and acked one by one through aio-pika's queue.consume and through aiormq's
   basic_consume directly: CPU microseconds per message of this process.

Each queue is named ``offload-floor-*`` and deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import statistics
import threading
import time
import urllib.parse
import uuid
from typing import Any

import aio_pika
import aiormq
import amqp

HEADERS = {"offload-id": "x" * 22, "offload-queue": "default", "offload-copy": "c" * 32, "offload-deliveries": 0}
BODY = b"x" * 300
KINDS: list[tuple[str, dict[str, Any]]] = [
    ("classic, x-max-priority=10", {"x-queue-type": "classic", "x-max-priority": 10}),
    ("classic, no priorities", {"x-queue-type": "classic"}),
    ("classic v2, x-max-priority=10", {"x-queue-type": "classic", "x-max-priority": 10, "x-queue-version": 2}),
]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def publish_latency(
    url: str, arguments: dict[str, Any], persistent: bool, n: int, client: str = "aio-pika"
) -> tuple[float, float]:
    """Medians in ms after the publish call: (confirm received, message at the consumer).
    ``client``: aio-pika on this loop, or py-amqp from a thread of its own (what offload's
    sync `delay()` uses)."""
    name = f"offload-floor-{uuid.uuid4().hex[:8]}"
    producer, consumer = await aio_pika.connect(url), await aio_pika.connect(url)
    try:
        publisher = await producer.channel(publisher_confirms=True)
        channel = await consumer.channel()
        await channel.set_qos(prefetch_count=4)
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        arrived: dict[str, float] = {}
        landed = threading.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived[message.message_id or ""] = time.perf_counter()
            landed.set()
            await message.ack()

        await queue.consume(on_message)
        if client == "py-amqp":
            sent = await asyncio.to_thread(_publish_from_thread, url, name, persistent, n, landed)
        else:
            sent = await _publish_on_loop(publisher, name, persistent, n, landed)
        confirms = [(confirmed - started) * 1000 for _, started, confirmed in sent]
        deliveries = [(arrived[i] - started) * 1000 for i, started, _ in sent]
        await queue.delete(if_unused=False, if_empty=False)
        return statistics.median(confirms), statistics.median(deliveries)
    finally:
        await producer.close()
        await consumer.close()


Sent = list[tuple[str, float, float]]  # message id, publish called, confirm back


async def _publish_on_loop(publisher: aio_pika.abc.AbstractChannel, name: str, persistent: bool, n: int, landed: threading.Event) -> Sent:
    mode = aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
    sent: Sent = []
    for i in range(n + 20):  # the first 20 warm up
        landed.clear()
        started = time.perf_counter()
        message = aio_pika.Message(BODY, headers=HEADERS, message_id=str(i), priority=0, delivery_mode=mode)
        await publisher.default_exchange.publish(message, name)
        confirmed = time.perf_counter()
        await asyncio.wait_for(asyncio.to_thread(landed.wait, 10), 11)
        if i >= 20:
            sent.append((str(i), started, confirmed))
    return sent


def _connect(url: str, *, confirm: bool = False) -> amqp.Connection:
    parts = urllib.parse.urlsplit(url)
    connection = amqp.Connection(
        f"{parts.hostname or 'localhost'}:{parts.port or 5672}", userid=urllib.parse.unquote(parts.username or "guest"),
        password=urllib.parse.unquote(parts.password or "guest"), virtual_host=urllib.parse.unquote(parts.path[1:]) or "/",
        confirm_publish=confirm,
    )
    connection.connect()
    return connection


def _publish_from_thread(url: str, name: str, persistent: bool, n: int, landed: threading.Event) -> Sent:
    connection = _connect(url, confirm=True)
    try:
        channel = connection.channel()
        sent: Sent = []
        for i in range(n + 20):
            landed.clear()
            started = time.perf_counter()
            message = amqp.Message(BODY, application_headers=HEADERS, message_id=str(i), priority=0, delivery_mode=2 if persistent else 1)
            channel.basic_publish(message, exchange="", routing_key=name, mandatory=True)
            confirmed = time.perf_counter()
            if not landed.wait(10):
                raise TimeoutError("the consumer did not get the message")
            if i >= 20:
                sent.append((str(i), started, confirmed))
        return sent
    finally:
        connection.close()


def _consume_elsewhere(url: str, name: str, arguments: dict[str, Any], n: int, ready: Any, lags: Any) -> None:
    """In a process of its own: consume ``n`` messages from ``name``; report each one's lag
    after the wall-clock time its publisher wrote into it."""
    connection = _connect(url)
    channel = connection.channel()
    channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
    channel.basic_qos(0, 4, False)
    got: list[float] = []

    def on_message(message: amqp.Message) -> None:
        got.append(time.time() - float(message.body))
        channel.basic_ack(message.delivery_tag)

    channel.basic_consume(name, callback=on_message)
    ready.set()
    while len(got) < n:
        connection.drain_events(timeout=10)
    lags.put(got)
    connection.close()


def delivery_across_processes(url: str, arguments: dict[str, Any], confirm: bool, n: int) -> float:
    """Median ms from the publish call to the consumer in another process having the message."""
    name = f"offload-floor-{uuid.uuid4().hex[:8]}"
    context = multiprocessing.get_context("spawn")
    ready, lags = context.Event(), context.Queue()
    consumer = context.Process(target=_consume_elsewhere, args=(url, name, arguments, n, ready, lags))
    consumer.start()
    try:
        if not ready.wait(30):
            raise TimeoutError("the consumer process did not start")
        connection = _connect(url)
        try:
            channel = connection.channel()
            if confirm:
                channel.confirm_select()
            for _ in range(n):
                message = amqp.Message(f"{time.time():.6f}".encode(), application_headers=HEADERS, delivery_mode=2)
                channel.basic_publish(message, exchange="", routing_key=name)
                if confirm:
                    channel.wait([amqp.spec.Basic.Ack, amqp.spec.Basic.Nack])
                time.sleep(0.002)  # a worker waiting for work, as in a round trip
            got: list[float] = lags.get(timeout=30)
            channel.queue_delete(name)
        finally:
            connection.close()
    finally:
        consumer.join(10)
    return statistics.median(got) * 1000


async def fill(url: str, name: str, arguments: dict[str, Any], n: int) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        await channel.declare_queue(name, durable=True, arguments=arguments)
        for i in range(n):
            message = aio_pika.Message(BODY, headers=HEADERS, message_id=str(i), delivery_mode=2)
            await channel.default_exchange.publish(message, name)
        # A last confirmed publish: everything before it has reached the queue.
        confirmed = await connection.channel(publisher_confirms=True)
        await confirmed.default_exchange.publish(aio_pika.Message(b"end", delivery_mode=2), name)
    finally:
        await connection.close()


async def consume_with_aio_pika(url: str, name: str, arguments: dict[str, Any], n: int) -> float:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=50)
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        done, count = asyncio.Event(), 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            count += 1
            await message.ack()
            if count == n + 1:
                done.set()

        started = cpu_s()
        await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), 300)
        return (cpu_s() - started) / (n + 1) * 1e6
    finally:
        await connection.close()


async def consume_with_aiormq(url: str, name: str, arguments: dict[str, Any], n: int) -> float:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=50)
        done, count = asyncio.Event(), 0

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal count
            count += 1
            await channel.basic_ack(message.delivery.delivery_tag)  # type: ignore[union-attr]
            if count == n + 1:
                done.set()

        started = cpu_s()
        await channel.basic_consume(name, on_message)
        await asyncio.wait_for(done.wait(), 300)
        return (cpu_s() - started) / (n + 1) * 1e6
    finally:
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("-n", type=int, default=500, help="messages per latency measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the cross-process comparison")
    parser.add_argument("--consume", type=int, default=20_000, help="messages per consumer measurement")
    args = parser.parse_args()

    print("publish with confirms, a consumer waiting (medians, ms after the publish call)")
    print(f"  {'queue':32} {'message':11} {'confirm':>8} {'delivery':>9}")
    for label, arguments in KINDS:
        for persistent in (True, False):
            confirm, delivery = await publish_latency(args.url, arguments, persistent, args.n)
            kind = "persistent" if persistent else "transient"
            print(f"  {label:32} {kind:11} {confirm:8.3f} {delivery:9.3f}")
    label, arguments = KINDS[0]
    print("the same from a thread of its own with py-amqp (offload's sync delay())")
    for persistent in (True, False):
        confirm, delivery = await publish_latency(args.url, arguments, persistent, args.n, client="py-amqp")
        kind = "persistent" if persistent else "transient"
        print(f"  {label:32} {kind:11} {confirm:8.3f} {delivery:9.3f}")

    print("\na persistent message from a py-amqp publisher to a consumer in another process (median ms until it has it)")
    variants = [(label, arguments, confirm) for label, arguments in KINDS[:2] for confirm in (True, False)]
    lags: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    for _ in range(args.rounds):
        for i, (_, arguments, confirm) in enumerate(variants):
            lags[i].append(await asyncio.to_thread(delivery_across_processes, args.url, arguments, confirm, args.n))
    for i, (label, _, confirm) in enumerate(variants):
        print(f"  {label:32} {'confirms' if confirm else 'no confirms':11} {statistics.median(lags[i]):9.3f}")

    print(f"\nconsuming {args.consume} messages, acked one by one (CPU of this process per message)")
    arguments = KINDS[0][1]
    for label, consume in (("aio-pika queue.consume", consume_with_aio_pika), ("aiormq basic_consume", consume_with_aiormq)):
        name = f"offload-floor-{uuid.uuid4().hex[:8]}"
        await fill(args.url, name, arguments, args.consume)
        per_message_us = await consume(args.url, name, arguments, args.consume)
        connection = await aiormq.connect(args.url)
        channel = await connection.channel()
        await channel.queue_delete(name)
        await connection.close()
        print(f"  {label:24} {per_message_us:6.0f} us")


if __name__ == "__main__":
    asyncio.run(main())
