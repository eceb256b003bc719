"""Valid layouts for tests, demos and benchmarks, without the planner.

Both return ``phy2log [L, P]`` int64 in which every expert has at least one replica.
"""

from __future__ import annotations

import torch

__all__ = ["greedy_layout", "random_layout"]


def random_layout(
    num_layers: int,
    num_logical: int,
    num_physical: int,
    *,
    generator: torch.Generator | None = None,
    max_replicas: int | None = None,
) -> torch.Tensor:
    """Random replica counts (each >= 1, at most ``max_replicas``) in a random slot order."""
    L, E, P = num_layers, num_logical, num_physical
    if P < E:
        raise ValueError(f"{P} slots cannot hold {E} experts")
    cap = P - E + 1 if max_replicas is None else max_replicas
    if cap * E < P:
        raise ValueError(f"max_replicas={cap} cannot fill {P} slots with {E} experts")
    rows = []
    for _ in range(L):
        cnt = [1] * E
        for u in torch.rand(P - E, generator=generator, dtype=torch.float64).tolist():
            free = [e for e in range(E) if cnt[e] < cap]
            cnt[free[min(int(u * len(free)), len(free) - 1)]] += 1
        slots = torch.repeat_interleave(torch.arange(E), torch.tensor(cnt))
        rows.append(slots[torch.randperm(P, generator=generator)])
    return torch.stack(rows)


def greedy_layout(load: torch.Tensor, num_physical: int, num_gpus: int) -> torch.Tensor:
    """A simple balancer: replicas by greedy apportionment (next replica to the largest
    load per replica, at most one per GPU), then replicas heaviest first onto the least
    loaded GPU that has a free slot and no replica of that expert yet (when possible).
    load [L, E] -> phy2log [L, P]."""
    L, E = load.shape
    P, G = num_physical, num_gpus
    S = P // G
    out = torch.empty(L, P, dtype=torch.int64)
    for layer in range(L):
        w = load[layer].double().tolist()
        cnt = [1] * E
        for _ in range(P - E):
            e = max((i for i in range(E) if cnt[i] < G), key=lambda i: (w[i] / cnt[i], -i))
            cnt[e] += 1
        reps = sorted(
            ((w[e] / cnt[e], e) for e in range(E) for _ in range(cnt[e])),
            key=lambda t: (-t[0], t[1]),
        )
        gload = [0.0] * G
        used: list[list[int]] = [[] for _ in range(G)]
        for rl, e in reps:
            free = [g for g in range(G) if len(used[g]) < S]
            fresh = [g for g in free if e not in used[g]]
            g = min(fresh or free, key=lambda g: (gload[g], g))
            used[g].append(e)
            gload[g] += rl
        out[layer] = torch.tensor([e for g in range(G) for e in used[g]])
    return out
