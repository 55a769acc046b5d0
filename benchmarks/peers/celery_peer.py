"""Celery: Redis or RabbitMQ broker, the Redis result backend."""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from benchmarks.peers.base import QUEUE, Peer, Settings, count, timed

settings = Settings.from_env()
app = Celery("peersbench", broker=settings.broker_url, backend=settings.redis_url)
app.conf.update(task_default_queue=QUEUE, broker_connection_retry_on_startup=True)


@app.task
def incr(n: int) -> int:
    return count(n)


@app.task
def echo(x: int) -> int:
    return x


class CeleryPeer(Peer):
    name = "celery"
    pool = "prefork, -c 2"
    waiter = "delay().get(), Redis result backend (pub/sub)"

    def worker_argv(self, bindir: Path) -> list[str]:
        # Gossip, mingle and heartbeats only talk to other workers; there are none here.
        return [
            str(bindir / "celery"), "-A", f"{__name__}:app", "worker", "-c", "2", "-P", "prefork", "-Q", QUEUE,
            "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]

    def reset(self) -> None:
        if self.settings.amqp:
            self._delete_queue()

    def enqueue(self, count: int, n: int) -> None:
        for _ in range(count):
            incr.delay(n)

    def round_trips(self, count: int) -> list[float]:
        def one(i: int) -> None:
            if echo.delay(i).get(timeout=30) != i:
                raise AssertionError("echo returned something else")

        return timed(one, count)

    def cleanup(self) -> None:
        if self.settings.amqp:
            self._delete_queue()

    def close(self) -> None:
        app.close()

    def _delete_queue(self) -> None:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(QUEUE)


PEER = CeleryPeer
