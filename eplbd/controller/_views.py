"""The status views: the ``data`` maps behind ``eplbd status``, ``top``, ``heatmap`` and
``history`` (schemas in docs/daemons.md, "Status API").

Read-only functions of the planner core's state (:class:`~eplbd.controller._state.CoreBase`); nothing here
changes it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from eplbd import __version__
from eplbd.controller._figures import (
    TimeFigures,
    balance,
    gpu_loads,
    lower_bound_balance,
    total_balance,
)
from eplbd.controller._state import STATUS_SCHEMA_VERSION, CoreBase, GroupState, round_or_none
from eplbd.wire import DEAD

__all__ = ["estimate", "status_data"]


def status_data(
    core: CoreBase, what: str = "status", group: str | None = None, *, epoch: int | None = None
) -> dict[str, Any]:
    """The ``data`` map of a status_reply (schemas in docs/daemons.md)."""
    groups = (
        [core.groups[group]] if group is not None else [core.groups[k] for k in sorted(core.groups)]
    )
    data: dict[str, Any] = {
        "schema_version": STATUS_SCHEMA_VERSION,
        "what": what,
        "at": core.clock.time(),
    }
    if what == "status":
        data["planner"] = planner_info(core)
        data["agents"] = agents_info(core)
        data["groups"] = [group_status(core, g) for g in groups]
    elif what == "history":
        data["groups"] = [
            {
                "group": g.name,
                "epoch": g.record.epoch,
                "attempts": list(g.record.history)
                + (
                    [g.attempt.to_dict(with_layout=False)]
                    if g.attempt is not None and not g.attempt.finished
                    else []
                ),
                "decisions": list(g.decisions),
            }
            for g in groups
        ]
    elif what == "top":
        data["groups"] = [group_top(core, g) for g in groups]
    elif what == "heatmap":
        data["groups"] = [group_heatmap(core, g) for g in groups]
    elif what == "layout":
        data["groups"] = [group_layout(core, g, epoch) for g in groups]
    return data


def planner_info(core: CoreBase) -> dict[str, Any]:
    now = core.clock.monotonic()
    return {
        "incarnation": core.incarnation,
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(now - core.started_mono, 3),
        "started_at": core.started_wall,
        "state_dir": None if core.store is None else str(core.store.state_dir),
        "endpoints": dict(core.endpoints),
        "counters": {
            "bad": dict(core.counters.bad),
            "received": dict(core.counters.received),
            "missing": dict(core.counters.missing),
            "store_errors": core.store_errors,
            "stalls": core.stalls,
            "stalled_s": round(core.stalled_s, 3),
        },
        "store": {
            "writable": core.store_writable,
            "errors": core.store_errors,
            "last_error": core.store_last_error,
            "last_error_at": core.store_last_error_wall,
        },
        "notes": list(core.notes),
    }


def agents_info(core: CoreBase) -> list[dict[str, Any]]:
    now = core.clock.monotonic()
    peers = core.liveness.peers()
    out = []
    for name in sorted(core.agents):
        a = core.agents[name]
        p = peers.get(name)
        out.append(
            {
                "agent": name,
                "node": a.node,
                "incarnation": a.incarnation,
                "software_version": a.software_version,
                "state": core.liveness.state(name) or DEAD,
                "last_seen_s": None if p is None else round(now - p.last_seen, 3),
                "restarts": 0 if p is None else p.restarts,
                "ranks": [{"group": gg, "ep_rank": r} for gg, r in sorted(a.ranks)],
            }
        )
    return out


def estimate(g: GroupState) -> tuple[torch.Tensor | None, str]:
    if g.window is None:
        return None, "none"
    f = g.window.forecast()
    if f is not None:
        return f, "forecast"
    f = g.window.best_estimate()
    return (f, "open_window") if f is not None else (None, "none")


def time_figures(core: CoreBase, g: GroupState) -> TimeFigures | None:
    """The modelled time of the layout in service on the group's estimate (None without a
    cost model, a load, or a window that counted its steps)."""
    load, _ = estimate(g)
    cur = g.current_layout
    tm = core.time_model(g)
    if tm is None or load is None or cur is None or not g.ep_size:
        return None
    return TimeFigures.of(tm, load, cur, g.ep_size)


def group_status(core: CoreBase, g: GroupState) -> dict[str, Any]:
    now = core.clock.monotonic()
    rec = g.record
    s = g.shape
    load, source = estimate(g)
    cur = g.current_layout
    bal_now = bal_window = lb = None
    if load is not None and cur is not None and g.ep_size:
        gl = gpu_loads(load, cur, g.ep_size)
        bal_now = total_balance(gl)
        if g.window is not None and g.window.windows:
            bal_window = total_balance(gpu_loads(g.window.window_sum(), cur, g.ep_size))
        lbv = lower_bound_balance(load, g.ep_size, cur.num_physical)
        mean = load.sum(dim=1)
        lb = float((lbv * mean).sum() / mean.sum()) if float(mean.sum()) > 0 else 1.0
    d = g.last_decision
    last = rec.history[-1] if rec.history else None
    blocked = core._blocked(g)
    nxt: dict[str, Any] = {"blocked_by": blocked, "earliest_in_s": None}
    if rec.frozen:
        nxt["blocked_by"] = nxt["blocked_by"] or "frozen"
    if g.last_rebalance_mono is not None:
        left = g.last_rebalance_mono + core.config.policy.cooldown_s - now
        nxt["earliest_in_s"] = round(max(0.0, left), 3)
    if g.window is not None and (t := g.window.next_close()) is not None:
        nxt["next_evaluation_in_s"] = round(max(0.0, t - now), 3)
    policy = core.config.policy
    windows = 0 if g.window is None else g.window.windows
    tokens = 0 if g.window is None else g.window.tokens
    nxt["windows_needed"] = max(0, policy.min_windows - windows)
    nxt["tokens_needed"] = max(0, policy.min_tokens - tokens)
    pending = None
    a = g.attempt
    if a is not None and not a.finished:
        pending = {
            "epoch": a.epoch,
            "state": a.state,
            "trigger": a.trigger,
            "started_at": a.started_wall,
            "deadline_in_s": round(a.deadline - now, 3),
            "staged": sorted(a.staged),
            "committed": sorted(a.committed),
            "waiting_for": a.waiting_for(),
            "restored": a.restored,
        }
    ranks = []
    for r in range(g.ep_size or 0):
        rk = g.ranks.get(r)
        ranks.append(
            {
                "ep_rank": r,
                "state": core.rank_state(g, r),
                "worker": None if rk is None else rk.worker,
                "incarnation": None if rk is None else rk.incarnation,
                "agent": None if rk is None else rk.agent,
                "node": None if rk is None else rk.node,
                "epoch": None if rk is None else rk.epoch,
                "left_reason": None if rk is None or rk.present else rk.left_reason,
            }
        )
    return {
        "group": g.name,
        "ep_size": g.ep_size,
        "num_layers": None if s is None else s.num_layers,
        "num_logical_experts": None if s is None else s.num_logical_experts,
        "num_physical_experts": None if s is None else s.num_physical_experts,
        "num_nodes": core._num_nodes(g),
        "complete": core.complete(g),
        "epoch": rec.epoch,
        "max_epoch": rec.max_epoch,
        "layout_known": not g.layout_unknown and cur is not None,
        "frozen": rec.frozen,
        "frozen_layers": list(rec.frozen_layers),
        "ranks": ranks,
        "data": {
            "source": source,
            "windows": 0 if g.window is None else g.window.windows,
            "tokens": 0 if g.window is None else g.window.tokens,
            "open_tokens": 0 if g.window is None else g.window.open_tokens,
            "snapshots": g.snapshots,
            "window_s": core.config.window_s,
            "forecast": core.config.forecast,
            "regime": None if g.window is None else g.window.regime_view(),
            "last_snapshot_s": None
            if g.last_snapshot_mono is None
            else round(now - g.last_snapshot_mono, 3),
            "restored": restored_view(g, core.clock.time()),
        },
        "objective": core.config.objective,
        "balance_now": round_or_none(bal_now),
        "time": None if (tf := time_figures(core, g)) is None else tf.to_dict(),
        "balance_window": round_or_none(bal_window),
        "balance_forecast": None if d is None else round_or_none(d.balance_planned),
        "balance_planned": None if d is None else round_or_none(d.balance_planned),
        "balance_after": None if d is None else round_or_none(d.balance_after),
        "lower_bound": round_or_none(lb),
        "last_rebalance": None
        if last is None
        else {
            "epoch": last.get("epoch"),
            "outcome": last.get("state"),
            "trigger": last.get("trigger"),
            "at": last.get("finished_at") or last.get("started_at"),
            "moves": (last.get("decision") or {}).get("moves"),
            "reason": last.get("reason"),
        },
        "next_rebalance": nxt,
        "pending": pending,
        "last_decision": None if d is None else d.to_dict(with_layers=False),
        "drops": dict(g.drops),
    }


def group_top(core: CoreBase, g: GroupState) -> dict[str, Any]:
    load, source = estimate(g)
    cur = g.current_layout
    out: dict[str, Any] = {
        "group": g.name,
        "epoch": g.record.epoch,
        "source": source,
        "objective": core.config.objective,
        "balance_now": None,
        "balance_planned": None,
        "lower_bound": None,
        "time": None,
        "layers": [],
    }
    if load is None or cur is None or not g.ep_size:
        return out
    tf = time_figures(core, g)
    if tf is not None:
        out["time"] = tf.to_dict()
    gl = gpu_loads(load, cur, g.ep_size)
    b = balance(gl)
    lbv = lower_bound_balance(load, g.ep_size, cur.num_physical)
    mean = load.sum(dim=1)
    out["balance_now"] = round_or_none(total_balance(gl))
    out["lower_bound"] = (
        round_or_none(float((lbv * mean).sum() / mean.sum())) if float(mean.sum()) > 0 else 1.0
    )
    d = g.last_decision
    planned = {f.layer: f for f in d.layers} if d is not None else {}
    if d is not None:
        out["balance_planned"] = round_or_none(d.balance_planned)
        out["decided_at"] = d.at
    k = min(core.config.hot_experts, cur.num_logical)
    totals = load.sum(dim=1, keepdim=True).clamp(min=1e-300)
    share = load / totals
    vals, idx = torch.topk(load, k, dim=1)
    frozen = set(g.record.frozen_layers)
    for i in range(cur.num_layers):
        f = planned.get(i)
        out["layers"].append(
            {
                "layer": i,
                "balance_now": round_or_none(float(b[i])),
                "time_balance": None if tf is None else round_or_none(tf.layer_balance[i]),
                "activated_slots": None if tf is None else round_or_none(tf.layer_activated[i], 4),
                "balance_planned": None if f is None else round_or_none(f.balance_planned),
                "lower_bound": round_or_none(float(lbv[i])),
                "moves": None if f is None else f.moves,
                "why": None if f is None else f.why,
                "frozen": i in frozen or g.record.frozen,
                "hot": [
                    {
                        "expert": int(idx[i, j]),
                        "load": round_or_none(float(vals[i, j]), 3),
                        "share": round_or_none(float(share[i, idx[i, j]]), 6),
                        "replicas": int(cur.logcnt[i, idx[i, j]]),
                    }
                    for j in range(k)
                ],
            }
        )
    return out


def group_heatmap(core: CoreBase, g: GroupState) -> dict[str, Any]:
    load, source = estimate(g)
    cur = g.current_layout
    out: dict[str, Any] = {
        "group": g.name,
        "epoch": g.record.epoch,
        "source": source,
        "num_gpus": g.ep_size,
        "by_gpu": None,
        "by_expert": None,
        "replicas": None,
    }
    if load is None or cur is None or not g.ep_size:
        return out
    gl = gpu_loads(load, cur, g.ep_size)
    out["by_gpu"] = [[round(float(x), 3) for x in row] for row in gl.tolist()]
    out["by_expert"] = [[round(float(x), 3) for x in row] for row in load.tolist()]
    out["replicas"] = cur.logcnt.tolist()
    return out


def restored_view(g: GroupState, wall: float) -> dict[str, Any] | None:
    """The windows restored at start: how many, from which epoch, how old the newest one is
    (its age at the restart plus the time since), and how many are still in the window."""
    r = g.restored
    if r is None or g.window is None:
        return None
    return {
        "windows": r["windows"],
        "windows_left": max(0, r["windows"] - (g.window.closed - r["at_closed"])),
        "epoch": r["epoch"],
        "age_s": round(wall - r["closed_at"], 3),
        "saved_at": r["saved_at"],
    }


def group_layout(core: CoreBase, g: GroupState, epoch: int | None) -> dict[str, Any]:
    """The layout of ``epoch`` (default: the one in service) in Layout JSON form, what
    ``eplbd plan --previous`` reads; ``layout`` is None when that epoch is not kept."""
    rec = g.record
    want = rec.epoch if epoch is None else epoch
    lay = g.layout_of(want)
    if want in rec.layouts:
        state = "committed"
    elif want == 0 and lay is not None:
        state = "default"
    elif lay is not None:
        a = g.recent.get(want)
        state = a.state if a is not None else "unknown"
    else:
        state = None
    kept = sorted(set(rec.layouts) | ({0} if g.shape is not None else set()))
    return {
        "group": g.name,
        "epoch": want,
        "current_epoch": rec.epoch,
        "state": state,
        "committed_at": rec.layout_times.get(want),
        "kept": kept,
        "num_gpus": g.ep_size,
        "expert_bytes": core.config.expert_bytes or None,
        "layout": None if lay is None else lay.to_dict(),
    }
