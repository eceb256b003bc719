"""A small deterministic MoE layer stack and its no-EPLB reference forward.

Everything derives from ``MoEConfig.seed``: router and expert weights, the tokens of each
(step, rank), and a router bias whose skew drifts with the step, so that hot experts move over
time and a balancer has something to chase. Float64 by default, so that "equal up to summation
order" checks can be tight (about 1e-12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["MoEConfig", "MoEModel", "expert_ffn"]


@dataclass(frozen=True)
class MoEConfig:
    """Shape and behaviour of the reference model, e.g. ``MoEConfig(num_layers=2,
    num_experts=8, top_k=2, hidden=16, ffn=32)``.

    skew: strength of the router bias towards a few hot experts (0: none);
    drift: how many expert positions the hot spot moves per step (0.05: one every 20 steps).
    """

    num_layers: int = 2
    num_experts: int = 8
    top_k: int = 2
    hidden: int = 16
    ffn: int = 32
    seed: int = 0
    skew: float = 1.5
    drift: float = 0.05
    dtype: torch.dtype = torch.float64


def expert_ffn(w13: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One expert: w13 [2F, H] (gate rows, then up rows), w2 [H, F]; h [T, H] -> [T, H]."""
    gu = h @ w13.t()
    f = w13.shape[0] // 2
    return (F.silu(gu[:, :f]) * gu[:, f:]) @ w2.t()


class MoEModel:
    """The logical model: per layer a router ``[H, E]`` and experts ``w13 [E, 2F, H]``,
    ``w2 [E, H, F]`` (CPU, ``cfg.dtype``). :meth:`to` copies it to a device."""

    def __init__(self, cfg: MoEConfig, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(cfg.seed)
        L, E, H, Fd = cfg.num_layers, cfg.num_experts, cfg.hidden, cfg.ffn

        def rnd(*shape: int, scale: float) -> torch.Tensor:
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(
                self.device, cfg.dtype
            )

        self.router = [rnd(H, E, scale=1.0 / math.sqrt(H)) for _ in range(L)]
        self.w13 = [rnd(E, 2 * Fd, H, scale=1.0 / math.sqrt(H)) for _ in range(L)]
        self.w2 = [rnd(E, H, Fd, scale=1.0 / math.sqrt(Fd)) for _ in range(L)]

    def expert_weights(self, layer: int) -> list[torch.Tensor]:
        """Logical-expert-major weights of ``layer``: ``[w13 [E, 2F, H], w2 [E, H, F]]``."""
        return [self.w13[layer], self.w2[layer]]

    def router_bias(self, layer: int, step: int) -> torch.Tensor:
        """[E]: 0 for the hot expert, falling like -skew * log(1 + distance) behind it."""
        E = self.cfg.num_experts
        shift = (layer * 3 + int(self.cfg.drift * step)) % E
        dist = (torch.arange(E, device=self.device) - shift) % E
        return (-self.cfg.skew * torch.log1p(dist.to(torch.float64))).to(self.cfg.dtype)

    def route(self, layer: int, h: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing of h [T, H]: (weights [T, K] summing to 1, logical ids [T, K] int64)."""
        logits = h @ self.router[layer] + self.router_bias(layer, step)
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, self.cfg.top_k, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), ids

    def tokens(self, step: int, rank: int, num_tokens: int) -> torch.Tensor:
        """Deterministic inputs of one rank at one step: [num_tokens, H]."""
        g = torch.Generator().manual_seed(hash((self.cfg.seed, step, rank)) & 0x7FFFFFFF)
        x = torch.randn(num_tokens, self.cfg.hidden, generator=g, dtype=torch.float64)
        return x.to(self.device, self.cfg.dtype)

    def reference_forward(
        self, x: torch.Tensor, step: int, routed: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The same layer stack with no EPLB: each token's experts computed from the logical
        weights directly. x [T, H] -> [T, H]. ``routed``: if given, receives each layer's
        logical ids [T, K]."""
        h = x
        K = self.cfg.top_k
        for layer in range(self.cfg.num_layers):
            w, ids = self.route(layer, h, step)
            if routed is not None:
                routed.append(ids)
            T = h.shape[0]
            flat = ids.reshape(-1)
            rows = h.repeat_interleave(K, dim=0)
            outs = torch.zeros_like(rows)
            for e in torch.unique(flat).tolist():
                m = flat == e
                outs[m] = expert_ffn(self.w13[layer][e], self.w2[layer][e], rows[m])
            h = h + (w.unsqueeze(-1) * outs.view(T, K, h.shape[1])).sum(dim=1)
        return h
