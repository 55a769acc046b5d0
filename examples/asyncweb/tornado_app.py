"""Tornado awaiting a task's result: the handler waits, the IOLoop keeps serving.

    python -m examples.asyncweb.tornado_app --port 8888
    offload worker examples.asyncweb.tasks:app
"""

from __future__ import annotations

import argparse
import asyncio
import json

import tornado.web

from examples.asyncweb.tasks import slow_query
from offload import ResultTimeout, TaskFailed


class ReportHandler(tornado.web.RequestHandler):
    async def get(self, customer_id: str) -> None:
        seconds = float(self.get_argument("seconds", "1.0"))
        result = await slow_query.adelay(int(customer_id), seconds)
        try:
            value = await result.wait(timeout=30)
        except ResultTimeout:
            self.set_status(504)
            value = {"error": "still running", "id": result.id}
        except TaskFailed as e:
            self.set_status(502)
            value = {"error": e.message}
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(value))


class PingHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"pong": "yes"})


def make_app() -> tornado.web.Application:
    return tornado.web.Application([(r"/report/(\d+)", ReportHandler), (r"/ping", PingHandler)])


async def main(port: int) -> None:
    make_app().listen(port, address="127.0.0.1")
    print(f"tornado listening on http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8888)
    asyncio.run(main(parser.parse_args().port))
