"""Prometheus metrics of one gateway, in a registry of its own.

A registry per gateway (not the global one) so two gateways in one process, or a gateway
mounted in an app that has metrics of its own, never collide on metric names.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from offload.brokers.base import QueueStats

WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _BrokerCollector(Collector):
    """Queue depths from the broker's stats, as last refreshed by ``GET /metrics``."""

    def __init__(self) -> None:
        self.stats: QueueStats | None = None
        self.up = False

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("offload_broker_up", "1 when the gateway's last call to the broker succeeded")
        up.add_metric([], 1.0 if self.up else 0.0)
        yield up
        if self.stats is None:
            return
        depth = GaugeMetricFamily("offload_queue_depth", "Tasks ready to run, per queue", labels=["queue"])
        for queue, count in sorted(self.stats.queued.items()):
            depth.add_metric([queue], float(count))
        yield depth
        for name, doc, value in (
            ("offload_tasks_scheduled", "Tasks waiting for their eta", self.stats.scheduled),
            ("offload_tasks_running", "Tasks leased by a worker", self.stats.running),
            ("offload_dead_letters", "Messages in the dead-letter store", self.stats.dead),
        ):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], float(value))
            yield family


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
