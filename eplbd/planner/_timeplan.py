"""The time objective's own steps: how many replicas of each expert receive rows, and
which ones.

With the cost model (:mod:`eplbd.planner._cost`), an active replica of expert e holding
``a_e`` active replicas costs ``f(mu_e / a_e)`` (mu: rows per step; f: fixed cost when read,
per tile, per row). More active replicas lower the largest one (the peak) but add weight
reads to the total, so unlike the token objective not every slot should receive rows: the
others hold **idle replicas** (share 0), kept warm, that a later plan can activate without
moving a byte.

- :func:`time_counts`: the greedy order of extra replicas (each next one to the expert with
  the largest per-replica time, as the token apportionment does), the lower bound, and the
  number K0 of active extras that minimises max(total / G, peak);
- :func:`candidate_items`: every layer's P replicas with K0 active extras (active ones
  weighted by their time, idle ones 0), ready for
  :func:`~eplbd.planner._placement.ldm_pack_items`;
- :func:`deactivate_surplus`, :func:`toggle`: which replicas of an expert are active, a
  choice that moves no weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from eplbd.planner._apportion import candidates
from eplbd.planner._placement import Placement, busiest_slots, replica_items
from eplbd.planner._sortkeys import desc_order

Cost = Callable[[np.ndarray], np.ndarray]

#: A number of active extras whose bound is within this fraction of the lowest counts as
#: good as the lowest (see :func:`time_counts`).
K_SLACK = 0.0
#: Busiest GPUs of a layer that may hand activity over in one round of :func:`toggle`.
TOGGLE_SOURCES = 1


@dataclass(frozen=True)
class TimeCounts:
    """Per layer (L), the greedy's outcome. ideal [L]: mean GPU time with one active
    replica per expert (the normaliser of time balance); bound [L]: lower bound of the max
    GPU time; full [L, E]: replica counts with all P - E extras; k0 [L]: the number of
    active extras that minimises max(total / G, peak); target [L]: that minimum; cand
    [L, M]: the experts that may get extras (the M = min(E, P - E) most loaded); rank
    [L, M, cap - 1]: the position of candidate m's k-th extra among all extras in the
    greedy order (P + 1: none)."""

    ideal: np.ndarray
    bound: np.ndarray
    full: np.ndarray
    k0: np.ndarray
    target: np.ndarray
    rank: np.ndarray
    cand: np.ndarray

    def active_counts(self, k: np.ndarray | None = None) -> np.ndarray:
        """Active replicas per expert with ``k`` [L] active extras (None: k0). -> [L, E]"""
        L, E = self.full.shape
        kk = self.k0 if k is None else np.asarray(k)
        out = np.ones((L, E), dtype=np.int64)
        out[np.arange(L)[:, None], self.cand] += (self.rank < kk[:, None, None]).sum(axis=2)
        return out


def time_counts(mu: np.ndarray, f: Cost, num_physical: int, num_gpus: int, cap: int) -> TimeCounts:
    """Greedy active replica counts for rows per step ``mu`` [L, E] under cost ``f``.

    The (k+1)-th replica of expert e has priority f(mu_e / k), its per-replica time with k
    replicas: taking extras by falling priority gives, for every K, the counts with the
    lowest peak (the largest per-replica time) that K extras can reach. The total time
    grows with K (every active replica is read), so the bound of a layer with K active
    extras is max(total(K) / G, peak(K)); the K with the lowest, K0 (ties: the most), is
    the plan's. (Packing several K and keeping the one that packed best chose by the
    packing before its refinement, which is where K0 gains: the busiest GPUs shed their
    small replicas onto the idle slots of others.)

    The reported lower bound of a layer's max GPU time is max(the ideal, the peak with
    all P - E extras): no layout that splits an expert's rows evenly over its active
    replicas does better (k replicas of an expert cost at least one: each reads the
    weights, and tiles round up).
    """
    L, E = mu.shape
    P, G = num_physical, num_gpus
    extra = P - E
    F1 = f(mu)
    ideal = F1.sum(axis=1) / G
    rows = np.arange(L)
    if extra <= 0 or cap <= 1:
        tot = np.maximum(ideal, F1.max(axis=1))
        return TimeCounts(
            ideal, tot, np.ones((L, E), dtype=np.int64), np.zeros(L, dtype=np.int64), tot,
            np.zeros((L, 0, 1), dtype=np.int64), np.zeros((L, 0), dtype=np.int64),
        )  # fmt: skip
    cand = candidates(mu, extra)  # [L, M]
    M = cand.shape[1]
    mc = mu[rows[:, None], cand]
    if M == extra and L and (low := mc.min(axis=1)).min() > 0:
        # as for the token apportionment, an expert gets at most mu_e / mu_(M) extras:
        # the columns beyond never rank (their "cap" marker neither: it ranks below all
        # M first extras)
        cap = min(cap, int(np.ceil((mc.max(axis=1) / low).max())) + 2)
    ks = np.arange(1, cap + 1, dtype=np.float64)
    # f grows with the rows, so priorities rank as the rows per replica do: rank rows,
    # and evaluate f only where the ranking is read
    Rk = mc[:, :, None] / ks  # [L, M, cap]: rows per replica with k replicas
    kc = cap - 1
    # stop markers: an expert at its cap, and the heaviest expert that may get no extra
    others = np.ones((L, E), dtype=bool)
    others[rows[:, None], cand] = False
    rest = np.where(others, mu, -1.0).max(axis=1)
    pr = np.concatenate([Rk[:, :, :kc].reshape(L, M * kc), Rk[:, :, kc], rest[:, None]], axis=1)
    real = np.zeros(pr.shape[1], dtype=bool)
    real[: M * kc] = True
    order = desc_order(np.maximum(pr, 0.0))
    s_real = real[order]
    span = extra + 1
    top = order[:, :span]
    s_rows = np.take_along_axis(pr, top, axis=1)
    stop = np.argmin(s_real, axis=1)  # real entries before the first marker
    kmax = np.minimum(extra, stop)
    # the (k+1)-th replica of m adds (k + 1) f(mu / (k + 1)) - k f(mu / k) to the total
    m, k = top[:, :extra] // kc, top[:, :extra] % kc + 1.0
    mk = np.take_along_axis(mc, np.minimum(m, M - 1), axis=1)
    add = np.where(s_real[:, :extra], (k + 1) * f(mk / (k + 1)) - k * f(mk / k), 0.0)
    total = F1.sum(axis=1)[:, None] + np.concatenate(
        [np.zeros((L, 1)), np.cumsum(add, axis=1)], axis=1
    )  # [L, extra + 1]: total time with K active extras (the first K are all real)
    peak = np.where(s_rows >= 0, f(np.maximum(s_rows, 0.0)), 0.0)
    K = np.arange(span)
    bnd = np.where(K <= kmax[:, None], np.maximum(total / G, peak), np.inf)
    # the most active extras whose bound is within K_SLACK of the lowest: finer items
    # pack tighter, which a bound of whole GPUs cannot see
    ok = bnd <= bnd.min(axis=1, keepdims=True) * (1.0 + K_SLACK)
    k0 = span - 1 - ok[:, ::-1].argmax(axis=1)
    # k f(mu / k) >= f(mu) (each replica reads the weights, tiles round up), so the
    # mean's bound is the ideal
    bound = np.maximum(ideal, peak[rows, kmax])
    # each real entry's rank among the real entries of the order: the first K are the
    # active extras, the first P - E all extras (markers only stop the bound's descent)
    real_rank = np.cumsum(s_real, axis=1) - 1
    rr = np.empty_like(order)
    rr[rows[:, None], order] = real_rank
    rank = np.where(real[None, :], rr, P + 1)[:, : M * kc].reshape(L, M, kc)
    full = np.ones((L, E), dtype=np.int64)
    full[rows[:, None], cand] += (rank < extra).sum(axis=2)
    return TimeCounts(ideal, bound, full, k0, bnd[rows, k0], rank, cand)


def candidate_items(
    tc: TimeCounts, mu: np.ndarray, f: Cost, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The P replicas of layers ``rows`` with K0 active extras: (items [n, P] experts,
    weights [n, P] (active: f(mu_e / a_e); idle: 0), active [n, P] bool)."""
    full = tc.full[rows]
    a = tc.active_counts()[rows]
    items = replica_items(full)  # [n, P]
    P = items.shape[1]
    start = np.cumsum(full, axis=1) - full
    within = np.arange(P) - np.take_along_axis(start, items, axis=1)  # copy index of its expert
    R = np.arange(rows.size)[:, None]
    per = f(mu[rows] / a)
    active = within < a[R, items]
    iw = np.where(active, per[R, items], 0.0)
    return items, iw, active


