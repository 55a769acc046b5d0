"""Tasks found by autodiscovery, in the tests and in the worker they start."""

from __future__ import annotations

from offload import current
from offload.contrib.django import app


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def count_users() -> int:
    from django.contrib.auth.models import User

    return User.objects.count()


@app.task
def report(n: int) -> dict[str, object]:
    current.progress(0.5, "halfway")
    return {"rows": n, "message": f"{n} rows written"}


@app.task
def explode() -> None:
    raise ValueError("the disk is full")
