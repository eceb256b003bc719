"""How good a layout is for a load: per-GPU loads, balance, and distance to the bound.

Terms of ARCHITECTURE.md: an expert's load is split over its replicas (evenly, or by the
layout's shares); a layer's balance is max GPU load / mean GPU load (1.0 is perfect, 1.0
also for a layer with no load); across layers, Σ max / Σ mean, since layers run one after
another and the slowest GPU of each adds up; Σ max / Σ lower bound says how far a layout is
from the best any layout could do. Moves between layouts: :func:`eplbd.layout.moves_between`.

With a cost model (:class:`~eplbd.planner.CostModel`) the same questions in time:
:func:`gpu_times` (modelled time of each GPU per step), :func:`time_balance` (Σ max / Σ mean
of those times over layers) and :func:`activated_slots` (slots per GPU that receive rows in
a step: each one is a weight read).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eplbd.layout import Layout
from eplbd.planner._apportion import lower_bound_np
from eplbd.planner._checks import as_load, check_int
from eplbd.planner._cost import SAMPLINGS, CostModel


def _phy2log(layout: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(phy2log [L, P], share [L, P] or None) of a Layout or a bare phy2log."""
    if isinstance(layout, Layout):
        return layout.phy2log.numpy(), None if layout.share is None else layout.share.numpy()
    t = torch.as_tensor(layout)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() != 2:
        raise ValueError("layout must be a Layout or an integer phy2log [L, P]")
    return t.to(torch.int64).numpy(), None


def slot_rows_np(w: np.ndarray, p2l: np.ndarray, share: np.ndarray | None = None) -> np.ndarray:
    """Each slot's part of its expert's load. w [L, E], p2l [L, P], share [L, P] (None: an
    even split over the replicas) -> [L, P] float64."""
    L, E = w.shape
    idx = np.arange(L)[:, None] * E + p2l
    sh = np.ones(p2l.shape) if share is None else share.astype(np.float64)
    tot = np.bincount(idx.ravel(), weights=sh.ravel(), minlength=L * E)
    return (w.ravel() / np.maximum(tot, 1e-300))[idx] * sh


