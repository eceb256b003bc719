from __future__ import annotations

import math
import re
import threading
import urllib.request

import pytest

from eplbd.ops.metrics import CardinalityError, Registry, serve_metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, frozenset], float]]:
    """A strict reader of text format 0.0.4: (name -> (type, help), (name, labels) -> value)."""
    meta: dict[str, list[str]] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            meta.setdefault(name, ["", ""])[1] = help_.replace("\\n", "\n").replace("\\\\", "\\")
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "summary", "untyped", "histogram")
            meta.setdefault(name, ["", ""])[0] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            labels = m.group(3) or ""
            pairs = _LABEL.findall(labels)
            rebuilt = ",".join(f'{k}="{v}"' for k, v in pairs)
            assert rebuilt == labels, f"bad labels {labels!r}"
            decoded = frozenset(
                (k, re.sub(r"\\(.)", lambda x: "\n" if x.group(1) == "n" else x.group(1), v))
                for k, v in pairs
            )
            base = re.sub(r"_(count|sum)$", "", m.group(1))
            assert m.group(1) in meta or base in meta, f"sample before its TYPE: {line!r}"
            samples[(m.group(1), decoded)] = float(m.group(4).replace("Inf", "inf"))
    return {k: (v[0], v[1]) for k, v in meta.items()}, samples


def test_render_format_and_escaping() -> None:
    reg = Registry(strict=True)
    c = reg.counter(
        "eplbd_rebalances_total", 'Rebalance "attempts".\nBy outcome \\.', ("group", "outcome")
    )
    g = reg.gauge("eplbd_balance", "Balance.", ("group",))
    s = reg.summary("eplbd_commit_seconds", "Commit latency.", ("group",))
    c.inc(group='g"0\\\n', outcome="committed")
    c.inc(2, group='g"0\\\n', outcome="committed")
    c.inc(group="g1", outcome="aborted")
    g.set(1.25, group="g1")
    g.set(float("inf"), group="g2")
    s.observe(0.5, group="g1")
    s.observe(0.25, group="g1")
    meta, samples = parse(reg.render())
    assert meta["eplbd_rebalances_total"] == ("counter", 'Rebalance "attempts".\nBy outcome \\.')
    assert meta["eplbd_balance"][0] == "gauge"
    assert meta["eplbd_commit_seconds"][0] == "summary"
    assert (
        samples[
            ("eplbd_rebalances_total", frozenset({("group", 'g"0\\\n'), ("outcome", "committed")}))
        ]
        == 3
    )
    assert (
        samples[("eplbd_rebalances_total", frozenset({("group", "g1"), ("outcome", "aborted")}))]
        == 1
    )
    assert samples[("eplbd_balance", frozenset({("group", "g1")}))] == 1.25
    assert samples[("eplbd_balance", frozenset({("group", "g2")}))] == math.inf
    assert samples[("eplbd_commit_seconds_count", frozenset({("group", "g1")}))] == 2
    assert samples[("eplbd_commit_seconds_sum", frozenset({("group", "g1")}))] == 0.75
    assert samples[("eplbd_metrics_series_refused_total", frozenset())] == 0


def test_gauge_function_and_remove() -> None:
    reg = Registry()
    peers = {"n": 3}
    g = reg.gauge("eplbd_peers", "Live peers.", ("kind",))
    g.set_function(lambda: peers["n"], kind="agent")
    g.set_function(lambda: 1 / 0, kind="broken")
    g.inc(kind="worker")
    g.inc(kind="worker")
    g.dec(kind="worker")
    _, samples = parse(reg.render())
    assert samples[("eplbd_peers", frozenset({("kind", "agent")}))] == 3
    assert math.isnan(samples[("eplbd_peers", frozenset({("kind", "broken")}))])
    assert samples[("eplbd_peers", frozenset({("kind", "worker")}))] == 1
    peers["n"] = 5
    assert g.value(kind="agent") == 5
    g.remove(kind="broken")
    assert ("eplbd_peers", frozenset({("kind", "broken")})) not in parse(reg.render())[1]


def test_cardinality_limit() -> None:
    reg = Registry(max_series=3)
    c = reg.counter("eplbd_drops_total", "Drops.", ("reason",))
    for r in ["a", "b", "c", "d", "e"]:
        c.inc(reason=r)
    c.inc(reason="a")  # an existing series still counts
    _, samples = parse(reg.render())
    assert {dict(k[1]).get("reason") for k in samples if k[0] == "eplbd_drops_total"} == {
        "a",
        "b",
        "c",
    }
    assert samples[("eplbd_drops_total", frozenset({("reason", "a")}))] == 2
    assert samples[("eplbd_metrics_series_refused_total", frozenset())] == 2

    strict = Registry(max_series=1, strict=True)
    g = strict.gauge("eplbd_x", "x", ("group",))
    g.set(1, group="a")
    with pytest.raises(CardinalityError):
        g.set(1, group="b")


def test_declaration_checks() -> None:
    reg = Registry()
    with pytest.raises(ValueError, match="_total"):
        reg.counter("eplbd_events", "x")
    with pytest.raises(ValueError, match="label"):
        reg.gauge("eplbd_ok", "x", ("__reserved",))
    c = reg.counter("eplbd_a_total", "x", ("group",))
    assert reg.counter("eplbd_a_total", "x", ("group",)) is c
    with pytest.raises(ValueError, match="already"):
        reg.gauge("eplbd_a_total", "x", ("group",))
    with pytest.raises(ValueError, match="labels"):
        c.inc(node="n1")
    with pytest.raises(ValueError, match="up"):
        c.inc(-1, group="g")


def test_scrape_over_http() -> None:
    reg = Registry()
    c = reg.counter("eplbd_snapshots_total", "Snapshots received.", ("group",))
    c.inc(5, group="g0")
    server = serve_metrics(reg, "127.0.0.1", 0)
    try:
        assert server.port > 0
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            _, samples = parse(resp.read().decode())
        assert samples[("eplbd_snapshots_total", frozenset({("group", "g0")}))] == 5

        # updates from other threads show at the next scrape
        def work() -> None:
            for _ in range(100):
                c.inc(group="g0")

        t = threading.Thread(target=work)
        t.start()
        t.join(timeout=5)
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            _, samples = parse(resp.read().decode())
        assert samples[("eplbd_snapshots_total", frozenset({("group", "g0")}))] == 105
    finally:
        server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)


def test_a_taken_port_is_named() -> None:
    reg = Registry()
    with (
        serve_metrics(reg, "127.0.0.1", 0) as first,
        pytest.raises(
            OSError, match=f"cannot serve metrics at 127.0.0.1:{first.port}: .*metrics setting"
        ),
    ):
        serve_metrics(reg, "127.0.0.1", first.port)


def test_no_created_series() -> None:
    """prometheus_client's _created series would double every counter and summary."""
    reg = Registry()
    reg.counter("eplbd_a_total", "a", ("group",)).inc(group="g")
    reg.summary("eplbd_b_seconds", "b", ("group",)).observe(1.0, group="g")
    assert "_created" not in reg.render()
