"""The worker registry: every running worker keeps a record in its result store, renewed by its
heartbeat and removed on a clean exit, so that `Offload.workers()`, `offload status` and
`offload ping` see the live workers of a namespace.

A record lives for ``heartbeat_timeout`` seconds after its last renewal: a worker killed with
SIGKILL, or frozen (SIGSTOP, a lost network), drops out of the list on its own. The leases of the
messages it held run for that same time (see `offload.brokers.base.DEFAULT_HEARTBEAT_TIMEOUT_S`),
so its tasks go back to their queue within it too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from offload.brokers.base import Store

log = logging.getLogger("offload.worker")


def offload_version() -> str:
    try:
        return metadata.version("offload")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "0+unknown"


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One live worker, as its last heartbeat described it."""

    id: str
    hostname: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    pool: str
    #: The ids of the tasks it holds (running, or leased and about to run).
    running: tuple[str, ...]
    started_at: dt.datetime
    last_seen: dt.datetime
    version: str

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["queues"], fields["running"] = list(self.queues), list(self.running)
        fields["started_at"], fields["last_seen"] = self.started_at.isoformat(), self.last_seen.isoformat()
        return fields

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> WorkerInfo:
        return cls(
            id=str(fields["id"]), hostname=str(fields["hostname"]), pid=int(fields["pid"]),
            queues=tuple(fields["queues"]), concurrency=int(fields["concurrency"]), pool=str(fields["pool"]),
            running=tuple(fields["running"]), started_at=dt.datetime.fromisoformat(fields["started_at"]),
            last_seen=dt.datetime.fromisoformat(fields["last_seen"]), version=str(fields["version"]),
        )


def new_worker_id() -> str:
    """Host, pid and a random part: readable in a log, unique across restarts of a pid."""
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


class Registration:
    """A worker's own record: `beat` writes it (with the tasks held now), `leave` removes it."""

    def __init__(self, store: Store, *, queues: Sequence[str], concurrency: int, pool: str, timeout_s: float) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.id = new_worker_id()
        self._fixed = {
            "id": self.id, "hostname": socket.gethostname(), "pid": os.getpid(), "queues": list(queues),
            "concurrency": concurrency, "pool": pool, "started_at": dt.datetime.now(dt.UTC).isoformat(),
            "version": offload_version(),
        }

    async def beat(self, running: Sequence[str]) -> None:
        record = {**self._fixed, "running": list(running), "last_seen": dt.datetime.now(dt.UTC).isoformat()}
        await self.store.put_worker(self.id, json.dumps(record).encode(), self.timeout_s)

    async def leave(self) -> None:
        await self.store.drop_worker(self.id)


async def live_workers(store: Store) -> list[WorkerInfo]:
    """The namespace's live workers, longest running first. A record that does not decode (a
    worker of an incompatible version) is left out, with a warning."""
    found = []
    for raw in await store.workers():
        try:
            found.append(WorkerInfo.from_json(json.loads(raw)))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("a worker record that does not decode was left out (%s)", e)
    return sorted(found, key=lambda w: (w.started_at, w.id))


def consuming(workers: Sequence[WorkerInfo], queue: str | None) -> list[WorkerInfo]:
    """The workers that consume ``queue`` (all of them when None)."""
    return [w for w in workers if queue is None or queue in w.queues]
