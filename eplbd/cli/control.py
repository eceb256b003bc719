"""``eplbd rebalance | freeze | unfreeze | rollback``: operator commands to the planner.

::

    eplbd rebalance [--dry-run] [--layers LIST] [--wait [SECONDS]] [--group NAME]
    eplbd freeze    [--layers LIST] [--group NAME]     # no automatic rebalance there
    eplbd unfreeze  [--layers LIST] [--group NAME]
    eplbd rollback EPOCH [--dry-run] [--wait [SECONDS]] [--group NAME]

One module for the four (``args.command`` says which); each sends one ``command`` and prints
the planner's one-line answer. ``rebalance`` plans now from the best load estimate, ignoring
the threshold and cooldown (not a freeze: frozen layers stay as they are); ``--dry-run``
shows the plan per layer (balance now and planned, lower bound, moves, why) without applying
it. ``--wait`` follows the two-phase commit until every rank serves the new epoch (exit 0),
it is aborted (1) or SECONDS pass (75). Without ``--group`` the planner's only group is used.

Exit codes: 0 done, 1 refused by the planner (the message says why), 2 usage, 69/75/78 as
for every command.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from eplbd.cli._client import (
    CliError,
    PlannerClient,
    add_common_arguments,
    fail,
    fmt_balance,
    open_client,
    quiet_broken_pipe,
)
from eplbd.cli._output import Output
from eplbd.ops.exits import EXIT_ERROR, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE

__all__ = ["add_arguments", "epoch_number", "resolve_group", "run"]

_FINISHED = ("committed", "aborted")


def epoch_number(text: str) -> int:
    """An epoch on the command line: an integer in [0, 2^63) (argparse type: else exit 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an epoch number") from None
    if not 0 <= n < 2**63:
        raise argparse.ArgumentTypeError(f"{text}: epochs are 0 (the default layout) or above")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    op = parser.get_default("command")
    if op == "rollback":
        parser.add_argument(
            "epoch", type=epoch_number, metavar="EPOCH", help="the epoch to go back to (>= 0)"
        )
    if op in ("rebalance", "rollback"):
        parser.add_argument(
            "--dry-run", action="store_true", help="show the plan and its figures, apply nothing"
        )
        parser.add_argument(
            "--wait",
            nargs="?",
            type=float,
            const=60.0,
            default=None,
            metavar="SECONDS",
            help="wait until the new epoch is committed on every rank (default 60 s)",
        )
    add_common_arguments(parser, watch=False, layers=op != "rollback")


def resolve_group(client: PlannerClient, group: str | None) -> str:
    """``group``, or the planner's only group (a usage error when there are several)."""
    if group is not None:
        return group
    names = [str(g.get("group")) for g in client.status("status").get("groups") or []]
    if len(names) == 1:
        return names[0]
    if not names:
        raise CliError("the planner knows no EP group yet (no worker registered)", EXIT_ERROR)
    raise CliError(f"several groups, name one with --group: {', '.join(names)}", EXIT_USAGE)


def _wait(client: PlannerClient, group: str, epoch: int, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        data = client.status("history", group)
        for g in data.get("groups") or []:
            for att in g.get("attempts") or []:
                if att.get("epoch") == epoch and att.get("state") in _FINISHED:
                    return dict(att)
        if time.monotonic() >= deadline:
            raise CliError(
                f"epoch {epoch} not finished after {seconds:g} s (see eplbd status / history)",
                EXIT_TIMEOUT,
                "timeout",
            )
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def _plan_table(out: Output, decision: dict[str, Any]) -> None:
    rows = []
    for f in decision.get("layers") or []:
        rows.append(
            [
                f.get("layer"),
                fmt_balance(out, f.get("balance_now")),
                fmt_balance(out, f.get("balance_planned")),
                fmt_balance(out, f.get("lower_bound")),
                f.get("moves"),
                "yes" if f.get("changed") else "no",
                str(f.get("why") or "").replace("_", " "),
            ]
        )
    out.line(
        f"balance {fmt_balance(out, decision.get('balance_now'))} -> "
        f"{fmt_balance(out, decision.get('balance_after'))} (full plan "
        f"{fmt_balance(out, decision.get('balance_planned'))}, lower bound "
        f"{fmt_balance(out, decision.get('lower_bound'))}); {decision.get('moves', 0)} moves, "
        f"at most {decision.get('max_rank_moves', 0)} into one rank"
    )
    if rows:
        out.table(
            ["LAYER", "BALANCE", "PLANNED", "LOWER BOUND", "MOVES", "CHANGE", "WHY"],
            rows,
            align=">>>>><<",
        )


def run(args: argparse.Namespace) -> int:
    return quiet_broken_pipe(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    op = args.command
    out = Output.from_args(args)
    dry = bool(getattr(args, "dry_run", False))
    wait = getattr(args, "wait", None)
    # NaN passes a "<= 0" test and never reaches a deadline: ask for a finite number
    if wait is not None and not (math.isfinite(wait) and wait > 0):
        return fail(args, CliError("--wait SECONDS must be a finite number > 0", EXIT_USAGE))
    if wait is not None and dry:
        return fail(args, CliError("--wait with --dry-run", EXIT_USAGE))
    try:
        client = open_client(args)
    except CliError as e:
        return fail(args, e)
    with client:
        try:
            group = resolve_group(client, args.group)
            ok, message, data = client.command(
                op,
                group,
                layers=getattr(args, "layers", None),
                epoch=getattr(args, "epoch", None),
                dry_run=dry,
            )
        except CliError as e:
            return fail(args, e)
        doc: dict[str, Any] = {"op": op, "group": group, "ok": ok, "message": message, "data": data}
        code = EXIT_OK if ok else EXIT_ERROR
        epoch = data.get("epoch")
        if ok and wait is not None and isinstance(epoch, int):
            if not out.json:
                out.line(message)
                out.flush()
            try:
                att = _wait(client, group, epoch, wait)
            except CliError as e:
                return fail(args, e)
            doc["outcome"] = att
            if att.get("state") != "committed":
                code = EXIT_ERROR
        if out.json:
            out.emit_json(doc)
            return code
        decision = data.get("decision")
        if not ok:
            if decision:
                _plan_table(out, decision)
                out.flush()
            return fail(args, CliError(message, EXIT_ERROR))
        if "outcome" not in doc:
            out.line(message)
        if decision and dry:
            _plan_table(out, decision)
        outcome = doc.get("outcome")
        if outcome is not None:
            state = outcome.get("state")
            lat = outcome.get("commit_latency_s")
            committed = outcome.get("committed") or {}
            steps = sorted(set(committed.values())) if isinstance(committed, dict) else []
            if state == "committed":
                out.line(
                    out.style(f"epoch {epoch} committed", "green")
                    + f" on {len(committed)} ranks"
                    + (f" at step {steps[0]}" if len(steps) == 1 else "")
                    + (f" in {lat:.2f} s" if isinstance(lat, int | float) else "")
                )
            else:
                why = outcome.get("reason") or "?"
                out.line(out.style(f"epoch {epoch} {state}: {why}", "red"))
        out.flush()
        return code
