"""The agent's Prometheus metrics, in a registry of its own (many agents share a simulator
process): counters read from the agent's tallies at scrape time, served latency observed per
request. `restnet agent --metrics-port` serves them."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
COUNTERS = {  # metric name (without _total) → (help, tally key)
    "restnet_agent_requests": ("inference requests served", "requests"),
    "restnet_agent_request_errors": ("inference requests failed for the device's reasons",
                                     "errors"),
    "restnet_agent_swaps": ("models swapped in", "swaps"),
    "restnet_agent_rollbacks": ("swaps rolled back by the health check or the canary "
                                "window", "rollbacks"),
    "restnet_agent_refusals": ("desired states refused (signature, addressee, replay)",
                               "refusals"),
}


class _Tallies(Collector):
    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        t = self.read()
        for name, (text, key) in COUNTERS.items():
            yield CounterMetricFamily(name, text, value=t[key])


class AgentMetrics:
    """One agent's metrics; `read` returns the tallies COUNTERS names."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Tallies(read))
        self.latency_ms = Histogram("restnet_agent_served_latency_ms",
                                    "served inference latency, ms", buckets=LATENCY_BUCKETS_MS,
                                    registry=self.registry)
