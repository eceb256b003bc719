"""``eplbd status``: the planner, its agents, each EP group's ranks, epoch and last rebalance.

::

    eplbd status [--group NAME] [--json] [--watch [SECONDS]] [--planner ADDR | --runtime-dir DIR]

The JSON form is the planner's ``status`` data (docs/daemons.md, "Planner daemon") plus the
``endpoint`` asked. Imports neither torch nor numpy: it must answer in a blink on a GPU node.
"""

from __future__ import annotations

import argparse
from typing import Any

from eplbd.cli._client import (
    PlannerClient,
    add_common_arguments,
    fmt_ago,
    fmt_balance,
    fmt_duration,
    fmt_ranks,
    watch_loop,
)
from eplbd.cli._output import Output

__all__ = ["add_arguments", "fetch", "render", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, watch=True, layers=False)


def fetch(client: PlannerClient, group: str | None) -> dict[str, Any]:
    data = client.status("status", group)
    data["endpoint"] = client.endpoint
    return data


def _rank_style(state: str) -> tuple[str, ...]:
    return {"alive": ("green",), "stale": ("yellow",)}.get(state, ("red",))


def _last(g: dict[str, Any], now: float | None) -> str:
    last = g.get("last_rebalance")
    if not last:
        return "never"
    moves = last.get("moves")
    text = f"epoch {last.get('epoch')} {last.get('outcome')} {fmt_ago(last.get('at'), now)}"
    extra = [x for x in (last.get("trigger"), None if moves is None else f"{moves} moves") if x]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _next(g: dict[str, Any]) -> str:
    """The NEXT column: what the next automatic rebalance waits for (docs/cli.md)."""
    nxt = g.get("next_rebalance") or {}
    blocked = nxt.get("blocked_by")
    windows, tokens = nxt.get("windows_needed"), nxt.get("tokens_needed")
    evaluation = nxt.get("next_evaluation_in_s")
    if blocked:
        text = blocked.replace("_", " ")
    elif nxt.get("earliest_in_s"):
        text = f"cooldown {fmt_duration(nxt['earliest_in_s'])}"
    elif windows:
        text = f"{windows} more window{'s' if windows > 1 else ''} of load"
    elif tokens:
        text = f"{tokens} more tokens"
    elif evaluation is not None:
        text = f"evaluates in {fmt_duration(evaluation)}"
    else:
        text = "waits for load"
    frozen = g.get("frozen_layers") or []
    if frozen and not g.get("frozen"):
        text += f"; layers {fmt_ranks(frozen)} frozen"
    return text


def _model(g: dict[str, Any]) -> str:
    L, E, P = g.get("num_layers"), g.get("num_logical_experts"), g.get("num_physical_experts")
    return "-" if L is None else f"{L}x{E}->{P}"


def render(out: Output, data: dict[str, Any]) -> None:
    now = data.get("at")
    p = data.get("planner") or {}
    out.line(
        out.style("planner", "bold")
        + f"  {data.get('endpoint', '')}  eplbd {p.get('version', '?')}  pid {p.get('pid', '?')}"
        + f"  up {fmt_duration(p.get('uptime_s'))}  incarnation {p.get('incarnation', '?')}"
    )
    if p.get("state_dir"):
        out.line(f"         state {p['state_dir']}")
    store = p.get("store") or {}
    if store.get("writable") is False:
        out.line(
            out.style(
                f"         state directory not writable: {store.get('errors')} write(s) failed, "
                f"the last {fmt_ago(store.get('last_error_at'), now)}: {store.get('last_error')}"
                " (no layout change is durable and no rebalance starts until it is fixed)",
                "red",
                "bold",
            )
        )
    bad = (p.get("counters") or {}).get("bad") or {}
    if bad:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
        out.line(out.style(f"         bad messages dropped: {shown}", "yellow"))
    for note in p.get("notes") or []:
        out.line(out.style(f"         note: {note}", "yellow"))
    out.line()

    agents = data.get("agents") or []
    if agents:
        rows = []
        for a in agents:
            by_group: dict[str, list[int]] = {}
            for r in a.get("ranks") or []:
                by_group.setdefault(str(r["group"]), []).append(int(r["ep_rank"]))
            ranks = " ".join(f"{g}:{fmt_ranks(rs)}" for g, rs in sorted(by_group.items()))
            st = str(a.get("state"))
            seen = a.get("last_seen_s")
            rows.append(
                [
                    a.get("agent"),
                    a.get("node"),
                    out.style(st, *_rank_style(st)),
                    "-" if seen is None else fmt_duration(seen) + " ago",
                    a.get("restarts", 0),
                    ranks or "-",
                ]
            )
        out.table(
            ["AGENT", "NODE", "STATE", "LAST SEEN", "RESTARTS", "RANKS"],
            rows,
            align="<<<<><",
        )
    else:
        out.line(out.style("no agents registered", "dim"))
    out.line()

    groups = data.get("groups") or []
    if not groups:
        out.line(out.style("no EP groups yet (no worker has registered)", "dim"))
        return
    rows = []
    # with a cost model (planner settings expert_shape / cost_model) the modelled time
    # columns follow the token balance: TIME BAL (Σ max / Σ mean of modelled GPU time)
    # and ACTIVE/GPU (slots per GPU read in a step: mean / max)
    timed = any(g.get("time") for g in groups)
    for g in groups:
        group_ranks = g.get("ranks") or []
        alive = sum(1 for r in group_ranks if r.get("state") in ("alive", "stale"))
        planned = g.get("balance_planned", g.get("balance_forecast"))
        t = g.get("time") or {}
        rows.append(
            [
                g.get("group"),
                f"{alive}/{g.get('ep_size') or 0}",
                g.get("epoch"),
                _model(g),
                fmt_balance(out, g.get("balance_now")),
                *([fmt_balance(out, t.get("time_balance")), _active(t)] if timed else []),
                fmt_balance(out, g.get("balance_window")),
                fmt_balance(out, planned),
                fmt_balance(out, g.get("lower_bound")),
                _last(g, now),
                _next(g),
            ]
        )
    out.table(
        [
            "GROUP",
            "RANKS",
            "EPOCH",
            "L x E->P",
            "BALANCE",
            *(["TIME BAL", "ACTIVE/GPU"] if timed else []),
            "MEASURED",
            "PLANNED",
            "LOWER BOUND",
            "LAST REBALANCE",
            "NEXT",
        ],
        rows,
        align="<>><>" + (">>" if timed else "") + ">>><<",
    )
    for g in groups:
        out.line()
        _render_group(out, g)


