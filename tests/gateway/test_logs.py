"""Capabilities never reach the logs: the access log of a real ``offload gateway`` shows each
path with ``token=[redacted]``, and offload's own loggers are redacted the same way."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from offload import Offload
from offload.gateway.redact import RedactCapabilities, redact, redact_logs
from offload.tokens import make_channel_token, make_token
from tests.conftest import urls_for
from tests.gateway.conftest import SECRET, start_gateway
from tests.support import flush_namespace


async def test_the_access_log_of_offload_gateway_never_shows_a_token(tmp_path: Path, namespace: str) -> None:
    url, results = urls_for("sqlite", tmp_path)
    app = Offload(url, namespace=namespace, results=results, secret=SECRET)
    server = await asyncio.to_thread(start_gateway, url, namespace, results, secret=SECRET)
    try:
        task_id = (await app.asend("tests.gateway.job")).id
        token, channel_token = make_token(app, task_id), make_channel_token(app, "exports")
        forged = token[:-4] + "AAAA"
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            answers = [
                await client.get(f"/tasks/{task_id}", params={"token": token}),
                await client.get(f"/tasks/{task_id}/events", params={"token": token, "lastEventId": "done"}),
                await client.get("/wait", params={"ids": task_id, "token": token}),
                await client.get(f"/tasks/{task_id}", params={"token": forged, "wait": "0"}),
                await client.get("/channels/exports", params={"cursor": "", "token": channel_token}),
                await client.get("/health", params={"password": "hunter2", "secret": "s3cr3t"},
                                 headers={"authorization": "Bearer b34r3r"}),
            ]
        assert [a.status_code for a in answers] == [200, 204, 200, 403, 200, 200]
        # The health check is the last request: once its line is out, every line before it is.
        await asyncio.to_thread(server.wait_for, lambda line: '"GET /health?' in line)
    finally:
        await asyncio.to_thread(server.stop)
        await flush_namespace(app)
        await app.aclose()
    output = server.output
    for secret_value in [token, token.partition(".")[2], forged, channel_token, "hunter2", "s3cr3t", "b34r3r"]:
        assert secret_value not in output
    assert f'"GET /tasks/{task_id}?token=[redacted] HTTP/1.1" 200' in output
    assert f'"GET /tasks/{task_id}/events?token=[redacted]&lastEventId=done HTTP/1.1" 204' in output
    assert f'"GET /wait?ids={task_id}&token=[redacted] HTTP/1.1" 200' in output
    assert f'"GET /tasks/{task_id}?token=[redacted]&wait=0 HTTP/1.1" 403' in output
    assert '"GET /channels/exports?cursor=&token=[redacted] HTTP/1.1" 200' in output
    assert '"GET /health?password=[redacted]&secret=[redacted] HTTP/1.1" 200' in output


@pytest.mark.parametrize(("line", "shown"), [
    ("GET /tasks/abc?token=1790000000.mac-_x&wait=25", "GET /tasks/abc?token=[redacted]&wait=25"),
    ("/wait?ids=a,b&token=1.x,2.y", "/wait?ids=a,b&token=[redacted]"),
    ("dashboard_password=pw metrics_token=mt", "dashboard_password=[redacted] metrics_token=[redacted]"),
    ("Authorization: Bearer abc.def", "Authorization: Bearer [redacted]"),
    ("[(b'authorization', b'Basic YWRtaW46cHc=')]", "[(b'authorization', b'Basic [redacted]')]"),
    ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:[redacted]@127.0.0.1:5672/"),
    ("GET /tasks/abc?wait=25 tokens are fine", "GET /tasks/abc?wait=25 tokens are fine"),
])
def test_redact_hides_values_and_keeps_the_rest(line: str, shown: str) -> None:
    assert redact(line) == shown


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A handler on the root logger, as ``offload gateway`` configures it, with redaction installed."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        redact_logs()
        yield stream
    finally:
        root.removeHandler(handler)
        for logger in [root, *(logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "offload"))]:
            for f in [f for f in logger.filters if isinstance(f, RedactCapabilities)]:
                logger.removeFilter(f)


def test_offload_loggers_are_redacted(captured: io.StringIO) -> None:
    logging.getLogger("offload.gateway").warning("GET /tasks/abc?token=%s failed", "1790000000.sekrit")
    logging.getLogger("offload.worker.consumer").warning("connecting to %s", "redis://:hunter2@cache:6379/0")
    try:
        raise ValueError("bad request /tasks/abc?token=1790000000.intraceback")
    except ValueError:
        logging.getLogger("offload.gateway").exception("boom")
    text = captured.getvalue()
    assert "GET /tasks/abc?token=[redacted] failed" in text
    assert "redis://:[redacted]@cache:6379/0" in text
    assert "ValueError: bad request /tasks/abc?token=[redacted]" in text
    for value in ["sekrit", "hunter2", "intraceback"]:
        assert value not in text


def test_redacting_twice_adds_one_filter(captured: io.StringIO) -> None:
    redact_logs()
    access = logging.getLogger("uvicorn.access")
    assert sum(isinstance(f, RedactCapabilities) for f in access.filters) == 1
