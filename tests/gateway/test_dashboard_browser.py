"""The dashboard in a real browser (Debian's Chromium through Playwright), on sqlite and Redis,
with `offload gateway --dashboard` and a worker as real processes: the overview follows queue
depths live, the task pages show failures, calls and live progress, dead letters are replayed
and purged from the page, the history survives a gateway restart, and a phone-wide screen
never scrolls sideways."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from offload import Offload
from offload.errors import TaskFailed
from tests.conftest import require_chromium, require_server
from tests.gateway.conftest import Server
from tests.support import OffloadProcess, env_for, flush_namespace, start_worker, wait_until

pytestmark = pytest.mark.browser

BASIC = "tests.apps.basic."
PASSWORD = "pw-dashboard-test"
T = 30_000  # ms a page may take to show what the test waits for


class Stack:
    """A gateway with the dashboard, a worker on the default queue, and an app to send with."""

    def __init__(self, url: str, namespace: str) -> None:
        self.env = env_for(url, namespace, OFFLOAD_DASHBOARD_PASSWORD=PASSWORD)
        self.server = self._gateway()
        self.worker: OffloadProcess = start_worker(url, namespace)
        self.app = Offload(url, namespace=namespace)

    def _gateway(self) -> Server:
        return Server(["-m", "offload", "gateway", "tests.apps.basic:app", "--port", "0", "--dashboard"], self.env)

    @property
    def page_url(self) -> str:
        return f"{self.server.base}/dashboard/"

    def restart_gateway(self) -> None:
        self.server.stop()
        self.server = self._gateway()

    def api(self, path: str) -> Any:
        response = httpx.get(self.page_url + path, auth=("admin", PASSWORD), timeout=10)
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self.worker.stop()
        self.server.stop()
        self.app._portal.run(flush_namespace(self.app))
        self.app.close()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_chromium()
    require_server(request.param)
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('dashboard') / 'offload.db'}"
    else:
        url = "redis://127.0.0.1:6379/0"
    made = Stack(url, f"t{uuid.uuid4().hex[:12]}")
    yield made
    made.close()



def open_context(browser: Any, **options: Any) -> Any:
    context = browser.new_context(http_credentials={"username": "admin", "password": PASSWORD}, **options)
    context.set_default_timeout(T)
    return context


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = open_context(browser)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


def goto(page: Any, stack: Stack, route: str) -> None:
    page.goto(stack.page_url + route)
    page.wait_for_selector("main h1")


def mark_document(page: Any) -> None:
    """Tag the loaded document, so a test can tell a live update from a reload."""
    page.evaluate("window.__same_document = true")


def same_document(page: Any) -> bool:
    return page.evaluate("window.__same_document === true") is True


def depth_shown(page: Any, queue: str) -> str:
    return page.text_content(f'#queues-table tr[data-queue="{queue}"] [data-testid="depth"]')  # type: ignore[no-any-return]


def test_the_overview_needs_the_password_and_follows_queue_depths_live(stack: Stack, page: Any) -> None:
    assert httpx.get(stack.page_url, timeout=10).status_code == 401
    assert httpx.get(stack.page_url + "api/overview", timeout=10).status_code == 401
    held = stack.app.ref(BASIC + "add").options(queue="held")
    held.delay(1, 2)
    held.delay(3, 4)  # no worker consumes "held": they wait there
    goto(page, stack, "#/")
    page.wait_for_selector('#queues-table tr[data-queue="held"]')
    assert depth_shown(page, "held") == "2"
    assert page.text_content("#count-workers") == "1"
    mark_document(page)

    held.delay(5, 6)
    page.wait_for_function("""() => document.querySelector('#queues-table tr[data-queue="held"] [data-testid="depth"]')
                                    ?.textContent === '3'""")
    assert same_document(page)


def test_a_failed_task_shows_its_call_and_traceback(stack: Stack, page: Any) -> None:
    failed = stack.app.ref(BASIC + "fail").delay("no such photo")
    with pytest.raises(TaskFailed):
        failed.get(timeout=30)
    goto(page, stack, "#/tasks?status=failed")
    assert page.input_value("#filter-status") == "failed"
    page.wait_for_selector(f'#tasks-table tr[data-task-id="{failed.id}"]')
    assert page.eval_on_selector_all("#tasks-table tbody tr", "rows => rows.map(r => r.dataset.status)") == \
        ["failed"] * page.locator("#tasks-table tbody tr").count()
    page.click(f'#tasks-table tr[data-task-id="{failed.id}"] a')

    page.wait_for_selector("#task-traceback")
    assert page.text_content("#task-id") == failed.id
    assert page.text_content("#task-error-type") == "ValueError"
    assert page.text_content("#task-error-message") == "no such photo"
    traceback = page.text_content("#task-traceback")
    assert "Traceback" in traceback and "ValueError: no such photo" in traceback
    assert page.text_content("#task-attempts") == "1"
    assert page.text_content("#task-call") == "fail('no such photo')"


def test_a_running_task_shows_its_progress_rising_then_its_result(stack: Stack, page: Any) -> None:
    running = stack.app.ref(BASIC + "progress_steps").delay(5, 0.6)
    goto(page, stack, f"#/task/{running.id}")
    mark_document(page)
    # Collect each progress value the page shows (the detail is redrawn on every change).
    page.evaluate("""() => {
        window.__progress = [];
        setInterval(() => {
            const bar = document.querySelector('#task-progress');
            const value = bar && bar.dataset.value !== '' ? Number(bar.dataset.value) : null;
            if (value !== null && window.__progress.at(-1) !== value) window.__progress.push(value);
        }, 20);
    }""")
    page.wait_for_selector("#task-result")
    assert page.text_content("#task-result") == "5"
    assert page.text_content('#task-status [data-testid="status"]') == "succeeded"
    assert page.text_content("#task-message") == "step 5 of 5"
    page.wait_for_function("() => window.__progress.at(-1) === 1")
    seen = page.evaluate("window.__progress")
    assert len([p for p in seen if 0 < p < 1]) >= 2, seen  # shown while the task ran, without a reload
    assert seen == sorted(seen)
    assert same_document(page)


def test_dead_letters_are_replayed_and_purged_from_the_page(stack: Stack, page: Any, tmp_path: Path) -> None:
    out = tmp_path / "not-yet" / "out.txt"  # its folder is missing: the first run fails
    replayed = stack.app.ref(BASIC + "record").delay(str(out), "replayed")
    purged = stack.app.ref(BASIC + "fail").delay("purge me")
    wanted = {replayed.id, purged.id}
    wait_until(lambda: wanted <= {d["id"] for d in stack.api("api/dead")["dead"]}, 30, "both dead letters")
    goto(page, stack, "#/dead")
    page.wait_for_selector(f'#dead-table tr[data-dead-id="{replayed.id}"]')
    assert "record(" in page.text_content(f'#dead-table tr[data-dead-id="{replayed.id}"]')

    out.parent.mkdir()
    page.check(f'#dead-table tr[data-dead-id="{replayed.id}"] input.pick')
    page.click("#replay-selected")
    page.wait_for_function("() => document.querySelector('#dead-status').textContent === 'Replayed 1 task(s).'")
    assert page.locator(f'#dead-table tr[data-dead-id="{replayed.id}"]').count() == 0
    wait_until(lambda: out.exists() and out.read_text() == "replayed\n", 30, "the replayed task's run")

    asked: list[str] = []

    def confirm(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.once("dialog", confirm)
    page.check(f'#dead-table tr[data-dead-id="{purged.id}"] input.pick')
    page.click("#purge-selected")
    page.wait_for_function("() => document.querySelector('#dead-status').textContent === 'Purged 1 task(s).'")
    assert asked and asked[0].startswith("Purge 1 dead letter(s)?")
    assert page.locator(f'#dead-table tr[data-dead-id="{purged.id}"]').count() == 0
    assert purged.id not in {d["id"] for d in stack.api("api/dead")["dead"]}


def test_the_history_survives_a_gateway_restart(stack: Stack, browser: Any) -> None:
    done = stack.app.ref(BASIC + "add").delay(20, 22)
    assert done.get(timeout=30) == 42
    stack.restart_gateway()
    context = open_context(browser)
    try:
        page = context.new_page()
        goto(page, stack, "#/tasks?status=succeeded")
        page.wait_for_selector(f'#tasks-table tr[data-task-id="{done.id}"]')
        goto(page, stack, f"#/task/{done.id}")
        assert page.wait_for_selector("#task-result").text_content() == "42"
    finally:
        context.close()


@pytest.mark.parametrize("route", ["#/", "#/tasks", "#/dead", "#/workers", "failed-task"])
def test_a_phone_wide_screen_never_scrolls_sideways(stack: Stack, browser: Any, route: str) -> None:
    if route == "failed-task":  # a long traceback and call in a <pre>
        failed = stack.app.ref(BASIC + "fail").delay("x" * 300)
        with pytest.raises(TaskFailed):
            failed.get(timeout=30)
        route = f"#/task/{failed.id}"
    else:
        stack.app.ref(BASIC + "add").delay(1, 1).get(timeout=30)
    context = open_context(browser, viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        goto(page, stack, route)
        page.wait_for_selector("main table, #task-traceback", state="attached")  # an empty table has no height
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        context.close()
