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
   ``tolerance`` of its lower bound, and each step is a candidate;
4. decision: a layer keeps its layout, or takes the candidate whose gain in balance (max /
   mean GPU load, on this load) minus ``move_cost`` times the share of its slots rewritten
   is largest, if positive and the gain is at least ``min_gain``; when ``max_moves`` caps
   the slots changed per call, layers are served by value per move.

Policy ``"deepseek"``: DeepSeek's algorithm from scratch (:func:`rebalance_experts`), the
baseline, for comparison.

Pure and deterministic: the same arguments give the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eplbd.layout import Layout, default_phy2log
from eplbd.planner._apportion import apportion
from eplbd.planner._checks import as_load, check_int, check_previous, check_topology, replica_cap
from eplbd.planner._deepseek import check_deepseek_args, rebalance_experts
from eplbd.planner._metrics import balance_np, gpu_loads_np
from eplbd.planner._placement import (
    Placement,
    SwapCosts,
    fix_duplicates,
    free_surplus,
    ldm_pack,
    refill,
    refine,
    slot_loads,
    transfer_counts,
)

POLICIES = ("migration", "deepseek")

#: Refinement: partners tried first for the busiest GPU, and the iteration cap.
SWAP_PARTNERS = 6
MAX_SWAP_ITERATIONS = 64
#: Without a previous layout nothing can be kept, so every layer is refined to within this
#: fraction of its bound (``tolerance`` applies to plans from a previous layout).
SCRATCH_TOLERANCE = 0.002
#: From a previous layout, candidates are refined to within DEPTH * tolerance of the bound
#: for each depth in turn; each layer then takes the one worth its moves (or none).
DEPTHS = (8, 4, 2, 1)
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

    Tensors are CPU float64 ``[L]`` unless said otherwise; loads in the units of the input.

    layout: the planned Layout; baseline [L, P] int64: the phy2log it is compared with
    (``previous``, or the default p mod E layout); mean: mean GPU load W / G;
    max_before / max_after: max GPU load under baseline / layout; bound: lower bound of the
    max GPU load; moves [L] int64: slots changed from baseline; changed [L] bool: whether
    the layer took a new placement; reasons: one key of :data:`REASONS` per layer; params:
    the parameters used.
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


