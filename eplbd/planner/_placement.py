"""The migration-aware planner's placement steps, on numpy arrays, vectorised over layers.

A placement of a batch of n layers is three arrays (G GPUs, S slots per GPU):

- ``p2l`` [n, G, S] int64: the expert in each slot (layout slot p is ``[p // S, p % S]``),
  -1 for a slot being refilled;
- ``sw`` [n, G, S] float64: the load of the replica in each slot (its expert's load divided
  by the expert's replica count);
- ``loads`` [n, G] float64: the sum of ``sw`` over each GPU's slots;
- ``act`` [n, G, S] bool or None: whether each slot receives rows (the time objective's
  idle replicas have weight 0 and ``act`` False; None: every slot does).

Steps: :func:`ldm_pack` places everything from scratch; :func:`transfer_counts`,
:func:`free_surplus` and :func:`refill` change only what new replica counts require;
:func:`refine` then swaps replicas between busy and idle GPUs until the layer is within a
tolerance of its lower bound. Each step loops over a small count (merges, refills, swap
rounds) and handles all layers of the batch in every iteration. The arrays are small, so
the cost is the number of numpy calls, not their size: the hot loops use few calls, flat
(one-dimensional) fancy indexing, and a per-GPU expert count table (``Placement.has``)
instead of comparing slot lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eplbd.planner._sortkeys import asc_order, desc_order

NO_EXPERT = -1
#: Most (busy, idle) GPU pairs one refinement round works on per layer.
MAX_PAIRS = 8


@dataclass
class Placement:
    """Mutable placement of n layers (see the module docstring for the shapes).

    ``has`` [n, G, E] int8, built on demand by :meth:`holdings`: how many replicas of each
    expert each GPU holds; kept up to date by swaps and refills.
    """

    p2l: np.ndarray
    sw: np.ndarray
    loads: np.ndarray
    has: np.ndarray | None = None
    duplicated: bool = False  # some GPU held two copies of an expert when has was built
    act: np.ndarray | None = None

    def holdings(self, num_experts: int | None = None) -> np.ndarray:
        if self.has is None:
            n, G, S = self.shape
            E = int(self.p2l.max()) + 1 if num_experts is None else num_experts
            cell = (np.arange(n)[:, None, None] * G + np.arange(G)[:, None]) * E
            flat = (cell + self.p2l)[self.p2l >= 0]  # free slots hold nothing
            has = np.zeros(n * G * E, dtype=np.int8)
            has[flat] = 1
            self.duplicated = np.count_nonzero(has) != flat.size
            if self.duplicated:  # some GPU holds two copies: count them
                has = np.bincount(flat, minlength=n * G * E).astype(np.int8)
            self.has = has.reshape(n, G, E)
        return self.has

    @property
    def shape(self) -> tuple[int, int, int]:
        n, G, S = self.p2l.shape
        return int(n), int(G), int(S)

    def flat(self) -> np.ndarray:
        """phy2log [n, P] int64."""
        n, G, S = self.shape
        return self.p2l.reshape(n, G * S)

    def flat_act(self) -> np.ndarray:
        """Active slots [n, P] bool (all True without ``act``)."""
        n, G, S = self.shape
        if self.act is None:
            return np.ones((n, G * S), dtype=bool)
        return self.act.reshape(n, G * S)

    def take(self, rows: np.ndarray) -> Placement:
        """A copy of the given layers (``has`` rebuilt on demand)."""
        return Placement(
            self.p2l[rows].copy(),
            self.sw[rows].copy(),
            self.loads[rows].copy(),
            act=None if self.act is None else self.act[rows].copy(),
        )


def slot_loads(w: np.ndarray, r: np.ndarray, p2l: np.ndarray) -> np.ndarray:
    """Per-slot replica load. w [n, E], r [n, E], p2l [n, ...] (ids >= 0) -> p2l's shape."""
    n = p2l.shape[0]
    per = (w / np.maximum(r, 1)).ravel()
    idx = (np.arange(n) * w.shape[1]).reshape((n,) + (1,) * (p2l.ndim - 1)) + p2l
    return per[idx]


