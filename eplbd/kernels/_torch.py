"""Reference implementation of map_and_record in plain torch (CPU, or any device).

Same results as the Triton kernels; used where there is no GPU and as the oracle in tests.
Like the kernels it never reads a device value on the host (no ``.item()``, no boolean
indexing), so it is CUDA-graph safe on a GPU too, only slower.
"""

from __future__ import annotations

import torch

KNUTH = 2654435769  # 2^32 / golden ratio: spreads consecutive tokens over replicas
# Replica counts are clamped to [1, MAX_COUNT] (the kernels divide in 32 bits); a real
# count is at most R, so only absurd inputs ever see the upper clamp.
MAX_COUNT = 2**31 - 1


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
    tensor, tokens at or past it are mapped but not counted. Flat element o belongs to token
    o // K and takes replica j = ((t * KNUTH) mod 2^32) mod max(1, count[e]), clamped to
    R - 1 so that an inconsistent count never reads past the map's row; a -1 (padding)
    entry reached that way maps to -1 and is not counted.
    """
    if topk_ids.numel() == 0:
        return topk_ids
    E, R = logical_to_physical_map.shape
    top_k = topk_ids.shape[-1] if topk_ids.dim() > 0 else 1
    flat = topk_ids.reshape(-1).long()
    dev = flat.device
    offs = torch.arange(flat.numel(), device=dev, dtype=torch.int64)
    tok = offs // top_k
    valid = (flat >= 0) & (flat < (E if R > 0 else 0))
    e = torch.where(valid, flat, torch.zeros_like(flat))
    cnt = logical_replica_count.to(dev).long()[e].clamp(1, MAX_COUNT)
    h = (tok * KNUTH) & 0xFFFFFFFF
    j = (h % cnt).clamp(max=max(R - 1, 0))
    l2p = logical_to_physical_map.to(dev).long()
    phys = l2p[e, j] if R > 0 else torch.full_like(flat, -1)
    phys = torch.where(valid, phys, torch.full_like(phys, -1))
    rec = should_record.reshape(-1)[:1].to(dev) != 0
    count = valid & (phys >= 0) & (phys < expert_load.shape[0]) & rec
    if num_valid_tokens is not None:
        count = count & (tok < num_valid_tokens.reshape(-1)[:1].to(dev).long())
    if expert_load.shape[0] > 0:
        idx = torch.where(count, phys, torch.zeros_like(phys)).to(expert_load.device)
        expert_load.index_add_(0, idx, count.to(expert_load.dtype).to(expert_load.device))
    return phys.to(topk_ids.dtype).reshape(topk_ids.shape)
