"""Fixtures shared by every test: backend URLs per kind, fresh namespaces, a clean environment.

Redis and RabbitMQ tests skip, saying why, when the server is not reachable, unless
OFFLOAD_REQUIRE_BROKERS=1 (CI), where an unreachable server fails the run instead.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("OFFLOAD_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("OFFLOAD_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")

# Every kind the conformance suites run against. A new broker is one more entry here.
KINDS = ["memory", "sqlite", "redis", "amqp"]
_SERVERS = {"redis": ("127.0.0.1", 6379), "amqp": ("127.0.0.1", 5672)}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_server(kind: str) -> None:
    """Skip (locally) or fail (CI) when the server behind a kind is not reachable."""
    if kind not in _SERVERS:
        return
    host, port = _SERVERS[kind]
    if _reachable(host, port):
        return
    reason = f"{kind} not reachable at {host}:{port}"
    if os.environ.get("OFFLOAD_REQUIRE_BROKERS") == "1":
        pytest.fail(f"{reason} (OFFLOAD_REQUIRE_BROKERS=1)")
    pytest.skip(reason)


def urls_for(kind: str, tmp_path: Path) -> tuple[str, str | None]:
    """(broker URL, results URL or None) for a kind; short leases so crash tests stay quick."""
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}", None
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'offload.db'}?visibility_timeout=3", None
    if kind == "redis":
        return f"{REDIS_URL}?visibility_timeout=3", None
    if kind == "amqp":
        return AMQP_URL, f"{REDIS_URL}"
    raise ValueError(kind)


@pytest.fixture(autouse=True)
def _clean_offload_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OFFLOAD_") and name not in ("OFFLOAD_REQUIRE_BROKERS", "OFFLOAD_TEST_REDIS", "OFFLOAD_TEST_AMQP"):
            monkeypatch.delenv(name)


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    require_server(request.param)
    yield request.param
