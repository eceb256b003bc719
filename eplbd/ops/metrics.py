"""Aggregates-only Prometheus metrics: ``prometheus_client`` behind a cap on label combinations.

eplbd exports what an operator alerts on (balance per group, epochs, rebalances, moves,
commit latency, dropped messages, live peers), never one series per expert or slot: a
DeepSeek-V3 group has 58 × 288 slots, which would swamp a Prometheus server. The metrics,
the text exposition and the ``/metrics`` HTTP endpoint are ``prometheus_client``'s (the
library vLLM and SGLang already use); this module adds only the guard: each metric has a
fixed set of label names and at most ``max_series`` label-value combinations; past that, new
combinations are refused (the sample is dropped and counted in
``eplbd_metrics_series_refused_total``, or :class:`CardinalityError` is raised when the
registry is ``strict``, as tests should make it).

Usage::

    reg = Registry()
    rebalances = reg.counter("eplbd_rebalances_total", "Rebalance attempts.",
                             labels=("group", "outcome"))
    balance = reg.gauge("eplbd_balance", "Sum max / sum mean GPU load.", labels=("group",))
    latency = reg.summary("eplbd_commit_seconds", "PREPARE to COMMITTED.", labels=("group",))
    rebalances.inc(group="g0", outcome="committed")
    balance.set(1.07, group="g0")
    latency.observe(0.41, group="g0")
    server = serve_metrics(reg, "127.0.0.1", 0)   # server.port: the bound port
    ...
    server.close()

Each daemon has its own registry (a ``prometheus_client.CollectorRegistry``, never the
library's global one). The ``_created`` series ``prometheus_client`` adds to counters and
summaries are switched off (for the whole process) when a registry is made: they would double
every series and say nothing an operator alerts on.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

__all__ = [
    "CardinalityError",
    "Counter",
    "Gauge",
    "MetricsBindError",
    "MetricsServer",
    "Registry",
    "Summary",
    "serve_metrics",
]

DEFAULT_MAX_SERIES = 64

LabelKey = tuple[str, ...]


class CardinalityError(ValueError):
    """A metric was asked for more label-value combinations than its limit."""


class _Guarded:
    """One ``prometheus_client`` metric and the label combinations it has been given."""

    kind = ""

    def __init__(self, registry: Registry, metric: Any, name: str, labels: tuple[str, ...]):
        self.name = name
        self.labels = labels
        self._registry = registry
        self._metric = metric
        self._keys: set[LabelKey] = set()
        self._lock = threading.Lock()

    def _key(self, values: dict[str, Any]) -> LabelKey:
        if set(values) != set(self.labels):
            raise ValueError(
                f"{self.name} takes labels {sorted(self.labels)}, got {sorted(values)}"
            )
        return tuple(str(values[label]) for label in self.labels)

    def _child(self, values: dict[str, Any]) -> Any:
        """The series for these label values, or None when refused (over the series cap)."""
        key = self._key(values)
        if not self.labels:
            return self._metric
        with self._lock:
            if key not in self._keys:
                if len(self._keys) >= self._registry.max_series:
                    self._registry._refuse(self.name, key)
                    return None
                self._keys.add(key)
        return self._metric.labels(*key)

    def _sample(self, suffix: str, values: dict[str, Any]) -> float:
        key = self._key(values)
        got = self._registry.collector_registry.get_sample_value(
            self.name + suffix, dict(zip(self.labels, key, strict=True))
        )
        return 0.0 if got is None else float(got)


class Counter(_Guarded):
    """A value that only grows (events, bytes). Names end in ``_total``."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        if amount < 0 or math.isnan(amount):
            raise ValueError(f"a counter only goes up ({amount})")
        child = self._child(labels)
        if child is not None:
            child.inc(amount)

    def value(self, **labels: Any) -> float:
        return self._sample("", labels)


