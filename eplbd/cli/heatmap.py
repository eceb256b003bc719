"""``eplbd heatmap``: load per layer x GPU (or x expert) as a heat map in the terminal.

::

    eplbd heatmap [--group NAME] [--layers LIST] [--by gpu|expert] [--scale row|all]
                  [--ascii] [--watch [SECONDS]] [--json]

One row per layer, one character per GPU (or per expert): the block ramp `` ▁▂▃▄▅▆▇█``, or
`` .:-=+*#%@`` when the terminal is not UTF-8 (or with ``--ascii``). Each row is scaled from 0
to its own maximum (``--scale all``: to the largest value of the map), so a balanced layer is
a flat row of full blocks and a hot GPU stands out. At the right: the row's max/mean (GPU
view) or its hottest expert and its share (expert view). When the experts (or GPUs) do not
fit the terminal, each character shows the hottest of a few adjacent ones (said in the header).

The JSON form is the planner's ``heatmap`` data (``by_gpu`` [L][G], ``by_expert`` [L][E],
``replicas`` [L][E], on the planner's forecast load) restricted to ``--layers``.
"""

from __future__ import annotations

import argparse
import shutil
from typing import Any

from eplbd.cli._client import (
    PlannerClient,
    add_common_arguments,
    check_layers,
    fmt_balance,
    watch_loop,
)
from eplbd.cli._output import ASCII_RAMP, UNICODE_RAMP, Output

__all__ = ["add_arguments", "fetch", "render", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--by", choices=("gpu", "expert"), default="gpu", help="columns: GPUs (default) or experts"
    )
    parser.add_argument(
        "--scale",
        choices=("row", "all"),
        default="row",
        help="scale each layer to its own maximum (default) or all to the map's maximum",
    )
    parser.add_argument(
        "--width", type=int, default=None, metavar="COLS", help="columns of the map (default: fit)"
    )
    add_common_arguments(parser, watch=True)


def fetch(client: PlannerClient, group: str | None, layers: list[int] | None) -> dict[str, Any]:
    data = client.status("heatmap", group)
    data["endpoint"] = client.endpoint
    if layers is not None:
        for g in data.get("groups") or []:
            by_gpu = g.get("by_gpu")
            check_layers(layers, None if by_gpu is None else len(by_gpu), str(g.get("group")))
            for key in ("by_gpu", "by_expert", "replicas"):
                rows = g.get(key)
                if rows is not None:
                    g[key] = [rows[i] for i in layers if i < len(rows)]
            g["layers"] = [i for i in layers if i < len(g.get("by_gpu") or [])]
    return data


def _bin(values: list[float], width: int) -> tuple[list[float], int]:
    """Fold ``values`` into at most ``width`` columns, keeping each group's maximum."""
    k = max(1, -(-len(values) // max(1, width)))
    if k == 1:
        return values, 1
    return [max(values[i : i + k]) for i in range(0, len(values), k)], k


def _axis(n: int) -> str:
    """Column labels: the last digit of each column's index."""
    return "".join(str(i % 10) for i in range(n))


def render(
    out: Output,
    data: dict[str, Any],
    *,
    by: str = "gpu",
    scale: str = "row",
    width: int | None = None,
) -> None:
    groups = data.get("groups") or []
    if not groups:
        out.line(out.style("no EP groups yet (no worker has registered)", "dim"))
        return
    term = width or max(20, shutil.get_terminal_size((100, 24)).columns - 30)
    for gi, g in enumerate(groups):
        if gi:
            out.line()
        key = "by_gpu" if by == "gpu" else "by_expert"
        rows = g.get(key)
        what = "GPU" if by == "gpu" else "expert"
        out.line(
            out.style(f"group {g.get('group')}", "bold")
            + f"  epoch {g.get('epoch')}  load per layer x {what} ({g.get('source') or 'none'})"
        )
        if not rows:
            out.line(out.style("  no load data yet", "dim"))
            continue
        layer_ids = g.get("layers") or list(range(len(rows)))
        binned = [_bin([float(v) for v in r], term) for r in rows]
        k = binned[0][1]
        top = max((max(b[0]) for b in binned if b[0]), default=0.0)
        ramp = UNICODE_RAMP if out.unicode else ASCII_RAMP
        note = f"; each column the hottest of {k} {what}s" if k > 1 else ""
        out.line(
            out.style(
                f"  '{ramp[1]}'..'{ramp[-1]}' = low..{'row' if scale == 'row' else 'map'} max, "
                f"' ' = none{note}",
                "dim",
            )
        )
        ncol = len(binned[0][0])
        axis = _axis(ncol) if k == 1 else " " * ncol
        out.line(f"  {'layer':>5}  {axis}  " + ("max/mean" if by == "gpu" else "hottest"))
        replicas = g.get("replicas")
        for idx, (vals, _) in enumerate(binned):
            raw = [float(v) for v in rows[idx]]
            vmax = max(vals) if scale == "row" else top
            heat = out.heat(vals, vmin=0.0, vmax=vmax if vmax > 0 else None)
            if by == "gpu":
                mean = sum(raw) / len(raw) if raw else 0.0
                tail = fmt_balance(out, max(raw) / mean if mean > 0 else None)
            else:
                total = sum(raw)
                e = max(range(len(raw)), key=lambda i: raw[i]) if raw else 0
                share = f"{100 * raw[e] / total:.0f}%" if total > 0 else "-"
                reps = ""
                if replicas is not None and idx < len(replicas):
                    reps = f" x{replicas[idx][e]}"
                tail = f"e{e} {share}{reps}"
            out.line(f"  {layer_ids[idx]:>5}  {heat}  {tail}")


def run(args: argparse.Namespace) -> int:
    if args.width is not None and args.width < 1:
        from eplbd.cli._client import CliError, fail
        from eplbd.ops.exits import EXIT_USAGE

        return fail(args, CliError("--width must be >= 1", EXIT_USAGE))
    return watch_loop(
        args,
        lambda c: fetch(c, args.group, args.layers),
        lambda out, doc: render(out, doc, by=args.by, scale=args.scale, width=args.width),
    )
