"""``eplbd history``: rebalance attempts with time, trigger, reason, gain, moves and outcome.

::

    eplbd history [--group NAME] [--limit N] [--decisions] [--watch [SECONDS]] [--json]

One row per two-phase commit attempt, oldest first: when it started, the epoch, what
triggered it (auto, force, rollback), its outcome (committed, aborted, or still preparing /
staged / committing), the balance it expected (now -> after, Σmax/Σmean on the forecast) and
the gain, the slots moved, how long the commit took, and the reason (the trigger's message, or
why it was aborted). ``--decisions`` adds the trigger's evaluations that did not lead to an
attempt (no gain, cooldown, frozen, ...), with how many times in a row each repeated.

The JSON form is the planner's ``history`` data, each list cut to the last ``--limit``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from eplbd.cli._client import (
    CliError,
    PlannerClient,
    add_common_arguments,
    fail,
    fmt_balance,
    fmt_duration,
    watch_loop,
)
from eplbd.cli._output import Output
from eplbd.ops.exits import EXIT_USAGE

__all__ = ["add_arguments", "fetch", "render", "run"]

_OUTCOME_STYLE = {"committed": ("green",), "aborted": ("red",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit", type=int, default=20, metavar="N", help="show the last N entries (default 20)"
    )
    parser.add_argument(
        "--decisions",
        action="store_true",
        help="also list the trigger's decisions that did not start an attempt",
    )
    add_common_arguments(parser, watch=True, layers=False)


def fetch(client: PlannerClient, group: str | None, limit: int) -> dict[str, Any]:
    data = client.status("history", group)
    data["endpoint"] = client.endpoint
    for g in data.get("groups") or []:
        g["attempts"] = list(g.get("attempts") or [])[-limit:]
        g["decisions"] = list(g.get("decisions") or [])[-limit:]
    return data


def _clock(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%m-%d %H:%M:%S", time.localtime(ts))


def _gain(d: dict[str, Any]) -> float | None:
    a, b = d.get("balance_now"), d.get("balance_after")
    if a is None or b is None:
        return None
    return float(a) - float(b)


def _balance(out: Output, d: dict[str, Any]) -> str:
    a, b = d.get("balance_now"), d.get("balance_after")
    if a is None and b is None:
        return "-"
    return f"{fmt_balance(out, a)} -> {fmt_balance(out, b)}"


def _reason(att: dict[str, Any]) -> str:
    d = att.get("decision") or {}
    if att.get("state") == "aborted":
        return f"aborted: {att.get('reason') or '?'}"
    text = d.get("message") or d.get("reason") or ""
    flags = att.get("flags") or []
    return text + (f" [{', '.join(flags)}]" if flags else "")


def _attempt_row(out: Output, att: dict[str, Any]) -> list[Any]:
    d = att.get("decision") or {}
    state = str(att.get("state"))
    gain = _gain(d)
    return [
        _clock(att.get("started_at")),
        att.get("epoch"),
        att.get("trigger") or d.get("trigger"),
        out.style(state, *_OUTCOME_STYLE.get(state, ("yellow",))),
        _balance(out, d),
        "-" if gain is None else f"{gain:+.3f}",
        d.get("moves"),
        fmt_duration(att.get("commit_latency_s"))
        if att.get("commit_latency_s") is not None
        else "-",
        _reason(att),
    ]


def _decision_row(out: Output, d: dict[str, Any]) -> list[Any]:
    gain = _gain(d)
    n = int(d.get("repeats") or 1)
    when = _clock(d.get("first_at") if n > 1 else d.get("at"))
    reason = str(d.get("reason") or "").replace("_", " ")
    msg = d.get("message") or ""
    return [
        when,
        d.get("epoch") if d.get("epoch") is not None else "-",
        d.get("trigger"),
        out.style(f"{d.get('action')}" + (f" x{n}" if n > 1 else ""), "dim"),
        _balance(out, d),
        "-" if gain is None else f"{gain:+.3f}",
        d.get("moves"),
        "-",
        msg if msg.startswith(reason) else (f"{reason}: {msg}" if msg else reason),
    ]


def render(out: Output, data: dict[str, Any], *, decisions: bool = False) -> None:
    groups = data.get("groups") or []
    if not groups:
        out.line(out.style("no EP groups yet (no worker has registered)", "dim"))
        return
    headers = [
        "STARTED",
        "EPOCH",
        "TRIGGER",
        "OUTCOME",
        "BALANCE",
        "GAIN",
        "MOVES",
        "COMMIT",
        "REASON",
    ]
    for gi, g in enumerate(groups):
        if gi:
            out.line()
        out.line(out.style(f"group {g.get('group')}", "bold") + f"  epoch {g.get('epoch')}")
        items: list[tuple[float, list[Any]]] = [
            (float(a.get("started_at") or 0.0), _attempt_row(out, a))
            for a in g.get("attempts") or []
        ]
        if decisions:
            items += [
                (float(d.get("at") or 0.0), _decision_row(out, d))
                for d in g.get("decisions") or []
                if d.get("action") != "prepare"
            ]
        if not items:
            out.line(out.style("  no rebalance attempts yet", "dim"))
            continue
        items.sort(key=lambda t: t[0])
        out.table(headers, [row for _, row in items], align="<><<<>>><")


def run(args: argparse.Namespace) -> int:
    if args.limit < 1:
        return fail(args, CliError("--limit must be >= 1", EXIT_USAGE))
    return watch_loop(
        args,
        lambda c: fetch(c, args.group, args.limit),
        lambda out, doc: render(out, doc, decisions=args.decisions),
    )
