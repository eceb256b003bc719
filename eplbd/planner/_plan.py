"""The planner the daemon uses: migration-aware placement with per-layer decisions.

Policy ``"migration"`` (the default), for each layer (all layers at once, vectorised):

1. replica counts: the greedy apportionment ``r*`` gives the lowest possible largest
   per-replica load ``m*``; from a previous layout, counts change only as much as needed to
   bring every expert's per-replica load under ``(1 + replica_slack) * m*``
   (:func:`~eplbd.planner._placement.transfer_counts`), so sampling noise in the load does
   not shuffle replicas around;
2. placement: every replica still wanted stays in its slot; the surplus replicas leave the
   busiest GPUs; the new ones go, heaviest first, to the least loaded GPU with a free slot,
   no copy of that expert, and (across nodes) preferably a node that already holds the
   expert. Without a previous layout everything is placed from scratch by balanced
   largest differencing (:func:`~eplbd.planner._placement.ldm_pack`);
3. improvement: swaps between busy and idle GPUs (:func:`~eplbd.planner._placement.refine`;
   a swap that changes fewer slots or stays inside a node wins a near tie). From a
   previous layout the layer is refined in steps, to within 8, 4, 2 and 1 times
   ``tolerance`` of its lower bound (the time objective: 4 and 2), and each step is a
   candidate;
4. decision: a layer keeps its layout, or takes the candidate whose gain in balance (max /
   mean GPU load, on this load) minus ``move_cost`` times the share of its slots rewritten
   is largest, if positive and the gain is at least ``min_gain``; when ``max_moves`` caps
   the slots changed per call, layers are served by value per move. The plan from scratch,
   its GPUs and slots renumbered to match the previous layout (:mod:`._align`), is always
   one of the candidates, so that with no price on moves a plan from a previous layout
   never ends worse than one from scratch.

Two objectives. ``"tokens"``: a GPU's load is the rows (token, k pairs) it computes, every
replica gets an even share of its expert's rows. ``"time"``: a GPU's load is its modelled
time per step (:class:`~eplbd.planner.CostModel`: a weight read per slot that receives
rows, a cost per tile of rows, a cost per row received), and a replica may be **idle**
(share 0: it holds its expert's weights but receives no rows), since in the regime where
weight reads dominate a replica costs more than it saves. The time objective decides how
many replicas of each expert are active (:mod:`._timeplan`), places active and idle
replicas with the same machinery, and can change which replicas are active without moving
any weights. Balance, gain and bound are then in time, relative to the ideal mean (every
expert's rows on one replica, the GPUs equally busy).

Policy ``"deepseek"``: DeepSeek's algorithm from scratch (:func:`rebalance_experts`), the
baseline, for comparison.

Pure and deterministic: the same arguments give the same layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eplbd.layout import Layout, default_phy2log
from eplbd.planner._align import align
from eplbd.planner._apportion import apportion
from eplbd.planner._checks import as_load, check_int, check_previous, check_topology, replica_cap
from eplbd.planner._cost import CostModel
from eplbd.planner._deepseek import check_deepseek_args, rebalance_experts
from eplbd.planner._metrics import balance_np, check_steps, slot_rows_np
from eplbd.planner._placement import (
    Placement,
    SwapCosts,
    busiest_slots,
    fix_duplicates,
    free_surplus,
    ldm_pack,
    ldm_pack_items,
    refill,
    refine,
    slot_loads,
    transfer_counts,
)
from eplbd.planner._timeplan import (
    Cost,
    TimeCounts,
    candidate_items,
    deactivate_surplus,
    time_counts,
    toggle,
)

POLICIES = ("migration", "deepseek")
OBJECTIVES = ("tokens", "time")

#: Refinement: partners tried first for the busiest GPU, and the iteration cap (the time
#: objective's bound is looser, whole weight reads per GPU, so its layers stay above it
#: longer; past 16 rounds they gained nothing measurable in development runs).
SWAP_PARTNERS = 6
MAX_SWAP_ITERATIONS = 64
TIME_SWAP_ITERATIONS = 8
TIME_MIN_STEP = 1e-3
#: Without a previous layout nothing can be kept, so every layer is refined to within this
#: fraction of its bound (``tolerance`` applies to plans from a previous layout).
SCRATCH_TOLERANCE = 0.002
#: The time objective computes the plan from scratch (with a price on moves) only where it
#: could pay for rewriting this share of the slots: aligned with the previous layout it
#: rewrote 55-80% of them in development runs (ESFT, DeepSeek-V3-size synthetic); half
#: of them is below what it ever rewrote.
SCRATCH_MOVES = 0.5
#: From a previous layout, candidates are refined to within DEPTH * tolerance of the bound
#: for each depth in turn; each layer then takes the one worth its moves (or none). The
#: time objective's layers took depth 4 or 2 in 85% of the layers it changed in the
#: planner benchmark's chains (8 and 1 in the rest, for 0.1% of balance): two depths
#: keep it within 10 ms at DeepSeek-V3 size.
DEPTHS = (8, 4, 2, 1)
TIME_DEPTHS = (4, 2)
#: Near-tie breakers, as fractions of the mean GPU load: a swap between nodes, a new
#: replica placed on a node without a copy, and each slot a swap changes.
NODE_PENALTY = 0.005
MOVE_PENALTY = 0.001

#: Reasons a layer was or was not changed (PlanResult.reasons).
REASONS = {
    "from_scratch": "no previous layout: planned from scratch",
    "baseline": "DeepSeek's algorithm, recomputed from scratch",
    "improved": "a candidate gains more balance than its moves cost",
    "balanced": "no change needed: the layout is already as good as the planner finds",
    "gain_below_threshold": "gain in balance below min_gain",
    "not_worth_moves": "the gain does not pay for the moves at move_cost",
    "move_budget": "max_moves spent on layers that gain more per move",
    "no_load": "no load recorded for this layer",
}


@dataclass(frozen=True)
class PlanResult:
    """A layout and why it is what it is, per layer.

    Tensors are CPU float64 ``[L]`` unless said otherwise; loads in the objective's unit
    (:attr:`unit`): for "tokens" the units of the input, for "time" modelled microseconds
    per step.

    layout: the planned Layout; baseline [L, P] int64: the phy2log it is compared with
    (``previous``, or the default p mod E layout); mean: mean GPU load W / G (time: the
    ideal mean, every expert's rows on one replica); max_before / max_after: max GPU load
    under baseline / layout; bound: lower bound of the max GPU load; moves [L] int64: slots
    changed from baseline; changed [L] bool: whether the layer took a new placement or
    split; reasons: one key of :data:`REASONS` per layer; params: the parameters used.
    """

    layout: Layout
    baseline: torch.Tensor
    policy: str
    num_gpus: int
    num_nodes: int
    mean: torch.Tensor
    max_before: torch.Tensor
    max_after: torch.Tensor
    bound: torch.Tensor
    moves: torch.Tensor
    changed: torch.Tensor
    reasons: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    objective: str = "tokens"

    @property
    def unit(self) -> str:
        """What the loads count: "rows" (tokens objective) or "us" (time objective)."""
        return "us" if self.objective == "time" else "rows"

    @property
    def balance_before(self) -> torch.Tensor:
        """max / mean per layer under the baseline layout. [L]"""
        return torch.from_numpy(balance_np(self.max_before.numpy(), self.mean.numpy()))

    @property
    def balance_after(self) -> torch.Tensor:
        """max / mean per layer under the planned layout. [L]"""
        return torch.from_numpy(balance_np(self.max_after.numpy(), self.mean.numpy()))

    @property
    def balance_bound(self) -> torch.Tensor:
        """The best max / mean any layout could reach, per layer. [L]"""
        return torch.from_numpy(balance_np(self.bound.numpy(), self.mean.numpy()))

    def _ratio(self, num: torch.Tensor, den: torch.Tensor) -> float:
        d = float(den.sum())
        return float(num.sum()) / d if d > 0 else 1.0

    @property
    def aggregate_before(self) -> float:
        """Σ max / Σ mean under the baseline layout."""
        return self._ratio(self.max_before, self.mean)

    @property
    def aggregate_after(self) -> float:
        """Σ max / Σ mean under the planned layout."""
        return self._ratio(self.max_after, self.mean)

    @property
    def aggregate_bound(self) -> float:
        """Σ lower bound / Σ mean: the best Σ max / Σ mean reachable."""
        return self._ratio(self.bound, self.mean)

    @property
    def bound_ratio(self) -> float:
        """Σ max / Σ lower bound under the planned layout (1.0: nothing could do better)."""
        return self._ratio(self.max_after, self.bound)

    @property
    def total_moves(self) -> int:
        return int(self.moves.sum())

    def layers(self) -> list[dict[str, Any]]:
        """One dict per layer, for tables and JSON."""
        bb, ba, lb = self.balance_before, self.balance_after, self.balance_bound
        return [
            {
                "layer": i,
                "balance_before": float(bb[i]),
                "balance_after": float(ba[i]),
                "lower_bound": float(lb[i]),
                "moves": int(self.moves[i]),
                "changed": bool(self.changed[i]),
                "reason": self.reasons[i],
            }
            for i in range(len(self.reasons))
        ]

    def summary(self) -> dict[str, Any]:
        P = self.layout.num_physical
        L = self.layout.num_layers
        return {
            "policy": self.policy,
            "objective": self.objective,
            "unit": self.unit,
            "num_layers": L,
            "num_logical_experts": self.layout.num_logical,
            "num_physical_experts": P,
            "num_gpus": self.num_gpus,
            "num_nodes": self.num_nodes,
            "balance_before": self.aggregate_before,
            "balance_after": self.aggregate_after,
            "lower_bound": self.aggregate_bound,
            "bound_ratio": self.bound_ratio,
            "moves": self.total_moves,
            "slots": L * P,
            "layers_changed": int(self.changed.sum()),
            "params": dict(self.params),
        }

    def to_dict(self) -> dict[str, Any]:
        """Figures (no layout): ``{"summary": {...}, "layers": [...]}``."""
        return {"summary": self.summary(), "layers": self.layers()}


def _layout(phy2log: np.ndarray, num_logical: int, share: np.ndarray | None = None) -> Layout:
    """Build a Layout from arrays known to be valid (the planner's own output); ``share``
    [L, P]: bool (active slots) or int shares, None for the equal split."""
    L, P = phy2log.shape
    E = num_logical
    logcnt = np.bincount((np.arange(L)[:, None] * E + phy2log).ravel(), minlength=L * E).reshape(
        L, E
    )
    R = max(int(logcnt.max()), 1)
    key = (phy2log << 20) | np.arange(P, dtype=np.int64)
    key.sort(axis=1)
    e = key >> 20
    slot = key & 0xFFFFF
    start = np.cumsum(logcnt, axis=1) - logcnt
    rank = np.arange(P) - np.take_along_axis(start, e, axis=1)
    log2phy = np.full((L, E, R), -1, dtype=np.int64)
    log2phy[np.arange(L)[:, None], e, rank] = slot
    sh = None
    if share is not None and not (share == 1).all():
        sh = torch.from_numpy(np.ascontiguousarray(share.astype(np.int64)))
    return Layout(
        torch.from_numpy(np.ascontiguousarray(phy2log)),
        torch.from_numpy(logcnt),
        torch.from_numpy(log2phy),
        sh,
    )


@dataclass
class _Problem:
    """What every step of a plan needs: the load in the objective's terms and the topology.

    w [L, E]: tokens: the load; time: rows per step (load / steps). f: the time
    objective's per-slot cost (None for tokens)."""

    w: np.ndarray
    G: int
    P: int
    N: int
    cap: int
    f: Cost | None

    @property
    def L(self) -> int:
        return int(self.w.shape[0])

    @property
    def E(self) -> int:
        return int(self.w.shape[1])

    @property
    def gpu_node(self) -> np.ndarray:
        return np.arange(self.G) // (self.G // self.N)

    def slot_weight(self, p2l: np.ndarray, act: np.ndarray | None) -> np.ndarray:
        """Each slot's load [L, P] under phy2log and the active slots or shares [L, P]
        (None: all, equal)."""
        rows = slot_rows_np(self.w, p2l, None if act is None else act.astype(np.float64))
        return rows if self.f is None else self.f(rows)

    def max_load(self, p2l: np.ndarray, act: np.ndarray | None) -> np.ndarray:
        """Max GPU load per layer. -> [L]"""
        sw = self.slot_weight(p2l, act)
        return sw.reshape(self.L, self.G, self.P // self.G).sum(axis=2).max(axis=1)


@dataclass
class _Cand:
    """A candidate layout of every layer: phy2log [L, P], active slots [L, P] (None: all),
    max GPU load [L]."""

    p2l: np.ndarray
    act: np.ndarray | None
    max: np.ndarray


def plan_with_report(
    load: Any,
    *,
    num_gpus: int,
    num_physical_experts: int,
    num_nodes: int = 1,
    previous: Layout | None = None,
    policy: str | None = None,
    min_gain: float = 0.005,
    move_cost: float = 0.35,
    max_moves: int | None = None,
    tolerance: float = 0.01,
    replica_slack: float = 0.0,
    num_groups: int | None = None,
    objective: str | None = None,
    cost_model: CostModel | None = None,
    steps: float = 1.0,
    sampling: str = "poisson",
) -> PlanResult:
    """Plan a layout for ``load`` and explain it per layer; see the module docstring.

    load [L, E] (float or int, finite, >= 0: tokens per expert, or a forecast of them);
    num_gpus G; num_physical_experts P (a multiple of G, >= E); num_nodes N (G a multiple
    of N); previous: the layout now served (its shape must match), or None;
    policy: None or "migration" (default), "deepseek" (baseline; ``num_groups`` expert groups,
    default 1, hierarchical when a multiple of N);
    min_gain: smallest drop in a layer's balance (max / mean) worth changing it for;
    move_cost: the balance a layer must gain to be worth rewriting all its slots (a
    candidate's value is gain - move_cost * moves / P);
    max_moves: most slots changed in all layers together (None: no limit);
    tolerance: the finest refinement, as a fraction of the bound (without ``previous``:
    :data:`SCRATCH_TOLERANCE`);
    replica_slack: replica counts stay as they are while every per-replica load is under
    ``(1 + replica_slack) * m*``, m* being the smallest largest per-replica load possible
    (tokens objective only).
    min_gain, move_cost, tolerance and replica_slack only matter with ``previous``; their
    defaults were tuned on the ESFT ``intent`` and ``law`` traces (docs/planner.md).
    objective: "tokens" (balance rows; the default without a cost model) or "time"
    (balance modelled time; the default with one); cost_model: the
    :class:`~eplbd.planner.CostModel` of one GPU's expert work (needed for "time");
    steps: the forward steps ``load`` was counted over (the time objective plans for
    load / steps rows per step); sampling: "poisson" (the load is a forecast, a step's
    rows vary) or "exact" (the load is the rows of the step planned for).

    Raises ValueError for a bad load, topology, previous layout, policy or parameter.
    """
    w = as_load(load)
    L, E = w.shape
    check_topology(E, num_physical_experts, num_gpus, num_nodes)
    G, P, N = int(num_gpus), int(num_physical_experts), int(num_nodes)
    pol = "migration" if policy is None else policy
    if pol not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    obj = objective if objective is not None else ("tokens" if cost_model is None else "time")
    if obj not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
    if cost_model is not None and not isinstance(cost_model, CostModel):
        raise ValueError(f"cost_model must be a CostModel, got {type(cost_model).__name__}")
    if obj == "time" and cost_model is None:
        raise ValueError("objective 'time' needs a cost_model")
    check_steps(steps, sampling)
    if previous is not None:
        check_previous(previous, L, E, P)
    if not (isinstance(min_gain, int | float) and min_gain >= 0):
        raise ValueError(f"min_gain must be a number >= 0, got {min_gain!r}")
    if not (isinstance(move_cost, int | float) and math.isfinite(move_cost) and move_cost >= 0):
        raise ValueError(
            f"move_cost must be a finite number >= 0 (max_moves=0 forbids moves), got {move_cost!r}"
        )
    if max_moves is not None:
        check_int(max_moves, "max_moves", minimum=0)
    if not (isinstance(tolerance, int | float) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if not (isinstance(replica_slack, int | float) and replica_slack >= 0):
        raise ValueError(f"replica_slack must be a number >= 0, got {replica_slack!r}")

    cap = replica_cap(E, P, G)
    f: Cost | None = None
    if obj == "time":
        assert cost_model is not None
        mu = w / float(steps)  # rows per step
        # every layer routes the same rows per step: one regime (tile shape) for the plan
        model = cost_model.for_load(mu, P)

        def f(x: np.ndarray) -> np.ndarray:
            return model._slot_time(x, sampling)  # rows of the checked load

        pb = _Problem(mu, G, P, N, cap, f)
    else:
        pb = _Problem(w, G, P, N, cap, None)
    if previous is None:
        base_p2l = default_phy2log(L, E, P).numpy()
        base_act = base_share = None
    else:
        base_p2l = previous.phy2log.numpy()
        base_share = None if previous.share is None else previous.share.numpy()
        base_act = None if base_share is None else base_share > 0
    # under the served split: a weighted one (shares other than 0 and 1) included
    max_before = pb.max_load(base_p2l, base_share)
    params: dict[str, Any] = {
        "min_gain": float(min_gain),
        "move_cost": float(move_cost),
        "max_moves": max_moves,
    }
    if obj == "time":
        params.update(steps=float(steps), sampling=sampling)
    tc: TimeCounts | None = None
    if obj == "time":
        tc = time_counts(pb.w, pb.f, P, G, cap)  # type: ignore[arg-type]
        mean, bound = tc.ideal, tc.bound
        r_star = tc.full
    else:
        r_star = apportion(w, P, cap)
        mean = w.sum(axis=1) / G
        bound = np.maximum(mean, (w / r_star).max(axis=1))
    act: np.ndarray | None = None
    if pol == "deepseek":
        groups = 1 if num_groups is None else num_groups
        check_deepseek_args(E, P, groups, N, G)
        new = rebalance_experts(w, P, groups, N, G)[0].numpy()
        changed = (new != base_p2l).any(axis=1)
        if base_share is not None:
            changed |= (base_share != 1).any(axis=1)
        reasons = ["baseline"] * L
        max_after = pb.max_load(new, None)
        params = {"num_groups": groups}
    else:
        params.update(tolerance=float(tolerance), replica_slack=float(replica_slack))
        if previous is None:
            scratch = _scratch(pb, r_star, bound, tc, np.arange(L))
            new, act, max_after = scratch.p2l, scratch.act, scratch.max
            changed = (new != base_p2l).any(axis=1)
            if act is not None:
                changed |= ~act.all(axis=1)
            reasons = ["from_scratch"] * L
        else:
            if tc is None:
                cands = _migrate(pb, previous, r_star, bound, tolerance, replica_slack)
                target = bound
            else:
                cands = _migrate_time(pb, previous, tc, tolerance)
                target = tc.target
            # the plan from scratch, where it may do better (every layer when moves are
            # free, else where the refinement got stuck above its finest target) and
            # could pay for its moves
            best = np.min([c.max for c in cands], axis=0)
            stuck = best > target * (1.0 + tolerance) * (1.0 + 1e-9)
            floor = SCRATCH_MOVES * P if tc is not None else 0.0
            may = _scratch_may_win(base_p2l, cands, r_star, previous, mean, max_before,
                                   target, float(min_gain), float(move_cost), floor)  # fmt: skip
            rows = np.flatnonzero((stuck | (move_cost == 0)) & may & (mean > 0))
            scratch = _scratch(pb, r_star, bound, tc, rows)
            if scratch.rows.size:
                cands.append(_aligned(pb, scratch, previous, base_act))
            weighted = None if base_share is None else np.asarray((base_share > 1).any(axis=1))
            new, act, max_after, changed, reasons = _decide(
                base_p2l, base_act, cands, mean, max_before,
                float(min_gain), float(move_cost), max_moves, weighted,
            )  # fmt: skip

    no_load = mean <= 0
    reasons = ["no_load" if no_load[i] else reasons[i] for i in range(L)]
    share = None if act is None else act.astype(np.int64)
    if base_share is not None:
        # a layer kept as it was keeps its split, a weighted one too (the planner's own
        # candidates only switch replicas on and off)
        share = np.ones((L, P), dtype=np.int64) if share is None else share
        kept = ~np.asarray(changed, dtype=bool)
        share[kept] = base_share[kept]
    layout = _layout(new, E, share)
    return PlanResult(
        layout=layout,
        baseline=torch.from_numpy(base_p2l),
        policy=pol,
        num_gpus=G,
        num_nodes=N,
        mean=torch.from_numpy(np.asarray(mean, dtype=np.float64)),
        max_before=torch.from_numpy(max_before),
        max_after=torch.from_numpy(np.asarray(max_after, dtype=np.float64)),
        bound=torch.from_numpy(np.asarray(bound, dtype=np.float64)),
        moves=torch.from_numpy((new != base_p2l).sum(axis=1).astype(np.int64)),
        changed=torch.from_numpy(np.asarray(changed, dtype=bool)),
        reasons=tuple(reasons),
        params=params,
        objective=obj,
    )


@dataclass
class _Scratch:
    """Layers ``rows`` planned from scratch: their placement (slots' loads and active
    flags included) and, over all layers (the others left as they were), as a candidate."""

    rows: np.ndarray
    pl: Placement

    @property
    def p2l(self) -> np.ndarray:
        return self.pl.flat()

    @property
    def act(self) -> np.ndarray | None:
        return None if self.pl.act is None else self.pl.flat_act()

    @property
    def max(self) -> np.ndarray:
        return self.pl.loads.max(axis=1)


def _scratch(
    pb: _Problem, r_star: np.ndarray, bound: np.ndarray, tc: TimeCounts | None, rows: np.ndarray
) -> _Scratch:
    """Layers ``rows`` planned from scratch: largest differencing, then swaps to within
    :data:`SCRATCH_TOLERANCE` of the bound (time: of the chosen count's own bound)."""
    n, G = rows.size, pb.G
    sub = np.arange(n)
    costs = SwapCosts(pb.gpu_node, None, np.zeros(n), None)  # nothing to keep
    if n == 0:
        S = pb.P // G
        return _Scratch(rows, Placement(np.zeros((0, G, S), np.int64), np.zeros((0, G, S)),
                                        np.zeros((0, G))))  # fmt: skip
    if tc is None:
        pl = ldm_pack(pb.w[rows], r_star[rows], G)
        target = bound[rows] * (1.0 + SCRATCH_TOLERANCE)
    else:
        assert pb.f is not None
        items, iw, active = candidate_items(tc, pb.w, pb.f, rows)
        pl = ldm_pack_items(items, iw, G, active)
        target = tc.target[rows] * (1.0 + SCRATCH_TOLERANCE)
    if tc is None:
        refine(pl, sub, target, costs, max_iter=MAX_SWAP_ITERATIONS, partners=SWAP_PARTNERS)
    else:
        refine(pl, sub, target, costs, max_iter=TIME_SWAP_ITERATIONS, partners=SWAP_PARTNERS,
               min_step=TIME_MIN_STEP * tc.ideal[rows], widen=False)  # fmt: skip
    if pl.act is not None:
        toggle(pl, sub, pb.P)
    return _Scratch(rows, pl)


def _aligned(
    pb: _Problem, scratch: _Scratch, previous: Layout, prev_act: np.ndarray | None
) -> _Cand:
    """The plan from scratch with GPUs and slots renumbered to keep what ``previous``
    holds; layers not planned from scratch stay as they are."""
    rows = scratch.rows
    prev = previous.phy2log.numpy()
    L, P = prev.shape
    pl = scratch.pl.take(np.arange(rows.size))
    align(pl, prev[rows].reshape(pl.shape))
    p2l = prev.copy()
    p2l[rows] = pl.flat()
    act = None
    if pl.act is not None or prev_act is not None:
        act = np.ones((L, P), dtype=bool) if prev_act is None else prev_act.copy()
        act[rows] = pl.flat_act()
    mx = np.full(L, np.inf)
    mx[rows] = pl.loads.max(axis=1)
    return _Cand(p2l, act, mx)


def _migrate(
    pb: _Problem,
    previous: Layout,
    r_star: np.ndarray,
    bound: np.ndarray,
    tolerance: float,
    replica_slack: float,
) -> list[_Cand]:
    """Token objective: candidate placements of every layer from ``previous``, one per
    refinement depth, coarsest first. The first has the new replica counts placed and no
    swaps; each next one is refined further, down to ``tolerance`` of the bound (see
    :data:`DEPTHS`)."""
    w, G = pb.w, pb.G
    prev = previous.phy2log.numpy()
    L, P = prev.shape
    S = P // G
    mean = w.sum(axis=1) / G
    peak = (w / r_star).max(axis=1)
    node_cost = NODE_PENALTY * mean if pb.N > 1 else None
    r_prev = previous.logcnt.numpy()
    limit = peak * (1.0 + replica_slack + 1e-9)
    r_new = transfer_counts(w, r_prev, limit, pb.cap)
    over_cap = r_prev.max(axis=1) > pb.cap  # a previous layout from elsewhere: recount
    r_new[over_cap] = r_star[over_cap]
    p2l = prev.reshape(L, G, S).copy()
    free_surplus(p2l, slot_loads(w, r_prev, p2l).sum(axis=2), r_prev, r_new)
    sw = np.where(p2l >= 0, slot_loads(w, r_new, np.maximum(p2l, 0)), 0.0)
    pl = Placement(p2l, sw, sw.sum(axis=2))
    forced = refill(pl, w, r_prev, r_new, pb.gpu_node, node_cost)
    pl.holdings(w.shape[1])  # also says whether the previous layout had duplicates
    if forced or pl.duplicated:
        fix_duplicates(pl)
    costs = SwapCosts(pb.gpu_node, node_cost, MOVE_PENALTY * mean, prev.reshape(L, G, S))
    return _refined(pl, bound, tolerance, costs)


def _refined(pl: Placement, bound: np.ndarray, tolerance: float, costs: SwapCosts) -> list[_Cand]:
    """The placement as it is, then refined to each depth in turn: one candidate each."""
    n = pl.shape[0]
    rows = np.arange(n)
    time = pl.act is not None

    def snap() -> _Cand:
        return _Cand(pl.flat().copy(), pl.flat_act().copy() if time else None,
                     pl.loads.max(axis=1))  # fmt: skip

    cands = [snap()]
    iters = TIME_SWAP_ITERATIONS if time else MAX_SWAP_ITERATIONS
    step = TIME_MIN_STEP * bound if time else None
    depths = TIME_DEPTHS if time else DEPTHS
    for depth in depths:
        # (the time objective toggled activity again after each depth's swaps: in the
        # planner benchmark's chains it never found a toggle there, at 0.5 ms a depth)
        refine(pl, rows, bound * (1.0 + depth * tolerance), costs, max_iter=iters,
               partners=SWAP_PARTNERS, min_step=step, widen=not time)  # fmt: skip
        cands.append(snap())
    return cands


def _migrate_time(pb: _Problem, previous: Layout, tc: TimeCounts, tolerance: float) -> list[_Cand]:
    """Time objective: candidates from ``previous``. Active counts a*: K0 active extras
    (:func:`~eplbd.planner._timeplan.time_counts`); toggling which replicas are active
    moves nothing, new replicas do.

    First candidate, no moves: the previous placement with up to a* of each expert's
    replicas active, the surplus idle on the busiest GPUs, then toggles. Then the
    migration, from there: experts with fewer replicas than a* get new ones, in slots of
    the idle (surplus) replicas of the least loaded experts on the least busy GPUs,
    heaviest first onto the least busy GPU, then toggles; then swaps to each refinement
    depth.
    """
    assert pb.f is not None
    mu, G = pb.w, pb.G
    prev = previous.phy2log.numpy()
    L, P = prev.shape
    S = P // G
    rows = np.arange(L)
    sh = (L, G, S)
    a_star = tc.active_counts()
    r_prev = previous.logcnt.numpy()
    ideal = tc.ideal
    node_cost = NODE_PENALTY * ideal if pb.N > 1 else None
    costs = SwapCosts(pb.gpu_node, node_cost, MOVE_PENALTY * ideal, prev.reshape(sh))
    # no moves: up to a* active
    a_now = np.minimum(a_star, r_prev)
    c = pb.f(mu / np.maximum(a_now, 1))
    sw = c[rows[:, None], prev].reshape(sh)
    pl = Placement(prev.reshape(sh).copy(), sw, sw.sum(axis=2), act=np.ones(sh, dtype=bool))
    deactivate_surplus(pl, a_now)
    toggle(pl, rows, G * S)
    cands = [_Cand(pl.flat().copy(), pl.flat_act().copy(), pl.loads.max(axis=1))]
    # counts: needy experts get replicas from the surplus of the least loaded ones (all
    # idle now: an expert keeps a* active)
    need = a_star - a_now
    owe = need.sum(axis=1)
    needy = np.flatnonzero(owe > 0)
    if needy.size:
        surplus = r_prev - a_now
        order = np.argsort(mu, axis=1, kind="stable")  # least loaded first
        sur_o = np.take_along_axis(surplus, order, axis=1)
        before = np.cumsum(sur_o, axis=1) - sur_o
        give_o = np.clip(owe[:, None] - before, 0, sur_o)
        give = np.empty_like(give_o)
        give[rows[:, None], order] = give_o
        r_new = r_prev + need - give
        assert pl.act is not None
        li, s = busiest_slots(pl.p2l, -pl.loads, give, ~pl.act)  # on the least busy GPUs
        pl.p2l[li, s // S, s % S] = -1
        # the needy experts' replicas now carry a* shares
        cn = pb.f(mu / np.maximum(a_star, 1))
        slot_e = np.maximum(pl.p2l, 0)
        grow = (need > 0)[rows[:, None, None], slot_e] & (pl.p2l >= 0)
        pl.sw = np.where(grow, cn[rows[:, None, None], slot_e], pl.sw)
        pl.loads = pl.sw.sum(axis=2)
        forced = refill(pl, cn * r_new, r_prev, r_new, pb.gpu_node, node_cost)
        pl.holdings(pb.E)
        if forced or pl.duplicated:
            fix_duplicates(pl)
        toggle(pl, needy, G * S)
    return cands + _refined(pl, tc.bound, tolerance, costs)


def _scratch_may_win(
    prev: np.ndarray, cands: list[_Cand], counts: np.ndarray, previous: Layout,
    mean: np.ndarray, max_before: np.ndarray, target: np.ndarray, min_gain: float,
    move_cost: float, floor: float,
) -> np.ndarray:  # fmt: skip
    """Layers where the plan from scratch could be :func:`_decide`'s choice: its max is
    at least ``target`` (its own bound) and its moves at least the replicas its
    ``counts`` [L, E] add to the previous layout's (and at least ``floor``), so its value
    is at most (max_before - target) / mean - move_cost * moves / P; where that is no
    better than keeping the layout or the best candidate, it is not worth computing.
    [L] bool"""
    P = prev.shape[1]
    add = np.maximum(np.maximum(counts - previous.logcnt.numpy(), 0).sum(axis=1), floor)
    gain_ub = balance_np(max_before, mean) - balance_np(target, mean)
    value_ub = gain_ub - move_cost * add / P
    best = np.zeros(prev.shape[0])
    before = balance_np(max_before, mean)
    for c in cands:
        gain = before - balance_np(c.max, mean)
        v = gain - move_cost * (c.p2l != prev).sum(axis=1) / P
        best = np.maximum(best, np.where(gain >= min_gain, v, 0.0))
    return (gain_ub >= min_gain) & (value_ub > best)


def _decide(
    prev: np.ndarray,
    prev_act: np.ndarray | None,
    cands: list[_Cand],
    mean: np.ndarray,
    max_before: np.ndarray,
    min_gain: float,
    move_cost: float,
    max_moves: int | None,
    weighted: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, list[str]]:
    """Per layer: keep ``prev`` or take one of ``cands``: the one whose gain in balance
    minus ``move_cost`` times the share of the layer's slots it rewrites (moves / P: the
    share of each GPU's expert memory restaged, the GPUs staging in parallel) is largest,
    and positive, with gain >= min_gain. A candidate that changes only which replicas are
    active moves nothing. ``weighted`` [L]: layers served with a weighted split (shares above
    1), which every candidate (shares 0 and 1) changes even on the same active slots.

    -> (phy2log, active slots or None, max GPU load, changed, reasons)."""
    L, P = prev.shape
    pact = np.ones((L, P), dtype=bool) if prev_act is None else prev_act
    before = balance_np(max_before, mean)
    gain = np.stack([before - balance_np(c.max, mean) for c in cands], axis=1)  # [L, C]
    moves = np.stack([(c.p2l != prev).sum(axis=1) for c in cands], axis=1)
    differs = np.stack(
        [(c.p2l != prev).any(axis=1) | ((pact if c.act is None else c.act) != pact).any(axis=1)
         for c in cands], axis=1,
    )  # fmt: skip
    if weighted is not None:
        differs |= weighted[:, None]
    ok = differs & (gain >= min_gain) & (gain > 0) & (mean > 0)[:, None]
    value = np.where(ok, gain - move_cost * moves / P, -np.inf)
    why = np.where(
        ~differs.any(axis=1),
        "balanced",
        np.where(ok.any(axis=1), "not_worth_moves", "gain_below_threshold"),
    ).astype(object)
    # Each layer's best option (ties: the first, which moves less).
    best = value.argmax(axis=1)
    choice = np.where(value[np.arange(L), best] > 0, best, -1)
    if max_moves is not None:
        choice = _within_budget(value, moves, choice, int(max_moves), why)
    why[choice >= 0] = "improved"
    reasons: list[str] = why.tolist()
    changed = choice >= 0
    new = prev.copy()
    act = pact.copy()
    max_after = max_before.copy()
    for j, c in enumerate(cands):
        take = choice == j
        new[take] = c.p2l[take]
        act[take] = True if c.act is None else c.act[take]
        max_after[take] = c.max[take]
    return new, (None if act.all() else act), max_after, changed, reasons


def _within_budget(
    value: np.ndarray, moves: np.ndarray, choice: np.ndarray, budget: int, reasons: np.ndarray
) -> np.ndarray:
    """Spend ``budget`` moves: layers by their best value per move, each on its best option
    that still fits. value, moves [L, C]; choice [L] (-1: keep). Marks "move_budget"."""
    L, C = value.shape
    out = np.full(L, -1)
    wanted = [i for i in range(L) if choice[i] >= 0]
    # value per move; a change that moves nothing (a new split) comes first
    wanted.sort(key=lambda i: (-value[i, choice[i]] / max(moves[i, choice[i]], 0.5), i))
    for i in wanted:
        options = sorted((j for j in range(C) if value[i, j] > 0), key=lambda j: (-value[i, j], j))
        fits = [j for j in options if moves[i, j] <= budget]
        if fits:
            out[i] = fits[0]
            budget -= int(moves[i, fits[0]])
        else:
            reasons[i] = "move_budget"
    return out


def plan(
    load: Any,
    *,
    num_gpus: int,
    num_physical_experts: int,
    num_nodes: int = 1,
    previous: Layout | None = None,
    policy: str | None = None,
    min_gain: float = 0.005,
    move_cost: float = 0.35,
    max_moves: int | None = None,
    tolerance: float = 0.01,
    replica_slack: float = 0.0,
    num_groups: int | None = None,
    objective: str | None = None,
    cost_model: CostModel | None = None,
    steps: float = 1.0,
    sampling: str = "poisson",
) -> Layout:
    """The layout :func:`plan_with_report` plans (same arguments), without the report.

    load [L, E] -> Layout with phy2log [L, P], logcnt [L, E], log2phy [L, E, R].
    """
    return plan_with_report(
        load,
        num_gpus=num_gpus,
        num_physical_experts=num_physical_experts,
        num_nodes=num_nodes,
        previous=previous,
        policy=policy,
        min_gain=min_gain,
        move_cost=move_cost,
        max_moves=max_moves,
        tolerance=tolerance,
        replica_slack=replica_slack,
        num_groups=num_groups,
        objective=objective,
        cost_model=cost_model,
        steps=steps,
        sampling=sampling,
    ).layout