def gpu_loads_np(
    w: np.ndarray,
    p2l: np.ndarray,
    num_gpus: int,
    cnt: np.ndarray | None = None,
    share: np.ndarray | None = None,
) -> np.ndarray:
    """w [L, E] f64, p2l [L, P], cnt [L, E] (replica counts, None: from p2l), share
    [L, P] (None: even split; cnt is then ignored) -> [L, G]."""
    L, E = w.shape
    P = p2l.shape[1]
    if share is not None:
        return slot_rows_np(w, p2l, share).reshape(L, num_gpus, P // num_gpus).sum(axis=2)
    idx = np.arange(L)[:, None] * E + p2l
    if cnt is None:
        cnt = np.bincount(idx.ravel(), minlength=L * E).reshape(L, E)
    per = (w / np.maximum(cnt, 1)).ravel()[idx]
    return per.reshape(L, num_gpus, P // num_gpus).sum(axis=2)


def gpu_times_np(
    rows: np.ndarray,
    p2l: np.ndarray,
    num_gpus: int,
    model: CostModel,
    share: np.ndarray | None = None,
    sampling: str = "poisson",
) -> np.ndarray:
    """Modelled time of each GPU (us) for ``rows`` [L, E] rows per step. -> [L, G]."""
    L, P = p2l.shape
    t = model.for_load(rows, P).slot_time(slot_rows_np(rows, p2l, share), sampling)
    return t.reshape(L, num_gpus, P // num_gpus).sum(axis=2)


def balance_np(max_load: np.ndarray, mean: np.ndarray) -> np.ndarray:
    return np.where(mean > 0, max_load / np.where(mean > 0, mean, 1.0), 1.0)


def _inputs(
    load: Any, layout: Any, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    w = as_load(load)
    p2l, share = _phy2log(layout)
    G = check_int(num_gpus, "num_gpus")
    if p2l.shape[0] != w.shape[0]:
        raise ValueError(f"layout has {p2l.shape[0]} layers, load has {w.shape[0]}")
    if p2l.size and (p2l.min() < 0 or p2l.max() >= w.shape[1]):
        raise ValueError(f"layout names an expert outside [0, {w.shape[1]})")
    if p2l.shape[1] % G:
        raise ValueError(f"{p2l.shape[1]} slots cannot be split evenly over {G} GPUs")
    return w, p2l, share


def gpu_loads(load: Any, layout: Any, num_gpus: int) -> torch.Tensor:
    """Load on each GPU. load [L, E], layout (Layout or phy2log [L, P]) -> [L, G] float64."""
    w, p2l, share = _inputs(load, layout, num_gpus)
    return torch.from_numpy(gpu_loads_np(w, p2l, num_gpus, share=share))


def balance(load: Any, layout: Any, num_gpus: int) -> torch.Tensor:
    """max / mean GPU load per layer. -> [L] float64 (1.0 where a layer has no load)."""
    w, p2l, share = _inputs(load, layout, num_gpus)
    g = gpu_loads_np(w, p2l, num_gpus, share=share)
    return torch.from_numpy(balance_np(g.max(axis=1), g.mean(axis=1)))


def aggregate_balance(load: Any, layout: Any, num_gpus: int) -> float:
    """Σ max / Σ mean GPU load over layers (1.0 when there is no load at all)."""
    w, p2l, share = _inputs(load, layout, num_gpus)
    g = gpu_loads_np(w, p2l, num_gpus, share=share)
    total = float(g.mean(axis=1).sum())
    return float(g.max(axis=1).sum()) / total if total > 0 else 1.0


def bound_ratio(load: Any, layout: Any, num_gpus: int) -> float:
    """Σ max GPU load / Σ lower bound over layers: 1.0 means no layout could do better."""
    w, p2l, share = _inputs(load, layout, num_gpus)
    g = gpu_loads_np(w, p2l, num_gpus, share=share)
    lb = float(lower_bound_np(w, num_gpus, p2l.shape[1]).sum())
    return float(g.max(axis=1).sum()) / lb if lb > 0 else 1.0


def _time_inputs(
    load: Any, layout: Any, num_gpus: int, cost_model: Any, steps: Any, sampling: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if not isinstance(cost_model, CostModel):
        raise ValueError(f"cost_model must be a CostModel, got {type(cost_model).__name__}")
    check_steps(steps, sampling)
    w, p2l, share = _inputs(load, layout, num_gpus)
    return w / float(steps), p2l, share


def check_steps(steps: Any, sampling: str = "poisson") -> float:
    """A finite ``steps`` > 0 and a known ``sampling``; raises ValueError. -> steps."""
    if isinstance(steps, bool) or not isinstance(steps, int | float) or not 0 < steps < np.inf:
        raise ValueError(f"steps must be a finite number > 0, got {steps!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    return float(steps)


def gpu_times(
    load: Any,
    layout: Any,
    num_gpus: int,
    cost_model: CostModel,
    *,
    steps: float = 1.0,
    sampling: str = "poisson",
) -> torch.Tensor:
    """Modelled time of each GPU's expert work per step, in us. -> [L, G] float64.

    load [L, E]: rows (token, k pairs) per expert counted over ``steps`` forward steps
    (rows per step = load / steps); layout: a Layout (its shares count) or phy2log [L, P];
    sampling: "poisson" (the load is an expectation; a step's count varies) or "exact"
    (the load is one step's count).
    """
    mu, p2l, share = _time_inputs(load, layout, num_gpus, cost_model, steps, sampling)
    return torch.from_numpy(gpu_times_np(mu, p2l, num_gpus, cost_model, share, sampling))


def time_balance(
    load: Any,
    layout: Any,
    num_gpus: int,
    cost_model: CostModel,
    *,
    steps: float = 1.0,
    sampling: str = "poisson",
) -> float:
    """Σ max / Σ mean of the modelled GPU times over layers (1.0 with no load): how much
    longer the step takes than if every GPU had the same time (arguments as
    :func:`gpu_times`)."""
    t = gpu_times(load, layout, num_gpus, cost_model, steps=steps, sampling=sampling).numpy()
    total = float(t.mean(axis=1).sum())
    return float(t.max(axis=1).sum()) / total if total > 0 else 1.0


def activated_slots(
    load: Any, layout: Any, num_gpus: int, *, steps: float = 1.0, sampling: str = "poisson"
) -> torch.Tensor:
    """Slots of each GPU that receive at least one row per step (each is a weight read).
    -> [L, G] float64: with "poisson" the expected number (a slot expecting x rows is read
    with probability 1 - e^-x), with "exact" the count for one step's load."""
    check_steps(steps, sampling)
    w, p2l, share = _inputs(load, layout, num_gpus)
    x = slot_rows_np(w / float(steps), p2l, share)
    a = -np.expm1(-x) if sampling == "poisson" else (x > 0).astype(np.float64)
    L, P = p2l.shape
    return torch.from_numpy(a.reshape(L, num_gpus, P // num_gpus).sum(axis=2))
