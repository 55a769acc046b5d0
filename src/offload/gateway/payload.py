"""What a browser sees of a task: the JSON of ``GET /tasks/{id}`` and its version."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from offload.result import Status, TaskState
from offload.serializers import to_plain


@dataclass(frozen=True, slots=True)
class Rendered:
    """A task's JSON, encoded once, with a version that names exactly this content."""

    state: TaskState
    body: bytes
    version: str

    @property
    def done(self) -> bool:
        return self.state.done


def task_payload(state: TaskState, debug: bool) -> dict[str, Any]:
    """``{"id","status","progress","message","result","error"}``; a traceback only in debug."""
    error: dict[str, str] | None = None
    if state.status in (Status.FAILED, Status.EXPIRED, Status.CANCELLED):
        exc = state.error_object()
        raw = state.error or {}
        error = {"type": raw.get("type") or type(exc).__name__, "message": raw.get("message") or str(exc)}
        if debug and raw.get("traceback"):
            error["traceback"] = raw["traceback"]
    return {
        "id": state.id,
        "status": state.status.value,
        "progress": state.progress,
        "message": state.message,
        "result": to_plain(state.result) if state.status is Status.SUCCEEDED else None,
        "error": error,
    }


def dumps(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError:
        # NaN or infinity (possible with msgpack or pickle results): JSON.parse would choke on
        # Python's spelling of them, so send them as strings.
        return json.dumps(_finite(value), separators=(",", ":"), ensure_ascii=False).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def render(state: TaskState, debug: bool) -> Rendered:
    body = dumps(task_payload(state, debug))
    return Rendered(state, body, version_of(body))


def version_of(body: bytes) -> str:
    """Short and stable: the same content always has the same version (SSE event ids, ETags)."""
    return hashlib.blake2b(body, digest_size=8).hexdigest()
