"""map_and_record: route logical expert ids to physical replicas and count load.

Dispatch, decided on every call (``backend``): CUDA tensors go through the fast Triton kernel;
CPU tensors through the torch implementation, or through the Triton kernel run by triton's
interpreter when ``TRITON_INTERPRET=1`` is set at the time of the call. Triton reads that
variable when it wraps a kernel with ``triton.jit``, so the kernels are wrapped lazily, once
per flavour, and the variable is honoured whenever it is set, before or after import.
"""

from __future__ import annotations

import torch

from eplbd.kernels._torch import map_and_record_torch

try:
    from eplbd.kernels import _triton
except ImportError:  # pragma: no cover - no triton on this platform
    _triton = None  # type: ignore[assignment]

__all__ = ["backend", "map_and_record", "map_and_record_torch"]

_ID_DTYPES = (torch.int32, torch.int64)


def backend(device: torch.device) -> str:
    """Which implementation map_and_record runs for tensors on ``device``.

    ``"triton"`` (compiled), ``"triton-interpreter"`` or ``"torch"``.
    """
    if _triton is None:
        return "torch"
    if _triton.interpreting() and device.type in ("cpu", "cuda"):
        return "triton-interpreter"
    return "triton" if device.type == "cuda" else "torch"


def _check(
    topk_ids: torch.Tensor,
    l2p: torch.Tensor,
    cnt: torch.Tensor,
    load: torch.Tensor,
    should_record: torch.Tensor,
    num_valid_tokens: torch.Tensor | None,
) -> None:
    if topk_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"map_and_record: topk_ids must be int32 or int64, not {topk_ids.dtype}")
    if l2p.dim() != 2 or l2p.dtype not in _ID_DTYPES:
        raise ValueError(f"logical_to_physical_map must be int32/int64 [E, R], got {l2p.shape}")
    if cnt.dim() != 1 or cnt.shape[0] != l2p.shape[0] or cnt.dtype not in _ID_DTYPES:
        raise ValueError(
            f"logical_replica_count must be int32/int64 [E={l2p.shape[0]}], got {cnt.shape}"
        )
    if load.dim() != 1:
        raise ValueError(f"expert_load must be 1-D [P], got {tuple(load.shape)}")
    if should_record.numel() < 1:
        raise ValueError("should_record must hold one element")
    if num_valid_tokens is not None and num_valid_tokens.numel() < 1:
        raise ValueError("num_valid_tokens must hold one element")
    dev = topk_ids.device
    others = [l2p, cnt, load, should_record]
    if num_valid_tokens is not None:
        others.append(num_valid_tokens)
    if any(t.device != dev for t in others):
        raise ValueError(f"map_and_record: every tensor must be on {dev}")


def map_and_record(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load: torch.Tensor,
    should_record: torch.Tensor,
    num_valid_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map routed logical ids to physical replica ids; count per slot while recording.

    topk_ids: [..., K] int32/int64 logical ids (any strides); logical_to_physical_map: [E, R],
    padded with -1; logical_replica_count: [E]; expert_load: [P] counters, incremented in
    place; should_record: 1-element device flag (non-zero: count), read on the device only;
    num_valid_tokens: optional 1-element device scalar, tokens at or past it are mapped but
    not counted (padded CUDA-graph batches). Returns physical ids, same shape and dtype as
    topk_ids (a new contiguous tensor; an empty input is returned as is). Exact semantics:
    ARCHITECTURE.md, fixed interfaces, and ``map_and_record_torch``.
    """
    if topk_ids.numel() == 0:
        return topk_ids
    _check(
        topk_ids,
        logical_to_physical_map,
        logical_replica_count,
        expert_load,
        should_record,
        num_valid_tokens,
    )
    if backend(topk_ids.device) == "torch" or _triton is None:
        return map_and_record_torch(
            topk_ids,
            logical_to_physical_map,
            logical_replica_count,
            expert_load,
            should_record,
            num_valid_tokens,
        )
    return _triton.launch_fast(
        topk_ids,
        logical_to_physical_map,
        logical_replica_count,
        expert_load,
        should_record,
        num_valid_tokens,
    )