def _layout(phy2log: np.ndarray, logcnt: np.ndarray) -> Layout:
    """Build a Layout from arrays known to be valid (the planner's own output)."""
    L, P = phy2log.shape
    E = logcnt.shape[1]
    R = max(int(logcnt.max()), 1)
    key = (phy2log << 20) | np.arange(P, dtype=np.int64)
    key.sort(axis=1)
    e = key >> 20
    slot = key & 0xFFFFF
    start = np.cumsum(logcnt, axis=1) - logcnt
    rank = np.arange(P) - np.take_along_axis(start, e, axis=1)
    log2phy = np.full((L, E, R), -1, dtype=np.int64)
    log2phy[np.arange(L)[:, None], e, rank] = slot
    return Layout(
        torch.from_numpy(np.ascontiguousarray(phy2log)),
        torch.from_numpy(np.ascontiguousarray(logcnt)),
        torch.from_numpy(log2phy),
    )


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
    ``(1 + replica_slack) * m*``, m* being the smallest largest per-replica load possible.
    min_gain, move_cost, tolerance and replica_slack only matter with ``previous``; their
    defaults were tuned on the ESFT ``intent`` and ``law`` traces (docs/planner.md).

    Raises ValueError for a bad load, topology, previous layout, policy or parameter.
    """
    w = as_load(load)
    L, E = w.shape
    check_topology(E, num_physical_experts, num_gpus, num_nodes)
    G, P, N = int(num_gpus), int(num_physical_experts), int(num_nodes)
    pol = "migration" if policy is None else policy
    if pol not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    if previous is not None:
        check_previous(previous, L, E, P)
    if not (isinstance(min_gain, int | float) and min_gain >= 0):
        raise ValueError(f"min_gain must be a number >= 0, got {min_gain!r}")
    if not (isinstance(move_cost, int | float) and move_cost >= 0):
        raise ValueError(f"move_cost must be a number >= 0, got {move_cost!r}")
    if max_moves is not None:
        check_int(max_moves, "max_moves", minimum=0)
    if not (isinstance(tolerance, int | float) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if not (isinstance(replica_slack, int | float) and replica_slack >= 0):
        raise ValueError(f"replica_slack must be a number >= 0, got {replica_slack!r}")

    cap = replica_cap(E, P, G)
    r_star = apportion(w, P, cap)
    mean = w.sum(axis=1) / G
    peak = (w / r_star).max(axis=1)
    bound = np.maximum(mean, peak)
    base_p2l = default_phy2log(L, E, P).numpy() if previous is None else previous.phy2log.numpy()
    base_cnt = None if previous is None else previous.logcnt.numpy()
    max_before = gpu_loads_np(w, base_p2l, G, base_cnt).max(axis=1)
    params: dict[str, Any] = {
        "min_gain": float(min_gain),
        "move_cost": float(move_cost),
        "max_moves": max_moves,
    }
    gpu_node = np.arange(G) // (G // N)
    max_after: np.ndarray | None = None

    if pol == "deepseek":
        groups = 1 if num_groups is None else num_groups
        check_deepseek_args(E, P, groups, N, G)
        p2l_t, _, cnt_t = rebalance_experts(w, P, groups, N, G)
        new = p2l_t.numpy()
        changed = (new != base_p2l).any(axis=1)
        reasons = ["baseline"] * L
        logcnt = cnt_t.numpy()
        params = {"num_groups": groups}
    else:
        params.update(tolerance=float(tolerance), replica_slack=float(replica_slack))
        costs_node = NODE_PENALTY * mean if N > 1 else None
        if previous is None:
            target = bound * (1.0 + SCRATCH_TOLERANCE)
            pl = ldm_pack(w, r_star, G)
            costs = SwapCosts(gpu_node, None, np.zeros(L), None)  # nothing to keep
            refine(
                pl, np.arange(L), target, costs,
                max_iter=MAX_SWAP_ITERATIONS, partners=SWAP_PARTNERS,
            )  # fmt: skip
            new = pl.flat().copy()
            max_after = pl.loads.max(axis=1)
            changed = (new != base_p2l).any(axis=1)
            reasons = ["from_scratch"] * L
            logcnt = r_star
        else:
            cands, cand_cnt = _migrate(w, previous, r_star, peak, mean, bound, tolerance,
                                       gpu_node, costs_node, cap, replica_slack, G)  # fmt: skip
            new, logcnt, max_after, changed, reasons = _decide(
                base_p2l, previous.logcnt.numpy(), cands, cand_cnt, mean, max_before,
                float(min_gain), float(move_cost), max_moves,
            )  # fmt: skip

    if max_after is None:
        max_after = gpu_loads_np(w, new, G, logcnt).max(axis=1)
    no_load = mean <= 0
    reasons = ["no_load" if no_load[i] else reasons[i] for i in range(L)]
    layout = _layout(new, logcnt)
    return PlanResult(
        layout=layout,
        baseline=torch.from_numpy(base_p2l),
        policy=pol,
        num_gpus=G,
        num_nodes=N,
        mean=torch.from_numpy(mean),
        max_before=torch.from_numpy(max_before),
        max_after=torch.from_numpy(max_after),
        bound=torch.from_numpy(bound),
        moves=torch.from_numpy((new != base_p2l).sum(axis=1).astype(np.int64)),
        changed=torch.from_numpy(np.asarray(changed, dtype=bool)),
        reasons=tuple(reasons),
        params=params,
    )


def _migrate(
    w: np.ndarray,
    previous: Layout,
    r_star: np.ndarray,
    peak: np.ndarray,
    mean: np.ndarray,
    bound: np.ndarray,
    tolerance: float,
    gpu_node: np.ndarray,
    node_cost: np.ndarray | None,
    cap: int,
    replica_slack: float,
    G: int,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Candidate placements of every layer from ``previous``, one per refinement depth.

    Returns ([(phy2log [L, P], max GPU load [L]) per depth, coarsest first], logcnt [L, E]):
    the first has the new replica counts placed and no swaps; each next one is refined
    further, down to ``tolerance`` of the bound (see :data:`DEPTHS`).
    """
    prev = previous.phy2log.numpy()
    L, P = prev.shape
    S = P // G
    r_prev = previous.logcnt.numpy()
    limit = peak * (1.0 + replica_slack + 1e-9)
    r_new = transfer_counts(w, r_prev, limit, cap)
    over_cap = r_prev.max(axis=1) > cap  # a previous layout from elsewhere: recount
    r_new[over_cap] = r_star[over_cap]
    p2l = prev.reshape(L, G, S).copy()
    free_surplus(p2l, slot_loads(w, r_prev, p2l).sum(axis=2), r_prev, r_new)
    sw = np.where(p2l >= 0, slot_loads(w, r_new, np.maximum(p2l, 0)), 0.0)
    pl = Placement(p2l, sw, sw.sum(axis=2))
    forced = refill(pl, w, r_prev, r_new, gpu_node, node_cost)
    pl.holdings(w.shape[1])  # also says whether the previous layout had duplicates
    if forced or pl.duplicated:
        fix_duplicates(pl)
    costs = SwapCosts(gpu_node, node_cost, MOVE_PENALTY * mean, prev.reshape(L, G, S))
    cands = [(pl.flat().copy(), pl.loads.max(axis=1))]
    rows = np.arange(L)
    for depth in DEPTHS:
        refine(pl, rows, bound * (1.0 + depth * tolerance), costs,
               max_iter=MAX_SWAP_ITERATIONS, partners=SWAP_PARTNERS)  # fmt: skip
        cands.append((pl.flat().copy(), pl.loads.max(axis=1)))
    return cands, r_new


