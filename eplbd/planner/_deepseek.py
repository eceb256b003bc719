"""DeepSeek's expert-parallel load balancer (EPLB), vectorised over layers.

The algorithm of deepseek-ai/EPLB ``eplb.py`` (also vLLM's default policy), step for step:

1. hierarchical (``num_groups % num_nodes == 0``): pack the expert groups onto the nodes
   with :func:`balanced_packing` (groups stay whole, so group-limited routing stays on few
   nodes); otherwise global: the same steps with one group and one node;
2. inside each node, replicate: each next replica goes to the expert with the largest load
   per replica (no cap on the count);
3. pack the node's replicas onto its GPUs with :func:`balanced_packing`.

It works in float32, as the reference does (``weight.float()``), so the comparisons and
sums are the reference's. Differences from the reference, on purpose:

- ties: the reference sorts with ``torch.sort`` (not stable), so the order of equal
  weights depends on the torch version and the row length; here ties go to the lower index
  (a stable sort), as eplbd's architecture fixes. Without equal per-replica loads the
  results are identical;
- ``log2phy`` has the reference's shape ``[L, E, max count]`` (vLLM pads to P - E + 1
  columns instead) but lists each expert's slots in ascending slot order, the convention of
  :mod:`eplbd.layout` (the reference orders them by replica rank); the set is the same;
- bad arguments raise ValueError instead of failing an ``assert``.

The replication step needs no loop over replicas (see :mod:`eplbd.planner._apportion`);
the packing loops over items but handles all layers (and nodes) at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eplbd.layout import log2phy_from_phy2log
from eplbd.planner._apportion import apportion, candidates
from eplbd.planner._checks import as_load, check_int, check_topology
from eplbd.planner._sortkeys import desc_order


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items into ``num_packs`` packs of n / num_packs items each, balancing weight.

    Items in descending weight (ties: lower index first), each into the lightest pack that
    still has room (ties: lower pack). weight [X, n] float32 -> (pack [X, n], rank [X, n])
    int64, ``rank`` being the item's position in its pack.
    """
    X, n = weight.shape
    per = n // num_packs
    if per == 1:
        pack = np.broadcast_to(np.arange(n, dtype=np.int64), (X, n)).copy()
        return pack, np.zeros((X, n), dtype=np.int64)
    order = desc_order(weight)
    pack_w = np.zeros((X, num_packs), dtype=weight.dtype)
    pack_n = np.zeros((X, num_packs), dtype=np.int64)
    pack = np.empty((X, n), dtype=np.int64)
    rank = np.empty((X, n), dtype=np.int64)
    rows = np.arange(X)
    full = np.array(np.inf, dtype=weight.dtype)
    for j in range(n):
        item = order[:, j]
        p = np.where(pack_n < per, pack_w, full).argmin(axis=1)
        pack[rows, item] = p
        rank[rows, item] = pack_n[rows, p]
        pack_w[rows, p] += weight[rows, item]
        pack_n[rows, p] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, ...]:
    """Greedy replication of E experts into ``num_phy`` slots, in the greedy's pick order.

    weight [X, E] float32 -> phy2log [X, num_phy] (slot e < E holds expert e, slot E + i the
    i-th extra replica picked), rank [X, num_phy] (replica number of each slot) and
    logcnt [X, E].
    """
    X, E = weight.shape
    extra = num_phy - E
    logcnt = apportion(weight, num_phy, None)
    phy2log = np.empty((X, num_phy), dtype=np.int64)
    rank = np.zeros((X, num_phy), dtype=np.int64)
    phy2log[:, :E] = np.arange(E)
    if extra == 0:
        return phy2log, rank, logcnt
    # Pick order: the chosen priorities w_e / k, largest first, ties to (lower e, lower k).
    top = candidates(weight, extra)
    M = top.shape[1]
    K = extra
    wt = np.take_along_axis(weight, top, axis=1)
    prio = (wt[:, :, None] / np.arange(1, K + 1, dtype=weight.dtype)).reshape(X, M * K)
    picks = desc_order(prio)[:, :extra]
    phy2log[:, E:] = np.take_along_axis(top, picks // K, axis=1)
    rank[:, E:] = picks % K + 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(
    w: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray]:
    """w [L, E] float32 -> (phy2log [L, P], logcnt [L, E]) int64."""
    L, E = w.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_phy // num_gpus
    # 1. groups onto nodes. The group sums come from torch, as in the reference, so that
    # their float32 rounding (and so the packing) is the same.
    group_w = torch.from_numpy(w).unflatten(-1, (num_groups, group_size)).sum(-1).numpy()
    gpack, grank = balanced_packing(group_w, num_nodes)
    first = (gpack * groups_per_node + grank) * group_size  # [L, groups]
    log2mlog = (first[:, :, None] + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicas inside each node: rows are (layer, node).
    e_node = E // num_nodes
    w_mlog = np.take_along_axis(w, mlog2log, axis=1).reshape(L * num_nodes, e_node)
    phy2mlog, _rank, mlogcnt = replicate_experts(w_mlog, num_phy // num_nodes)
    # 3. each node's replicas onto its GPUs.
    per_replica = w_mlog / mlogcnt.astype(np.float32)
    replica_w = np.take_along_axis(per_replica, phy2mlog, axis=1)
    pack, rank = balanced_packing(replica_w, num_gpus // num_nodes)
    slot_of = pack * per_gpu + rank  # replica -> slot inside its node
    at_slot = _inverse(slot_of)  # slot inside node -> replica
    p2mlog = np.take_along_axis(phy2mlog, at_slot, axis=1).reshape(L, num_nodes, -1)
    p2mlog = (p2mlog + (np.arange(num_nodes) * e_node)[None, :, None]).reshape(L, num_phy)
    phy2log = np.take_along_axis(mlog2log, p2mlog, axis=1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, E), log2mlog, axis=1)
    return phy2log, logcnt


def check_deepseek_args(
    E: int, num_replicas: Any, num_groups: Any, num_nodes: Any, num_gpus: Any
) -> bool:
    """Validate; returns True for the hierarchical policy, False for the global one."""
    check_topology(E, num_replicas, num_gpus, num_nodes)
    ng = check_int(num_groups, "num_groups")
    hierarchical = ng % num_nodes == 0
    if hierarchical and E % ng:
        raise ValueError(f"{E} logical experts cannot be split evenly into {ng} groups")
    return hierarchical


def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's EPLB: where each expert replica goes, from the experts' loads.

    weight: [L, E] load of each logical expert (float or int, finite, >= 0);
    num_replicas: P, the physical slots, a multiple of ``num_gpus``;
    num_groups: expert groups (hierarchical policy when a multiple of ``num_nodes``);
    num_nodes: server nodes; num_gpus: G, a multiple of ``num_nodes``.

    Returns (int64, CPU):
        phy2log [L, P]: the logical expert in each slot (slot p on GPU p // (P / G));
        log2phy [L, E, R]: each expert's slots in ascending order, padded with -1,
            R = the largest replica count;
        logcnt [L, E]: replicas per expert.

    Raises ValueError for a bad shape, a negative or non-finite load, or a topology that
    does not divide (P % G, G % N, E % num_groups when hierarchical, P < E).
    """
    w = as_load(weight, "weight", dtype=np.float32)
    L, E = w.shape
    if check_deepseek_args(E, num_replicas, num_groups, num_nodes, num_gpus):
        phy2log, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, logcnt = _hierarchical(w, num_replicas, 1, 1, num_gpus)
    p2l = torch.from_numpy(np.ascontiguousarray(phy2log))
    return p2l, log2phy_from_phy2log(p2l, E), torch.from_numpy(np.ascontiguousarray(logcnt))
