"""``eplbd top``: per-layer balance, what the planner would do, hot experts, pending commits.

::

    eplbd top [--group NAME] [--layers LIST] [--sort balance|gain|layer] [--hot N]
              [--watch [SECONDS]] [--json]

Per group a header (epoch, where the load figures come from, Σmax/Σmean balance of the layout
in service on the forecast load, of the last plan, and the lower bound; a pending two-phase
commit), then one row per layer: its balance now (max/mean GPU load), planned, lower bound,
the moves of the last plan and why the layer was or was not changed, and its hottest experts
(share of the layer's load and replica count). docs/cli.md, "Reading eplbd top".

The JSON form is the planner's ``top`` data with each group's ``pending`` commit (from the
``status`` data) added, and only the layers asked for.
"""

from __future__ import annotations

import argparse
from typing import Any

from eplbd.cli._client import (
    PlannerClient,
    add_common_arguments,
    check_layers,
    fmt_balance,
    fmt_duration,
    fmt_ranks,
    watch_loop,
)
from eplbd.cli._output import Output

__all__ = ["add_arguments", "fetch", "render", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sort",
        choices=("layer", "balance", "gain"),
        default="layer",
        help="row order: layer number, worst balance first, or largest planned gain first",
    )
    parser.add_argument(
        "--hot", type=int, default=3, metavar="N", help="hot experts shown per layer (default 3)"
    )
    add_common_arguments(parser, watch=True)


def fetch(client: PlannerClient, group: str | None, layers: list[int] | None) -> dict[str, Any]:
    top = client.status("top", group)
    status = client.status("status", group)
    pending = {g.get("group"): g.get("pending") for g in status.get("groups") or []}
    sizes = {g.get("group"): g.get("num_layers") for g in status.get("groups") or []}
    for g in top.get("groups") or []:
        g["pending"] = pending.get(g.get("group"))
        check_layers(layers, sizes.get(g.get("group")), str(g.get("group")))
        if layers is not None:
            keep = set(layers)
            g["layers"] = [x for x in g.get("layers") or [] if x.get("layer") in keep]
    top["endpoint"] = client.endpoint
    return top


def _gain(row: dict[str, Any]) -> float:
    now, planned = row.get("balance_now"), row.get("balance_planned")
    if now is None or planned is None:
        return 0.0
    return float(now) - float(planned)


def _hot(out: Output, row: dict[str, Any], n: int) -> str:
    parts = []
    for h in (row.get("hot") or [])[:n]:
        share = h.get("share")
        pct = "?" if share is None else f"{100 * share:.0f}%"
        parts.append(f"e{h.get('expert')} {pct} x{h.get('replicas')}")
    return ", ".join(parts) or "-"


def render_pending(out: Output, pend: dict[str, Any] | None) -> str:
    if not pend:
        return out.style("no commit pending", "dim")
    waiting = pend.get("waiting_for") or []
    return (
        out.style(f"pending epoch {pend.get('epoch')}: {pend.get('state')}", "yellow", "bold")
        + f" ({pend.get('trigger')}); staged {fmt_ranks(pend.get('staged') or [])}"
        + f", committed {fmt_ranks(pend.get('committed') or [])}"
        + (f", waiting for {fmt_ranks(waiting)}" if waiting else "")
        + f"; deadline in {fmt_duration(pend.get('deadline_in_s'))}"
    )


def render(out: Output, data: dict[str, Any], *, sort: str = "layer", hot: int = 3) -> None:
    groups = data.get("groups") or []
    if not groups:
        out.line(out.style("no EP groups yet (no worker has registered)", "dim"))
        return
    for gi, g in enumerate(groups):
        if gi:
            out.line()
        source = g.get("source") or "none"
        out.line(
            out.style(f"group {g.get('group')}", "bold")
            + f"  epoch {g.get('epoch')}  load: {source}"
            + "  balance "
            + fmt_balance(out, g.get("balance_now"))
            + "  planned "
            + fmt_balance(out, g.get("balance_planned"))
            + "  lower bound "
            + fmt_balance(out, g.get("lower_bound"))
            + _time_header(out, g.get("time"))
        )
        out.line("  " + render_pending(out, g.get("pending")))
        rows_in = list(g.get("layers") or [])
        if not rows_in and source != "none":
            out.line(out.style("  no layer matches --layers", "dim"))
            continue
        if not rows_in:
            out.line(
                out.style(
                    "  no load data yet (the planner shows layers once snapshots arrive)", "dim"
                )
            )
            continue
        if sort == "balance":
            rows_in.sort(key=lambda r: -(r.get("balance_now") or 0.0))
        elif sort == "gain":
            rows_in.sort(key=lambda r: -_gain(r))
        rows = []
        timed = bool(g.get("time"))
        for r in rows_in:
            why = r.get("why") or "-"
            act = r.get("activated_slots")
            rows.append(
                [
                    r.get("layer"),
                    fmt_balance(out, r.get("balance_now")),
                    *(
                        [
                            fmt_balance(out, r.get("time_balance")),
                            "-" if act is None else f"{act:.1f}",
                        ]
                        if timed
                        else []
                    ),
                    fmt_balance(out, r.get("balance_planned")),
                    fmt_balance(out, r.get("lower_bound")),
                    "-" if r.get("moves") is None else r.get("moves"),
                    out.style("frozen", "cyan") if r.get("frozen") else why.replace("_", " "),
                    _hot(out, r, hot),
                ]
            )
        out.table(
            [
                "LAYER",
                "BALANCE",
                *(["TIME BAL", "ACTIVE"] if timed else []),
                "PLANNED",
                "LOWER BOUND",
                "MOVES",
                "WHY",
                "HOT EXPERTS (share x replicas)",
            ],
            rows,
            align=">>" + (">>" if timed else "") + ">>><<",
        )


def _time_header(out: Output, t: dict[str, Any] | None) -> str:
    """The modelled time of the layout in service, when the planner has a cost model."""
    if not t:
        return ""
    return (
        "  time balance "
        + fmt_balance(out, t.get("time_balance"))
        + f"  {t.get('step_us', 0.0):.0f} us/step"
        + f"  active slots/GPU {t.get('activated_slots_mean', 0.0):.1f}"
        + f" (max {t.get('activated_slots_max', 0.0):.1f})"
    )


def run(args: argparse.Namespace) -> int:
    if args.hot < 0:
        from eplbd.cli._client import CliError, fail
        from eplbd.ops.exits import EXIT_USAGE

        return fail(args, CliError("--hot must be >= 0", EXIT_USAGE))
    return watch_loop(
        args,
        lambda c: fetch(c, args.group, args.layers),
        lambda out, doc: render(out, doc, sort=args.sort, hot=args.hot),
    )
