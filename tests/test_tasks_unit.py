"""Task registration, names, inline calls and option validation (no broker traffic)."""

from __future__ import annotations

import datetime as dt

import pytest

import offload
from offload import ConfigError, Offload


@pytest.fixture
def app() -> Offload:
    return Offload("memory://unit")


def add(x: int, y: int) -> int:
    return x + y


class Invoices:
    @staticmethod
    def total(amounts: list[int]) -> int:
        return sum(amounts)


def test_names_and_inline_calls(app: Offload) -> None:
    add_task = app.task(add)

    @app.task(name="custom.name", queue="images", priority=5, retries=3, retry_backoff=2.0, time_limit=30,
              soft_time_limit=25, expires=60, rate_limit="10/s")
    def thumb(path: str) -> str:
        return path

    assert add_task.name == f"{__name__}.add"
    assert app.task(Invoices.total).name == f"{__name__}.Invoices.total"
    assert add_task(1, 2) == 3 and thumb("p") == "p"
    assert app.registry["custom.name"] is thumb
    assert thumb.opts.queue == "images" and thumb.opts.priority == 5 and thumb.opts.time_limit_s == 30


def test_a_function_a_worker_cannot_import_needs_a_name(app: Offload) -> None:
    def local() -> None: ...

    with pytest.raises(ConfigError, match=r"test_tasks_unit\.test_a_function_a_worker_cannot_import_needs_a_name\.<locals>\.local is defined inside a function.*name="):
        app.task(local)
    with pytest.raises(ConfigError, match=r"is a lambda.*name="):
        app.task(lambda: None)
    assert app.registry == {}
    named = app.task(name="reports.local")(local)
    assert named.name == "reports.local" and app.registry == {"reports.local": named}


def test_async_tasks_are_recognised(app: Offload) -> None:
    @app.task(name="fetch")
    async def fetch(url: str) -> int:
        return len(url)

    assert fetch.is_async


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"priority": -1}, "priority"),
        ({"priority": 3.5}, "priority"),
        ({"queue": "a,b"}, "queue"),
        ({"retries": -1}, "retries"),
        ({"countdown": -5}, "countdown"),
        ({"countdown": 1, "eta": dt.datetime.now(dt.UTC)}, "not both"),
        ({"expires": dt.datetime(2030, 1, 1)}, "aware"),
        ({"soft_time_limit": 10, "time_limit": 5}, "soft_time_limit"),
        ({"colour": "red"}, "unknown task option"),
    ],
)
def test_bad_options_are_refused_clearly(app: Offload, opts: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        app.ref("t").options(**opts)


def test_two_functions_one_name_is_an_error(app: Offload) -> None:
    app.task(name="same")(lambda: 1)
    with pytest.raises(ConfigError, match="give one of them name"):
        app.task(name="same")(lambda: 2)


def test_ids_are_random_and_url_safe(app: Offload) -> None:
    ids = {app.ref("t").delay().id for _ in range(50)}
    assert len(ids) == 50
    for i in ids:
        assert len(i) >= 21 and all(c.isalnum() or c in "-_" for c in i)


def test_public_names_are_sorted_and_complete() -> None:
    assert offload.__all__ == sorted(offload.__all__)
    for name in ("Offload", "Result", "Status", "TaskState", "current", "Retry", "TaskFailed", "TaskTimeLimit",
                 "TaskExpired", "TaskCancelled", "ResultTimeout", "SerializationError", "BrokerUnavailable",
                 "ConfigError", "OffloadError"):
        assert name in offload.__all__


def test_error_tree() -> None:
    assert issubclass(offload.TaskTimeLimit, offload.TaskFailed)
    assert issubclass(offload.ResultTimeout, TimeoutError)
    for e in (offload.TaskFailed, offload.TaskExpired, offload.TaskCancelled, offload.ResultTimeout,
              offload.SerializationError, offload.BrokerUnavailable, offload.ConfigError, offload.Retry):
        assert issubclass(e, offload.OffloadError)
