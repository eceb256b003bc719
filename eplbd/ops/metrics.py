"""Aggregates-only Prometheus metrics: a tiny registry and a ``/metrics`` HTTP endpoint.

eplbd exports what an operator alerts on (balance per group, epochs, rebalances, moves,
commit latency, dropped messages, live peers), never one series per expert or slot: a
DeepSeek-V3 group has 58 × 288 slots, which would swamp a Prometheus server. Each metric has
a fixed, small set of label names, and at most ``max_series`` label-value combinations;
past that, new combinations are refused (the sample is dropped and counted in
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

The text is exposition format 0.0.4: ``# HELP`` and ``# TYPE`` lines, then one sample per
line, label values escaped (backslash, double quote, newline).
"""

from __future__ import annotations

import math
import re
import socket
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "CONTENT_TYPE",
    "CardinalityError",
    "Counter",
    "Gauge",
    "MetricsServer",
    "Registry",
    "Summary",
    "format_value",
    "serve_metrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_MAX_SERIES = 64

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelKey = tuple[str, ...]


class CardinalityError(ValueError):
    """A metric was asked for more label-value combinations than its limit."""


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers plainly, +Inf, -Inf, NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Metric:
    kind = "untyped"

    def __init__(self, registry: Registry, name: str, help: str, labels: Iterable[str]) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.labels = tuple(labels)
        for label in self.labels:
            if not _LABEL_RE.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} on {name}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"duplicate label names on {name}")
        self.name = name
        self.help = help
        self._registry = registry
        self._lock = threading.Lock()

    def _key(self, values: dict[str, Any]) -> LabelKey | None:
        """The label key for these values, or None when refused (over the series limit)."""
        if set(values) != set(self.labels):
            raise ValueError(
                f"{self.name} takes labels {sorted(self.labels)}, got {sorted(values)}"
            )
        key = tuple(str(values[label]) for label in self.labels)
        if key in self._series_keys():
            return key
        if len(self._series_keys()) >= self._registry.max_series:
            self._registry._refuse(self.name, key)
            return None
        return key

    def _series_keys(self) -> set[LabelKey] | dict[LabelKey, Any]:
        raise NotImplementedError

    def _label_text(self, key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = list(zip(self.labels, key, strict=True)) + list(extra)
        if not pairs:
            return ""
        return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs) + "}"

    def samples(self) -> list[tuple[str, str, float]]:
        """(name suffix included, label text, value) for every series."""
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for name, labels, value in self.samples():
            lines.append(f"{name}{labels} {format_value(value)}")
        return "\n".join(lines) + "\n"


