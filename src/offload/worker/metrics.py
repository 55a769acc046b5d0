"""Prometheus metrics of one worker process, in a registry of its own, and the HTTP exporter
that serves them for Prometheus to scrape.

A registry per `WorkerMetrics` (not prometheus_client's global one) so that a worker started
inside an application with metrics of its own, or two workers in one test process, never
collide on metric names. The gateway's ``/metrics`` shows the queues and the worker registry
from outside; these are what only the worker sees: how long each task ran and how it ended.

The numbers live in the process that calls `WorkerMetrics.observe`: with the process pool that
is the worker's main process, which learns every outcome, not its children.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["DURATION_BUCKETS", "MetricsServer", "WorkerMetrics"]

#: Seconds. Web background work spans from a few milliseconds (send a mail, touch a cache) to
#: minutes (an export, a video): fine steps below a second, coarse ones up to ten minutes.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

_LABELS = ("name", "queue", "status")


@dataclass(frozen=True)
class MetricsServer:
    """A running exporter: ``GET http://{host}:{port}/metrics`` answers until `close`."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class WorkerMetrics:
    """The task outcomes and the load of one worker.

    ``status`` is how a task's run ended, as its state says: ``succeeded``, ``failed``,
    ``retrying``, ``expired``, ``cancelled``. Series are labelled by task name and queue, a
    handful each in a usual app; never pass values that grow without bound (ids, arguments).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.duration = Histogram(
            "offload_task_duration_seconds", "How long tasks ran, by name, queue and how they ended",
            _LABELS, buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.tasks = Counter(
            "offload_tasks", "Task runs ended, by name, queue and how they ended", _LABELS, registry=self.registry
        )
        self.running = Gauge("offload_worker_running_tasks", "Tasks this worker runs now", registry=self.registry)

    def observe(self, name: str, queue: str, status: str, duration_s: float) -> None:
        """Count one run of a task that has ended, and how long it ran."""
        self.duration.labels(name, queue, status).observe(duration_s)
        self.tasks.labels(name, queue, status).inc()

    def set_running(self, n: int) -> None:
        self.running.set(n)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
        """Serve this registry at ``http://host:port/metrics`` from a daemon thread (port 0: one
        the system picks, read from the returned server). Loopback by default: the metrics name
        the app's tasks, which is nobody's business outside its infrastructure."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(host, server.server_port, server, thread)
