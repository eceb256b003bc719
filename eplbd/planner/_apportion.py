"""Replica counts by greedy apportionment, and the lower bound of a layer's max GPU load.

Giving each next replica to the expert with the largest load per replica ``w_e / r_e``
(DeepSeek's ``replicate_experts``) minimises ``max_e w_e / r_e`` over all counts with
``sum r_e = P`` and ``1 <= r_e <= cap``. The greedy never needs to run step by step: adding
the (k+1)-th replica of expert e has priority ``w_e / k``, which falls with k, so the P - E
extra replicas are simply the P - E largest priorities. Ties go to the lower expert, then to
the lower k, as the step-by-step greedy (``argmax`` returns the first maximum) does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eplbd.planner._checks import as_load, check_topology, replica_cap


def _first_true_per_row(mask: np.ndarray, take: np.ndarray) -> np.ndarray:
    """Keep the first ``take[i]`` True entries of each row of ``mask``. [X, n] -> [X, n]."""
    return mask & (np.cumsum(mask, axis=1) <= take[:, None])


def top_rows(values: np.ndarray, count: int) -> np.ndarray:
    """Mask of the ``count`` largest entries of each row, ties to the lower index. [X, n]."""
    X, n = values.shape
    if count >= n:
        return np.ones((X, n), dtype=bool)
    thr = np.partition(values, n - count, axis=1)[:, n - count : n - count + 1]
    ge = values >= thr
    over = ge.sum(axis=1) > count
    if over.any():  # ties at the threshold: keep the first ones
        rows = np.flatnonzero(over)
        v, t = values[rows], thr[rows]
        gt = v > t
        need = count - gt.sum(axis=1)
        ge[rows] = gt | _first_true_per_row(v == t, need)
    return ge


def candidates(w: np.ndarray, extra: int) -> np.ndarray:
    """The experts that may receive an extra replica, ascending ids. [X, E] -> [X, M].

    Only an expert whose own load is among the ``extra`` largest can win one of ``extra``
    rounds of the greedy, so ``M = min(E, extra)`` candidates (ties to the lower id) suffice.
    """
    X, E = w.shape
    M = min(E, extra)
    if M == E:
        return np.broadcast_to(np.arange(E), (X, E))
    return np.nonzero(top_rows(w, M))[1].reshape(X, M)


def apportion(w: np.ndarray, num_slots: int, cap: int | None) -> np.ndarray:
    """Greedy replica counts. w [X, E] (float32 or float64: the greedy compares in that
    dtype) -> r [X, E] int64 with ``sum r = num_slots`` and ``1 <= r <= cap`` (None: no cap).
    """
    X, E = w.shape
    extra = num_slots - E
    r = np.ones((X, E), dtype=np.int64)
    if extra <= 0:
        return r
    K = extra if cap is None else min(cap - 1, extra)
    if K <= 0:
        return r
    top = candidates(w, extra)
    M = top.shape[1]
    rows = np.arange(X)[:, None]
    wt = w[rows, top]
    if M == extra and X:
        # The extra-th largest priority is at least the M-th largest load, so an expert
        # gets at most w_e / (that load) extras: fewer columns to rank.
        floor_w = wt.min(axis=1)
        if (floor_w > 0).all():
            K = max(1, min(K, int((wt.max(axis=1) / floor_w).max()) + 1))
    ks = np.arange(1, K + 1, dtype=w.dtype)
    prio = (wt[:, :, None] / ks).reshape(X, M * K)  # expert-major, then k: the tie order
    sel = top_rows(prio, extra)
    r[rows, top] = 1 + sel.reshape(X, M, K).sum(axis=2)
    return r


def lower_bound_np(w: np.ndarray, num_gpus: int, num_physical: int) -> np.ndarray:
    """max(W / G, min over counts of max_e w_e / r_e) per layer. [L, E] f64 -> [L] f64."""
    cap = replica_cap(w.shape[1], num_physical, num_gpus)
    r = apportion(w, num_physical, cap)
    return np.maximum(w.sum(axis=1) / num_gpus, (w / r).max(axis=1))


def replica_counts(load: Any, num_physical_experts: int, num_gpus: int) -> torch.Tensor:
    """Replicas per expert that minimise the largest per-replica load. [L, E] -> [L, E] int64.

    Greedy apportionment (each next replica to the largest ``w_e / r_e``), at most
    ``num_gpus`` replicas per expert so that no GPU needs two copies of one expert.
    """
    w = as_load(load)
    check_topology(w.shape[1], num_physical_experts, num_gpus, 1)
    cap = replica_cap(w.shape[1], num_physical_experts, num_gpus)
    return torch.from_numpy(apportion(w, num_physical_experts, cap))


def lower_bound(load: Any, num_gpus: int, num_physical_experts: int) -> torch.Tensor:
    """Lower bound of each layer's max GPU load with P slots on G GPUs. [L, E] -> [L] f64.

    ``max(W / G, min over r of max_e w_e / r_e)`` with ``1 <= r_e <= G`` and ``sum r_e = P``:
    no layout can do better, since the GPUs share W and every replica sits whole on one GPU.
    Divide by ``W / G`` for the best balance (max / mean) a layout can reach.
    """
    w = as_load(load)
    check_topology(w.shape[1], num_physical_experts, num_gpus, 1)
    return torch.from_numpy(lower_bound_np(w, num_gpus, num_physical_experts))
