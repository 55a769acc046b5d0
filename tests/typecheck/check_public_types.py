"""What a user's editor and type checker see of the public API. This file is never run: mypy
--strict checks it in `make lint`, and each assert_type fails the build when a type drifts."""

from __future__ import annotations

from typing import Any, assert_type

from offload import AsyncTask, Offload, Result, Task, TaskState

app = Offload("memory://")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(queue="images", retries=3)
def resize(path: str, width: int = 640) -> bytes:
    return path.encode() * width


@app.task
async def fetch_rows(query: str) -> list[dict[str, Any]]:
    return [{"query": query}]


@app.task(name="reports.nightly")
async def nightly() -> None:
    return None


# The decorator keeps the signature (checked by assignment: assert_type would compare the
# parameters' names too). An async def becomes an AsyncTask, which no plain Task is.
add_task: Task[[int, int], int] = add
resize_task: Task[[str, int], bytes] = resize
fetch_task: AsyncTask[[str], list[dict[str, Any]]] = fetch_rows
nightly_task: AsyncTask[[], None] = nightly
not_async: AsyncTask[[int, int], int] = add  # type: ignore[assignment]

# Sending keeps the return type, for sync and async tasks alike.
assert_type(add.delay(1, 2), Result[int])
assert_type(resize.delay("a.jpg", width=320), Result[bytes])
assert_type(fetch_rows.delay("select 1"), Result[list[dict[str, Any]]])
assert_type(add.delay(1, 2).get(timeout=5), int)
assert_type(fetch_rows.delay("select 1").get(), list[dict[str, Any]])
assert_type(add.delay(1, 2).state(), TaskState)

# Calling a task inline runs the function: a value, or for async def the coroutine to await.
assert_type(add(1, 2), int)


async def in_a_view() -> None:
    r = await add.adelay(1, 2)
    assert_type(r, Result[int])
    assert_type(await r, int)
    assert_type(await r.wait(5), int)
    assert_type(await fetch_rows("select 1"), list[dict[str, Any]])
    rows = await (await fetch_rows.adelay("select 1"))
    assert_type(rows, list[dict[str, Any]])
    # A task known only by name: its result's type is unknown.
    assert_type(app.ref("reports.nightly").delay(), Result[Any])


# Wrong arguments are errors in the editor, not at run time in a worker.
add.delay("1", 2)  # type: ignore[arg-type]
add.delay(1)  # type: ignore[call-arg]
resize.delay("a.jpg", height=3)  # type: ignore[call-arg]
