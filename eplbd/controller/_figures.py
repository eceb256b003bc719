"""Balance figures of a layout on a load: what the trigger compares and the status shows.

Terms as in ARCHITECTURE.md: an expert's load is split over its replicas (evenly, or by the
layout's shares); the balance of a layer is max GPU load / mean GPU load (1.0 is perfect);
across layers Σ max / Σ mean. Pure functions, float64 results. Per-GPU loads, modelled
times and the lower bounds come from :mod:`eplbd.planner`, so the daemon, ``eplbd plan``
and the planner's own report agree.

In time (:class:`TimeModel`: a cost model and the forward steps the load was counted over)
a GPU's load is its modelled time per step, and balances are max / the *ideal* mean (every
expert's rows on one replica, the GPUs equally busy), as the planner's time objective
reports them: the mean of a layout's own times grows with every replica it reads, so
max / own mean would reward reading more replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eplbd import planner
from eplbd.layout import Layout
from eplbd.planner import CostModel

__all__ = [
    "TimeFigures",
    "TimeModel",
    "balance",
    "gpu_loads",
    "lower_bound_balance",
    "slot_loads",
    "total_balance",
]


@dataclass(frozen=True)
class TimeModel:
    """What turns a load [L, E] (rows over ``steps`` forward steps) into GPU time:
    ``cost_model`` (per-slot time per step, us) and ``steps`` (> 0)."""

    cost_model: CostModel
    steps: float

    def gpu_times(self, load: torch.Tensor, layout: Layout, num_gpus: int) -> torch.Tensor:
        """Modelled time of each GPU per step, us. -> [L, G] float64."""
        return planner.gpu_times(load, layout, num_gpus, self.cost_model, steps=self.steps)

    def ideal(
        self, load: torch.Tensor, num_gpus: int, num_physical: int | None = None
    ) -> torch.Tensor:
        """Mean GPU time per step with every expert's rows on one replica. -> [L]
        num_physical: the group's slots, whose mean rows picks a tiered model's regime, as
        :meth:`gpu_times` does (None: one slot an expert)."""
        mu = load.to(torch.float64).numpy() / self.steps
        model = self.cost_model.for_load(mu, num_physical or mu.shape[1])
        return torch.from_numpy(model.slot_time(mu).sum(axis=1) / num_gpus)

    def bound(self, load: torch.Tensor, num_gpus: int, num_physical: int) -> torch.Tensor:
        """Lower bound of the max GPU time per step (the planner's, :func:`time_counts`). [L]"""
        from eplbd.planner._checks import replica_cap
        from eplbd.planner._timeplan import time_counts

        mu = load.to(torch.float64).numpy() / self.steps
        E = mu.shape[1]
        cap = replica_cap(E, num_physical, num_gpus)
        model = self.cost_model.for_load(mu, num_physical)
        tc = time_counts(mu, model.slot_time, num_physical, num_gpus, cap)
        return torch.from_numpy(np.asarray(tc.bound, dtype=np.float64))

    def activated(self, load: torch.Tensor, layout: Layout, num_gpus: int) -> torch.Tensor:
        """Expected slots per GPU that receive rows in a step (weight reads). [L, G]"""
        return planner.activated_slots(load, layout, num_gpus, steps=self.steps)


@dataclass(frozen=True)
class TimeFigures:
    """A layout's modelled time on a load, beside its token balance (status, top, metrics).

    balance: Σ max / Σ mean over layers of the GPUs' modelled times per step (the mean of
    the layout's own times; 1.0 is perfect); layer_balance [L]: max / mean per layer;
    step_us: Σ over layers of the slowest GPU's time (us per step, the expert part);
    activated_mean / activated_max: slots per GPU that receive rows in a step (each a
    weight read), the mean over layers and GPUs and the largest; layer_activated [L]: the
    largest per layer.
    """

    balance: float
    layer_balance: list[float]
    step_us: float
    activated_mean: float
    activated_max: float
    layer_activated: list[float]

    @classmethod
    def of(cls, tm: TimeModel, load: torch.Tensor, layout: Layout, num_gpus: int) -> TimeFigures:
        t = tm.gpu_times(load, layout, num_gpus)
        act = tm.activated(load, layout, num_gpus)
        return cls(
            balance=total_balance(t),
            layer_balance=[float(x) for x in balance(t)],
            step_us=float(t.max(dim=1).values.sum()),
            activated_mean=float(act.mean()),
            activated_max=float(act.max()),
            layer_activated=[float(x) for x in act.max(dim=1).values],
        )

    def to_dict(self) -> dict[str, float]:
        """The totals (per-layer lists are for ``top``)."""
        return {
            "time_balance": round(self.balance, 6),
            "step_us": round(self.step_us, 3),
            "activated_slots_mean": round(self.activated_mean, 4),
            "activated_slots_max": round(self.activated_max, 4),
        }


def slot_loads(load: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    """Load carried by each slot. load [L, E], phy2log [L, P] -> [L, P] float64."""
    p2l = phy2log.long()
    w = load.to(torch.float64)
    cnt = torch.zeros_like(w)
    cnt.scatter_add_(1, p2l, torch.ones(p2l.shape, dtype=torch.float64))
    per_replica = w / cnt.clamp(min=1.0)
    return torch.gather(per_replica, 1, p2l)


def gpu_loads(load: torch.Tensor, layout: Any, num_gpus: int) -> torch.Tensor:
    """Load per GPU (slot p on rank p // S). load [L, E], layout (a Layout, whose shares
    count, or phy2log [L, P]) -> [L, G] float64."""
    return planner.gpu_loads(load, layout, num_gpus)


def balance(per_gpu: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """max / mean per layer (mean [L]: the per-GPU mean unless given). [L, G] -> [L] (1.0
    for a layer with no load)."""
    if mean is None:
        mean = per_gpu.mean(dim=1)
    mx = per_gpu.max(dim=1).values
    return torch.where(mean > 0, mx / mean.clamp(min=1e-300), torch.ones_like(mean))


def total_balance(per_gpu: torch.Tensor, mean: torch.Tensor | None = None) -> float:
    """Σ max / Σ mean over layers (layers run one after another). [L, G] -> float."""
    m = float((per_gpu.mean(dim=1) if mean is None else mean).sum())
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
