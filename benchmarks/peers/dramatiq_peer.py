"""Dramatiq: Redis or RabbitMQ broker, the Results middleware with its Redis backend."""

from __future__ import annotations

import os
from pathlib import Path

import dramatiq
from dramatiq.broker import Broker
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from benchmarks.peers.base import QUEUE, Peer, Settings, count, timed

settings = Settings.from_env()
broker: Broker
if settings.amqp:
    confirm = os.environ.get("PEERS_DRAMATIQ_CONFIRM") == "1"  # set by dramatiq_confirms_peer
    broker = RabbitmqBroker(url=settings.broker_url, confirm_delivery=confirm)
else:
    broker = RedisBroker(url=settings.broker_url)
broker.add_middleware(Results(backend=RedisBackend(url=settings.redis_url)))
dramatiq.set_broker(broker)


# store_results on both actors: every other library stores every task's result too.
@dramatiq.actor(queue_name=QUEUE, store_results=True)
def incr(n: int) -> int:
    return count(n)


@dramatiq.actor(queue_name=QUEUE, store_results=True)
def echo(x: int) -> int:
    return x


class DramatiqPeer(Peer):
    name = "dramatiq"
    pool = "--processes 1 --threads 2"
    waiter = "message.get_result(block=True) (Redis BLPOP)"

    def worker_argv(self, bindir: Path) -> list[str]:
        return [str(bindir / "dramatiq"), __name__, "--processes", "1", "--threads", "2", "--queues", QUEUE]

    def reset(self) -> None:
        broker.flush_all()

    def enqueue(self, count: int, n: int) -> None:
        for _ in range(count):
            incr.send(n)

    def round_trips(self, count: int) -> list[float]:
        def one(i: int) -> None:
            if echo.send(i).get_result(block=True, timeout=30_000) != i:
                raise AssertionError("echo returned something else")

        return timed(one, count)

    def cleanup(self) -> None:
        if isinstance(broker, RabbitmqBroker):
            # Dramatiq declares a delay queue and a dead-letter queue beside each queue.
            for name in (QUEUE, f"{QUEUE}.DQ", f"{QUEUE}.XQ"):
                broker.channel.queue_delete(name)

    def close(self) -> None:
        broker.close()


PEER = DramatiqPeer