class Counter(_Metric):
    """A value that only grows (events, bytes). Names end in ``_total``."""

    kind = "counter"

    def __init__(self, registry: Registry, name: str, help: str, labels: Iterable[str]) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} should end in _total")
        super().__init__(registry, name, help, labels)
        self._values: dict[LabelKey, float] = {}
        if not self.labels:
            self._values[()] = 0.0

    def _series_keys(self) -> dict[LabelKey, float]:
        return self._values

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        if amount < 0 or math.isnan(amount):
            raise ValueError(f"a counter only goes up ({amount})")
        with self._lock:
            key = self._key(labels)
            if key is not None:
                self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: Any) -> float:
        key = tuple(str(labels[label]) for label in self.labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def samples(self) -> list[tuple[str, str, float]]:
        with self._lock:
            items = sorted(self._values.items())
        return [(self.name, self._label_text(k), v) for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down, or is computed at scrape time (:meth:`set_function`)."""

    kind = "gauge"

    def __init__(self, registry: Registry, name: str, help: str, labels: Iterable[str]) -> None:
        super().__init__(registry, name, help, labels)
        self._values: dict[LabelKey, float | Callable[[], float]] = {}

    def _series_keys(self) -> dict[LabelKey, Any]:
        return self._values

    def set(self, value: float, **labels: Any) -> None:
        with self._lock:
            key = self._key(labels)
            if key is not None:
                self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        with self._lock:
            key = self._key(labels)
            if key is not None:
                current = self._values.get(key, 0.0)
                base = current() if callable(current) else current
                self._values[key] = base + amount

    def dec(self, amount: float = 1.0, **labels: Any) -> None:
        self.inc(-amount, **labels)

    def set_function(self, fn: Callable[[], float], **labels: Any) -> None:
        """Read the value from ``fn()`` at each scrape (it must be fast and thread-safe)."""
        with self._lock:
            key = self._key(labels)
            if key is not None:
                self._values[key] = fn

    def remove(self, **labels: Any) -> None:
        """Drop a series (a group that went away), freeing its place under the limit."""
        key = tuple(str(labels[label]) for label in self.labels)
        with self._lock:
            self._values.pop(key, None)

    def value(self, **labels: Any) -> float:
        key = tuple(str(labels[label]) for label in self.labels)
        with self._lock:
            v = self._values.get(key, 0.0)
        return float(v()) if callable(v) else v

    def samples(self) -> list[tuple[str, str, float]]:
        with self._lock:
            items = sorted(self._values.items(), key=lambda kv: kv[0])
        out = []
        for key, v in items:
            try:
                value = float(v()) if callable(v) else v
            except Exception:  # a broken callback must not break the scrape
                value = math.nan
            out.append((self.name, self._label_text(key), value))
        return out


class Summary(_Metric):
    """Count and sum of observations (e.g. commit latency): ``rate(sum) / rate(count)`` is the
    mean over any window. No quantiles: they cannot be aggregated across daemons."""

    kind = "summary"

    def __init__(self, registry: Registry, name: str, help: str, labels: Iterable[str]) -> None:
        super().__init__(registry, name, help, labels)
        self._values: dict[LabelKey, list[float]] = {}
        if not self.labels:
            self._values[()] = [0.0, 0.0]

    def _series_keys(self) -> dict[LabelKey, list[float]]:
        return self._values

    def observe(self, value: float, **labels: Any) -> None:
        if math.isnan(value):
            return
        with self._lock:
            key = self._key(labels)
            if key is not None:
                cell = self._values.setdefault(key, [0.0, 0.0])
                cell[0] += 1
                cell[1] += value

    def count(self, **labels: Any) -> float:
        key = tuple(str(labels[label]) for label in self.labels)
        with self._lock:
            return self._values.get(key, [0.0, 0.0])[0]

    def sum(self, **labels: Any) -> float:
        key = tuple(str(labels[label]) for label in self.labels)
        with self._lock:
            return self._values.get(key, [0.0, 0.0])[1]

    def samples(self) -> list[tuple[str, str, float]]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        out = []
        for key, (count, total) in items:
            out.append((self.name + "_count", self._label_text(key), count))
            out.append((self.name + "_sum", self._label_text(key), total))
        return out


class Registry:
    """The metrics of one daemon. Thread-safe; render from any thread."""

    def __init__(self, *, max_series: int = DEFAULT_MAX_SERIES, strict: bool = False) -> None:
        if max_series < 1:
            raise ValueError("max_series must be >= 1")
        self.max_series = max_series
        self.strict = strict
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}
        self._refused = Counter(
            self,
            "eplbd_metrics_series_refused_total",
            "Samples dropped because their metric reached its series limit.",
            labels=(),
        )
        self._metrics[self._refused.name] = self._refused

    def _refuse(self, name: str, key: LabelKey) -> None:
        if self.strict:
            raise CardinalityError(
                f"{name}: more than {self.max_series} label combinations (refused {key})"
            )
        with self._refused._lock:
            self._refused._values[()] += 1
        return None

    def _add(self, metric: _Metric) -> Any:
        with self._lock:
            existing = self._metrics.get(metric.name)
            if existing is not None:
                if type(existing) is type(metric) and existing.labels == metric.labels:
                    return existing  # the same declaration twice gives the same metric
                raise ValueError(f"metric {metric.name} already registered differently")
            self._metrics[metric.name] = metric
            return metric

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        c: Counter = self._add(Counter(self, name, help, labels))
        return c

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Gauge:
        g: Gauge = self._add(Gauge(self, name, help, labels))
        return g

    def summary(self, name: str, help: str, labels: Iterable[str] = ()) -> Summary:
        s: Summary = self._add(Summary(self, name, help, labels))
        return s

    def get(self, name: str) -> _Metric:
        return self._metrics[name]

    def render(self) -> str:
        """The whole registry in text exposition format 0.0.4, metrics sorted by name."""
        with self._lock:
            metrics = sorted(self._metrics.values(), key=lambda m: m.name)
        return "".join(m.render() for m in metrics)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _body(self) -> tuple[int, bytes, str]:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            return 200, self.server.registry.render().encode("utf-8"), CONTENT_TYPE
        return 404, b"not found: try /metrics\n", "text/plain; charset=utf-8"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._respond(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(with_body=False)

    def _respond(self, with_body: bool) -> None:
        try:
            code, body, ctype = self._body()
        except Exception:  # never let a scrape take the thread down
            code, body, ctype = 500, b"internal error\n", "text/plain; charset=utf-8"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every 15 s would flood the daemon's log


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    registry: Registry


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """A running ``/metrics`` endpoint (see :func:`serve_metrics`)."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
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

    ``port=0`` binds an ephemeral port (read it from ``.port``). An IPv6 ``host`` (with a
    colon) binds an IPv6 socket. Raises ``OSError`` when the address is taken.
    """
    cls = _Server6 if ":" in host else _Server
    server = cls((host.strip("[]"), port), _Handler)
    server.registry = registry
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.2},
        name=f"eplbd-metrics-{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return MetricsServer(server, thread)
