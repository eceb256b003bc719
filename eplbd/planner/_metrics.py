"""How good a layout is for a load: per-GPU loads, balance, and distance to the bound.

Terms of ARCHITECTURE.md: an expert's load is split evenly over its replicas; a layer's
balance is max GPU load / mean GPU load (1.0 is perfect, 1.0 also for a layer with no
load); across layers, Σ max / Σ mean, since layers run one after another and the slowest
GPU of each adds up; Σ max / Σ lower bound says how far a layout is from the best any layout
could do. Moves between layouts: :func:`eplbd.layout.moves_between`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eplbd.layout import Layout
from eplbd.planner._apportion import lower_bound_np
from eplbd.planner._checks import as_load, check_int


def _phy2log(layout: Any) -> np.ndarray:
    if isinstance(layout, Layout):
        return layout.phy2log.numpy()
    t = torch.as_tensor(layout)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() != 2:
        raise ValueError("layout must be a Layout or an integer phy2log [L, P]")
    return t.to(torch.int64).numpy()


def gpu_loads_np(
    w: np.ndarray, p2l: np.ndarray, num_gpus: int, cnt: np.ndarray | None = None
) -> np.ndarray:
    """w [L, E] f64, p2l [L, P], cnt [L, E] (replica counts, None: from p2l) -> [L, G]."""
    L, E = w.shape
    P = p2l.shape[1]
    idx = np.arange(L)[:, None] * E + p2l
    if cnt is None:
        cnt = np.bincount(idx.ravel(), minlength=L * E).reshape(L, E)
    per = (w / np.maximum(cnt, 1)).ravel()[idx]
    return per.reshape(L, num_gpus, P // num_gpus).sum(axis=2)


def balance_np(max_load: np.ndarray, mean: np.ndarray) -> np.ndarray:
    return np.where(mean > 0, max_load / np.where(mean > 0, mean, 1.0), 1.0)


def _inputs(load: Any, layout: Any, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    w = as_load(load)
    p2l = _phy2log(layout)
    G = check_int(num_gpus, "num_gpus")
    if p2l.shape[0] != w.shape[0]:
        raise ValueError(f"layout has {p2l.shape[0]} layers, load has {w.shape[0]}")
    if p2l.size and (p2l.min() < 0 or p2l.max() >= w.shape[1]):
        raise ValueError(f"layout names an expert outside [0, {w.shape[1]})")
    if p2l.shape[1] % G:
        raise ValueError(f"{p2l.shape[1]} slots cannot be split evenly over {G} GPUs")
    return w, p2l


def gpu_loads(load: Any, layout: Any, num_gpus: int) -> torch.Tensor:
    """Load on each GPU. load [L, E], layout (Layout or phy2log [L, P]) -> [L, G] float64."""
    w, p2l = _inputs(load, layout, num_gpus)
    return torch.from_numpy(gpu_loads_np(w, p2l, num_gpus))


def balance(load: Any, layout: Any, num_gpus: int) -> torch.Tensor:
    """max / mean GPU load per layer. -> [L] float64 (1.0 where a layer has no load)."""
    w, p2l = _inputs(load, layout, num_gpus)
    g = gpu_loads_np(w, p2l, num_gpus)
    return torch.from_numpy(balance_np(g.max(axis=1), g.mean(axis=1)))


def aggregate_balance(load: Any, layout: Any, num_gpus: int) -> float:
    """Σ max / Σ mean GPU load over layers (1.0 when there is no load at all)."""
    w, p2l = _inputs(load, layout, num_gpus)
    g = gpu_loads_np(w, p2l, num_gpus)
    total = float(g.mean(axis=1).sum())
    return float(g.max(axis=1).sum()) / total if total > 0 else 1.0


def bound_ratio(load: Any, layout: Any, num_gpus: int) -> float:
    """Σ max GPU load / Σ lower bound over layers: 1.0 means no layout could do better."""
    w, p2l = _inputs(load, layout, num_gpus)
    g = gpu_loads_np(w, p2l, num_gpus)
    lb = float(lower_bound_np(w, num_gpus, p2l.shape[1]).sum())
    return float(g.max(axis=1).sum()) / lb if lb > 0 else 1.0
