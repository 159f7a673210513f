"""A FailoverClient's metrics in an app's own Prometheus registry.

The Rust core counts and formats the metrics (`FailoverClient.metrics()`, also
served by `FailoverProxy` at `/_keyfailover/metrics`); for a FastAPI app that
already serves `/metrics` with `prometheus_client`, one line adds them::

    from prometheus_client import REGISTRY
    from keyfailover.metrics import collector

    REGISTRY.register(collector(client))

`prometheus_client` is an optional dependency (`pip install prometheus-client`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from keyfailover._native import FailoverClient

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["PoolCollector", "collector"]


class PoolCollector:
    """A `prometheus_client` collector reading a FailoverClient's metrics at each scrape."""

    def __init__(self, client: FailoverClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.parser import text_string_to_metric_families

        yield from text_string_to_metric_families(self.client.metrics())

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: the families are read at scrape time.
        return ()

    def __repr__(self) -> str:
        return f"PoolCollector({self.client!r})"


def collector(client: FailoverClient) -> PoolCollector:
    """The pool metrics of `client`, for `prometheus_client.REGISTRY.register(...)`."""
    return PoolCollector(client)
