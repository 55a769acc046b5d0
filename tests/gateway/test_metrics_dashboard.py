"""docs/grafana/offload.json, the Grafana dashboard, asks only for metrics offload exports (the
gateway's and the workers'), so that renaming a metric cannot leave a panel silently empty."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from offload.brokers.base import QueueStats
from offload.gateway.metrics import GatewayMetrics
from offload.worker.metrics import WorkerMetrics
from offload.workers import WorkerInfo
from tests.support import ROOT

DASHBOARD = ROOT / "docs" / "grafana" / "offload.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
METRIC = re.compile(r"\boffload_[a-z0-9_]+")


def exported_names() -> set[str]:
    """Every sample name the gateway and a worker export, with each kind of series present."""
    gateway = GatewayMetrics()
    now = dt.datetime.now(dt.UTC)
    worker = WorkerInfo(id="w1", hostname="h", pid=1, queues=("default",), concurrency=2, pool="thread",
                        running=("t1",), started_at=now, last_seen=now, version="0")
    gateway.broker.update(QueueStats(queued={"default": 1}, oldest_age_s={"default": 1.0}), [worker])
    worker_metrics = WorkerMetrics()
    worker_metrics.observe("shop.mail", "default", "succeeded", 0.1)
    text = gateway.render().decode() + generate_latest(worker_metrics.registry).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def queries(board: dict[str, Any]) -> list[str]:
    """The PromQL of every panel's targets and of every query variable."""
    found = [t["expr"] for p in board["panels"] for t in p["targets"]]
    found += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return found


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    exported = exported_names()
    for query in queries(dashboard()):
        used = METRIC.findall(query)
        assert used, f"queries no offload metric: {query}"
        assert set(used) <= exported, f"{sorted(set(used) - exported)} in {query!r}: not exported by offload"


def test_panels_cover_queues_workers_tasks_and_dead_letters() -> None:
    used = {name for query in queries(dashboard()) for name in METRIC.findall(query)}
    for name in ("offload_queue_depth", "offload_queue_oldest_age_seconds", "offload_tasks_running",
                 "offload_workers_live", "offload_tasks_total", "offload_task_duration_seconds_bucket",
                 "offload_dead_letters"):
        assert name in used, name


def test_every_query_uses_the_datasource_variable() -> None:
    board = dashboard()
    [variable] = [v for v in board["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    for panel in board["panels"]:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