def _swap_many(
    pl: Placement, layer: np.ndarray, g: np.ndarray, sa: np.ndarray, h: np.ndarray,
    sb: np.ndarray,
) -> None:  # fmt: skip
    """Swap slot (g, sa) with slot (h, sb) in each given layer; g != h, one swap per GPU.

    Flat indices throughout: one-dimensional fancy indexing is the cheap kind.
    """
    if layer.size == 0:
        return
    n, G, S = pl.shape
    ga, gb = layer * G + g, layer * G + h
    fa, fb = ga * S + sa, gb * S + sb
    p2l, sw, loads = pl.p2l.reshape(-1), pl.sw.reshape(-1), pl.loads.reshape(-1)
    xa, xb = p2l[fa], p2l[fb]
    va, vb = sw[fa], sw[fb]
    p2l[fa] = xb
    p2l[fb] = xa
    sw[fa] = vb
    sw[fb] = va
    loads[ga] += vb - va
    loads[gb] += va - vb
    if pl.act is not None:
        act = pl.act.reshape(-1)
        aa, ab = act[fa], act[fb]
        act[fa] = ab
        act[fb] = aa
    if pl.has is not None:
        E = pl.has.shape[2]
        has = pl.has.reshape(-1)
        # no index repeats within one of the two: one swap per GPU, g != h
        has[np.concatenate((ga * E + xa, gb * E + xb))] -= 1
        has[np.concatenate((ga * E + xb, gb * E + xa))] += 1


# --- from scratch ------------------------------------------------------------------------


def replica_items(r: np.ndarray) -> np.ndarray:
    """Each layer's replicas as a list of experts, ascending. r [n, E] (rows sum to P) ->
    [n, P] int64."""
    n, E = r.shape
    P = int(r[0].sum())
    return np.repeat(np.tile(np.arange(E, dtype=np.int64), n), r.ravel()).reshape(n, P)


def ldm_pack(w: np.ndarray, r: np.ndarray, num_gpus: int) -> Placement:
    """Pack every replica (expert e's weighing w_e / r_e) from scratch by largest
    differencing (:func:`ldm_pack_items`). w [n, E], r [n, E]."""
    n = w.shape[0]
    items = replica_items(r)
    iw = (w / np.maximum(r, 1))[np.arange(n)[:, None], items]
    return ldm_pack_items(items, iw, num_gpus)


