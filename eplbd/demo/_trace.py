"""Replaying a real routing trace: which logical experts each token of each step picks.

The ESFT trace (``benchmarks/data/esft_routing_ids.npz``) holds, per task domain, the top-6
routed expert ids of every token over 64 experts in 26 MoE layers (uint8
``[tokens, 26, 6]``). The demo replays the domains one after the other, so the load shifts
the way it does when a cluster's traffic changes: ``steps_per_domain`` steps of each,
``workers x tokens`` trace tokens per step, rank r taking its slice of them. A domain with
fewer tokens than its steps need wraps around (the same real routing, seen again).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eplbd.demo._config import TRACE_DOMAINS

__all__ = ["Trace", "default_trace_path", "load_trace", "pick_layers"]

_DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "esft_routing_ids.npz"


def default_trace_path() -> Path:
    """The ESFT trace shipped in the repository (benchmarks/data)."""
    return _DATA


def pick_layers(available: int, wanted: int) -> list[int]:
    """``wanted`` layers spread evenly over ``available``, e.g. (26, 4) -> [0, 8, 17, 25]."""
    n = max(1, min(wanted, available))
    if n == 1:
        return [0]
    return sorted({round(i * (available - 1) / (n - 1)) for i in range(n)})


@dataclass(frozen=True)
class Trace:
    """Per domain: ids int64 [tokens, L, K] for the picked layers."""

    domains: tuple[str, ...]
    ids: tuple[np.ndarray, ...]
    num_experts: int
    top_k: int

    @property
    def num_layers(self) -> int:
        return int(self.ids[0].shape[1])

    def domain_of(self, step: int, steps: int) -> int:
        per = max(1, steps // len(self.domains))
        return min(step // per, len(self.domains) - 1)

    def step_ids(self, step: int, steps: int, rank: int, workers: int, tokens: int) -> np.ndarray:
        """ids [tokens, L, K] of ``rank`` at ``step``."""
        d = self.domain_of(step, steps)
        per = max(1, steps // len(self.domains))
        local = step - d * per
        src = self.ids[d]
        start = (local * workers + rank) * tokens
        rows = (np.arange(start, start + tokens) % src.shape[0]).astype(np.int64)
        return src[rows]


def load_trace(path: str | os.PathLike[str], layers: list[int] | None = None) -> Trace:
    """Read an ESFT-style npz (``<domain>_topk_ids`` arrays [tokens, layers, K]).

    Domains come in the order intent, law, summary, translation when present, then any
    others alphabetically. ``layers`` picks layers of the trace (default: all).
    """
    with np.load(path) as z:
        names = [k[: -len("_topk_ids")] for k in z.files if k.endswith("_topk_ids")]
        if not names:
            raise ValueError(f"{path}: no <domain>_topk_ids arrays")
        order = list(TRACE_DOMAINS)
        names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
        arrays = []
        for n in names:
            a = np.asarray(z[f"{n}_topk_ids"])
            if a.ndim != 3 or a.shape[0] == 0:
                raise ValueError(f"{path}: {n}_topk_ids must be [tokens, layers, k], got {a.shape}")
            arrays.append(a)
    num_layers, k = arrays[0].shape[1], arrays[0].shape[2]
    if any(a.shape[1:] != (num_layers, k) for a in arrays):
        raise ValueError(f"{path}: domains disagree on [layers, k]")
    sel = list(range(num_layers)) if layers is None else list(layers)
    if not sel or min(sel) < 0 or max(sel) >= num_layers:
        raise ValueError(f"{path}: layers {sel} outside [0, {num_layers})")
    num_experts = int(max(int(a.max()) for a in arrays)) + 1
    ids = tuple(np.ascontiguousarray(a[:, sel, :]).astype(np.int64) for a in arrays)
    return Trace(tuple(names), ids, num_experts, int(k))