class Gauge(_Guarded):
    """A value that goes up and down, or is computed at scrape time (:meth:`set_function`)."""

    kind = "gauge"

    def set(self, value: float, **labels: Any) -> None:
        child = self._child(labels)
        if child is not None:
            child.set(float(value))

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        child = self._child(labels)
        if child is not None:
            child.inc(amount)

    def dec(self, amount: float = 1.0, **labels: Any) -> None:
        self.inc(-amount, **labels)

    def set_function(self, fn: Callable[[], float], **labels: Any) -> None:
        """Read the value from ``fn()`` at each scrape (it must be fast and thread-safe); a
        callback that raises shows NaN instead of failing the scrape."""

        def safe() -> float:
            try:
                return float(fn())
            except Exception:
                return math.nan

        child = self._child(labels)
        if child is not None:
            child.set_function(safe)

    def remove(self, **labels: Any) -> None:
        """Drop a series (a group that went away), freeing its place under the cap."""
        key = self._key(labels)
        with self._lock:
            if key not in self._keys:
                return
            self._keys.discard(key)
        self._metric.remove(*key)

    def value(self, **labels: Any) -> float:
        return self._sample("", labels)


class Summary(_Guarded):
    """Count and sum of observations (e.g. commit latency): ``rate(sum) / rate(count)`` is the
    mean over any window. No quantiles: they cannot be aggregated across daemons."""

    kind = "summary"

    def observe(self, value: float, **labels: Any) -> None:
        if math.isnan(value):
            return
        child = self._child(labels)
        if child is not None:
            child.observe(value)

    def count(self, **labels: Any) -> float:
        return self._sample("_count", labels)

    def sum(self, **labels: Any) -> float:
        return self._sample("_sum", labels)


_KINDS: dict[str, Any] = {
    "counter": (Counter, prometheus_client.Counter),
    "gauge": (Gauge, prometheus_client.Gauge),
    "summary": (Summary, prometheus_client.Summary),
}


class Registry:
    """The metrics of one daemon. Thread-safe; render from any thread."""

    def __init__(self, *, max_series: int = DEFAULT_MAX_SERIES, strict: bool = False) -> None:
        if max_series < 1:
            raise ValueError("max_series must be >= 1")
        prometheus_client.disable_created_metrics()
        self.max_series = max_series
        self.strict = strict
        self.collector_registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._metrics: dict[str, _Guarded] = {}
        self._refused = self.counter(
            "eplbd_metrics_series_refused_total",
            "Samples dropped because their metric reached its series limit.",
        )

    def _refuse(self, name: str, key: LabelKey) -> None:
        if self.strict:
            raise CardinalityError(
                f"{name}: more than {self.max_series} label combinations (refused {key})"
            )
        self._refused.inc()

    def _add(self, kind: str, name: str, help: str, labels: Iterable[str]) -> Any:
        ours, theirs = _KINDS[kind]
        label_names = tuple(labels)
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name!r} should end in _total")
        with self._lock:
            existing = self._metrics.get(name)
            if existing is not None:
                if existing.kind == kind and existing.labels == label_names:
                    return existing  # the same declaration twice gives the same metric
                raise ValueError(f"metric {name} already registered differently")
            if len(set(label_names)) != len(label_names):
                raise ValueError(f"duplicate label names on {name}")
            metric = theirs(name, help, label_names, registry=self.collector_registry)
            guarded = ours(self, metric, name, label_names)
            self._metrics[name] = guarded
            return guarded

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        c: Counter = self._add("counter", name, help, labels)
        return c

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Gauge:
        g: Gauge = self._add("gauge", name, help, labels)
        return g

    def summary(self, name: str, help: str, labels: Iterable[str] = ()) -> Summary:
        s: Summary = self._add("summary", name, help, labels)
        return s

    def render(self) -> str:
        """The whole registry in the text exposition format."""
        return generate_latest(self.collector_registry).decode("utf-8")


class MetricsServer:
    """A running ``/metrics`` endpoint (see :func:`serve_metrics`)."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        addr = server.server_address
        self.host: str = str(addr[0])
        self.port: int = int(addr[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (waits for the serving thread)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(registry: Registry, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` binds an ephemeral port (read it from ``.port``); an IPv6 ``host`` binds an
    IPv6 socket. Raises :class:`MetricsBindError` (an OSError) naming the address when it is
    taken.
    """
    try:
        server, thread = start_http_server(
            port, addr=host.strip("[]"), registry=registry.collector_registry
        )
    except OSError as e:
        raise MetricsBindError(
            e.errno,
            f"cannot serve metrics at {host}:{port}: {e.strerror or e} (the metrics setting; "
            "empty turns the endpoint off)",
        ) from None
    return MetricsServer(server, thread)


class MetricsBindError(OSError):
    """The ``/metrics`` endpoint cannot be bound; the message names the address."""

    def __str__(self) -> str:
        return str(self.strerror)
