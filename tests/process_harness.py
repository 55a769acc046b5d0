"""The conformance harness over the kinds whose workers are real processes (sqlite, redis,
amqp), for worker tests that need a real process: its log, its threads, its own app."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from offload.brokers.base import OutgoingMessage
from tests.conformance.conftest import Harness
from tests.conftest import require_server
from tests.support import OffloadProcess, start_worker

PROCESS_KINDS = ["sqlite", "redis", "amqp"]


@pytest.fixture(params=PROCESS_KINDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[Harness]:
    require_server(request.param)
    h = Harness(request.param, tmp_path, namespace)
    try:
        yield h
    finally:
        h.close()


def start_app_worker(harness: Harness, app: str, *args: str, extra_env: dict[str, str] | None = None) -> OffloadProcess:
    """A worker process serving ``app`` (module:attribute) on the harness's broker."""
    w = start_worker(harness.url, harness.namespace, "--log-level", "info", *args, results=harness.results, app=app,
                     extra_env=extra_env)
    harness.workers.append(w)
    return w


def inject(harness: Harness, body: bytes, message_id: str | None = None) -> str:
    """Put raw bytes on the default queue, as a sender that bypasses the codec would."""
    message_id = message_id or uuid.uuid4().hex

    async def put() -> None:
        broker = await harness.app._broker()
        await broker.enqueue(OutgoingMessage(id=message_id, queue="default", body=body))

    harness.app._portal.run(put())
    return message_id


def dead_reasons(harness: Harness) -> dict[str, str]:
    async def read() -> dict[str, Any]:
        broker = await harness.app._broker()
        return {d.id: d.reason for d in await broker.dead_letters(1000)}

    return harness.app._portal.run(read())