def _decide(
    prev: np.ndarray,
    prev_cnt: np.ndarray,
    cands: list[tuple[np.ndarray, np.ndarray]],
    cand_cnt: np.ndarray,
    mean: np.ndarray,
    max_before: np.ndarray,
    min_gain: float,
    move_cost: float,
    max_moves: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Per layer: keep ``prev`` or take one of ``cands``: the one whose gain in balance
    minus ``move_cost`` times the share of the layer's slots it rewrites (moves / P: the
    share of each GPU's expert memory restaged, the GPUs staging in parallel) is largest,
    and positive, with gain >= min_gain.

    -> (phy2log, logcnt, max GPU load, changed, reasons)."""
    L = prev.shape[0]
    before = balance_np(max_before, mean)
    gain = np.stack([before - balance_np(m, mean) for _, m in cands], axis=1)  # [L, C]
    moves = np.stack([(c != prev).sum(axis=1) for c, _ in cands], axis=1)
    ok = (moves > 0) & (gain >= min_gain) & (gain > 0) & (mean > 0)[:, None]
    value = np.where(ok, gain - move_cost * moves / prev.shape[1], -np.inf)
    why = np.where(
        (moves == 0).all(axis=1),
        "balanced",
        np.where(ok.any(axis=1), "not_worth_moves", "gain_below_threshold"),
    ).astype(object)
    # Each layer's best option (ties: the coarser one, which moves less).
    best = value.argmax(axis=1)
    choice = np.where(value[np.arange(L), best] > 0, best, -1)
    if max_moves is not None:
        choice = _within_budget(value, moves, choice, int(max_moves), why)
    why[choice >= 0] = "improved"
    reasons: list[str] = why.tolist()
    changed = choice >= 0
    new = prev.copy()
    max_after = max_before.copy()
    for j, (c, m) in enumerate(cands):
        take = choice == j
        new[take] = c[take]
        max_after[take] = m[take]
    logcnt = np.where(changed[:, None], cand_cnt, prev_cnt)
    return new, logcnt, max_after, changed, reasons


def _within_budget(
    value: np.ndarray, moves: np.ndarray, choice: np.ndarray, budget: int, reasons: np.ndarray
) -> np.ndarray:
    """Spend ``budget`` moves: layers by their best value per move, each on its best option
    that still fits. value, moves [L, C]; choice [L] (-1: keep). Marks "move_budget"."""
    L, C = value.shape
    out = np.full(L, -1)
    wanted = [i for i in range(L) if choice[i] >= 0]
    wanted.sort(key=lambda i: (-value[i, choice[i]] / moves[i, choice[i]], i))
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
    ).layout
