"""The pure staging plan: what each rank copies locally, fetches, and who sends it."""

from __future__ import annotations

import torch
from eplbd_client._plan import (
    Transfer,
    chunk_rounds,
    local_stage_plan,
    needed_from_outside,
    transfer_plan,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from eplbd.testing import random_layout

shapes = st.sampled_from([(2, 4, 8), (3, 8, 12), (2, 6, 16), (1, 5, 20)])  # (L, E, P)


def _pair(L: int, E: int, P: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return random_layout(L, E, P, generator=g), random_layout(L, E, P, generator=g)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, G=st.sampled_from([1, 2, 4]), seed=st.integers(0, 10_000))
def test_local_plan_rebuilds_the_new_layout(shape: tuple[int, int, int], G: int, seed: int) -> None:
    """Weights stand for their expert id: staging then applying gives the new local slots."""
    L, E, P = shape
    old, new = _pair(L, E, P, seed)
    S = P // G
    for r in range(G):
        plan = local_stage_plan(old, new, r, G)
        wanted = needed_from_outside(old, new, r, G)
        fetched = []
        for layer in range(L):
            live = old[layer, r * S : (r + 1) * S].tolist()
            st_ = plan.get(layer)
            if st_ is None:
                assert live == new[layer, r * S : (r + 1) * S].tolist()
                continue
            rows: list[int] = []
            for kind, arg in st_.sources:
                if kind == "local":
                    rows.append(live[arg])
                elif kind == "fetch":
                    fetched.append((layer, arg))
                    rows.append(arg)
                else:
                    rows.append(rows[arg])
            for q, x in zip(st_.slots, rows, strict=True):
                live[q] = x
            assert live == new[layer, r * S : (r + 1) * S].tolist()
            assert list(st_.experts) == rows
        assert sorted(fetched) == wanted  # each needed expert fetched once


@settings(max_examples=25, deadline=None)
@given(
    shape=shapes,
    G=st.sampled_from([2, 4]),
    gpn=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 10_000),
)
def test_transfer_plan_sends_each_need_once_from_a_holder(
    shape: tuple[int, int, int], G: int, gpn: int, seed: int
) -> None:
    L, E, P = shape
    old, new = _pair(L, E, P, seed)
    S = P // G
    transfers = transfer_plan(old, new, G, gpn)
    want = sorted(
        (layer, x, d) for d in range(G) for layer, x in needed_from_outside(old, new, d, G)
    )
    got = sorted((t.layer, t.expert, t.dst) for t in transfers)
    assert got == want
    for t in transfers:
        assert t.src != t.dst and t.src_slot // S == t.src
        assert int(old[t.layer, t.src_slot]) == t.expert
        holders = {p // S for p in range(P) if int(old[t.layer, p]) == t.expert} - {t.dst}
        if any(h // gpn == t.dst // gpn for h in holders):
            assert t.src // gpn == t.dst // gpn, "a same-node holder existed"


def test_transfer_plan_is_deterministic_and_balances_senders() -> None:
    # Expert 0 lives on ranks 0 and 1; ranks 2 and 3 both need it: one send each.
    old = torch.tensor([[0, 1, 0, 2, 3, 4, 5, 6]])
    new = torch.tensor([[0, 1, 0, 2, 0, 4, 0, 6]])
    t1 = transfer_plan(old, new, 4, 1)
    assert t1 == transfer_plan(old.clone(), new.clone(), 4, 1)
    assert [(t.src, t.dst) for t in t1] == [(0, 2), (1, 3)]
    # With nodes {0,1} and {2,3}, nothing is on the receivers' node: same answer.
    assert [(t.src, t.dst) for t in transfer_plan(old, new, 4, 2)] == [(0, 2), (1, 3)]


def test_chunk_rounds_respects_the_budget() -> None:
    ts = [Transfer(0, e, e % 3, 0, 3 + e % 2) for e in range(10)]
    rounds = chunk_rounds(ts, {0: 100}, 250, 5)
    assert [t for r in rounds for t in r] == ts
    for r in rounds:
        for rank in range(5):
            assert sum(100 for t in r if t.dst == rank) <= 250
            assert sum(100 for t in r if t.src == rank) <= 250
    assert chunk_rounds(ts, {0: 1000}, 10, 5) == [[t] for t in ts]  # one per round at least
    assert chunk_rounds([], {}, 10, 5) == []
