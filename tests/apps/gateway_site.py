"""A tiny site for the browser tests: one page at ``/`` that uses offload.js, and the gateway of
the basic app mounted at ``/jobs`` (as a real site would mount it). Serve it with
``python -m uvicorn tests.apps.gateway_site:site``."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route

from tests.apps.basic import app

# The page follows the task named by ?id= (with ?token=) and the channel named by ?channel=,
# and writes what it sees into the DOM for the test to read.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>offload.js test page</title></head>
<body>
<ol id="progress"></ol>
<p id="result"></p>
<p id="error"></p>
<ol id="messages"></ol>
<script src="jobs/offload.js"></script>
<script>
  const params = new URLSearchParams(location.search);
  const show = (id, text) => { document.getElementById(id).textContent = text; };
  const add = (id, text) => {
    const item = document.createElement("li");
    item.textContent = text;
    document.getElementById(id).append(item);
  };
  if (params.get("id")) {
    offload.result(params.get("id"), {
      token: params.get("token"),
      onProgress: (task) => add("progress", JSON.stringify([task.status, task.progress, task.message])),
    }).then(
      (value) => show("result", JSON.stringify(value)),
      (error) => show("error", JSON.stringify([error.status, error.error && error.error.type, error.message])),
    );
  }
  if (params.get("channel")) {
    offload.subscribe(params.get("channel"), (data) => add("messages", JSON.stringify(data)));
  }
</script>
</body></html>
"""


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


# With a secret (OFFLOAD_TEST_SECRET), tasks need tokens; channels named news* are public.
site = Starlette(routes=[Route("/", page), Mount("/jobs", app=app.asgi(public_channels=["news*"]))])
