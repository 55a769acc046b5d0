"""Fixtures shared by every test: backend URLs per kind, fresh namespaces, a clean environment.

Redis and RabbitMQ tests skip, saying why, when the server is not reachable, unless
OFFLOAD_REQUIRE_BROKERS=1 (CI), where an unreachable server fails the run instead; so do tests
that need a browser, a program (rabbitmqctl, uwsgi) or an optional package (uvloop, Django).
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

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
    missing(f"{kind} not reachable at {host}:{port}")


def missing(reason: str) -> NoReturn:
    """Skip (locally) or fail (CI, OFFLOAD_REQUIRE_BROKERS=1) for something the test needs that
    this machine lacks: a server, a browser, a program or a package."""
    if os.environ.get("OFFLOAD_REQUIRE_BROKERS") == "1":
        pytest.fail(f"{reason} (OFFLOAD_REQUIRE_BROKERS=1)")
    pytest.skip(reason)


def require_module(name: str, install: str) -> types.ModuleType:
    """``pytest.importorskip`` that fails in CI instead of skipping."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} is not installed ({install})")


def require_program(name: str, install: str) -> str:
    """The path of a program on PATH (or beside this interpreter), or `missing`."""
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        missing(f"{name} is not installed ({install})")
    return found


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
