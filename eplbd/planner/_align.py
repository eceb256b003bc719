"""Align a placement planned from scratch with the layout now served, to save moves.

Which GPU gets which group of replicas, and which slot of a GPU holds which of its
replicas, changes nothing in the balance; it only decides how many slots must be
rewritten. :func:`align` renumbers the GPUs of a fresh placement so that each lands on the
GPU of the previous layout it shares most experts with (greedy matching, largest overlap
first), then puts every replica that a GPU kept back into its old slot.
"""

from __future__ import annotations

import numpy as np

from eplbd.planner._placement import Placement


def align(pl: Placement, prev: np.ndarray) -> None:
    """Renumber GPUs and slots of ``pl`` (in place) to match ``prev`` [n, G, S] closely."""
    n, G, S = pl.shape
    E = int(max(pl.p2l.max(), prev.max())) + 1
    li = np.arange(n)[:, None, None]
    gi = np.arange(G)[None, :, None]
    # overlap[l, g, h]: experts that new GPU g and old GPU h both hold (a batched matmul)
    new_has = np.zeros((n, G, E), dtype=np.float32)
    new_has[li, gi, pl.p2l] = 1.0
    old_has = np.zeros((n, G, E), dtype=np.float32)
    old_has[li, gi, prev] = 1.0
    _permute_gpus(pl, _match(np.matmul(new_has, old_has.transpose(0, 2, 1))))
    _keep_slots(pl, prev, E)


def _match(score: np.ndarray) -> np.ndarray:
    """A one-to-one map of new GPUs g to old GPUs h with a large total score [n, G, G]:
    the new GPUs in order of their best score, each to its best old GPU still free.
    -> to [n, G]."""
    n, G, _ = score.shape
    rows = np.arange(n)
    s = score.copy()
    to = np.empty((n, G), dtype=np.int64)
    order = np.argsort(-s.max(axis=2), axis=1, kind="stable")
    for i in range(G):
        g = order[:, i]
        h = s[rows, g].argmax(axis=1)
        to[rows, g] = h
        s[rows, :, h] = -np.inf
    return to


def _permute_gpus(pl: Placement, to: np.ndarray) -> None:
    """GPU g of ``pl`` becomes GPU to[l, g]."""
    n = pl.shape[0]
    R = np.arange(n)[:, None]
    for name in ("p2l", "sw", "loads", "act"):
        a = getattr(pl, name)
        if a is None:
            continue
        out = np.empty_like(a)
        out[R, to] = a
        setattr(pl, name, out)
    pl.has = None


def _keep_slots(pl: Placement, prev: np.ndarray, E: int) -> None:
    """Within each GPU, put each replica whose expert the same GPU held in ``prev`` into
    that old slot; the others fill the remaining slots in order."""
    n, G, S = pl.shape
    li = np.arange(n)[:, None, None]
    gi = np.arange(G)[None, :, None]
    si = np.arange(S)[None, None, :]
    old_slot = np.full((n, G, E), -1, dtype=np.int16 if S < 2**15 else np.int64)
    old_slot[li, gi, prev] = si
    target = old_slot[li, gi, pl.p2l].astype(np.int64)  # [n, G, S]: its old slot, or -1
    # one new entry per old slot (a GPU holding two copies of an expert: the last wins)
    claim = np.full((n, G, S), -1, dtype=np.int64)
    hit = target >= 0
    lm, gm, sm = np.nonzero(hit)
    claim[lm, gm, target[hit]] = sm
    matched = hit & (claim[li, gi, np.maximum(target, 0)] == si)
    taken = claim >= 0
    # the others, in order, go to the free old slots, in order
    free_slot = np.argsort(taken, axis=2, kind="stable")  # free slots first, ascending
    un_rank = np.cumsum(~matched, axis=2) - 1
    fill = np.take_along_axis(free_slot, np.maximum(un_rank, 0), axis=2)
    target = np.where(matched, target, fill)
    for name in ("p2l", "sw", "act"):
        a = getattr(pl, name)
        if a is None:
            continue
        out = np.empty_like(a)
        out[li, gi, target] = a
        setattr(pl, name, out)
    pl.has = None
