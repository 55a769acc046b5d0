"""offload.js in a real browser (Debian's Chromium through Playwright): a page served next to
the gateway shows a task's progress and result, over SSE and, with EventSource removed, over
long polling; and it follows a channel both ways."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from offload import Offload
from offload.tokens import make_token
from tests.conftest import require_chromium
from tests.gateway.conftest import SECRET, Server
from tests.support import env_for, start_worker

pytestmark = pytest.mark.browser

BASIC = "tests.apps.basic."


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The site (page + gateway at /jobs) and a worker, on sqlite, with a secret."""
    require_chromium()
    url = f"sqlite:///{tmp_path_factory.mktemp('browser') / 'offload.db'}"
    namespace = "browser"
    env = env_for(url, namespace, OFFLOAD_TEST_SECRET=SECRET)
    server = Server(["-m", "uvicorn", "tests.apps.gateway_site:site", "--port", "0", "--timeout-graceful-shutdown", "2"], env)
    worker = start_worker(url, namespace, extra_env={"OFFLOAD_TEST_SECRET": SECRET})
    app = Offload(url, namespace=namespace, secret=SECRET)
    try:
        yield {"base": server.base, "app": app}
    finally:
        app.close()
        worker.stop()
        server.stop()



@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    yield page
    context.close()


def open_page(page: Any, base: str, *, without_event_source: bool, **params: str) -> list[str]:
    """Load the test page; returns the list that collects the URLs the page requests."""
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    if without_event_source:
        page.add_init_script("delete window.EventSource;")
    query = "&".join(f"{k}={v}" for k, v in params.items())
    page.goto(f"{base}/?{query}")
    return requested


def shown(page: Any, selector: str) -> Any:
    element = page.wait_for_selector(f"{selector}:not(:empty)", timeout=30_000)
    return json.loads(element.text_content())


def progress_seen(page: Any) -> list[list[Any]]:
    return [json.loads(text) for text in page.locator("#progress li").all_text_contents()]


@pytest.mark.parametrize("without_event_source", [False, True], ids=["sse", "long-polling"])
def test_page_shows_progress_and_result(stack: dict[str, Any], page: Any, without_event_source: bool) -> None:
    app: Offload = stack["app"]
    result = app.ref(BASIC + "progress_steps").delay(4, 0.5)
    requested = open_page(page, stack["base"], without_event_source=without_event_source,
                          id=result.id, token=result.token())

    assert shown(page, "#result") == 4
    steps = progress_seen(page)
    assert steps[-1] == ["succeeded", 1.0, "step 4 of 4"]
    fractions = [p for _, p, _ in steps if p is not None]
    assert len(fractions) >= 3, steps  # progress showed while the task ran, in order
    assert fractions == sorted(fractions)
    streams = [u for u in requested if f"/jobs/tasks/{result.id}/events" in u]
    polls = [u for u in requested if re.search(rf"/jobs/tasks/{result.id}\?", u)]
    if without_event_source:
        assert not streams and len(polls) >= 3
        assert any("since=" in u and "wait=" in u for u in polls)
    else:
        assert streams and not polls


def test_page_reports_a_failed_task(stack: dict[str, Any], page: Any) -> None:
    app: Offload = stack["app"]
    result = app.ref(BASIC + "fail").delay("no such photo")
    open_page(page, stack["base"], without_event_source=False, id=result.id, token=result.token())
    assert shown(page, "#error") == ["failed", "ValueError", "no such photo"]


def test_page_reports_a_refused_token(stack: dict[str, Any], page: Any) -> None:
    app: Offload = stack["app"]
    result = app.ref(BASIC + "add").delay(1, 2)
    other = make_token(app, "some-other-task")
    # The stream is refused (403), offload.js falls back to polling, which says why.
    open_page(page, stack["base"], without_event_source=False, id=result.id, token=other)
    assert shown(page, "#error")[0] == 403


@pytest.mark.parametrize("without_event_source", [False, True], ids=["sse", "long-polling"])
def test_page_follows_a_channel(stack: dict[str, Any], page: Any, without_event_source: bool) -> None:
    app: Offload = stack["app"]
    channel = f"news{int(time.monotonic() * 1000)}"
    _wait_for_channel_clients(stack["base"], 0)  # the previous test's page has gone
    # Channels of an app with a secret need a token; the site makes news* public instead.
    open_page(page, stack["base"], without_event_source=without_event_source, channel=channel)
    _wait_for_channel_clients(stack["base"], 1)
    app.ref(BASIC + "publish_to").delay(channel, "first").get(timeout=30)
    app.ref(BASIC + "publish_to").delay(channel, "second").get(timeout=30)
    page.wait_for_function("document.querySelectorAll('#messages li').length >= 2", timeout=30_000)
    assert [json.loads(t) for t in page.locator("#messages li").all_text_contents()] == [
        {"data": "first"}, {"data": "second"}]


def _wait_for_channel_clients(base: str, count: int) -> None:
    pattern = re.compile(r'^offload_gateway_waiting_clients{kind="channel"} (\S+)$', re.M)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = pattern.search(httpx.get(f"{base}/jobs/metrics").text)
        if found and float(found.group(1)) == count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the gateway never had {count} channel client(s)")


