"""The trigger policy: when a new placement pays for itself, and which layers change.

A rebalance costs network time and staging memory on every rank; it pays only where the
layout in service is clearly worse, on the forecast load, than a new plan. Per layer the
policy compares ``balance_now`` (the current layout on the forecast) with
``balance_planned`` (the planner's layout for the forecast, starting from the current one),
and changes the layer only where the gain ``balance_now - balance_planned`` reaches
``min_gain``. Group-level gates come first: a pending commit, an incomplete group, a frozen
group, too little data, and the cooldown since the last rebalance. Then the per-rank move
budget (what a rank can stage at once) picks the best layers by gain until it is spent.

Two objectives (``objective`` of the planner's settings). "tokens" (the default): a GPU's
load is the rows it computes, balances are max / mean GPU load. "time": a GPU's load is
its modelled time per step (:class:`~eplbd.controller._figures.TimeModel`: the cost model of
the settings, the forecast divided by the steps its windows recorded), balances are max /
the ideal mean time, so the gain compared with ``min_gain`` is the fraction of a step's
ideal expert time the new layout saves; the planner plans for time too, and may change a
layer's split alone (idle replicas become active or the reverse), which moves no weights.

Every call returns a :class:`Decision`, acted on or not, with its reason and the per-layer
figures, so the status API and the history can say why each layer did or did not change.

Pure: the caller passes the times, the forecast and the planner function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from eplbd.controller._figures import (
    TimeModel,
    balance,
    gpu_loads,
    lower_bound_balance,
    total_balance,
)
from eplbd.layout import Layout

__all__ = [
    "Decision",
    "LayerFigures",
    "PlanFn",
    "TriggerPolicy",
    "decide",
    "rollback_decision",
]

#: ``plan(load [L, E], *, num_gpus, num_physical_experts, num_nodes, previous) -> Layout``;
#: with the time objective also ``objective="time", cost_model=..., steps=...``
PlanFn = Callable[..., Layout]

# Reason codes (Decision.reason); the message says the figures in words.
REASONS = (
    "changed",  # a new layout is prepared (or would be, for a dry run)
    "pending_commit",  # an attempt is in flight
    "group_incomplete",  # not every rank is registered and alive
    "layout_unknown",  # the ranks serve an epoch whose layout this planner does not have
    "frozen",  # the operator froze the group
    "insufficient_data",  # fewer windows or tokens than the policy needs
    "cooldown",  # too soon after the last rebalance
    "no_gain",  # no layer's gain reaches the threshold
    "over_move_budget",  # layers would gain, but none fits the move budget
    "rollback",  # the operator rolled back to an earlier layout
    "same_layout",  # rollback target equals the layout in service
)

# Per-layer reasons (LayerFigures.why)
LAYER_REASONS = (
    "changed",
    "frozen",
    "no_moves",  # the planned layout equals the current one in this layer
    "gain_below_threshold",
    "over_move_budget",
    "not_requested",
    "not_considered",
    "rollback",
)


@dataclass(frozen=True)
class TriggerPolicy:
    """The knobs of the trigger (all from the planner's settings).

    min_gain: smallest per-layer balance gain worth a move, e.g. 0.05 (1.30 -> 1.25);
    cooldown_s: seconds between the end of one rebalance and the next automatic one;
    min_windows / min_tokens: data needed before the first automatic decision;
    max_moves_per_rank: slots one rank may receive per epoch (its staging memory), 0 = no cap;
    max_moves: slots moved per epoch in the whole group, 0 = no cap.
    """

    min_gain: float = 0.05
    cooldown_s: float = 300.0
    min_windows: int = 3
    min_tokens: int = 1
    max_moves_per_rank: int = 0
    max_moves: int = 0


@dataclass
class LayerFigures:
    """What the trigger saw for one layer (balances are max/mean GPU load, >= 1.0)."""

    layer: int
    balance_now: float | None  # None where no load is known (a rollback before any data)
    balance_planned: float | None
    lower_bound: float | None
    moves: int  # slots the planned layout changes in this layer
    changed: bool
    why: str  # one of LAYER_REASONS

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "balance_now": _round(self.balance_now),
            "balance_planned": _round(self.balance_planned),
            "lower_bound": _round(self.lower_bound),
            "moves": self.moves,
            "changed": self.changed,
            "why": self.why,
        }


@dataclass
class Decision:
    """One evaluation of the trigger for one group, acted on or not.

    ``action`` is "prepare" (start a two-phase commit of ``layout``), "dry_run" (the same,
    but only shown) or "none". Totals are Σ max / Σ mean over layers on the forecast:
    ``balance_now`` of the layout in service, ``balance_after`` of the layout that results
    from this decision, ``balance_planned`` of the full plan, ``lower_bound`` the best any
    layout could do. ``moves`` counts changed slots, ``max_rank_moves`` the most one rank
    receives.
    """

    group: str
    at: float  # wall-clock time of the decision
    trigger: str  # "auto", "force", "rollback"
    action: str
    reason: str
    message: str
    layers: list[LayerFigures] = field(default_factory=list)
    balance_now: float | None = None
    balance_after: float | None = None
    balance_planned: float | None = None
    lower_bound: float | None = None
    moves: int = 0
    max_rank_moves: int = 0
    layout: Layout | None = None
    epoch: int | None = None  # the epoch prepared for it, once the driver allocates one
    target_epoch: int | None = None  # rollback: the epoch whose layout is restored
    objective: str = "tokens"  # what the balances measure: "tokens" or "time"

    @property
    def changed_layers(self) -> list[int]:
        return [f.layer for f in self.layers if f.changed]

    def to_dict(self, *, with_layers: bool = True) -> dict[str, Any]:
        r = _round
        d: dict[str, Any] = {
            "group": self.group,
            "at": self.at,
            "trigger": self.trigger,
            "action": self.action,
            "reason": self.reason,
            "message": self.message,
            "balance_now": r(self.balance_now),
            "balance_after": r(self.balance_after),
            "balance_planned": r(self.balance_planned),
            "lower_bound": r(self.lower_bound),
            "moves": self.moves,
            "max_rank_moves": self.max_rank_moves,
            "changed_layers": self.changed_layers,
            "epoch": self.epoch,
            "target_epoch": self.target_epoch,
            "objective": self.objective,
        }
        if with_layers:
            d["layers"] = [f.to_dict() for f in self.layers]
        return d


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def _totals_lb(mean: torch.Tensor, lb: torch.Tensor) -> float:
    """Σ bound / Σ mean from per-layer bound balances ``lb`` and means ``mean`` [L]."""
    m = float(mean.sum())
    return float((lb * mean).sum()) / m if m > 0 else 1.0


def _gain(f: LayerFigures) -> float:
    if f.balance_now is None or f.balance_planned is None:
        return 0.0
    return f.balance_now - f.balance_planned


def _measure(
    load: torch.Tensor, a: Layout, b: Layout, num_gpus: int, time: TimeModel | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-GPU loads of layouts ``a`` and ``b`` [L, G], the mean they are measured against
    and the lower bound as a balance [L], in rows or (``time``) modelled time."""
    P = a.num_physical
    if time is None:
        g_a, g_b = gpu_loads(load, a, num_gpus), gpu_loads(load, b, num_gpus)
        return g_a, g_b, g_a.mean(dim=1), lower_bound_balance(load, num_gpus, P)
    mean = time.ideal(load, num_gpus, P)  # the same for every layout (module docstring)
    lb = balance(time.bound(load, num_gpus, P).unsqueeze(1), mean)
    return time.gpu_times(load, a, num_gpus), time.gpu_times(load, b, num_gpus), mean, lb


def _rank_moves(old: torch.Tensor, new: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Slots each rank receives per layer. [L, P] x [L, P] -> [L, G] int64."""
    L, P = old.shape
    return (old != new).view(L, num_gpus, P // num_gpus).sum(dim=2)


def decide(
    *,
    group: str,
    now: float,
    wall: float,
    policy: TriggerPolicy,
    plan_fn: PlanFn,
    current: Layout,
    forecast: torch.Tensor | None,
    windows: int,
    tokens: int,
    num_gpus: int,
    num_nodes: int = 1,
    last_rebalance_at: float | None = None,
    frozen: bool = False,
    frozen_layers: Iterable[int] = (),
    blocked: str | None = None,
    force: bool = False,
    layers: Iterable[int] | None = None,
    dry_run: bool = False,
    time: TimeModel | None = None,
) -> Decision:
    """Evaluate the trigger for one group (see the module docstring).

    ``forecast`` [L, E] (None: no data yet); ``now`` monotonic seconds (cooldown), ``wall``
    the timestamp recorded; ``blocked`` a group-level reason the caller found ("pending_commit",
    "group_incomplete", "layout_unknown"); ``force`` (operator): skips the cooldown, the data
    minimum and the threshold (any positive gain), but not freezes, the move budget or
    ``blocked``; ``layers`` limits the layers considered; ``dry_run``: decide, never act;
    ``time``: plan and measure in modelled time (the "time" objective), None for tokens.
    """
    trigger = "force" if force else "auto"
    d = Decision(group=group, at=wall, trigger=trigger, action="none", reason="", message="")
    d.objective = "tokens" if time is None else "time"

    def stop(reason: str, message: str) -> Decision:
        d.reason, d.message = reason, message
        return d

    if forecast is None:
        if blocked is not None:
            return stop(blocked, _BLOCKED_MESSAGES.get(blocked, blocked))
        return stop("insufficient_data", "no load data yet")

    L = current.num_layers
    E = current.num_logical
    P = current.num_physical
    load = forecast.to(torch.float64)
    extra: dict[str, Any] = {}
    if time is not None:
        extra = {"objective": "time", "cost_model": time.cost_model, "steps": time.steps}
    planned = plan_fn(
        load,
        num_gpus=num_gpus,
        num_physical_experts=P,
        num_nodes=num_nodes,
        previous=current,
        **extra,
    )
    if tuple(planned.phy2log.shape) != (L, P) or planned.num_logical != E:
        raise ValueError("the planner returned a layout of another shape")
    old = current.phy2log
    new_all = planned.phy2log
    g_now, g_plan, mean, lb = _measure(load, current, planned, num_gpus, time)
    b_now = balance(g_now, mean)
    b_plan = balance(g_plan, mean)
    rank_moves = _rank_moves(old, new_all, num_gpus)  # [L, G]
    layer_moves = rank_moves.sum(dim=1)
    resplit = (current.shares != planned.shares).any(dim=1)  # [L]: the split changes
    d.balance_now = total_balance(g_now, mean)
    d.balance_planned = total_balance(g_plan, mean)
    d.balance_after = d.balance_now
    d.lower_bound = _totals_lb(mean, lb)
    figs = [
        LayerFigures(
            layer=i,
            balance_now=float(b_now[i]),
            balance_planned=float(b_plan[i]),
            lower_bound=float(lb[i]),
            moves=int(layer_moves[i]),
            changed=False,
            why="not_considered",
        )
        for i in range(L)
    ]
    d.layers = figs

    if blocked is not None:
        return stop(blocked, _BLOCKED_MESSAGES.get(blocked, blocked))
    if frozen:
        return stop("frozen", "the group is frozen (unfreeze to resume)")
    if not force:
        if windows < policy.min_windows or tokens < policy.min_tokens:
            return stop(
                "insufficient_data",
                f"{windows} window(s) and {tokens} token(s) so far; the policy needs "
                f"{policy.min_windows} and {policy.min_tokens}",
            )
        if last_rebalance_at is not None and now < last_rebalance_at + policy.cooldown_s:
            left = last_rebalance_at + policy.cooldown_s - now
            return stop("cooldown", f"cooldown: {left:.1f} s left of {policy.cooldown_s:g} s")

    wanted = None if layers is None else set(int(x) for x in layers)
    frozen_set = set(int(x) for x in frozen_layers)
    threshold = 1e-9 if force else policy.min_gain
    candidates: list[LayerFigures] = []
    for f in figs:
        if wanted is not None and f.layer not in wanted:
            f.why = "not_requested"
        elif f.layer in frozen_set:
            f.why = "frozen"
        elif f.moves == 0 and not bool(resplit[f.layer]):
            f.why = "no_moves"
        elif _gain(f) < threshold:
            f.why = "gain_below_threshold"
        else:
            candidates.append(f)
    candidates.sort(key=lambda f: (-_gain(f), f.layer))

    per_rank = torch.zeros(num_gpus, dtype=torch.int64)
    total = 0
    chosen: list[int] = []
    for f in candidates:
        rm = rank_moves[f.layer]
        if policy.max_moves_per_rank > 0 and int((per_rank + rm).max()) > policy.max_moves_per_rank:
            f.why = "over_move_budget"
            continue
        if policy.max_moves > 0 and total + f.moves > policy.max_moves:
            f.why = "over_move_budget"
            continue
        per_rank += rm
        total += f.moves
        f.changed, f.why = True, "changed"
        chosen.append(f.layer)

    if not chosen:
        if candidates:
            return stop(
                "over_move_budget",
                f"{len(candidates)} layer(s) would gain but none fits the move budget "
                f"({policy.max_moves_per_rank} per rank, {policy.max_moves} in all)",
            )
        best = max((_gain(f) for f in figs), default=0.0)
        return stop(
            "no_gain",
            f"best layer gain {best:.4f} is below the threshold {threshold:g}",
        )

    new = old.clone()
    idx = torch.tensor(sorted(chosen), dtype=torch.long)
    new[idx] = new_all[idx]
    share = current.shares.clone()  # unchanged layers keep their split too
    share[idx] = planned.shares[idx]
    d.layout = Layout.from_phy2log(new, E, num_gpus=num_gpus, share=share)
    g_after = g_now.clone()  # layers are independent: the chosen ones as planned
    g_after[idx] = g_plan[idx]
    d.balance_after = total_balance(g_after, mean)
    d.moves = total
    d.max_rank_moves = int(per_rank.max()) if per_rank.numel() else 0
    d.action = "dry_run" if dry_run else "prepare"
    return stop(
        "changed",
        f"{len(chosen)} layer(s) change, {total} slot move(s); balance "
        f"{d.balance_now:.4f} -> {d.balance_after:.4f} (lower bound {d.lower_bound:.4f})",
    )


def rollback_decision(
    *,
    group: str,
    wall: float,
    current: Layout,
    target: Layout,
    target_epoch: int,
    forecast: torch.Tensor | None,
    num_gpus: int,
    dry_run: bool = False,
    time: TimeModel | None = None,
) -> Decision:
    """A decision to serve ``target`` (an earlier epoch's layout) again, as a new epoch.

    The operator asked for it, so no gate applies except that the layouts must differ; the
    figures (if a forecast exists) show what the rollback does to balance (in modelled time
    with ``time``).
    """
    d = Decision(
        group=group,
        at=wall,
        trigger="rollback",
        action="none",
        reason="",
        message="",
        target_epoch=target_epoch,
        objective="tokens" if time is None else "time",
    )
    old, new = current.phy2log, target.phy2log
    L = current.num_layers
    if old.shape != new.shape:
        raise ValueError("the rollback target has another shape than the layout in service")
    rank_moves = _rank_moves(old, new, num_gpus)
    moves = rank_moves.sum(dim=1)
    b_now: list[float | None]
    b_new: list[float | None]
    lbl: list[float | None]
    if forecast is not None:
        load = forecast.to(torch.float64)
        g_now, g_new, mean, lb = _measure(load, current, target, num_gpus, time)
        b_now, b_new = list(balance(g_now, mean).tolist()), list(balance(g_new, mean).tolist())
        lbl = list(lb.tolist())
        d.balance_now, d.balance_after = total_balance(g_now, mean), total_balance(g_new, mean)
        d.balance_planned = d.balance_after
        d.lower_bound = _totals_lb(mean, lb)
    else:
        b_now, b_new, lbl = [None] * L, [None] * L, [None] * L
    resplit = (current.shares != target.shares).any(dim=1)
    for i in range(L):
        m = int(moves[i])
        ch = m > 0 or bool(resplit[i])
        d.layers.append(
            LayerFigures(i, b_now[i], b_new[i], lbl[i], m, ch, "rollback" if ch else "no_moves")
        )
    d.moves = int(moves.sum())
    d.max_rank_moves = int(rank_moves.sum(dim=0).max()) if rank_moves.numel() else 0
    if d.moves == 0 and not bool(resplit.any()):
        d.reason, d.message = "same_layout", f"epoch {target_epoch}'s layout is already served"
        return d
    d.layout = target
    d.action = "dry_run" if dry_run else "prepare"
    d.reason = "rollback"
    d.message = f"roll back to the layout of epoch {target_epoch}: {d.moves} slot move(s)"
    return d


_BLOCKED_MESSAGES = {
    "pending_commit": "a two-phase commit is in flight",
    "group_incomplete": "not every rank of the group is registered and alive",
    "layout_unknown": "the ranks serve an epoch whose layout this planner does not know",
}