def _active(t: dict[str, Any]) -> str:
    """Activated slots per GPU in a step: "mean/max", "-" when unknown."""
    mean, mx = t.get("activated_slots_mean"), t.get("activated_slots_max")
    return "-" if mean is None or mx is None else f"{mean:.1f}/{mx:.1f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _render_group(out: Output, g: dict[str, Any]) -> None:
    name = g.get("group")
    d = g.get("data") or {}
    restored = d.get("restored") or {}
    from_disk = (
        f" ({restored['windows_left']} restored from epoch {restored.get('epoch')}, the newest "
        f"{fmt_duration(restored.get('age_s'))} old)"
        if restored.get("windows_left")
        else ""
    )
    out.line(
        out.style(f"group {name}", "bold")
        + f"  load: {d.get('source', 'none')}, {d.get('windows', 0)} windows{from_disk}, "
        + f"{d.get('tokens', 0)} tokens, {d.get('snapshots', 0)} snapshots"
        + (
            f", last {fmt_duration(d['last_snapshot_s'])} ago"
            if d.get("last_snapshot_s") is not None
            else ""
        )
    )
    reg = d.get("regime")
    if reg:
        level = reg.get("change_above")
        out.line(
            f"  forecast: regime mean of {reg.get('windows_in_mean', 0)} windows, "
            f"{reg.get('changes', 0)} changes of traffic found"
            + (f" (the last a {reg['last_change']})" if reg.get("last_change") else "")
            + (", following the drift" if reg.get("following_drift") else "")
            + f"; last dispersion {_num(reg.get('dispersion'))}, a change above "
            + ("- (learning)" if level is None else _num(level))
        )
    if g.get("frozen_layers"):
        out.line(f"  frozen layers: {fmt_ranks(g['frozen_layers'])}")
    pend = g.get("pending")
    if pend:
        waiting = pend.get("waiting_for") or []
        out.line(
            out.style("  pending", "yellow", "bold")
            + f" epoch {pend.get('epoch')} {pend.get('state')} ({pend.get('trigger')}): "
            + f"staged {fmt_ranks(pend.get('staged') or [])}, committed "
            + f"{fmt_ranks(pend.get('committed') or [])}"
            + (f", waiting for {fmt_ranks(waiting)}" if waiting else "")
            + f", deadline in {fmt_duration(pend.get('deadline_in_s'))}"
        )
    rows = []
    for r in g.get("ranks") or []:
        st = str(r.get("state"))
        rows.append(
            [
                r.get("ep_rank"),
                out.style(st, *_rank_style(st)),
                r.get("worker"),
                r.get("node"),
                r.get("epoch"),
                r.get("left_reason") or "",
            ]
        )
    if rows:
        out.table(["RANK", "STATE", "WORKER", "NODE", "EPOCH", "NOTE"], rows, align="><<<><")
    drops = g.get("drops") or {}
    if drops:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(drops.items()))
        out.line(out.style(f"  dropped: {shown}", "yellow"))


def run(args: argparse.Namespace) -> int:
    return watch_loop(args, lambda c: fetch(c, args.group), render)
