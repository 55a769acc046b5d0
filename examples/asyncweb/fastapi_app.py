"""FastAPI awaiting a task's result: the request waits, the server does not.

    uvicorn examples.asyncweb.fastapi_app:api
    offload worker examples.asyncweb.tasks:app
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException

from examples.asyncweb.tasks import app, slow_query
from offload import ResultTimeout, TaskFailed

api = FastAPI()
# The gateway too, for browsers: /offload/tasks/{id}, /offload/offload.js, ...
api.mount("/offload", app.asgi())


@api.get("/report/{customer_id}")
async def report(customer_id: int, seconds: float = 1.0) -> dict[str, object]:
    result = await slow_query.adelay(customer_id, seconds)
    try:
        return await result.wait(timeout=30)  # a coroutine woken by the result store, no thread held
    except ResultTimeout:
        raise HTTPException(504, f"still running; poll /offload/tasks/{result.id}") from None
    except TaskFailed as e:
        raise HTTPException(502, f"report failed: {e.message}") from None


@api.get("/ping")
async def ping() -> dict[str, str]:
    return {"pong": "yes"}
