"""Reading a daemon's /metrics endpoint in tests."""

from __future__ import annotations

import re
import urllib.request

_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """A Prometheus text endpoint as {'name{labels}': value}, labels sorted by name
    (``eplbd_x_total{group="g",outcome="committed"}``)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, brace, labels = key.partition("{")
        if brace:
            pairs = sorted(_LABEL.findall(labels))
            key = name + "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"
        out[key] = float(value)
    return out
