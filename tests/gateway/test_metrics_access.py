"""Who may read ``/metrics`` (it names the queues): everyone, nobody (``metrics=False``), or the
holder of a bearer token; and ``offload gateway`` keeps it off by default on a public address."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from offload import ConfigError, Offload
from offload.gateway.serve import is_loopback, metrics_served
from tests.conftest import urls_for
from tests.gateway.conftest import Server, client_for
from tests.support import env_for

METRICS_TOKEN = "scrape-me-3f9a"


async def test_metrics_are_served_by_default() -> None:
    async with client_for(Offload("memory://metrics").asgi()) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200 and "offload_broker_up" in response.text


async def test_metrics_can_be_turned_off() -> None:
    async with client_for(Offload("memory://metrics").asgi(metrics=False)) as client:
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer wrong", f"bearer{METRICS_TOKEN}",
                                           f"Basic {METRICS_TOKEN}", f"Bearer {METRICS_TOKEN}x", b"Bearer \xe9"])
async def test_a_metrics_token_is_required_when_set(authorization: str | bytes | None) -> None:
    value = authorization.encode() if isinstance(authorization, str) else authorization
    headers: dict[bytes, bytes] = {} if value is None else {b"authorization": value}
    async with client_for(Offload("memory://metrics").asgi(metrics_token=METRICS_TOKEN)) as client:
        refused = await client.get("/metrics", headers=headers)
        allowed = await client.get("/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert "offload_" not in refused.text
    assert allowed.status_code == 200 and "offload_broker_up" in allowed.text


def test_an_empty_metrics_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="metrics_token"):
        Offload("memory://metrics").asgi(metrics_token="")


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("gateway.example", False),
])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_metrics_default_on_loopback_or_with_a_token_and_as_told_otherwise() -> None:
    assert metrics_served("127.0.0.1", None, None) is True
    assert metrics_served("0.0.0.0", None, None) is False
    assert metrics_served("0.0.0.0", None, METRICS_TOKEN) is True
    assert metrics_served("0.0.0.0", True, None) is True
    assert metrics_served("127.0.0.1", False, METRICS_TOKEN) is False


async def gateway_command(tmp_path: Path, namespace: str, *args: str, **env: str) -> Server:
    url, results = urls_for("sqlite", tmp_path)
    command = ["-m", "offload", "gateway", "tests.apps.basic:app", "--port", "0", *args]
    return await asyncio.to_thread(Server, command, env_for(url, namespace, results, **env))


async def metrics_status(server: Server, authorization: str | None = None) -> int:
    headers = {} if authorization is None else {"authorization": authorization}
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
        assert (await client.get("/health")).status_code == 200
        return (await client.get("/metrics", headers=headers)).status_code


async def test_offload_gateway_on_a_public_address_serves_no_metrics_by_default(tmp_path: Path, namespace: str) -> None:
    server = await gateway_command(tmp_path, namespace, "--host", "0.0.0.0")
    try:
        assert await metrics_status(server) == 404
        assert "/metrics is off on 0.0.0.0" in server.output
    finally:
        await asyncio.to_thread(server.stop)


async def test_offload_gateway_with_a_metrics_token_asks_for_it(tmp_path: Path, namespace: str) -> None:
    server = await gateway_command(tmp_path, namespace, "--host", "0.0.0.0", OFFLOAD_METRICS_TOKEN=METRICS_TOKEN)
    try:
        assert await metrics_status(server) == 401
        assert await metrics_status(server, "Bearer wrong") == 401
        assert await metrics_status(server, f"Bearer {METRICS_TOKEN}") == 200
    finally:
        await asyncio.to_thread(server.stop)


async def test_offload_gateway_no_metrics_and_metrics(tmp_path: Path, namespace: str) -> None:
    server = await gateway_command(tmp_path, namespace, "--no-metrics")
    try:
        assert await metrics_status(server) == 404
    finally:
        await asyncio.to_thread(server.stop)
    server = await gateway_command(tmp_path, namespace, "--host", "0.0.0.0", "--metrics")
    try:
        assert await metrics_status(server) == 200
    finally:
        await asyncio.to_thread(server.stop)
