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
- :class:`RegimeSource` (the emulation's long runs): a run of any length from a few
  regimes of routing, one after another (:func:`esft_regimes`: the ESFT domains;
  :func:`synthetic_regimes`: DeepSeek-V3-size popularities calibrated on them), each step
  drawn afresh from the regime it falls in;
- :func:`dispatch_counts`: the rows each physical slot receives in a step, with
  ``map_and_record``'s exact semantics (each rank hashes its own token index t:
  replica j = ((t * 2654435769) mod 2^32) mod count[e], slot = table[e, j]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ESFT_DOMAINS",
    "RegimeSource",
    "Stream",
    "dispatch_counts",
    "esft_regimes",
    "esft_stream",
    "expert_load",
    "step_ids",
    "synthetic_regimes",
    "synthetic_stream",
]

ESFT_DOMAINS = ("intent", "law", "summary", "translation")

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


def expert_load(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Rows each logical expert receives per layer: ids [..., L, K] (any leading axes:
    tokens, or ranks and tokens) -> [L, E] int64."""
    return np.stack([
        np.bincount(ids[..., layer, :].ravel(), minlength=num_experts)
        for layer in range(ids.shape[-2])
    ])  # fmt: skip


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


# --- long runs: regimes ----------------------------------------------------------------------


@dataclass(frozen=True)
class RegimeSource:
    """Steps of routing for a run of any length: the run is cut into regimes of
    ``regime_steps`` steps, cycling through ``regimes``; the ``warmup`` steps before the
    run come from the last regime, so the run opens with a change of regime.

    Each regime is a pool of routed tokens ([n, L, K] logical ids, real or generated). A
    decode-like step (``contiguous`` False) gives each rank ``tokens`` tokens drawn at
    random from the pool (a batch of many concurrent requests, one token each); a
    prefill-like step (True) gives each rank a contiguous chunk of the pool at a random
    offset (a prompt, with its sequence's correlations). The draws depend on ``seed`` and
    the step only, so every policy sees the same steps.

    ``blend_steps`` > 0 makes each change gradual (a drift instead of a switch): in the
    first ``blend_steps`` steps of a regime, each token (decode) or prompt (prefill) still
    comes from the previous regime with a probability falling linearly from near 1 to near
    0. With ``blend_steps == regime_steps`` the traffic never stops drifting.
    """

    name: str
    regimes: tuple[np.ndarray, ...]
    num_experts: int
    regime_steps: int
    warmup: int
    contiguous: bool
    seed: int = 0
    blend_steps: int = 0

    @property
    def num_layers(self) -> int:
        return int(self.regimes[0].shape[1])

    @property
    def top_k(self) -> int:
        return int(self.regimes[0].shape[2])

    def regime(self, step: int) -> int:
        """Index of the regime step ``step`` falls in (warm-up steps: the last)."""
        if step < self.warmup:
            return len(self.regimes) - 1
        return ((step - self.warmup) // self.regime_steps) % len(self.regimes)

    def mix(self, step: int) -> tuple[int, float]:
        """(the regime step ``step`` falls in, the share of its tokens or prompts still drawn
        from the previous regime): 0 but while a change drifts (``blend_steps``)."""
        pos = step - self.warmup
        if self.blend_steps > 0 and pos >= 0 and pos % self.regime_steps < self.blend_steps:
            return self.regime(step), 1.0 - (pos % self.regime_steps + 1) / (self.blend_steps + 1)
        return self.regime(step), 0.0

    def ids(self, step: int, ranks: int, tokens: int) -> np.ndarray:
        """ids [G, T, L, K] of step ``step``."""
        pool = self.regimes[self.regime(step)]
        n = pool.shape[0]
        rng = np.random.default_rng([self.seed, step])
        if self.contiguous:
            start = rng.integers(0, n, size=(ranks, 1))
            idx = (start + np.arange(tokens)) % n
        else:
            idx = rng.integers(0, n, size=(ranks, tokens))
        out = pool[idx]
        r, old = self.mix(step)
        if old > 0:
            prev = self.regimes[(r - 1) % len(self.regimes)]
            # drawn after the ids, so the steps of a run without blending stay as they were
            mask = rng.random(size=(ranks, 1 if self.contiguous else tokens)) < old
            out = np.where(mask[..., None, None], prev[idx % prev.shape[0]], out)
        return out


def esft_regimes(
    layers: list[int], domains: tuple[str, ...] = ESFT_DOMAINS
) -> tuple[np.ndarray, ...]:
    """The ESFT traces' domains (the given layers), one regime each."""
    with np.load(DATA / "esft_routing_ids.npz") as d:
        return tuple(
            np.asarray(d[f"{dom}_topk_ids"])[:, layers, :].astype(np.int64) for dom in domains
        )


#: Calibrated on the ESFT traces (benchmarks/data): the per-layer coefficient of variation
#: of the expert loads is 0.80 in the median (p10 0.54, p90 1.19), a lognormal popularity
#: with sigma 0.70; consecutive domains' loads have cosine similarity 0.645, what
#: independent popularities with that spread give (1 / (1 + CV^2) = 0.61); inside one
#: domain, 1024-token windows are as alike at a lag of 6 windows as at 1 (no drift).
SYNTH_SIGMA = 0.70


def synthetic_regimes(
    count: int, pool_tokens: int, num_layers: int = 2, num_experts: int = 256, top_k: int = 8,
    seed: int = 0, sigma: float = SYNTH_SIGMA,
) -> tuple[np.ndarray, ...]:  # fmt: skip
    """``count`` regimes of DeepSeek-V3-size routing (256 experts, top-8): per regime and
    layer an independent lognormal popularity (sigma calibrated on the ESFT traces,
    :data:`SYNTH_SIGMA`), ``pool_tokens`` tokens each picking ``top_k`` distinct experts
    with those probabilities."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pool = np.empty((pool_tokens, num_layers, top_k), dtype=np.int64)
        for layer in range(num_layers):
            p = np.exp(sigma * rng.standard_normal(num_experts))
            pool[:, layer] = _distinct_picks(rng, p / p.sum(), pool_tokens, top_k)
        out.append(pool)
    return tuple(out)


def _distinct_picks(rng: np.random.Generator, p: np.ndarray, n: int, k: int) -> np.ndarray:
    """[n, k] experts drawn by probability ``p``, distinct within a row (a row with a
    repeat is drawn again, as sampling without replacement does)."""
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    out = np.searchsorted(cdf, rng.random((n, k)), side="right")
    while True:
        s = np.sort(out, axis=1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
        if bad.size == 0:
            return out
        out[bad] = np.searchsorted(cdf, rng.random((bad.size, k)), side="right")
