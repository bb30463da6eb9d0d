"""``/metrics``: the service's event relay and streams in Prometheus' text format.

Read from the hub when scraped (a collector, not counters updated on the hot
path), in a registry of the app's own so several apps in one process never
share numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from metaflow_stack.service.events import EventHub


class _HubCollector:
    def __init__(self, hub: EventHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        state = self.hub.describe()
        yield CounterMetricFamily(
            "metaflow_service_events_published", "Events the relay has published since start", value=state["published"]
        )
        yield CounterMetricFamily(
            "metaflow_service_events_parked",
            "Events the broker refused, set aside since start (listed at /admin/parked-events)",
            value=state["parked"],
        )
        yield CounterMetricFamily(
            "metaflow_service_stream_overflows",
            "Event streams ended because their client fell too far behind (told to resume)",
            value=self.hub.overflows,
        )
        yield GaugeMetricFamily("metaflow_service_event_streams", "Open /events streams", value=state["streams"])
        yield GaugeMetricFamily(
            "metaflow_service_relay_up",
            "1 while the relay publishes, 0 while it waits on an error",
            value=0 if state["error"] else 1,
        )


def registry_for(hub: EventHub) -> CollectorRegistry:
    """A registry that reports ``hub`` when scraped."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_HubCollector(hub))
    return registry
