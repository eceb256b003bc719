"""The time objective's own steps: how many replicas of each expert receive rows, and
which ones.

With the cost model (:mod:`eplbd.planner._cost`), an active replica of expert e holding
``a_e`` active replicas costs ``f(mu_e / a_e)`` (mu: rows per step; f: fixed cost when read,
per tile, per row). More active replicas lower the largest one (the peak) but add weight
reads to the total, so unlike the token objective not every slot should receive rows: the
others hold **idle replicas** (share 0), kept warm, that a later plan can activate without
moving a byte.

- :func:`time_counts`: the greedy order of extra replicas (each next one to the expert with
  the largest per-replica time, as the token apportionment does), the lower bound, and a
  few candidate numbers K of active extras (the one minimising max(total / G, peak), and
  its neighbours that make the active replicas divide evenly over the GPUs, and all);
- :func:`candidate_items`: for each K, every layer's P replicas (active ones weighted by
  their time, idle ones 0), ready for :func:`~eplbd.planner._placement.ldm_pack_items`;
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

#: Candidate numbers of active extra replicas per layer (see :func:`time_counts`).
NUM_K = 4


@dataclass(frozen=True)
class TimeCounts:
    """Per layer (L), the greedy's outcome. ideal [L]: mean GPU time with one active
    replica per expert (the normaliser of time balance); bound [L]: lower bound of the max
    GPU time; full [L, E]: replica counts with all P - E extras; ks [L, NUM_K]: candidate
    numbers of active extras, ascending; cand [L, M]: the experts that may get extras (the
    M = min(E, P - E) most loaded); rank [L, M, cap - 1]: the position of candidate m's
    k-th extra among all extras in the greedy order (P + 1: none); target [L, NUM_K]:
    max(total(K) / G, peak(K)) for each candidate K."""

    ideal: np.ndarray
    bound: np.ndarray
    full: np.ndarray
    ks: np.ndarray
    rank: np.ndarray
    target: np.ndarray
    cand: np.ndarray

    def active_counts(self, k: np.ndarray) -> np.ndarray:
        """Active replicas per expert with ``k`` [L] (or [L, C]) active extras. -> [L, E]
        (or [L, C, E])."""
        L, E = self.full.shape
        kk = np.asarray(k)
        extra = (self.rank[:, None, :, :] < kk.reshape(L, -1)[:, :, None, None]).sum(axis=3)
        out = np.ones((L, extra.shape[1], E), dtype=np.int64)
        out[
            np.arange(L)[:, None, None],
            np.arange(extra.shape[1])[None, :, None],
            self.cand[:, None, :],
        ] += extra
        return out if kk.ndim == 2 else out[:, 0]


def time_counts(mu: np.ndarray, f: Cost, num_physical: int, num_gpus: int, cap: int) -> TimeCounts:
    """Greedy active replica counts for rows per step ``mu`` [L, E] under cost ``f``.

    The (k+1)-th replica of expert e has priority f(mu_e / k), its per-replica time with k
    replicas: taking extras by falling priority gives, for every K, the counts with the
    lowest peak (the largest per-replica time) that K extras can reach. The total time
    grows with K (every active replica is read), so the bound of a layer with K active
    extras is max(total(K) / G, peak(K)); the one with the lowest, K0, and the nearest K
    that make E + K a multiple of G (whole numbers of active replicas per GPU matter when
    reads dominate) and K = P - E are the candidates.

    The reported lower bound of a layer's max GPU time is max(sum over e of
    min_k k f(mu_e / k) / G, the peak with all P - E extras): no layout that splits an
    expert's rows evenly over its active replicas does better (experts outside the P - E
    most loaded count with one replica in the first term).
    """
    L, E = mu.shape
    P, G = num_physical, num_gpus
    extra = P - E
    F1 = f(mu)
    ideal = F1.sum(axis=1) / G
    rows = np.arange(L)
    if extra <= 0 or cap <= 1:
        zero = np.zeros((L, NUM_K), dtype=np.int64)
        tot = np.maximum(ideal, F1.max(axis=1))
        return TimeCounts(
            ideal, tot, np.ones((L, E), dtype=np.int64), zero,
            np.zeros((L, 0, 1), dtype=np.int64), np.repeat(tot[:, None], NUM_K, axis=1),
            np.zeros((L, 0), dtype=np.int64),
        )  # fmt: skip
    cand = candidates(mu, extra)  # [L, M]
    M = cand.shape[1]
    ks = np.arange(1, cap + 1, dtype=np.float64)
    mc = mu[rows[:, None], cand]
    Fk = f(mc[:, :, None] / ks)  # [L, M, cap]: per-replica time with k replicas
    kc = cap - 1
    prio = Fk[:, :, :kc]  # priority of the (k+1)-th replica, k = 1..cap-1
    delta = ks[1:] * Fk[:, :, 1:] - ks[:kc] * Fk[:, :, :kc]  # total time it adds
    # stop markers: an expert at its cap, and the heaviest expert that may get no extra
    others = np.ones((L, E), dtype=bool)
    others[rows[:, None], cand] = False
    f_rest = np.where(others, F1, -np.inf).max(axis=1)
    pr = np.concatenate([prio.reshape(L, M * kc), Fk[:, :, kc], f_rest[:, None]], axis=1)
    real = np.zeros(pr.shape[1], dtype=bool)
    real[: M * kc] = True
    dl = np.concatenate([delta.reshape(L, M * kc), np.zeros((L, M + 1))], axis=1)
    order = desc_order(np.maximum(pr, 0.0))
    s_pr = np.take_along_axis(pr, order, axis=1)
    s_real = real[order]
    s_dl = np.take_along_axis(dl, order, axis=1)
    stop = np.argmin(s_real, axis=1)  # real entries before the first marker
    kmax = np.minimum(extra, stop)
    span = extra + 1
    total = F1.sum(axis=1)[:, None] + np.concatenate(
        [np.zeros((L, 1)), np.cumsum(s_dl[:, :extra], axis=1)], axis=1
    )  # [L, extra + 1]: total time with K active extras (the first K are all real)
    peak = np.maximum(s_pr[:, :span], 0.0)
    K = np.arange(span)
    bnd = np.maximum(total / G, peak)
    k0 = np.where(K <= kmax[:, None], bnd, np.inf).argmin(axis=1)
    lb_mean = (np.where(others, F1, 0.0).sum(axis=1) + (ks * Fk).min(axis=2).sum(axis=1)) / G
    bound = np.maximum(lb_mean, peak[rows, kmax])
    # each real entry's rank among the real entries of the order: the first K are the
    # active extras, the first P - E all extras (markers only stop the bound's descent)
    real_rank = np.cumsum(s_real, axis=1) - 1
    rr = np.empty_like(order)
    rr[rows[:, None], order] = real_rank
    rank = np.where(real[None, :], rr, P + 1)[:, : M * kc].reshape(L, M, kc)
    full = np.ones((L, E), dtype=np.int64)
    full[rows[:, None], cand] += (rank < extra).sum(axis=2)
    # candidate K: the nearest below K0 that divides evenly over the GPUs, K0, the nearest
    # above, and all extras
    down = k0 - (E + k0) % G
    up = k0 + (-(E + k0)) % G
    cks = np.stack([np.where(down >= 0, down, k0), k0, np.minimum(up, kmax), kmax], axis=1)
    cks = np.sort(np.minimum(cks, kmax[:, None]), axis=1)
    target = np.take_along_axis(bnd, cks, axis=1)
    return TimeCounts(ideal, bound, full, cks, rank, target, cand)


def candidate_items(
    tc: TimeCounts, mu: np.ndarray, f: Cost
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every layer's P replicas for each candidate K: (items [C, L, P] experts, weights
    [C, L, P] (active: f(mu_e / a_e); idle: 0), active [C, L, P] bool, a [C, L, E])."""
    L, E = mu.shape
    a = tc.active_counts(tc.ks)  # [L, C, E]
    a = np.moveaxis(a, 1, 0)  # [C, L, E]
    items = replica_items(tc.full)  # [L, P]
    P = items.shape[1]
    start = np.cumsum(tc.full, axis=1) - tc.full
    within = np.arange(P) - np.take_along_axis(start, items, axis=1)  # copy index of its expert
    R = np.arange(L)[:, None]
    per = f(mu[None] / a)  # [C, L, E]
    ac = a[:, R, items]  # [C, L, P]
    active = within[None] < ac
    iw = np.where(active, per[:, R, items], 0.0)
    return np.broadcast_to(items, ac.shape), iw, active, a


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
    """Move activity between replicas of one expert (no weights move): while the busiest
    GPU of a layer has an active replica whose expert has an idle replica on a GPU that
    would stay below it, make that one active instead (the lightest such GPU first)."""
    assert pl.act is not None
    n, G, S = pl.shape
    active = rows.copy()
    for _ in range(max_iter):
        if active.size == 0:
            return
        m = active.size
        ar = np.arange(m)
        ld = pl.loads[active]
        g = ld.argmax(axis=1)
        top = ld[ar, g]
        e = pl.p2l[active, g]  # [m, S]
        c = pl.sw[active, g]  # [m, S]
        on = pl.act[active, g]
        y = pl.p2l[active]  # [m, G, S]
        idle = ~pl.act[active]
        hit = (y[:, None, :, :] == e[:, :, None, None]) & idle[:, None, :, :]  # [m, S, G, S]
        hit &= on[:, :, None, None] & (c[:, :, None, None] > 0)
        new_load = ld[:, None, :, None] + c[:, :, None, None]
        score = np.where(
            hit & (new_load < top[:, None, None, None] * (1 - 1e-12)), new_load, np.inf
        )
        flat = score.reshape(m, -1)
        best = flat.argmin(axis=1)
        ok = np.isfinite(flat[ar, best])
        if not ok.any():
            return
        s, h, t = np.unravel_index(best[ok], (S, G, S))
        la, ga = active[ok], g[ok]
        cv = pl.sw[la, ga, s]
        pl.sw[la, ga, s] = 0.0
        pl.act[la, ga, s] = False
        pl.sw[la, h, t] = cv
        pl.act[la, h, t] = True
        pl.loads[la, ga] -= cv
        pl.loads[la, h] += cv
        active = active[ok]
