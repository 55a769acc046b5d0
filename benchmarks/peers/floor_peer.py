"""No library at all: the least a task system on RabbitMQ with Redis results can do while keeping
offload's promises, as a row beside the libraries (RabbitMQ only; never counted as a peer).

The caller and worker of `benchmarks/amqp_round_trip_floor.py` with every promise: a persistent
message on a queue with native priorities, the caller's QUEUED state written while it waits for
the publisher confirm, the worker's claim before it runs the task, the result stored with one
script, then the ack. The worker is one thread (py-amqp and redis-py, prefetch 4) that runs each
task inline. Whatever a real task system keeping those promises does on top (decoding, routing,
a pool, retries, time limits, an event loop) can only add to this row's round trip.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.amqp_round_trip_floor import EVERY_PROMISE, Caller, work
from benchmarks.peers.base import QUEUE, Peer, Settings, count, timed


def run(body: bytes) -> bytes:
    """``incr <n>`` (the drain task) or ``echo <x>``: the result's bytes."""
    name, _, argument = body.partition(b" ")
    if name == b"incr":
        return str(count(int(argument))).encode()
    return argument


class FloorPeer(Peer):
    name = "floor"
    pool = "no library: one thread, py-amqp and redis-py, tasks run inline (prefetch 4)"
    waiter = "BLMOVE on the task's done list, after the publisher confirm"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._caller = Caller(settings.broker_url, settings.redis_url, QUEUE, EVERY_PROMISE)

    def worker_argv(self, bindir: Path) -> list[str]:
        return [sys.executable, "-m", __name__, "worker"]

    def reset(self) -> None:
        self._caller.delete_queue()  # and whatever an earlier run left in it
        self._caller.declare_queue()

    def enqueue(self, count: int, n: int) -> None:
        body = f"incr {n}".encode()
        for _ in range(count):
            self._caller.send(body)

    def round_trips(self, count: int) -> list[float]:
        def one(i: int) -> None:
            self._caller.wait(self._caller.send(f"echo {i}".encode()), timeout_s=30)

        return timed(one, count)

    def cleanup(self) -> None:
        self._caller.delete_queue()

    def close(self) -> None:
        self._caller.close()


PEER = FloorPeer

if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    settings = Settings.from_env()
    work(settings.broker_url, settings.redis_url, QUEUE, EVERY_PROMISE, None, run)
