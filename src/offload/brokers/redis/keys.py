"""The keys and channels of a namespace. Every one lives under ``offload:<namespace>:``::

    m:<id>        hash: q (queue), b (body), s (ready score), d (deliveries), k (dedup key),
                  r (when it became or becomes ready, for the age of a queue's oldest)
    q:<queue>     sorted set of ready ids, scored (9 - priority) * 1e12 + sequence
    queues        set of queue names ever used (for stats)
    seq           arrival counter, for FIFO order within a priority
    sched         sorted set of ids waiting for their eta, scored by eta
    lease         sorted set of leased ids, scored by lease deadline
    key:<key>     dedup key -> id of the message holding it
    dead          sorted set of dead-letter ids, scored by time of death
    x:<id>        hash of a dead letter: q, b, r (reason), t (time)
    claim:<token> a fetch's result for a few seconds, so a retried fetch gets the same leases
    waiters:<q>   sorted set of fetch calls blocked on a queue, scored by when they stop waiting
    waiting:<w>   what an enqueue needs to hand a blocked fetch messages: lease, channel, queues, how many
    state:<id>    a task's encoded state (Store)
    kv:<key>      the Store's key-value space
    h:all         the history (Store.history): sorted set of listed task ids, scored by queued time;
                  h:s:<status>, h:n:<name>, h:q:<queue> the same per status, task name and queue,
                  h:meta hash id -> its listing, h:exp sorted set of ids by when their state expires
    workers       sorted set of live worker ids, scored by when their record runs out (ms)
    workers:rec   hash: worker id -> its registry record
    wake:<queue>  pub/sub channel: the queue got ready messages while a fetch was waiting on it
    hand:<uuid>   pub/sub channel of one broker object: messages handed to its blocked fetches
    done:<id>     list holding a task's final state for two minutes, for blocked sync waiters
    task:<id>     pub/sub channel: the state of that task changed (a final state comes with it)
    chan:<name>   pub/sub channel of `Store.publish`

The scripts build the keys they touch from the prefix they get as KEYS[1]; `Keys` names the
ones Python reads or subscribes to itself.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from redis.asyncio import Redis

__all__ = ["Keys", "unlink_prefix"]


@dataclass(frozen=True, slots=True)
class Keys:
    """The names of one namespace's keys and channels (channels as bytes, as pub/sub sees them)."""

    prefix: str

    @classmethod
    def of(cls, namespace: str) -> Keys:
        return cls(f"offload:{namespace}:")

    def state(self, task_id: str) -> str:
        return f"{self.prefix}state:{task_id}"

    def done(self, task_id: str) -> str:
        return f"{self.prefix}done:{task_id}"

    def value(self, key: str) -> str:
        return f"{self.prefix}kv:{key}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}workers"

    @property
    def worker_records(self) -> str:
        return f"{self.prefix}workers:rec"

    def channel(self, name: str) -> str:
        return f"{self.prefix}chan:{name}"

    def task_channel(self, task_id: str) -> bytes:
        return f"{self.prefix}task:{task_id}".encode()

    def wake_channel(self, queue: str) -> bytes:
        return f"{self.prefix}wake:{queue}".encode()

    def new_hand_channel(self) -> bytes:
        """A hand-off channel of its own for one broker object."""
        return f"{self.prefix}hand:{uuid.uuid4().hex}".encode()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def unlink_prefix(client: Redis, prefix: str) -> None:
    """Remove every key under ``prefix``, a batch at a time (UNLINK frees them off the server's
    main thread)."""
    batch: list[bytes] = []
    async for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await client.unlink(*batch)
            batch.clear()
    if batch:
        await client.unlink(*batch)
