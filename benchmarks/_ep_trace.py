"""Routing traces for the one-GPU EP emulation and the cost-model validation, and the
dispatch of a step's tokens to physical slots.

- :func:`esft_stream`: the real ESFT routing (DeepSeek-V2-Lite: 64 experts, top-6), the four
  domains one after another, a chosen set of its 26 layers;
- :func:`synthetic_stream`: DeepSeek-V3-size routing (256 experts, top-8) where the traces
  have too few experts: per layer a heavy-tailed popularity (lognormal, sigma 1.2, like the
  planner benchmarks' synthetic loads) that drifts from step to step (an AR(1) walk of the
  log-popularity, rho 0.998 per step: consecutive steps alike, as consecutive windows of
  the ESFT traces are) and switches regime twice (a fresh popularity mixed
  in half-half: what a domain change looks like in the ESFT traces);
- :func:`step_ids`: the ids [G, T, L, K] of one step: each rank takes T consecutive tokens;
- :func:`dispatch_counts`: the rows each physical slot receives in a step, with
  ``map_and_record``'s exact semantics (each rank hashes its own token index t:
  replica j = ((t * 2654435769) mod 2^32) mod count[e], slot = table[e, j]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Stream", "dispatch_counts", "esft_stream", "step_ids", "synthetic_stream"]

DATA = Path(__file__).resolve().parent / "data"
KNUTH = 2654435769


@dataclass(frozen=True)
class Stream:
    """Token routing in arrival order: ids [tokens, L, K] (int64, logical experts), and where
    each domain (or regime) starts."""

    name: str
    ids: np.ndarray
    num_experts: int
    starts: tuple[int, ...]

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[1])


def esft_stream(
    layers: list[int], domains: tuple[str, ...] = ("intent", "law", "summary", "translation")
) -> Stream:
    """The ESFT traces, the given layers, domains concatenated."""
    with np.load(DATA / "esft_routing_ids.npz") as d:
        parts = [np.asarray(d[f"{dom}_topk_ids"])[:, layers, :].astype(np.int64) for dom in domains]
    starts = tuple(int(x) for x in np.cumsum([0] + [p.shape[0] for p in parts[:-1]]))
    return Stream("ESFT " + "+".join(domains), np.concatenate(parts), 64, starts)


def synthetic_stream(
    steps: int, tokens_per_step: int, num_layers: int = 2, num_experts: int = 256,
    top_k: int = 8, seed: int = 0, sigma: float = 1.2, rho: float = 0.998,
) -> Stream:  # fmt: skip
    """DeepSeek-V3-size routing with drift and two regime switches (see the module)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    z = rng.standard_normal((num_layers, num_experts))
    switches = {steps // 3, 2 * steps // 3}
    out = np.empty((steps * tokens_per_step, num_layers, top_k), dtype=np.int64)
    starts = [0]
    for s in range(steps):
        if s in switches:
            z = np.sqrt(0.5) * z + np.sqrt(0.5) * rng.standard_normal(z.shape)
            starts.append(s * tokens_per_step)
        else:
            z = rho * z + np.sqrt(1 - rho**2) * rng.standard_normal(z.shape)
        p = torch.from_numpy(np.exp(sigma * z))
        for layer in range(num_layers):
            picks = torch.multinomial(p[layer].expand(tokens_per_step, -1), top_k, generator=gen)
            out[s * tokens_per_step : (s + 1) * tokens_per_step, layer] = picks.numpy()
    return Stream(f"synthetic {num_experts} experts top-{top_k}", out, num_experts, tuple(starts))


def step_ids(stream: Stream, step: int, ranks: int, tokens: int) -> np.ndarray:
    """ids [G, T, L, K] of one step: rank g takes tokens [(step G + g) T, ... + T), wrapping
    around the stream."""
    n = stream.ids.shape[0]
    idx = (np.arange(ranks * tokens) + step * ranks * tokens) % n
    return stream.ids[idx].reshape(ranks, tokens, stream.num_layers, stream.top_k)


def dispatch_counts(
    ids: np.ndarray, table: np.ndarray, count: np.ndarray, num_physical: int
) -> np.ndarray:
    """Rows per physical slot of one layer. ids [G, T, K] (each rank's tokens), table
    [E, D], count [E] (a dispatch table: ``Layout.dispatch()`` of that layer) -> [P] int64."""
    G, T, K = ids.shape
    h = (np.arange(T, dtype=np.int64) * KNUTH) & 0xFFFFFFFF  # per-rank token index
    c = np.maximum(count[ids], 1)
    j = np.minimum(h[None, :, None] % c, table.shape[1] - 1)
    phys = table[ids, j]
    return np.bincount(phys[phys >= 0].ravel(), minlength=num_physical)
