"""A WSGI app that uses offload at import, as a start-up check or a warm-up would: the loop
thread and the broker's connections exist before uWSGI forks its workers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from tests.apps.basic import add, app

app.result(add.delay(1, 1).id).status()  # offload in use in the process that will fork


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    value = add.delay(2, 3).get(timeout=float(os.environ.get("FORKING_SITE_TIMEOUT", "10")))
    body = json.dumps({"value": value, "pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
