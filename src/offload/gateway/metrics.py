"""Prometheus metrics of one gateway, in a registry of its own.

A registry per gateway (not the global one) so two gateways in one process, or a gateway
mounted in an app that has metrics of its own, never collide on metric names.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from offload.brokers.base import QueueStats
from offload.workers import WorkerInfo

WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _BrokerCollector(Collector):
    """What ``GET /metrics`` last read: the broker's stats and the live workers of the registry.

    Per-worker series are labelled by the worker's id (host, pid and a random part) and its
    host: fine for tens of workers, but every restart starts new series, so a fleet of
    hundreds restarting often is better watched through the per-queue and total series.
    """

    def __init__(self) -> None:
        self.stats: QueueStats | None = None
        self.workers: Sequence[WorkerInfo] | None = None
        self.read_at = dt.datetime.now(dt.UTC)
        self.up = False

    def update(self, stats: QueueStats, workers: Sequence[WorkerInfo]) -> None:
        self.stats, self.workers, self.read_at = stats, workers, dt.datetime.now(dt.UTC)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("offload_broker_up", "1 when the gateway's last calls to the broker and result store succeeded")
        up.add_metric([], 1.0 if self.up else 0.0)
        yield up
        if self.stats is not None:
            yield from self._queues(self.stats)
        if self.workers is not None:
            yield from self._workers(self.workers)

    def _queues(self, stats: QueueStats) -> Iterator[Metric]:
        depth = GaugeMetricFamily("offload_queue_depth", "Tasks ready to run, per queue", labels=["queue"])
        for queue, count in sorted(stats.queued.items()):
            depth.add_metric([queue], float(count))
        yield depth
        age = GaugeMetricFamily(
            "offload_queue_oldest_age_seconds",
            "How long the oldest task ready in a queue has waited (absent when none is ready, and on amqp)",
            labels=["queue"],
        )
        for queue, seconds in sorted(stats.oldest_age_s.items()):
            age.add_metric([queue], seconds)
        yield age
        for name, doc, value in (
            ("offload_tasks_scheduled", "Tasks waiting for their eta", stats.scheduled),
            ("offload_tasks_running", "Tasks leased by a worker", stats.running),
            ("offload_dead_letters", "Messages in the dead-letter store", stats.dead),
        ):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], float(value))
            yield family

    def _workers(self, workers: Sequence[WorkerInfo]) -> Iterator[Metric]:
        live = GaugeMetricFamily("offload_workers_live", "Workers whose heartbeat is current")
        live.add_metric([], float(len(workers)))
        yield live
        consumers: dict[str, int] = {}
        for w in workers:
            for queue in w.queues:
                consumers[queue] = consumers.get(queue, 0) + 1
        per_queue = GaugeMetricFamily("offload_queue_workers", "Live workers consuming a queue", labels=["queue"])
        for queue, count in sorted(consumers.items()):
            per_queue.add_metric([queue], float(count))
        yield per_queue
        labels = ["worker", "hostname"]
        held = GaugeMetricFamily(
            "offload_worker_tasks_held", "Tasks a worker holds (running, or leased and about to run)", labels=labels
        )
        slots = GaugeMetricFamily("offload_worker_concurrency", "Tasks a worker runs at once at most", labels=labels)
        seen = GaugeMetricFamily(
            "offload_worker_last_seen_age_seconds", "Seconds since a worker's last heartbeat", labels=labels
        )
        for w in workers:
            held.add_metric([w.id, w.hostname], float(len(w.running)))
            slots.add_metric([w.id, w.hostname], float(w.concurrency))
            seen.add_metric([w.id, w.hostname], max((self.read_at - w.last_seen).total_seconds(), 0.0))
        yield from (held, slots, seen)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.states_served = Counter(
            "offload_gateway_states_served", "Task states sent to clients, by status", ["status"], registry=self.registry
        )
        self.waiting = Gauge(
            "offload_gateway_waiting_clients", "Clients waiting now (long polls, task streams, channel streams)",
            ["kind"], registry=self.registry,
        )
        self.wait_seconds = Histogram(
            "offload_gateway_wait_seconds", "How long long polls waited before their answer, by outcome",
            ["outcome"], buckets=WAIT_BUCKETS, registry=self.registry,
        )
        self.delivery_lag = Histogram(
            "offload_gateway_delivery_lag_seconds", "From a task's end to a waiting client being sent its final state",
            buckets=LAG_BUCKETS, registry=self.registry,
        )
        self.broker = _BrokerCollector()
        self.registry.register(self.broker)
        # Children created up front, so dashboards see zeros rather than missing series.
        for kind in ("poll", "stream", "channel"):
            self.waiting.labels(kind)
        for outcome in ("ready", "timeout", "gone"):
            self.wait_seconds.labels(outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)
