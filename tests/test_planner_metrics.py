"""Replica counts, the lower bound, and the balance metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eplbd.planner as planner
from eplbd.layout import Layout, moves_between
from eplbd.planner import (
    aggregate_balance,
    balance,
    bound_ratio,
    gpu_loads,
    lower_bound,
    replica_counts,
)


def _greedy_counts(w: list[float], P: int, cap: int) -> list[int]:
    """The textbook greedy, one replica at a time (first maximum wins)."""
    r = [1] * len(w)
    for _ in range(P - len(w)):
        best = max((e for e in range(len(w)) if r[e] < cap), key=lambda e: w[e] / r[e])
        r[best] += 1
    return r


def test_public_surface_is_sorted() -> None:
    assert planner.__all__ == sorted(planner.__all__)
    for name in planner.__all__:
        assert hasattr(planner, name)


def test_lower_bound_worked_examples() -> None:
    # W / G dominates: [8, 4, 2, 2] on 2 GPUs, 6 slots. Extras: expert 0 (8 -> 4), then
    # experts 0 and 1 tie at 4 but expert 0 is at the cap (2 = G): expert 1 -> counts
    # [2, 2, 1, 1], max w / r = 4 < W / G = 8.
    assert replica_counts([[8, 4, 2, 2]], 6, 2).tolist() == [[2, 2, 1, 1]]
    assert lower_bound([[8, 4, 2, 2]], 2, 6).tolist() == [8.0]
    # The per-replica term dominates: no spare slot, one expert carries 90 of 100.
    assert lower_bound([[90, 10]], 2, 2).tolist() == [90.0]
    # The cap binds: expert 0 gets at most G = 2 replicas (45 each), the other spare slots
    # go to the small experts; the bound is then W / G = 48 (w_e / G never exceeds W / G).
    assert replica_counts([[90, 2, 2, 2]], 8, 2).tolist() == [[2, 2, 2, 2]]
    assert lower_bound([[90, 2, 2, 2]], 2, 8).tolist() == [48.0]
    # A layer with no load has bound 0.
    assert lower_bound([[0, 0, 0]], 3, 3).tolist() == [0.0]


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 10),
    st.integers(1, 5),
    st.integers(0, 6),
    st.integers(0, 2**16),
    st.booleans(),
)
def test_counts_equal_the_step_by_step_greedy(
    L: int, E: int, G: int, spare: int, seed: int, ints: bool
) -> None:
    P = max(E + spare, G)
    P = G * -(-P // G)
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 5, (L, E)).astype(float) if ints else rng.random((L, E)) * 10
    cap = max(G, -(-P // E))
    r = replica_counts(w, P, G)
    for layer in range(L):
        assert r[layer].tolist() == _greedy_counts(w[layer].tolist(), P, cap)
    lb = lower_bound(w, G, P)
    peak = (torch.from_numpy(w) / r).max(dim=1).values
    assert torch.allclose(lb, torch.maximum(torch.from_numpy(w).sum(dim=1) / G, peak))


def test_gpu_loads_and_balance_worked_example() -> None:
    # Layout [[e0 e0 e1 | e2 e3 e3]]: expert 0 and 3 have 2 replicas each.
    # Loads [40 10 20 30]: GPU 0 = 20 + 20 + 10 = 50, GPU 1 = 20 + 15 + 15 = 50.
    p2l = torch.tensor([[0, 0, 1, 2, 3, 3]])
    w = torch.tensor([[40.0, 10.0, 20.0, 30.0]])
    assert gpu_loads(w, p2l, 2).tolist() == [[50.0, 50.0]]
    assert balance(w, p2l, 2).tolist() == [1.0]
    # Slot p holds p mod 4: GPU 0 = e0/2 + e1/2 + e2 = 45, GPU 1 = e3 + e0/2 + e1/2 = 55.
    default = Layout.default(1, 4, 6)
    assert gpu_loads(w, default, 2).tolist() == [[45.0, 55.0]]
    assert balance(w, default, 2).tolist() == [1.1]
    # Two layers: sum max / sum mean = (55 + 3) / (50 + 2) with the second layer [4, 0, 0, 0]
    # -> GPU 0 = 2 + 0 + 0, GPU 1 = 0 + 2 + 0 ... = 2 and 2.
    w2 = torch.tensor([[40.0, 10.0, 20.0, 30.0], [4.0, 0.0, 0.0, 0.0]])
    two = Layout.default(2, 4, 6)
    assert gpu_loads(w2, two, 2)[1].tolist() == [2.0, 2.0]
    assert math.isclose(aggregate_balance(w2, two, 2), (55 + 2) / (50 + 2))
    # bound: layer 0 max(50, 40 / 2) = 50, layer 1 max(2, 4 / 2) = 2.
    assert math.isclose(bound_ratio(w2, two, 2), (55 + 2) / (50 + 2))


def test_zero_load_layer_has_balance_one() -> None:
    assert balance(torch.zeros(1, 4), Layout.default(1, 4, 4), 2).tolist() == [1.0]
    assert aggregate_balance(torch.zeros(2, 4), Layout.default(2, 4, 4), 2) == 1.0
    assert bound_ratio(torch.zeros(2, 4), Layout.default(2, 4, 4), 2) == 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(2, 8), st.integers(1, 4), st.integers(0, 2**16))
def test_no_layout_beats_the_lower_bound(L: int, E: int, G: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    S = -(-E // G) + int(rng.integers(0, 3))
    P = G * S
    w = rng.random((L, E)) * 10
    # any layout: a random phy2log with every expert present
    p2l = np.concatenate([np.tile(np.arange(E), (L, 1)), rng.integers(0, E, (L, P - E))], 1)
    p2l = np.take_along_axis(p2l, rng.permuted(np.tile(np.arange(P), (L, 1)), axis=1), 1)
    g = gpu_loads(w, torch.from_numpy(p2l), G)
    assert (g.max(dim=1).values >= lower_bound(w, G, P) * (1 - 1e-12)).all()
    assert bound_ratio(w, torch.from_numpy(p2l), G) >= 1 - 1e-12


def test_moves_between_is_reexported() -> None:
    a = torch.tensor([[0, 1, 2, 3]])
    b = torch.tensor([[0, 2, 1, 3]])
    assert planner.moves_between is moves_between
    assert planner.moves_between(a, b).tolist() == [2]


@pytest.mark.parametrize(
    ("call", "msg"),
    [
        (lambda: gpu_loads([[1.0, 2.0]], [[0, 2]], 1), "outside"),
        (lambda: gpu_loads([[1.0, 2.0]], [[0, 1, 1]], 2), "split evenly"),
        (lambda: gpu_loads([[1.0, 2.0]], [[0.0, 1.0]], 1), "integer phy2log"),
        (lambda: balance([[1.0, 2.0], [1.0, 2.0]], [[0, 1]], 1), "layers"),
        (lambda: lower_bound([[1.0, -2.0]], 1, 2), "negative"),
        (lambda: lower_bound([[1.0, 2.0]], 2, 3), "split evenly"),
        (lambda: replica_counts([["a", "b"]], 2, 1), "real numbers"),
    ],
)
def test_metric_arguments_are_checked(call: object, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        call()  # type: ignore[operator]