def ldm_pack_items(
    items: np.ndarray, iw: np.ndarray, num_gpus: int, active: np.ndarray | None = None
) -> Placement:
    """Pack items (experts [n, P], weights [n, P]) onto G GPUs by largest differencing;
    ``active`` [n, P] bool travels with the items (None: all active).

    The replicas, heaviest first, are dealt into T = P / G tuples of G (tuple k holds the
    k-th G heaviest). Then, T - 1 times, the two tuples whose loads spread most are merged:
    the heavier entries of one onto the lighter entries of the other (Karmarkar-Karp's
    differencing, in its balanced form). The last tuple's G entries are the GPUs; each GPU
    gets exactly one replica from every original tuple, which becomes its slot k. Much
    closer to the bound than greedy LPT; :func:`refine` finishes the job.
    """
    n, P = items.shape
    G = num_gpus
    T = P // G
    R2 = np.arange(n)[:, None]
    order = desc_order(iw)
    items = items[R2, order]
    iw = iw[R2, order]
    sums = iw.reshape(n, T, G).copy()  # [n, tuple, entry]
    spread = sums[:, :, 0] - sums[:, :, -1]
    rows = np.arange(n)
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    a = np.zeros(n, dtype=np.int64)
    for _ in range(T - 1):
        a = spread.argmax(axis=1)
        spread[rows, a] = -np.inf
        b = spread.argmax(axis=1)
        sa, sb = sums[rows, a], sums[rows, b]
        up, down = asc_order(sa), desc_order(sb)  # entry i joins a's i-th lightest ...
        merged = sa[R2, up] + sb[R2, down]  # ... with b's i-th heaviest
        sums[rows, a] = merged
        spread[rows, a] = merged.max(axis=1) - merged.min(axis=1)
        spread[rows, b] = -np.inf
        steps.append((a, b, up, down))
    # Walk the merges backwards: where[t, i] = the final entry (GPU) of tuple t's entry i.
    where = np.zeros((n, T, G), dtype=np.int64)
    where[rows, a] = np.arange(G)
    for a, b, up, down in reversed(steps):
        after = where[rows, a]
        before_a = np.empty_like(after)
        before_a[R2, up] = after
        before_b = np.empty_like(after)
        before_b[R2, down] = after
        where[rows, a] = before_a
        where[rows, b] = before_b
    slot = where.reshape(n, P) * T + np.arange(P) // G
    p2l = np.empty((n, P), dtype=np.int64)
    sw = np.empty((n, P))
    p2l[R2, slot] = items
    sw[R2, slot] = iw
    act: np.ndarray | None = None
    if active is not None:
        flat_act = np.empty((n, P), dtype=bool)
        flat_act[R2, slot] = active[R2, order]
        act = flat_act.reshape(n, G, T)
    pl = Placement(
        p2l.reshape(n, G, T), sw.reshape(n, G, T), sw.reshape(n, G, T).sum(axis=2), act=act
    )
    fix_duplicates(pl)
    return pl


# --- duplicates --------------------------------------------------------------------------


