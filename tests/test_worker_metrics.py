"""A worker's own Prometheus metrics, read over HTTP from the exporter `WorkerMetrics.serve`
starts, as Prometheus would scrape them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from offload.worker.metrics import DURATION_BUCKETS, MetricsServer, WorkerMetrics


@pytest.fixture
def served() -> Iterator[tuple[WorkerMetrics, MetricsServer]]:
    metrics = WorkerMetrics()
    server = metrics.serve("127.0.0.1", 0)
    yield metrics, server
    server.close()


def scrape(server: MetricsServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"http://{server.host}:{server.port}/metrics", timeout=5)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_task_outcomes_durations_and_load_are_served_over_http(served: tuple[WorkerMetrics, MetricsServer]) -> None:
    metrics, server = served
    assert server.port > 0
    metrics.observe("shop.mail", "default", "succeeded", 0.004)
    metrics.observe("shop.mail", "default", "succeeded", 0.2)
    metrics.observe("shop.export", "exports", "failed", 42.0)
    metrics.set_running(3)
    got = scrape(server)
    mail = {"name": "shop.mail", "queue": "default", "status": "succeeded"}
    export = {"name": "shop.export", "queue": "exports", "status": "failed"}
    assert got[("offload_tasks_total", frozenset(mail.items()))] == 2
    assert got[("offload_tasks_total", frozenset(export.items()))] == 1
    assert got[("offload_task_duration_seconds_count", frozenset(mail.items()))] == 2
    assert got[("offload_task_duration_seconds_sum", frozenset(mail.items()))] == pytest.approx(0.204)
    # The fastest bucket holds the 4 ms run; the export lands between 30 s and 60 s.
    assert got[("offload_task_duration_seconds_bucket", frozenset({**mail, "le": "0.005"}.items()))] == 1
    assert got[("offload_task_duration_seconds_bucket", frozenset({**export, "le": "30.0"}.items()))] == 0
    assert got[("offload_task_duration_seconds_bucket", frozenset({**export, "le": "60.0"}.items()))] == 1
    assert got[("offload_worker_running_tasks", frozenset())] == 3


def test_buckets_run_from_five_milliseconds_to_ten_minutes() -> None:
    assert DURATION_BUCKETS[0] == 0.005 and DURATION_BUCKETS[-1] == 600.0
    assert list(DURATION_BUCKETS) == sorted(set(DURATION_BUCKETS))


def test_each_worker_metrics_has_its_own_registry_and_a_closed_exporter_stops_answering() -> None:
    one, two = WorkerMetrics(), WorkerMetrics()
    assert one.registry is not two.registry
    one.observe("a", "default", "succeeded", 1.0)
    server = two.serve()
    try:
        assert ("offload_tasks_total", frozenset({"name": "a", "queue": "default", "status": "succeeded"}.items())) \
            not in scrape(server)
    finally:
        server.close()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{server.host}:{server.port}/metrics", timeout=2)
