"""Which weights move for a layout change: pure functions, identical on every rank.

Every rank computes the same answers from the same two layouts (``old`` and ``new`` phy2log,
[L, P] int64), which is what lets the peer-to-peer source run without extra messages: a sender
knows what each receiver needs because it can compute the receiver's plan itself.

Terms: G ranks, S = P // G slots per rank, slot p on rank p // S. A slot *changes* when its
logical expert differs between the layouts. A rank must *fetch* expert x of layer l when one
of its changed slots gets x and none of its slots held x in the old layout (else it copies x
locally); it fetches each such expert once, however many of its slots get it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "LayerStage",
    "Transfer",
    "chunk_rounds",
    "local_stage_plan",
    "needed_from_outside",
    "transfer_plan",
]


@dataclass(frozen=True)
class LayerStage:
    """How one rank fills the staging rows of one layer.

    slots: local slot indices (0..S-1) that change, ascending, e.g. ``[0, 2]``;
    experts: the new expert of each of those slots, e.g. ``[5, 5]``;
    sources: per row, ``("local", q)`` copy from local slot q of the live weights,
        ``("fetch", x)`` filled by the weight source, or ``("dup", i)`` copy of staging
        row i (the same expert fetched once), e.g. ``[("fetch", 5), ("dup", 0)]``.
    """

    slots: tuple[int, ...]
    experts: tuple[int, ...]
    sources: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Transfer:
    """One expert's weights of one layer sent from rank ``src`` (its slot ``src_slot``, a
    global slot id) to rank ``dst``."""

    layer: int
    expert: int
    src: int
    src_slot: int
    dst: int


def _rows(t: torch.Tensor) -> list[list[int]]:
    return [list(map(int, r)) for r in t.long().tolist()]


def _needed_row(old: list[int], new: list[int], rank: int, S: int) -> list[int]:
    lo, hi = rank * S, (rank + 1) * S
    local_old = set(old[lo:hi])
    return sorted({new[p] for p in range(lo, hi) if new[p] != old[p] and new[p] not in local_old})


def needed_from_outside(
    old: torch.Tensor, new: torch.Tensor, rank: int, num_ranks: int
) -> list[tuple[int, int]]:
    """(layer, expert) pairs that ``rank`` must receive, sorted. old, new: [L, P]."""
    S = old.shape[1] // num_ranks
    out: list[tuple[int, int]] = []
    for layer, (o, n) in enumerate(zip(_rows(old), _rows(new), strict=True)):
        out.extend((layer, x) for x in _needed_row(o, n, rank, S))
    return out


def local_stage_plan(
    old: torch.Tensor, new: torch.Tensor, rank: int, num_ranks: int
) -> dict[int, LayerStage]:
    """Per layer with at least one changed slot on ``rank``: how to fill its staging rows."""
    S = old.shape[1] // num_ranks
    lo = rank * S
    plan: dict[int, LayerStage] = {}
    for layer, (o, n) in enumerate(zip(_rows(old), _rows(new), strict=True)):
        first_local: dict[int, int] = {}
        for q in range(S):
            first_local.setdefault(o[lo + q], q)
        slots: list[int] = []
        experts: list[int] = []
        sources: list[tuple[str, int]] = []
        fetched_row: dict[int, int] = {}
        for q in range(S):
            x = n[lo + q]
            if x == o[lo + q]:
                continue
            row = len(slots)
            slots.append(q)
            experts.append(x)
            if x in first_local:
                sources.append(("local", first_local[x]))
            elif x in fetched_row:
                sources.append(("dup", fetched_row[x]))
            else:
                fetched_row[x] = row
                sources.append(("fetch", x))
        if slots:
            plan[layer] = LayerStage(tuple(slots), tuple(experts), tuple(sources))
    return plan


def transfer_plan(
    old: torch.Tensor, new: torch.Tensor, num_ranks: int, gpus_per_node: int = 1
) -> list[Transfer]:
    """Every peer-to-peer transfer of a layout change, in one global order.

    Each expert goes once to each rank that must fetch it (:func:`needed_from_outside`), from a
    rank that held it in the old layout: one on the receiver's node when there is one (node of
    rank r = r // gpus_per_node), else any; among those the one with the fewest transfers so
    far, then the lowest rank. Ordered by (layer, receiver, expert).
    """
    G = num_ranks
    S = old.shape[1] // G
    gpn = max(1, int(gpus_per_node))
    sent = [0] * G
    out: list[Transfer] = []
    for layer, (o, n) in enumerate(zip(_rows(old), _rows(new), strict=True)):
        holders: dict[int, list[tuple[int, int]]] = {}
        for p, x in enumerate(o):
            r = p // S
            hs = holders.setdefault(x, [])
            if not hs or hs[-1][0] != r:
                hs.append((r, p))
        for d in range(G):
            for x in _needed_row(o, n, d, S):
                cands = [h for h in holders[x] if h[0] != d]
                same = [h for h in cands if h[0] // gpn == d // gpn]
                r, p = min(same or cands, key=lambda h: (sent[h[0]], h[0]))
                sent[r] += 1
                out.append(Transfer(layer, x, r, p, d))
    return out


def chunk_rounds(
    transfers: list[Transfer], layer_bytes: dict[int, int], chunk_bytes: int, num_ranks: int
) -> list[list[Transfer]]:
    """Split transfers, in order, into rounds where no rank sends or receives more than
    ``chunk_bytes`` (a round always holds at least one transfer). layer_bytes: bytes of one
    expert's weights per layer."""
    rounds: list[list[Transfer]] = []
    cur: list[Transfer] = []
    recv = [0] * num_ranks
    send = [0] * num_ranks
    for t in transfers:
        b = layer_bytes[t.layer]
        if cur and (recv[t.dst] + b > chunk_bytes or send[t.src] + b > chunk_bytes):
            rounds.append(cur)
            cur, recv, send = [], [0] * num_ranks, [0] * num_ranks
        cur.append(t)
        recv[t.dst] += b
        send[t.src] += b
    if cur:
        rounds.append(cur)
    return rounds
