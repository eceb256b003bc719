"""The planner's Prometheus metrics: aggregates per group, never per expert or slot.

Series (labels in braces):

- ``eplbd_planner_balance{group,kind}``: Σ max / Σ mean GPU load on the forecast; kind
  ``now`` (layout in service), ``after`` (what the last decision would give), ``bound``;
- ``eplbd_planner_time_balance{group}``: Σ max / Σ mean of the GPUs' modelled expert time
  per step, layout in service on the forecast (with a cost model: ``expert_shape`` or
  ``cost_model``);
- ``eplbd_planner_step_seconds{group}``: the modelled expert time of a step (Σ over layers
  of the slowest GPU);
- ``eplbd_planner_activated_slots{group,kind}``: slots per GPU that receive rows in a step
  (each a weight read), kind ``mean`` (over layers and GPUs) or ``max``;
- ``eplbd_planner_epoch{group}``: committed epoch in service;
- ``eplbd_planner_attempts_total{group,outcome}``: finished attempts (committed / aborted);
- ``eplbd_planner_prepares_total{group}``: attempts started;
- ``eplbd_planner_moves_total{group}``: slots moved by committed epochs;
- ``eplbd_planner_commit_seconds{group}``: prepare -> first committed report (summary);
- ``eplbd_planner_decisions_total{group,reason}``: trigger evaluations by reason;
- ``eplbd_planner_snapshots_total{group}``: snapshots accepted;
- ``eplbd_planner_traffic_changes_total{group}``: changes of traffic the regime forecast
  found (``forecast = regime``; its mean restarted);
- ``eplbd_planner_dropped_total{reason}``: messages dropped (wire reasons, unknown_epoch...);
- ``eplbd_planner_peers{kind,state}``: agents and ranks by liveness;
- ``eplbd_planner_pending{group}``: 1 while a commit is in flight;
- ``eplbd_planner_store_writable``: 0 while the state directory refuses writes;
- ``eplbd_planner_store_errors_total``: failed writes of the state directory;
- ``eplbd_planner_curve_reloads_total{outcome}``: allow-list reloads (ok / refused);
- ``eplbd_planner_curve_allowed_keys``: client keys the allow-list holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eplbd.ops.metrics import Registry

if TYPE_CHECKING:
    from eplbd.controller._core import PlannerCore
    from eplbd.controller._figures import TimeFigures
    from eplbd.controller._trigger import Decision

__all__ = ["PlannerMetrics"]


class PlannerMetrics:
    """The hooks :class:`PlannerCore` calls, writing into an :class:`eplbd.ops.Registry`."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry or Registry()
        r = self.registry
        self.balance = r.gauge(
            "eplbd_planner_balance",
            "Sum max / sum mean GPU load on the forecast (1.0 is perfect).",
            labels=("group", "kind"),
        )
        self.time_balance = r.gauge(
            "eplbd_planner_time_balance",
            "Sum max / sum mean of the GPUs' modelled expert time per step, layout in service.",
            labels=("group",),
        )
        self.step_seconds = r.gauge(
            "eplbd_planner_step_seconds",
            "Modelled expert time of a step (sum over layers of the slowest GPU), in seconds.",
            labels=("group",),
        )
        self.activated = r.gauge(
            "eplbd_planner_activated_slots",
            "Slots per GPU that receive rows in a step (weight reads): mean or max.",
            labels=("group", "kind"),
        )
        self.epoch_g = r.gauge(
            "eplbd_planner_epoch", "Committed layout epoch in service.", labels=("group",)
        )
        self.attempts = r.counter(
            "eplbd_planner_attempts_total",
            "Finished two-phase commits by outcome.",
            labels=("group", "outcome"),
        )
        self.prepares = r.counter(
            "eplbd_planner_prepares_total", "Two-phase commits started.", labels=("group",)
        )
        self.moves = r.counter(
            "eplbd_planner_moves_total", "Slots moved by committed epochs.", labels=("group",)
        )
        self.latency = r.summary(
            "eplbd_planner_commit_seconds",
            "Seconds from prepare to the first committed report.",
            labels=("group",),
        )
        self.decisions = r.counter(
            "eplbd_planner_decisions_total",
            "Trigger evaluations by reason.",
            labels=("group", "reason"),
        )
        self.snapshots = r.counter(
            "eplbd_planner_snapshots_total", "Load snapshots accepted.", labels=("group",)
        )
        self.traffic_changes = r.counter(
            "eplbd_planner_traffic_changes_total",
            "Changes of traffic the regime forecast found (its mean restarted).",
            labels=("group",),
        )
        self.drops = r.counter(
            "eplbd_planner_dropped_total", "Messages dropped, by reason.", labels=("reason",)
        )
        self.peers_g = r.gauge(
            "eplbd_planner_peers", "Agents and ranks by liveness.", labels=("kind", "state")
        )
        self.store_writable = r.gauge(
            "eplbd_planner_store_writable",
            "0 while the state directory refuses writes (no layout change is durable), else 1.",
        )
        self.store_writable.set(1)
        self.store_errors = r.counter(
            "eplbd_planner_store_errors_total", "Writes of the state directory that failed."
        )
        self.curve_reloads = r.counter(
            "eplbd_planner_curve_reloads_total",
            "CURVE allow-list reloads (SIGHUP) by outcome: ok, or refused (the old list stays).",
            labels=("outcome",),
        )
        self.curve_allowed = r.gauge(
            "eplbd_planner_curve_allowed_keys", "Client public keys the CURVE allow-list holds."
        )
        self.pending = r.gauge(
            "eplbd_planner_pending", "1 while a two-phase commit is in flight.", labels=("group",)
        )

    # hooks ---------------------------------------------------------------------------------

    def dropped(self, reason: str) -> None:
        self.drops.inc(reason=reason)

    def epoch(self, group: str, epoch: int) -> None:
        self.epoch_g.set(epoch, group=group)

    def prepared(self, group: str) -> None:
        self.prepares.inc(group=group)
        self.pending.set(1, group=group)

    def commit(self, group: str, latency_s: float | None, moves: int) -> None:
        if latency_s is not None:
            self.latency.observe(latency_s, group=group)
        self.moves.inc(max(0, moves), group=group)

    def outcome(self, group: str, state: str) -> None:
        self.attempts.inc(group=group, outcome=state)
        self.pending.set(0, group=group)

    def curve_reload(self, outcome: str) -> None:
        self.curve_reloads.inc(outcome=outcome)

    def curve_keys(self, n: int) -> None:
        self.curve_allowed.set(n)

    def store_write(self, ok: bool) -> None:
        self.store_writable.set(1 if ok else 0)
        if not ok:
            self.store_errors.inc()

    def snapshot(self, group: str) -> None:
        self.snapshots.inc(group=group)

    def traffic_change(self, group: str) -> None:
        self.traffic_changes.inc(group=group)

    def decision(self, group: str, d: Decision, *, intention: bool = True) -> None:
        """Count ``d``; its balances become the group's gauges only when it is the planner's
        intention (not a refused command or a dry run)."""
        self.decisions.inc(group=group, reason=d.reason)
        if not intention:
            return
        for kind, value in (
            ("now", d.balance_now),
            ("after", d.balance_after),
            ("bound", d.lower_bound),
        ):
            if value is not None:
                self.balance.set(value, group=group, kind=kind)

    def time(self, group: str, tf: TimeFigures) -> None:
        """The modelled time figures of the layout in service."""
        self.time_balance.set(tf.balance, group=group)
        self.step_seconds.set(tf.step_us * 1e-6, group=group)
        self.activated.set(tf.activated_mean, group=group, kind="mean")
        self.activated.set(tf.activated_max, group=group, kind="max")

    def peers(self, core: PlannerCore) -> None:
        counts: dict[tuple[str, str], int] = {}
        for name in core.agents:
            st = core.liveness.state(name) or "dead"
            counts[("agent", st)] = counts.get(("agent", st), 0) + 1
        for g in core.groups.values():
            for r in range(g.ep_size or 0):
                st = core.rank_state(g, r)
                counts[("rank", st)] = counts.get(("rank", st), 0) + 1
        for kind in ("agent", "rank"):
            for st in ("alive", "stale", "dead", "left", "rejoining", "missing"):
                if kind == "agent" and st in ("left", "rejoining", "missing"):
                    continue
                self.peers_g.set(counts.get((kind, st), 0), kind=kind, state=st)

    def render(self) -> str:
        return self.registry.render()
