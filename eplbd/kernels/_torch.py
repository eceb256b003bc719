"""Reference implementation of map_and_record in plain torch (CPU, or any device).

Same results as the Triton kernel; used where there is no GPU and as the oracle in tests.
"""

from __future__ import annotations

import torch

KNUTH = 2654435769  # 2^32 / golden ratio: spreads consecutive tokens over replicas


def map_and_record_torch(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load: torch.Tensor,
    should_record: torch.Tensor,
    num_valid_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """topk_ids [..., K] -> physical ids of the same shape and dtype; counts into expert_load.

    l2p: [E, R]; replica_count: [E]; expert_load: [P'] (counted only for 0 <= phys < P');
    should_record: 1-element tensor (non-zero: count); num_valid_tokens: optional 1-element
    tensor, tokens at or past it are mapped but not counted.
    """
    if topk_ids.numel() == 0:
        return topk_ids
    E = logical_to_physical_map.shape[0]
    R = logical_to_physical_map.shape[1]
    top_k = topk_ids.shape[-1]
    flat = topk_ids.reshape(-1).long()
    dev = flat.device
    offs = torch.arange(flat.numel(), device=dev, dtype=torch.int64)
    tok = offs // top_k
    valid = (flat >= 0) & (flat < E)
    e = torch.where(valid, flat, torch.zeros_like(flat))
    cnt = logical_replica_count.to(dev).long()[e].clamp(min=1)
    h = (tok * KNUTH) & 0xFFFFFFFF
    j = h % cnt
    j = torch.minimum(j, torch.full_like(j, R - 1))
    phys = logical_to_physical_map.to(dev).long()[e, j]
    phys = torch.where(valid, phys, torch.full_like(phys, -1))
    rec = should_record.reshape(-1)[:1].to(dev) != 0
    count = valid & (phys >= 0) & (phys < expert_load.numel()) & rec
    if num_valid_tokens is not None:
        count = count & (tok < num_valid_tokens.reshape(-1)[:1].to(dev).long())
    idx = phys[count]
    expert_load.index_add_(
        0, idx, torch.ones(idx.numel(), dtype=expert_load.dtype, device=expert_load.device)
    )
    return phys.to(topk_ids.dtype).reshape(topk_ids.shape)
