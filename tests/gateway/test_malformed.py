"""Malformed input never breaks the gateway: a token has exactly one spelling, anything else
is a 403; odd ids, tokens and ``wait`` values are answered with a 2xx or 4xx, never a 5xx; and
a kept-alive connection outlives a bad request on a real server."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload import Offload
from offload.tokens import check_channel_token, check_token, make_channel_token, make_token
from tests.conftest import urls_for
from tests.gateway.conftest import SECRET, client_for, start_gateway
from tests.support import flush_namespace

TASK_ID = "3kTMd9o0Zr9Zl2x7VvXbQA"
#: Other scripts' digits, which str.isdigit() and int() accept: none may spell an expiry.
FOREIGN_DIGITS = [
    "".join(chr(zero + n) for n in range(10))
    for zero in (0x0660, 0x06F0, 0x0966, 0xFF10)  # Arabic-Indic, extended Arabic-Indic, Devanagari, fullwidth
] + ["\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079"]  # superscripts
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def secret_app() -> Offload:
    return Offload("memory://tokens", secret=SECRET)


# -- the token parser ---------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["²." + "A" * 43, "1²." + "A" * 43, "9" * 13 + "." + "A" * 43])
def test_a_malformed_expiry_is_refused(secret_app: Offload, token: str) -> None:
    assert check_token(secret_app, TASK_ID, token) is False


def test_a_non_ascii_mac_is_refused(secret_app: Offload) -> None:
    expiry, _, mac = make_token(secret_app, TASK_ID).partition(".")
    assert check_token(secret_app, TASK_ID, f"{expiry}.é{mac[1:]}") is False
    assert check_channel_token(secret_app, "news", f"{expiry}.{mac[:-1]}\u2028") is False


@pytest.mark.parametrize("digits", FOREIGN_DIGITS)
def test_an_expiry_in_other_digits_is_refused_even_with_the_right_mac(secret_app: Offload, digits: str) -> None:
    token = make_token(secret_app, TASK_ID)
    expiry, _, mac = token.partition(".")
    respelled = expiry.translate(str.maketrans("0123456789", digits))
    assert check_token(secret_app, TASK_ID, token) is True
    assert check_token(secret_app, TASK_ID, f"{respelled}.{mac}") is False


def test_other_spellings_of_a_valid_token_are_refused(secret_app: Offload) -> None:
    token = make_token(secret_app, TASK_ID)
    expiry, _, mac = token.partition(".")
    for spelling in [f"0{token}", f"{token}=", f"{token}\n", f" {token}", f"{expiry}.{mac.lower()}",
                     f"+{token}", f"{expiry}.{mac}A", f"{expiry}..{mac}", token.replace("-", "+").replace("_", "/")]:
        if spelling != token:
            assert check_token(secret_app, TASK_ID, spelling) is False, spelling


@FUZZ
@given(text=st.text())
def test_arbitrary_text_is_never_a_token_and_never_raises(secret_app: Offload, text: str) -> None:
    assert check_token(secret_app, TASK_ID, text) is False
    assert check_channel_token(secret_app, "news", text) is False


@st.composite
def respellings(draw: st.DrawFn, token: str) -> str:
    """``token`` with a few characters replaced, inserted or deleted, from any script."""
    chars = list(token)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(chars)))
        edit = draw(st.sampled_from(["replace", "insert", "delete"]))
        char = draw(st.one_of(st.characters(), st.sampled_from("".join(FOREIGN_DIGITS) + "0123456789.=-_+/ ")))
        if edit == "insert":
            chars.insert(at, char)
        elif chars and at < len(chars):
            chars[at:at + 1] = [char] if edit == "replace" else []
    return "".join(chars)


@FUZZ
@given(data=st.data())
def test_only_the_exact_token_passes(secret_app: Offload, data: st.DataObject) -> None:
    token = make_token(secret_app, TASK_ID)
    other = data.draw(respellings(token))
    assert check_token(secret_app, TASK_ID, other) is (other == token)
    channel_token = make_channel_token(secret_app, "news")
    other = data.draw(respellings(channel_token))
    assert check_channel_token(secret_app, "news", other) is (other == channel_token)


# -- the routes, in process -----------------------------------------------------------------------
ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "²", "١٢٣", "-1", "NaN", "nan", "inf", "-inf", "1e309", "9" * 400, "0x10", "1_000",
                     "%ff%fe", "%00", "%", "%zz", "..", "\x00", "\u2028", "\ud800", ",", ",,", "a,b", "é" * 300]),
)


#: Tokens: odd text alone, or around the one dot a token has.
ODD_TOKENS = st.one_of(ODD_TEXT, st.builds("{}.{}".format, ODD_TEXT, ODD_TEXT),
                       st.builds("{}.{}".format, st.sampled_from(["²", "1²", "١٢٣", "1" * 12]), st.text(min_size=43, max_size=43)))


def query_value(value: str) -> str:
    """``value`` percent-encoded as a browser would send it (lone surrogates as raw UTF-8 junk)."""
    return quote(value.encode("utf-8", "surrogatepass"), safe="%")


@pytest.fixture(params=["memory", "sqlite"])
async def fuzzed_apps(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> AsyncIterator[list[Any]]:
    """An app with a secret and one without, each with its gateway and an in-process client."""
    url, results = urls_for(request.param, tmp_path)
    apps = [Offload(url, results=results, namespace=namespace, secret=SECRET),
            Offload(url, results=results, namespace=namespace + "open")]
    clients = [client_for(app.asgi()) for app in apps]
    yield list(zip(apps, clients, strict=True))
    for app, client in zip(apps, clients, strict=True):
        await client.aclose()
        await flush_namespace(app)
        await app.aclose()


def path_segment(value: str) -> str:
    return quote(value.encode("utf-8", "surrogatepass"), safe="%") or "%20"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task_id=ODD_TEXT, token=ODD_TOKENS, wait=ODD_TEXT, since=ODD_TEXT, route=st.integers(0, 4))
async def test_odd_requests_are_never_a_server_error(
    fuzzed_apps: list[Any], task_id: str, token: str, wait: str, since: str, route: int,
) -> None:
    # wait= is kept to a tiny number of seconds when it parses, so a long poll cannot hold the test.
    try:
        wait = wait if float(wait) <= 0.01 else "0"
    except ValueError:
        pass
    query = f"token={query_value(token)}&wait={query_value(wait)}&since={query_value(since)}"
    path = [
        f"/tasks/{path_segment(task_id)}?{query}",
        f"/tasks/{path_segment(task_id)}/events?{query}&lastEventId=done",
        f"/wait?ids={query_value(task_id)}&mode={query_value(since)}&{query}",
        f"/wait?ids={query_value(task_id)},{query_value(since)}&mode=any&{query}",
        f"/tasks/{path_segment(task_id)}?token={query_value(token)},{query_value(since)}&wait=0",
    ][route]
    for _, client in fuzzed_apps:
        response = await client.get(path)
        assert 200 <= response.status_code < 500, (path, response.status_code, response.text)


async def test_a_malformed_token_is_403_on_every_task_route(secret_app: Offload) -> None:
    expiry, _, mac = make_token(secret_app, TASK_ID).partition(".")
    async with client_for(secret_app.asgi()) as client:
        for token in ["²." + mac, f"{expiry}.é{mac[1:]}"]:
            for path, params in [(f"/tasks/{TASK_ID}", {}), (f"/tasks/{TASK_ID}/events", {}), ("/wait", {"ids": TASK_ID})]:
                response = await client.get(path, params={**params, "token": token})
                assert response.status_code == 403, (path, token, response.text)


# -- a real server ----------------------------------------------------------------------------------
def http_get(sock: socket.socket, target: str, host: str) -> tuple[int, bytes]:
    """One HTTP/1.1 request on an open connection; its status and body (Content-Length framed)."""
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection before answering {target}")
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length_header = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    assert length_header is not None, head
    length = int(length_header.group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection in the middle of answering {target}")
        body += chunk
    return status, body


async def test_a_kept_alive_connection_survives_a_malformed_token(tmp_path: Path, namespace: str) -> None:
    url, results = urls_for("sqlite", tmp_path)
    app = Offload(url, namespace=namespace, results=results, secret=SECRET)
    server = await asyncio.to_thread(start_gateway, url, namespace, results, secret=SECRET)
    try:
        task_id = (await app.asend("tests.gateway.job")).id
        expiry, _, mac = make_token(app, task_id).partition(".")
        where = urlsplit(server.base)
        assert where.hostname is not None and where.port is not None
        with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
            host = where.netloc
            for token in [quote("²." + mac), quote(f"{expiry}.é{mac[1:]}")]:
                for target in [f"/tasks/{task_id}?token={token}", f"/tasks/{task_id}/events?token={token}",
                               f"/wait?ids={task_id}&token={token}"]:
                    status, _ = await asyncio.to_thread(http_get, sock, target, host)
                    assert status == 403, target
            # The same connection still answers, and the right token still reads the task.
            status, body = await asyncio.to_thread(http_get, sock, f"/tasks/{task_id}?token={expiry}.{mac}", host)
            assert status == 200 and httpx.Response(200, content=body).json()["id"] == task_id
        assert not any("Traceback" in line for line in server.lines), "\n".join(server.lines)
    finally:
        await asyncio.to_thread(server.stop)
        await flush_namespace(app)
        await app.aclose()
