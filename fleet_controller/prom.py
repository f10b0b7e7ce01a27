"""The controller's Prometheus metrics, in a registry of its own (`restnet controller
--metrics-port`): counters read from the controller's own tallies at scrape time, histograms
observed as events happen."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .costerror import WARMUP_REPORTS

REACTION_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
ERROR_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 5.0)
ACC_BUCKETS = tuple(k / 10 for k in range(1, 11))


class _Tallies(Collector):
    """Counters and gauges the controller already keeps, read when scraped."""

    def __init__(self, read: Callable[[], dict]) -> None:
        self.read = read

    def collect(self) -> Iterator:
        t = self.read()
        deps = GaugeMetricFamily("restnet_controller_deployments",
                                 "deployments in the store, by status", labels=["status"])
        for status, n in sorted(t["deployments"].items()):
            deps.add_metric([status], n)
        yield deps
        sent = CounterMetricFamily("restnet_controller_bytes_sent",
                                   "bytes published to devices", labels=["kind"])
        sent.add_metric(["desired"], t["desired_bytes"])
        sent.add_metric(["chunks"], t["chunk_bytes"])
        yield sent
        yield CounterMetricFamily("restnet_controller_adaptations",
                                  "deployments that ended HEALTHY", value=t["adaptations"])
        yield CounterMetricFamily("restnet_controller_dropped",
                                  "bad messages counted and dropped", value=t["dropped"])
        refused = CounterMetricFamily("restnet_controller_artifact_requests",
                                      "segment requests by outcome (anything but queued is a "
                                      "refusal)", labels=["outcome"])
        for outcome, n in sorted(t["art"].items()):
            refused.add_metric([outcome], n)
        yield refused
        yield CounterMetricFamily("restnet_controller_rollouts_aborted",
                                  "policy rollouts halted", value=t["rollouts_aborted"])


class ControllerMetrics:
    """One controller's metrics; `read` returns its tallies (see `_Tallies.collect`)."""

    def __init__(self, read: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Tallies(read))
        self.reaction_ms = Histogram(
            "restnet_controller_reaction_ms", "trigger telemetry → HEALTHY ack, ms",
            buckets=REACTION_BUCKETS_MS, registry=self.registry)
        self.cost_error = Histogram(
            "restnet_controller_cost_error_ratio", "|predicted − measured| / measured p95 "
            "of the running model, predicted before the report, after each device's first "
            f"{WARMUP_REPORTS} reports (fleet_controller.costerror)", buckets=ERROR_BUCKETS,
            registry=self.registry)
        self.probe_accuracy = Histogram(
            "restnet_controller_probe_accuracy", "accuracy on devices' labelled probes after "
            "a swap (HEALTHY acks)", buckets=ACC_BUCKETS, registry=self.registry)
