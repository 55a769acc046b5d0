"""The fastest round trip RabbitMQ and Redis allow from Python, with and without what offload
promises: a floor for `delay().get()` on ``amqp://`` with ``results=redis://``, written with no
task system at all.

    python benchmarks/amqp_round_trip_floor.py           # amqp://guest:guest@127.0.0.1:5672/, redis db 0
    python benchmarks/amqp_round_trip_floor.py --rounds 6 -n 1000

A caller (this process) and a worker (a process of its own, one thread, py-amqp and redis-py,
prefetch 4) do the least a round trip needs: the caller publishes a persistent message (the task
id is its message id) and waits for the result with BLMOVE on a done list; the worker takes the message,
runs ``echo``, stores the result (state and done list, one script, as offload's store does) and
acks. Then the same with each of offload's promises added in turn:

1. ``plain``: a plain durable queue, nothing else (Dramatiq's default does this much);
2. ``+ priorities``: the queue has ``x-max-priority=10`` (the issue asks for native priorities);
3. ``+ confirm``: the caller waits for the publisher confirm before it waits for the result (the
   issue: a `delay()` that returns has reached the broker);
4. ``+ QUEUED``: the caller stores the task's QUEUED state while the confirm is on its way
   (API.md: status and the gateway know a task the moment `delay()` returns);
5. ``+ claim``: the worker claims the task with SET NX before running it (API.md: a cancelled
   queued task never runs).

The variants run in turn, round after round, so that the machine's drift weighs on each alike;
each figure is the median over rounds of the round trip's median. The last variant also runs
as the ``floor`` row of `benchmarks/peers.py --brokers amqp`, in turn with offload and Dramatiq:
what offload adds to the floor is its own cost; what the floor adds to Dramatiq is the promises'.
Queues are named ``offload-floor-*`` and deleted, keys ``offload-floor:*`` expire in a minute.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp
import redis

if __package__ in (None, ""):  # run as a script: the checkout is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.amqp_floor import _connect

TTL_MS = 60_000
# The result store's outcome script, reduced to what a waiter needs: the state and the done
# list it blocks on (offload's also publishes the change and handles retries).
STORE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
"""


@dataclass(frozen=True)
class Variant:
    label: str
    priorities: bool = False
    confirm: bool = False
    queued: bool = False
    claim: bool = False

    def arguments(self) -> dict[str, Any]:
        return {"x-max-priority": 10} if self.priorities else {}


VARIANTS = [
    Variant("plain"),
    Variant("+ priorities", priorities=True),
    Variant("+ confirm", priorities=True, confirm=True),
    Variant("+ QUEUED", priorities=True, confirm=True, queued=True),
    Variant("+ claim", priorities=True, confirm=True, queued=True, claim=True),
]


def echo(body: bytes) -> bytes:
    return body


#: The variant with every promise: what `benchmarks/peers.py` runs as its ``floor`` row.
EVERY_PROMISE = VARIANTS[-1]


def work(url: str, redis_url: str, queue: str, variant: Variant, ready: Any, run: Callable[[bytes], bytes] = echo) -> None:
    """The worker: take a message, (claim,) run, store, ack; until it is killed. The task id
    is the message id; ``run`` turns the body into the result."""
    client = redis.Redis.from_url(redis_url)
    store = client.register_script(STORE)
    connection = _connect(url)
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, auto_delete=False, arguments=variant.arguments())
    channel.basic_qos(0, 4, False)

    def on_message(message: amqp.Message) -> None:
        task_id = message.properties["message_id"]
        claimed = not variant.claim or client.set(f"offload-floor:claim:{task_id}", b"1", nx=True, px=TTL_MS)
        if claimed:
            result = run(message.body)
            store(keys=[f"offload-floor:state:{task_id}", f"offload-floor:done:{task_id}"], args=[result, TTL_MS])
        channel.basic_ack(message.delivery_tag)

    channel.basic_consume(queue, callback=on_message)
    if ready is not None:
        ready.set()
    while True:
        connection.drain_events(timeout=60)


class Caller:
    """The caller's side of ``variant`` on one connection: `send` publishes (and waits as the
    variant says), `wait` blocks until the worker has stored the result."""

    def __init__(self, url: str, redis_url: str, queue: str, variant: Variant) -> None:
        self.queue, self.variant = queue, variant
        self.client = redis.Redis.from_url(redis_url)
        self.connection = _connect(url)
        self.channel = self.connection.channel()
        self.declare_queue()
        if variant.confirm:
            self.channel.confirm_select()

    def declare_queue(self) -> None:
        self.channel.queue_declare(self.queue, durable=True, auto_delete=False, arguments=self.variant.arguments())

    def send(self, body: bytes) -> str:
        task_id = uuid.uuid4().hex
        message = amqp.Message(body, delivery_mode=2, priority=0, message_id=task_id)
        self.channel.basic_publish(message, exchange="", routing_key=self.queue)
        if self.variant.queued:
            self.client.set(f"offload-floor:state:{task_id}", b"queued", nx=True, px=TTL_MS)
        if self.variant.confirm:
            self.channel.wait([amqp.spec.Basic.Ack, amqp.spec.Basic.Nack])
        return task_id

    def wait(self, task_id: str, timeout_s: float = 10) -> None:
        done = f"offload-floor:done:{task_id}"
        if self.client.blmove(done, done, timeout_s, "LEFT", "LEFT") is None:
            raise TimeoutError(f"no result for {task_id} ({self.variant.label})")

    def delete_queue(self) -> None:
        self.channel.queue_delete(self.queue)

    def close(self) -> None:
        self.connection.close()
        self.client.close()


def round_trips(url: str, redis_url: str, variant: Variant, n: int) -> float:
    """Median ms of ``n`` round trips (after 20 for warm-up) with a fresh worker and queue."""
    queue = f"offload-floor-{uuid.uuid4().hex[:8]}"
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    caller = Caller(url, redis_url, queue, variant)
    worker = context.Process(target=work, args=(url, redis_url, queue, variant, ready))
    worker.start()
    try:
        if not ready.wait(30):
            raise TimeoutError("the worker process did not start")
        took: list[float] = []
        for i in range(n + 20):
            started = time.perf_counter()
            caller.wait(caller.send(b"echo"))
            if i >= 20:
                took.append((time.perf_counter() - started) * 1000)
        return statistics.median(took)
    finally:
        worker.kill()  # it holds nothing unacked between round trips; its keys expire
        worker.join(10)
        caller.delete_queue()
        caller.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("-n", type=int, default=500, help="round trips per variant and round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    medians: dict[str, list[float]] = {v.label: [] for v in VARIANTS}
    for round_no in range(1, args.rounds + 1):
        for variant in VARIANTS:
            medians[variant.label].append(round_trips(args.url, args.redis, variant, args.n))
        print(f"round {round_no}: " + "  ".join(f"{label} {m[-1]:.3f}" for label, m in medians.items()), flush=True)
    print(f"\nround trip p50 in ms, median over {args.rounds} rounds of {args.n}:")
    previous = None
    for label, values in medians.items():
        median = statistics.median(values)
        added = "" if previous is None else f"  ({median - previous:+.3f})"
        print(f"  {label:14} {median:6.3f}{added}")
        previous = median


if __name__ == "__main__":
    main()
