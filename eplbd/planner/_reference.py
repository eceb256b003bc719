"""DeepSeek's EPLB written the straightforward way: the oracle for tests and benchmarks.

This follows the structure of the published algorithm (deepseek-ai/EPLB ``eplb.py``, vLLM's
default policy) line of thought for line of thought: a Python loop over layers and items for
the packing, one greedy step per extra replica, torch in float32. It is what engines run
today, so the speed benchmark measures the planner against it, and the tests check that
:func:`eplbd.planner.rebalance_experts` (vectorised) gives exactly its results. The one
deliberate difference from the published code is the tie order (stable sort, ties to the
lower index), which eplbd's architecture fixes.
"""

from __future__ import annotations

import torch


def reference_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [X, n] -> (pack [X, n], rank in pack [X, n]); n / num_packs items per pack."""
    X, n = weight.shape
    per = n // num_packs
    if per == 1:
        return torch.arange(n).expand(X, n).clone(), torch.zeros(X, n, dtype=torch.int64)
    order = torch.sort(weight.float(), dim=-1, descending=True, stable=True).indices
    pack = torch.full((X, n), -1, dtype=torch.int64)
    rank = torch.full((X, n), -1, dtype=torch.int64)
    for x in range(X):
        loads = [torch.zeros((), dtype=torch.float32) for _ in range(num_packs)]
        counts = [0] * num_packs
        for item in order[x].tolist():
            open_packs = [p for p in range(num_packs) if counts[p] < per]
            best = min(open_packs, key=lambda p: float(loads[p]))
            pack[x, item] = best
            rank[x, item] = counts[best]
            loads[best] = loads[best] + weight[x, item]
            counts[best] += 1
    return pack, rank


def reference_replicate(
    weight: torch.Tensor, num_phy: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [X, E] -> (phy2log [X, num_phy], replica rank [X, num_phy], logcnt [X, E])."""
    X, E = weight.shape
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(X, 1)
    rank = torch.zeros(X, num_phy, dtype=torch.int64)
    logcnt = torch.ones(X, E, dtype=torch.int64)
    rows = torch.arange(X)
    for slot in range(E, num_phy):
        pick = (weight / logcnt).max(dim=-1).indices  # first maximum: ties to the lower id
        phy2log[:, slot] = pick
        rank[:, slot] = logcnt[rows, pick]
        logcnt[rows, pick] += 1
    return phy2log, rank, logcnt


def _invert(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand(perm.shape).contiguous())
    return inv


def reference_hierarchical(
    weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [L, E] float32 -> (phy2log [L, P], logcnt [L, E])."""
    L, E = weight.shape
    gsize = E // num_groups
    per_node_groups = num_groups // num_nodes
    per_gpu = num_phy // num_gpus
    group_load = weight.unflatten(-1, (num_groups, gsize)).sum(-1)
    gpack, grank = reference_packing(group_load, num_nodes)
    log2mlog = (
        ((gpack * per_node_groups + grank) * gsize).unsqueeze(-1) + torch.arange(gsize)
    ).flatten(-2)
    mlog2log = _invert(log2mlog)
    node_load = weight.gather(-1, mlog2log).view(-1, E // num_nodes)
    phy2mlog, _, mlogcnt = reference_replicate(node_load, num_phy // num_nodes)
    replica_load = (node_load / mlogcnt).gather(-1, phy2mlog)
    pack, rank = reference_packing(replica_load, num_gpus // num_nodes)
    at_slot = _invert(pack * per_gpu + rank)
    p2mlog = phy2mlog.gather(-1, at_slot).view(L, num_nodes, -1)
    p2mlog = (p2mlog + torch.arange(0, E, E // num_nodes).view(1, -1, 1)).flatten(-2)
    phy2log = mlog2log.gather(-1, p2mlog)
    logcnt = mlogcnt.view(L, -1).gather(-1, log2mlog)
    return phy2log, logcnt


def reference_rebalance(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [L, E] -> (phy2log [L, P], logcnt [L, E]), no argument checks."""
    w = weight.float().cpu()
    if num_groups % num_nodes == 0:
        return reference_hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    return reference_hierarchical(w, num_replicas, 1, 1, num_gpus)
