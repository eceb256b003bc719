"""The agent's Prometheus metrics: aggregates only (per node, never per worker or slot).

The socket loop calls :meth:`AgentMetrics.update` about once a second with the core and the
wire counters; counters advance by the difference since the last update, so the core keeps
plain integers and never touches the registry from its hot path.
"""

from __future__ import annotations

from typing import Any

from eplbd.ops.metrics import Registry

__all__ = ["AgentMetrics"]


class AgentMetrics:
    """Series: workers, groups, planner_connected, open windows, held snapshots (gauges);
    bad messages by side and reason, dropped messages by reason, relayed messages by type
    and direction, forwarded snapshots by kind, worker events (counters)."""

    def __init__(self, registry: Registry) -> None:
        r = registry
        self.registry = registry
        self.workers = r.gauge("eplbd_agent_workers", "Workers registered on this node.")
        self.groups = r.gauge("eplbd_agent_groups", "EP groups with a worker on this node.")
        self.planner_connected = r.gauge(
            "eplbd_agent_planner_connected", "1 while a planner session is up (welcomed, live)."
        )
        self.open_windows = r.gauge(
            "eplbd_agent_open_windows", "Recording windows waiting for the other local ranks."
        )
        self.held = r.gauge(
            "eplbd_agent_held_snapshots", "Merged snapshots held while the planner is away."
        )
        self.bad = r.counter(
            "eplbd_agent_bad_messages_total",
            "Messages received and dropped as malformed or out of order.",
            labels=("side", "reason"),
        )
        self.dropped = r.counter(
            "eplbd_agent_dropped_total",
            "Messages not sent or not kept (full queue, peer gone, planner away).",
            labels=("reason",),
        )
        self.relayed = r.counter(
            "eplbd_agent_relayed_total",
            "prepare/abort relayed down to workers, staged/aborted/committed up to the planner.",
            labels=("type", "direction"),
        )
        self.forwarded = r.counter(
            "eplbd_agent_snapshots_forwarded_total",
            "Merged snapshots sent to the planner (complete: every local rank in it).",
            labels=("kind",),
        )
        self.received = r.counter(
            "eplbd_agent_snapshots_received_total", "Snapshots accepted from workers."
        )
        self.events = r.counter(
            "eplbd_agent_events_total",
            "Workers joined and left (by reason), planner sessions lost and restarted.",
            labels=("event",),
        )
        self._last: dict[tuple[str, ...], float] = {}

    def _delta(self, key: tuple[str, ...], value: float) -> float:
        prev = self._last.get(key, 0.0)
        self._last[key] = value
        return max(0.0, value - prev)

    def update(self, status: dict[str, Any], wire: dict[str, dict[str, Any]]) -> None:
        """``status``: :meth:`AgentCore.status`; ``wire``: side -> WireCounters.as_dict()."""
        self.workers.set(len(status["workers"]))
        self.groups.set(sum(1 for g in status["groups"].values() if g["local_ranks"]))
        self.planner_connected.set(1.0 if status["planner"]["synced"] else 0.0)
        self.open_windows.set(status["open_windows"])
        self.held.set(sum(g["held_snapshots"] for g in status["groups"].values()))
        for side, counters in wire.items():
            for reason, n in counters["bad"].items():
                d = self._delta(("bad", side, reason), n)
                if d:
                    self.bad.inc(d, side=side, reason=reason)
            for reason, n in counters["dropped"].items():
                d = self._delta(("dropped", side, reason), n)
                if d:
                    self.dropped.inc(d, reason=f"{side}_{reason}")
        for key, n in status["dropped"].items():
            d = self._delta(("core_dropped", key), n)
            if d:
                self.dropped.inc(d, reason=key.replace(":", "_"))
        for key, n in status["relayed"].items():
            d = self._delta(("relayed", key), n)
            if d:
                msg_type, _, direction = key.partition(":")
                self.relayed.inc(d, type=msg_type, direction=direction)
        for kind, n in status["forwarded"].items():
            d = self._delta(("forwarded", kind), n)
            if d:
                self.forwarded.inc(d, kind=kind)
        n_recv = wire.get("workers", {}).get("received", {}).get("snapshot", 0)
        d = self._delta(("received",), n_recv)
        if d:
            self.received.inc(d)
        for key, n in status["events"].items():
            d = self._delta(("events", key), n)
            if d:
                self.events.inc(d, event=key.replace(":", "_"))
