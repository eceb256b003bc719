"""Balance figures of a layout on a load: what the trigger compares and the status shows.

Terms as in ARCHITECTURE.md: an expert's load is split evenly over its replicas; the balance
of a layer is max GPU load / mean GPU load (1.0 is perfect); across layers Σ max / Σ mean.
Pure functions, float64 results. Per-GPU loads and the lower bound come from
:mod:`eplbd.planner`, so the daemon, ``eplbd plan`` and the planner's own report agree.
"""

from __future__ import annotations

import torch

from eplbd import planner

__all__ = [
    "balance",
    "gpu_loads",
    "lower_bound_balance",
    "slot_loads",
    "total_balance",
]


def slot_loads(load: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    """Load carried by each slot. load [L, E], phy2log [L, P] -> [L, P] float64."""
    p2l = phy2log.long()
    w = load.to(torch.float64)
    cnt = torch.zeros_like(w)
    cnt.scatter_add_(1, p2l, torch.ones(p2l.shape, dtype=torch.float64))
    per_replica = w / cnt.clamp(min=1.0)
    return torch.gather(per_replica, 1, p2l)


def gpu_loads(load: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load per GPU (slot p on rank p // S). load [L, E], phy2log [L, P] -> [L, G] float64."""
    return planner.gpu_loads(load, phy2log, num_gpus)


def balance(per_gpu: torch.Tensor) -> torch.Tensor:
    """max / mean per layer. [L, G] -> [L] (1.0 for a layer with no load)."""
    mean = per_gpu.mean(dim=1)
    mx = per_gpu.max(dim=1).values
    return torch.where(mean > 0, mx / mean.clamp(min=1e-300), torch.ones_like(mean))


def total_balance(per_gpu: torch.Tensor) -> float:
    """Σ max / Σ mean over layers (layers run one after another). [L, G] -> float."""
    m = float(per_gpu.mean(dim=1).sum())
    return float(per_gpu.max(dim=1).values.sum()) / m if m > 0 else 1.0


def lower_bound_balance(load: torch.Tensor, num_gpus: int, num_physical: int) -> torch.Tensor:
    """The best balance any layout with P slots on G GPUs can reach. load [L, E] -> [L].

    :func:`eplbd.planner.lower_bound` (max(W / G, min over replica counts of max_e w_e / r_e))
    divided by the mean W / G; 1.0 for a layer with no load.
    """
    w = load.to(torch.float64)
    lb = planner.lower_bound(w, num_gpus, num_physical)
    mean = w.sum(dim=1) / num_gpus
    return torch.where(mean > 0, lb / mean.clamp(min=1e-300), torch.ones_like(mean))