def deactivate_surplus(pl: Placement, active_counts: np.ndarray) -> None:
    """Keep ``active_counts`` [n, E] replicas of each expert active: the surplus ones on the
    busiest GPUs go idle (weight 0). In place; needs ``pl.act``."""
    assert pl.act is not None
    n, G, S = pl.shape
    E = active_counts.shape[1]
    flat = pl.p2l.reshape(n, G * S)
    on = pl.act.reshape(n, G * S)
    have = np.zeros((n, E), dtype=np.int64)
    np.add.at(have, (np.arange(n)[:, None], np.where(on, flat, 0)), on.astype(np.int64))
    li, s = busiest_slots(pl.p2l, pl.loads, np.maximum(have - active_counts, 0), pl.act)
    if li.size == 0:
        return
    g, k = s // S, s % S
    np.subtract.at(pl.loads, (li, g), pl.sw[li, g, k])
    pl.sw[li, g, k] = 0.0
    pl.act[li, g, k] = False


def toggle(pl: Placement, rows: np.ndarray, max_iter: int) -> None:
    """Move activity between replicas of one expert (no weights move): while one of the
    busiest GPUs of a layer has an active replica whose expert has an idle replica on a
    GPU that would stay below it, make that one active instead (the lightest such GPU
    first). Each round, each of the :data:`TOGGLE_SOURCES` busiest GPUs may hand over one
    replica, to GPUs outside them and distinct from each other.

    The idle replicas are looked up in a per-expert table (:func:`_idle_table`), kept up
    to date as activity moves."""
    assert pl.act is not None
    n_all, G, S = pl.shape
    if rows.size == 0:
        return
    row, idle = _idle_table(pl, rows)  # [n, E] -> [n, X, R] flat slots, -1 padded
    if idle.shape[2] == 0:
        return
    R = idle.shape[2]
    T = max(1, min(TOGGLE_SOURCES, G // 2))
    at = np.arange(rows.size)  # each active layer's row of ``idle``
    active = rows.copy()
    for _ in range(max_iter):
        if active.size == 0:
            return
        m = active.size
        ar = np.arange(m)[:, None]
        ld = pl.loads[active]
        if T == 1:  # the first of desc_order: the largest in float32, ties to the lower index
            src = np.asarray(ld, dtype=np.float32).argmax(axis=1)[:, None]
        else:
            src = desc_order(ld)[:, :T]  # [m, T] the busiest GPUs
        top = ld[ar, src]
        e = pl.p2l[active[:, None], src]  # [m, T, S]
        c = pl.sw[active[:, None], src]
        on = pl.act[active[:, None], src] & (c > 0)
        # [m, T, S, R]: idle replicas of the sources' experts
        cand = idle[at[:, None, None], row[at[:, None, None], e]]
        h_all = cand // S
        # flat indices (cheaper); a -1 (no idle replica) reads some load, masked below
        new_load = ld.reshape(-1)[(ar * G)[:, :, None, None] + h_all] + c[..., None]
        ok = (cand >= 0) & on[..., None] & (new_load < top[:, :, None, None] * (1 - 1e-12))
        flat = np.where(ok, new_load, np.inf).reshape(m * T, S * R)
        best = flat.argmin(axis=1)
        found = np.isfinite(flat[np.arange(m * T), best]).reshape(m, T)
        best = best.reshape(m, T)
        sk, j = best // R, best % R
        b = cand[ar, np.arange(T), sk, j]  # [m, T] the idle slot each source picked
        h = b // S
        go = found
        if T > 1:
            # no hand-over to a source, nor two to one GPU (the busier source keeps it);
            # with one source neither can happen (a hand-over to it would raise its load)
            is_src = (h[:, :, None] == src[:, None, :]).any(axis=2)
            dup = np.triu(h[:, :, None] == h[:, None, :], 1).any(axis=1)
            go = found & ~is_src & ~dup
        if not go.any():
            return
        li, ti = np.nonzero(go)
        la, ga, sa, bb, jj = active[li], src[li, ti], sk[li, ti], b[li, ti], j[li, ti]
        hb, tb = bb // S, bb % S
        cv = pl.sw[la, ga, sa]
        pl.sw[la, ga, sa] = 0.0
        pl.act[la, ga, sa] = False
        pl.sw[la, hb, tb] = cv
        pl.act[la, hb, tb] = True
        np.subtract.at(pl.loads, (la, ga), cv)
        np.add.at(pl.loads, (la, hb), cv)
        # the replica now idle takes the place of the one now active
        ia = at[li]
        idle[ia, row[ia, pl.p2l[la, ga, sa]], jj] = ga * S + sa
        keep = go.any(axis=1)
        active, at = active[keep], at[keep]


def _idle_table(pl: Placement, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Idle slots of each expert, in layers ``rows``: (row [n, E]: each expert's row of the
    table, the experts without idle replicas sharing one of -1s; table [n, X, R]: flat slot
    ids g * S + k, -1 padded). X: the most experts with idle replicas in one layer, R: the
    most idle replicas of one expert (0: none idle)."""
    assert pl.act is not None
    n = rows.size
    flat = pl.p2l[rows].reshape(n, -1)
    E = int(flat.max()) + 1
    li, si = np.nonzero(~pl.act[rows].reshape(n, -1))
    if li.size == 0:
        return np.zeros((n, E), dtype=np.int64), np.zeros((n, 1, 0), dtype=np.int64)
    key = li * E + flat[li, si]  # ascending in (layer, expert); nonzero keeps slots ascending
    order = np.argsort(key, kind="stable")
    key, si = key[order], si[order]
    new = np.r_[True, key[1:] != key[:-1]]
    first = np.flatnonzero(new)
    rank = np.arange(key.size) - np.repeat(first, np.diff(np.r_[first, key.size]))
    # experts with idle replicas numbered 1, 2, ... within their layer; 0 is the empty row
    ki = key[first]
    lay = ki // E
    start = np.searchsorted(lay, np.arange(n))
    num = np.arange(ki.size) - start[lay] + 1
    row = np.zeros((n, E), dtype=np.int64)
    row[lay, ki % E] = num
    table = np.full((n, int(num.max()) + 1, int(rank.max()) + 1), -1, dtype=np.int64)
    table[key // E, row[key // E, key % E], rank] = si
    return row, table
