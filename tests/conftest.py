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
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

REDIS_URL = os.environ.get("OFFLOAD_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("OFFLOAD_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass(frozen=True)
class Kind:
    """A backend as the suites see it: its broker URL (``{tmp}`` is the test's directory), the
    results URL when it keeps none itself, and the server it needs."""

    url: str
    results: str | None = None
    server: tuple[str, int] | None = None


def _port(url: str, default: int) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url)
    return parsed.hostname or "127.0.0.1", parsed.port or default


# Every kind the conformance suites run against: a new broker is one more entry here. Short
# leases keep the crash tests quick.
KINDS: dict[str, Kind] = {
    "memory": Kind("memory://{unique}"),
    "sqlite": Kind("sqlite:///{tmp}/offload.db?visibility_timeout=3"),
    "redis": Kind(f"{REDIS_URL}?visibility_timeout=3", server=_port(REDIS_URL, 6379)),
    "amqp": Kind(AMQP_URL, results=REDIS_URL, server=_port(AMQP_URL, 5672)),
}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_server(kind: str) -> None:
    """Skip (locally) or fail (CI) when a server behind a kind (its broker's, or its results
    store's) is not reachable."""
    spec = KINDS.get(kind)
    if spec is None:
        return
    servers = [spec.server, _port(spec.results, 6379) if spec.results else None]
    for server in servers:
        if server is not None and not _reachable(*server):
            missing(f"{kind} not reachable at {server[0]}:{server[1]}")


def missing(reason: str) -> NoReturn:
    """Skip (locally) or fail (CI, OFFLOAD_REQUIRE_BROKERS=1) for something the test needs that
    this machine lacks: a server, a browser, a program or a package."""
    if os.environ.get("OFFLOAD_REQUIRE_BROKERS") == "1":
        pytest.fail(f"{reason} (OFFLOAD_REQUIRE_BROKERS=1)")
    pytest.skip(reason)


#: Debian's chromium package, driven by Playwright (its own browser downloads are never used).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def require_chromium() -> None:
    """Chromium and Playwright, or skip (locally) / fail (CI) saying which is missing."""
    if not os.path.exists(CHROMIUM):
        missing(f"no Chromium at {CHROMIUM} (Debian's chromium package)")
    require_module("playwright", "pip install playwright")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium, one per test module."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


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
    """(broker URL, results URL or None) for a kind."""
    spec = KINDS[kind]
    return spec.url.format(tmp=tmp_path, unique=uuid.uuid4().hex), spec.results


@pytest.fixture(autouse=True)
def _clean_offload_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OFFLOAD_") and name not in ("OFFLOAD_REQUIRE_BROKERS", "OFFLOAD_TEST_REDIS", "OFFLOAD_TEST_AMQP"):
            monkeypatch.delenv(name)


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    require_server(request.param)
    yield request.param