def _duplicate_slots(
    p2l: np.ndarray, layers: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One slot per affected layer (among ``layers``) holding a second replica of an expert
    on its GPU. p2l [n, G, S] -> (layers, gpus, slots)."""
    n, G, S = p2l.shape
    nb = max(1, (S - 1).bit_length())
    m = layers.size
    key = (p2l[layers].reshape(m * G, S) << nb) | np.arange(S, dtype=np.int64)
    key.sort(axis=1)
    e = key >> nb
    dup = (e[:, 1:] == e[:, :-1]) & (e[:, 1:] >= 0)  # [m * G, S - 1]
    hit = dup.any(axis=1).reshape(m, G)
    found = np.flatnonzero(hit.any(axis=1))
    g = hit[found].argmax(axis=1)
    row = found * G + g
    slot = key[row, 1 + dup[row].argmax(axis=1)] & ((1 << nb) - 1)
    return layers[found], g, slot


def fix_duplicates(pl: Placement) -> None:
    """Swap away second replicas of an expert on one GPU, where another GPU can take them.

    The packing steps leave a few (copies of one expert merged onto the same entry, a
    refill with no other GPU free): each pass swaps one per layer with the slot of closest
    load among those on GPUs without that expert whose own expert is not on the first GPU.
    A layer where no such slot exists keeps its duplicate.
    """
    n, G, S = pl.shape
    if S < 2:
        return
    E = int(pl.p2l.max()) + 1
    layers = np.arange(n)
    for _ in range(G * S):
        layers, g, s = _duplicate_slots(pl.p2l, layers)
        if layers.size == 0:
            return
        m = layers.size
        ar = np.arange(m)
        e = pl.p2l[layers, g, s]
        y = pl.p2l[layers]  # [m, G, S]
        on_g = np.zeros((m, E + 1), dtype=bool)  # column E: a free slot (-1)
        on_g[ar[:, None], pl.p2l[layers, g]] = True
        ok = ~(y == e[:, None, None]).any(axis=2)[:, :, None] & ~on_g[ar[:, None, None], y]
        ok &= y >= 0
        cost = np.abs(pl.sw[layers] - pl.sw[layers, g, s][:, None, None])
        flat = np.where(ok, cost, np.inf).reshape(m, G * S)
        best = flat.argmin(axis=1)
        found = np.isfinite(flat[ar, best])
        layers, g, s, best = layers[found], g[found], s[found], best[found]
        _swap_many(pl, layers, g, s, best // S, best % S)


# --- from a previous layout ----------------------------------------------------------------


def transfer_counts(w: np.ndarray, r_prev: np.ndarray, limit: np.ndarray, cap: int) -> np.ndarray:
    """New replica counts, as close to ``r_prev`` as the per-replica ``limit`` allows.

    w, r_prev [n, E]; limit [n]. Each expert gets at least ``ceil(w_e / limit)`` replicas
    (at most ``cap``); the replicas this adds are taken, one at a time, from the experts that
    have more than they need and whose load per replica stays lowest after giving one up.
    Returns r [n, E] int64 with the same row sums as ``r_prev``.
    """
    # A layer with no load has limit 0: every expert needs just its one replica.
    safe = np.where(limit > 0, limit, 1.0)[:, None]
    need = np.where(limit[:, None] > 0, np.ceil(w / safe), 1.0)
    need_min = np.clip(need, 1, cap).astype(np.int64)
    r = np.maximum(r_prev, need_min)
    owe = r.sum(axis=1) - r_prev.sum(axis=1)
    rows = np.flatnonzero(owe > 0)
    while rows.size:
        rr = r[rows]
        after = np.where(rr > need_min[rows], w[rows] / np.maximum(rr - 1, 1), np.inf)
        donor = after.argmin(axis=1)
        r[rows, donor] -= 1
        owe[rows] -= 1
        rows = rows[owe[rows] > 0]
    return r


def busiest_slots(
    p2l: np.ndarray, loads: np.ndarray, drop: np.ndarray, eligible: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For each expert, its ``drop`` [n, E] slots on the busiest GPUs (ties: lower slot).

    p2l [n, G, S]; loads [n, G]; eligible [n, G, S] bool: the slots that may be picked
    (None: all). Returns (layers, flat slots) of the picked slots.
    """
    n, G, S = p2l.shape
    E = drop.shape[1]
    flat = p2l.reshape(n, G * S)
    mask = drop[np.arange(n)[:, None], np.maximum(flat, 0)] > 0
    mask &= flat >= 0
    if eligible is not None:
        mask &= eligible.reshape(n, G * S)
    li, si = np.nonzero(mask)
    if li.size == 0:
        return li, si
    e = flat[li, si]
    # Group by (layer, expert), busiest GPU first (then lower slot); pick the first ones.
    by_load = np.argsort(-loads, axis=1, kind="stable")
    grank = np.empty_like(by_load)
    grank[np.arange(n)[:, None], by_load] = np.arange(G)
    order = np.argsort(((li * E + e) * G + grank[li, si // S]) * S + si % S)
    li, si, e = li[order], si[order], e[order]
    key = li * E + e
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    rank = np.arange(key.size) - np.repeat(first, np.diff(np.r_[first, key.size]))
    pick = rank < drop[li, e]
    return li[pick], si[pick]


def free_surplus(p2l: np.ndarray, loads: np.ndarray, r_prev: np.ndarray, r_new: np.ndarray) -> None:
    """Empty the slots of replicas no longer wanted, on the busiest GPUs first (in place).

    p2l [n, G, S]; loads [n, G] (before the change); r_prev, r_new [n, E]. An expert with
    r_prev > r_new loses r_prev - r_new replicas; their slots get expert -1.
    """
    n, G, S = p2l.shape
    li, s = busiest_slots(p2l, loads, np.maximum(r_prev - r_new, 0))
    p2l[li, s // S, s % S] = NO_EXPERT


def refill(
    pl: Placement,
    w: np.ndarray,
    r_prev: np.ndarray,
    r_new: np.ndarray,
    gpu_node: np.ndarray,
    node_penalty: np.ndarray | None,
) -> bool:
    """Place the new replicas (r_new - r_prev of each expert) into the free slots, in place.

    Heaviest replica first, each onto the least loaded GPU that has a free slot and no replica
    of that expert; a GPU on a node that holds no replica of the expert yet (its weights
    would cross nodes) counts ``node_penalty`` [n] heavier (None: one node). gpu_node [G]:
    each GPU's node, GPUs of a node contiguous. Returns whether some replica had to go to a
    GPU that already holds its expert (then :func:`fix_duplicates` is due).
    """
    n, G, S = pl.shape
    add = np.maximum(r_new - r_prev, 0)
    per_layer = add.sum(axis=1)
    D = int(per_layer.max()) if n else 0
    forced = False
    if D == 0:
        return forced
    E = w.shape[1]
    # The new replicas of each layer, padded to D with -1 (load 0, so last), heaviest first.
    flat_e = np.repeat(np.tile(np.arange(E, dtype=np.int64), n), add.ravel())
    flat_l = np.repeat(np.arange(n), per_layer)
    pos = np.arange(flat_e.size) - np.repeat(np.cumsum(per_layer) - per_layer, per_layer)
    items = np.full((n, D), NO_EXPERT, dtype=np.int64)
    items[flat_l, pos] = flat_e
    item_w = np.zeros((n, D))
    item_w[flat_l, pos] = w[flat_l, flat_e] / r_new[flat_l, flat_e]
    order = desc_order(item_w)
    R2 = np.arange(n)[:, None]
    items = items[R2, order]
    item_w = item_w[R2, order]
    N = int(gpu_node[-1]) + 1
    free_n = (pl.p2l == NO_EXPERT).sum(axis=2)  # [n, G]
    pl.has = None
    has = pl.holdings(E)
    gpus = np.arange(G)[None, :]
    for t in range(D):
        rows = np.flatnonzero(items[:, t] >= 0)
        if rows.size == 0:
            break
        e = items[rows, t]
        holds = has[rows[:, None], gpus, e[:, None]] > 0  # [m, G]
        score = pl.loads[rows]
        if N > 1 and node_penalty is not None:
            node_lacks = ~holds.reshape(rows.size, N, G // N).any(axis=2)
            score = score + node_penalty[rows, None] * node_lacks[:, gpu_node]
        room = free_n[rows] > 0
        ok = room & ~holds
        # Where every GPU with room holds the expert already, place it anyway:
        # fix_duplicates swaps it away afterwards.
        none = ~ok.any(axis=1, keepdims=True)
        if none.any():
            forced = True
            ok = np.where(none, room, ok)
        g = np.where(ok, score, np.inf).argmin(axis=1)
        k = (pl.p2l[rows, g] == NO_EXPERT).argmax(axis=1)
        iw = item_w[rows, t]
        pl.p2l[rows, g, k] = e
        pl.sw[rows, g, k] = iw
        if pl.act is not None:
            pl.act[rows, g, k] = True
        pl.loads[rows, g] += iw
        free_n[rows, g] -= 1
        has[rows, g, e] += 1
    return forced


# --- improvement by swaps ------------------------------------------------------------------


@dataclass(frozen=True)
class SwapCosts:
    """What makes one improving swap preferable to another, in units of load.

    gpu_node [G]: node of each GPU; node [n] (None: one node): added for a swap between
    nodes; move [n]: added per slot a swap takes from its ``prev`` [n, G, S] expert (None:
    moves are free).
    """

    gpu_node: np.ndarray
    node: np.ndarray | None
    move: np.ndarray
    prev: np.ndarray | None


def refine(
    pl: Placement,
    rows: np.ndarray,
    target: np.ndarray,
    costs: SwapCosts,
    *,
    max_iter: int,
    partners: int,
    min_step: np.ndarray | None = None,
    widen: bool = True,
) -> None:
    """Swap replicas from GPUs above ``target`` [n] to lighter ones, in place.

    rows: the layers (of the placement) to work on. Each round pairs, in every layer still
    above its target, the i-th busiest GPU with the i-th lightest, for every GPU above the
    target (at most :data:`MAX_PAIRS`), and makes in each pair the swap that most lowers the
    pair's larger load (:func:`_pair_swaps`). Where that does not lower the busiest GPU, the
    busiest GPU tries the other GPUs instead (:func:`_best_swaps`, the ``partners`` lightest
    first, then all unless ``widen`` is False). Costs break near-ties. A layer stops at its
    target, or when its busiest GPU cannot be lowered by one swap by more than its
    ``min_step`` [n] (None: by anything).
    """
    n, G, S = pl.shape
    active = rows[pl.loads[rows].max(axis=1) > target[rows]]
    K = min(partners, G)
    step = np.zeros(n) if min_step is None else min_step
    for _ in range(max_iter):
        if active.size == 0:
            break
        top_ok = _pair_swaps(pl, active, target, costs, step)
        progress = top_ok
        if K and not top_ok.all():
            stuck = active[~top_ok]
            ok = _best_swaps(pl, stuck, costs, K, step)
            if widen and K < G and not ok.all():
                ok[~ok] = _best_swaps(pl, stuck[~ok], costs, G, step)
            progress = top_ok.copy()
            progress[~top_ok] = ok
        active = active[progress]
        active = active[pl.loads[active].max(axis=1) > target[active]]


def _pair_swaps(
    pl: Placement, A: np.ndarray, target: np.ndarray, costs: SwapCosts, step: np.ndarray
) -> np.ndarray:
    """One swap in each (i-th busiest, i-th lightest) GPU pair whose busy side is above
    target, for the layers A. Returns whether each layer's busiest GPU got lower. [len(A)]

    Swapping a (load x, busy side at Lh) with b (load y, light side at Ll) leaves the pair at
    max(Lh - x + y, Ll + x - y) = (Lh + Ll) / 2 + |x - y - (Lh - Ll) / 2|, so each pair
    minimises |x - half - y| plus its costs; the costs split into a part of a and a part
    of b, which keeps the [m, T, S, S] arrays to a handful.
    """
    n_all, G, S = pl.shape
    m = A.size
    ld = pl.loads[A]
    above = (ld > target[A][:, None]).sum(axis=1)
    T = int(min(G // 2, MAX_PAIRS, above.max()))
    if T == 0:
        return np.zeros(m, dtype=bool)
    order = asc_order(ld)
    base = A[:, None] * G
    heavy = order[:, : -T - 1 : -1] + base  # [m, T] flat GPU ids, busiest first
    light = order[:, :T] + base
    loads = pl.loads.reshape(-1)
    Lh, Ll = loads[heavy], loads[light]
    half = 0.5 * (Lh - Ll)
    # [m, T, S]: the GPUs' slots, gathered as rows of the [n * G, S] views
    p2l, sw = pl.p2l.reshape(-1, S), pl.sw.reshape(-1, S)
    ph, wh, pq, wq = p2l[heavy], sw[heavy], p2l[light], sw[light]
    # a swap that would duplicate: a's expert already on the light GPU, or b's on the busy one
    has = pl.holdings()
    E = has.shape[2]
    has = has.reshape(-1)
    cost_a = np.where(has[light[:, :, None] * E + ph] > 0, np.inf, 0.0)  # [m, T, S]
    cost_b = np.where(has[heavy[:, :, None] * E + pq] > 0, np.inf, 0.0)
    if costs.node is not None:
        cross = costs.gpu_node[heavy % G] != costs.gpu_node[light % G]
        cost_a += (costs.node[A][:, None] * cross)[:, :, None]
    if costs.prev is not None:
        prev = costs.prev.reshape(-1, S)  # a slot still holding its old expert: a move
        mc = costs.move[A][:, None, None]
        cost_a += mc * (ph == prev[heavy])
        cost_b += mc * (pq == prev[light])
    score = np.abs((wh - half[:, :, None])[:, :, :, None] - wq[:, :, None, :])
    score += cost_a[:, :, :, None]
    score += cost_b[:, :, None, :]
    flat = score.reshape(m * T, S * S)
    best = flat.argmin(axis=1)
    rows = np.arange(m * T)
    sa, sb = best // S, best % S
    moved = wh.reshape(-1, S)[rows, sa] - wq.reshape(-1, S)[rows, sb]
    new_pair = np.maximum(Lh.ravel() - moved, Ll.ravel() + moved)
    lim = Lh * (1.0 - 1e-12) - step[A][:, None]
    ok = np.isfinite(flat[rows, best]) & (new_pair < lim.ravel())
    ok &= (np.arange(T) < above[:, None]).ravel()  # only busy sides above the target
    k = np.flatnonzero(ok)
    hk, lk = heavy.ravel()[k], light.ravel()[k]
    _swap_many(pl, hk // G, hk % G, sa[k], lk % G, sb[k])
    return ok.reshape(m, T)[:, 0]


def _best_swaps(
    pl: Placement, A: np.ndarray, costs: SwapCosts, K: int, step: np.ndarray
) -> np.ndarray:
    """The busiest GPU's best swap with any of the K lightest GPUs, in each layer of A.

    Same arithmetic as :func:`_pair_swaps`, with one busy GPU and K partners. Returns
    whether a swap lowering the busiest GPU was made. [len(A)] bool
    """
    n_all, G, S = pl.shape
    m = A.size
    ar = np.arange(m)
    R2 = ar[:, None]
    ld = pl.loads[A]
    g = ld.argmax(axis=1)
    top = ld[ar, g]
    hs = np.broadcast_to(np.arange(G), (m, G)) if K >= G else asc_order(ld)[:, :K]
    K = hs.shape[1]
    lh = ld[R2, hs]  # [m, K]
    half = 0.5 * (top[:, None] - lh)
    # flat GPU ids, for gathers from the [n * G, S] and [n * G * E] views (the cheap kind)
    fg, fh = A * G + g, A[:, None] * G + hs
    p2l, sw = pl.p2l.reshape(-1, S), pl.sw.reshape(-1, S)
    pa, wa = p2l[fg], sw[fg]  # [m, S]
    pb, wb = p2l[fh], sw[fh]  # [m, K, S]
    has = pl.holdings()
    E = has.shape[2]
    has = has.reshape(-1)
    a_on_h = has[fh[:, None, :] * E + pa[:, :, None]]  # [m, S, K]
    cost_a = np.where(a_on_h > 0, np.inf, 0.0)  # a's expert already on h
    cost_b = np.where(has[fg[:, None, None] * E + pb] > 0, np.inf, 0.0)  # b's on g
    cost_b += 0.5 * (top[:, None] + lh)[:, :, None]  # the pair's centre differs per partner
    if costs.node is not None:
        cross = costs.gpu_node[hs] != costs.gpu_node[g][:, None]  # [m, K]
        cost_b += (costs.node[A][:, None] * cross)[:, :, None]
    if costs.prev is not None:
        mc = costs.move[A][:, None]
        prev = costs.prev.reshape(-1, S)
        cost_a += (mc * (pa == prev[fg]))[:, :, None]
        cost_b += mc[:, :, None] * (pb == prev[fh])
    score = np.abs((wa[:, :, None] - half[:, None, :])[:, :, :, None] - wb[:, None, :, :])
    score += cost_a[:, :, :, None]
    score += cost_b[:, None, :, :]
    flat = score.reshape(m, -1)
    best = flat.argmin(axis=1)
    sa, hi, sb = np.unravel_index(best, (S, K, S))
    moved = wa[ar, sa] - wb[ar, hi, sb]
    new_pair = np.maximum(top - moved, lh[ar, hi] + moved)
    ok = np.isfinite(flat[ar, best]) & (new_pair < top * (1.0 - 1e-12) - step[A])
    _swap_many(pl, A[ok], g[ok], sa[ok], hs[ok, hi[ok]], sb[ok])
    return ok
