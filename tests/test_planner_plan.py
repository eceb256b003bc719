"""The migration-aware planner: valid layouts, close to the bound, few moves, explained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplbd.layout import Layout
from eplbd.planner import (
    REASONS,
    bound_ratio,
    gpu_loads,
    lower_bound,
    moves_between,
    plan,
    plan_with_report,
    rebalance_experts,
)
from eplbd.planner._placement import Placement, refill

DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "esft_routing_ids.npz"


def _heavy_tailed(L: int, E: int, seed: int, sigma: float = 1.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.exp(sigma * rng.standard_normal((L, E)))
    return np.stack([rng.multinomial(200 * E, row / row.sum()) for row in p]).astype(float)


def _duplicates(layout: Layout, G: int) -> int:
    L, P = layout.phy2log.shape
    per_gpu = layout.phy2log.view(L, G, P // G)
    s = per_gpu.sort(dim=2).values
    return int((s[:, :, 1:] == s[:, :, :-1]).sum())


@st.composite
def _case(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int]:
    nodes = draw(st.sampled_from([1, 2]))
    G = nodes * draw(st.integers(1, 3))
    E = draw(st.integers(1, 12))
    S = max(1, -(-E // G)) + draw(st.integers(0, 2))
    L = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["int", "float", "zeros", "skewed"]))
    if kind == "int":
        w = rng.integers(0, 6, (L, E)).astype(float)
    elif kind == "float":
        w = rng.random((L, E)) * 100
    elif kind == "zeros":
        w = np.zeros((L, E))
    else:
        w = (rng.random((L, E)) ** 6) * 1000
    return w, G, G * S, nodes


@settings(max_examples=60, deadline=None)
@given(_case(), st.integers(0, 2**16))
def test_every_plan_is_a_valid_layout_no_better_than_the_bound(
    case: tuple[np.ndarray, int, int, int], seed: int
) -> None:
    w, G, P, N = case
    L, E = w.shape
    first = plan_with_report(w, num_gpus=G, num_physical_experts=P, num_nodes=N)
    rng = np.random.default_rng(seed)
    w2 = w * rng.uniform(0.5, 1.5, w.shape)
    second = plan_with_report(
        w2, num_gpus=G, num_physical_experts=P, num_nodes=N, previous=first.layout
    )
    for res, load in ((first, w), (second, w2)):
        lay = res.layout
        lay.validate_consistent()
        assert lay.phy2log.shape == (L, P) and lay.phy2log.dtype == torch.int64
        assert (lay.logcnt >= 1).all() and lay.logcnt.sum(dim=1).tolist() == [P] * L
        assert (lay.logcnt <= max(G, -(-P // E))).all()
        g = gpu_loads(load, lay, G)
        assert torch.allclose(g.max(dim=1).values, res.max_after)
        assert (res.max_after >= lower_bound(load, G, P) * (1 - 1e-9)).all()
        if P // G <= E:  # then r_e <= G and no GPU needs two copies of one expert
            assert _duplicates(lay, G) == 0
        assert set(res.reasons) <= set(REASONS)
        assert torch.equal(res.moves, moves_between(res.baseline, lay.phy2log))
    # unchanged layers are exactly the previous ones
    kept = ~second.changed
    assert torch.equal(second.layout.phy2log[kept], first.layout.phy2log[kept])


def test_free_moves_from_the_served_layout_reach_what_scratch_reaches() -> None:
    # The case (8 experts, 2 GPUs, 12 slots): from the served layout with
    # --move-cost 0 --min-gain 0 the planner said "balanced" at 1.059 of the bound, where
    # a plan from scratch reaches 1.000.
    served = Layout.from_phy2log([[5, 6, 1, 0, 7, 2, 3, 1, 0, 7, 5, 4]], 8)
    load = [[80.0, 44.0, 40.0, 12.0, 16.0, 24.0, 4.0, 50.0]]
    kw = {"num_gpus": 2, "num_physical_experts": 12}
    scratch = plan_with_report(load, **kw)
    assert scratch.bound_ratio == pytest.approx(1.0)
    res = plan_with_report(load, **kw, previous=served, move_cost=0, min_gain=0)
    assert res.bound_ratio == pytest.approx(1.0)
    assert res.reasons == ("improved",)
    # the plan from scratch, renumbered to keep what the served layout holds, moves less
    assert 0 < res.total_moves <= int(moves_between(served.phy2log, scratch.layout.phy2log).sum())


@settings(max_examples=60, deadline=None)
@given(_case(), st.integers(0, 2**16))
def test_with_free_moves_a_previous_layout_never_ends_worse_than_scratch(
    case: tuple[np.ndarray, int, int, int], seed: int
) -> None:
    w, G, P, N = case
    rng = np.random.default_rng(seed)
    served = plan(
        w * rng.uniform(0.2, 2.0, w.shape), num_gpus=G, num_physical_experts=P, num_nodes=N
    )
    kw = {"num_gpus": G, "num_physical_experts": P, "num_nodes": N}
    scratch = plan_with_report(w, **kw)
    res = plan_with_report(w, **kw, previous=served, move_cost=0, min_gain=0)
    assert (res.max_after <= scratch.max_after * (1 + 1e-9) + 1e-12).all()


def test_deterministic() -> None:
    w = _heavy_tailed(4, 32, seed=1)
    a = plan(w, num_gpus=8, num_physical_experts=40, num_nodes=2)
    b = plan(w.copy(), num_gpus=8, num_physical_experts=40, num_nodes=2)
    assert torch.equal(a.phy2log, b.phy2log)
    c = plan(w, num_gpus=8, num_physical_experts=40, num_nodes=2, previous=a)
    d = plan(torch.from_numpy(w), num_gpus=8, num_physical_experts=40, num_nodes=2, previous=b)
    assert torch.equal(c.phy2log, d.phy2log)


def test_close_to_the_bound_with_perfect_knowledge_on_synthetic_loads() -> None:
    w = _heavy_tailed(6, 256, seed=2)
    res = plan_with_report(w, num_gpus=32, num_physical_experts=288, num_nodes=4)
    assert res.bound_ratio <= 1.01
    p2l, _, _ = rebalance_experts(w, 288, 8, 4, 32)
    assert res.bound_ratio <= bound_ratio(w, p2l, 32)


def test_already_optimal_previous_changes_nothing() -> None:
    w = _heavy_tailed(5, 64, seed=3)
    first = plan(w, num_gpus=8, num_physical_experts=72)
    again = plan_with_report(w, num_gpus=8, num_physical_experts=72, previous=first)
    assert again.total_moves == 0
    assert not again.changed.any()
    assert set(again.reasons) <= {"balanced", "gain_below_threshold"}
    assert torch.equal(again.layout.phy2log, first.phy2log)


def test_small_load_change_moves_few_slots() -> None:
    w = _heavy_tailed(8, 64, seed=4)
    first = plan(w, num_gpus=8, num_physical_experts=72)
    rng = np.random.default_rng(5)
    w2 = w * rng.uniform(0.97, 1.03, w.shape)
    res = plan_with_report(w2, num_gpus=8, num_physical_experts=72, previous=first)
    p2l, _, _ = rebalance_experts(w2, 72, 1, 1, 8)
    scratch_moves = int(moves_between(first.phy2log, p2l).sum())
    assert res.total_moves <= 0.1 * 8 * 72
    assert res.total_moves * 5 <= scratch_moves
    assert res.aggregate_after <= res.aggregate_before + 1e-12


def test_big_load_change_is_followed() -> None:
    w = _heavy_tailed(4, 64, seed=6)
    first = plan(w, num_gpus=8, num_physical_experts=72)
    w2 = np.roll(w, 7, axis=1)  # the hot experts are now others
    res = plan_with_report(w2, num_gpus=8, num_physical_experts=72, previous=first)
    assert res.changed.all()
    assert res.aggregate_before > 1.2
    assert res.aggregate_after <= (1 + 2 * res.params["tolerance"]) * res.aggregate_bound


def test_min_gain_and_move_budget() -> None:
    w = _heavy_tailed(6, 64, seed=7)
    start = Layout.default(6, 64, 72)
    frozen = plan_with_report(w, num_gpus=8, num_physical_experts=72, previous=start, min_gain=10.0)
    assert frozen.total_moves == 0 and set(frozen.reasons) == {"gain_below_threshold"}
    pricey = plan_with_report(
        w, num_gpus=8, num_physical_experts=72, previous=start, move_cost=100.0
    )
    assert pricey.total_moves == 0 and set(pricey.reasons) == {"not_worth_moves"}
    free = plan_with_report(w, num_gpus=8, num_physical_experts=72, previous=start)
    assert free.changed.all() and set(free.reasons) == {"improved"}
    gain = free.balance_before - free.balance_after
    best = int(torch.argmax(gain / free.moves.clamp(min=1)))
    budget = max(free.total_moves // 4, int(free.moves[best]))
    capped = plan_with_report(
        w, num_gpus=8, num_physical_experts=72, previous=start, max_moves=budget
    )
    assert 0 < capped.total_moves <= budget < free.total_moves
    assert set(capped.reasons) <= {"improved", "move_budget"}
    assert capped.aggregate_after < capped.aggregate_before
    # the layer with the most gain per move comes first and gets its best option
    assert torch.equal(capped.layout.phy2log[best], free.layout.phy2log[best])


def test_no_load_layer_is_left_alone() -> None:
    w = np.zeros((2, 16))
    w[1] = np.arange(16)
    start = Layout.default(2, 16, 20)
    res = plan_with_report(w, num_gpus=4, num_physical_experts=20, previous=start)
    assert res.reasons[0] == "no_load" and not bool(res.changed[0])
    assert torch.equal(res.layout.phy2log[0], start.phy2log[0])


def test_new_replicas_prefer_a_node_that_holds_the_expert() -> None:
    # 4 GPUs in 2 nodes ({0, 1}, {2, 3}), 2 slots each; GPUs 1 and 2 have a free slot and
    # GPU 2 is a little lighter. Expert 0 lives on GPU 0 (node 0) and gets a second replica:
    # it goes to GPU 1, where its weights come over NVLink, unless the gap is large.
    def placement(light: float) -> Placement:
        p2l = np.array([[[0, 1], [2, -1], [3, -1], [4, 5]]])
        sw = np.array([[[20.0, 10.0], [10.0, 0.0], [light, 0.0], [15.0, 15.0]]])
        return Placement(p2l, sw, sw.sum(axis=2))

    w = np.array([[40.0, 10.0, 10.0, 9.9, 15.0, 15.0]])
    r_prev = np.array([[1, 1, 1, 1, 1, 1]])
    r_new = np.array([[2, 1, 1, 1, 1, 1]])
    gpu_node = np.array([0, 0, 1, 1])
    pl = placement(9.9)
    refill(pl, w, r_prev, r_new, gpu_node, np.array([0.5]))
    assert pl.p2l[0, 1].tolist() == [2, 0]
    pl = placement(9.9)
    refill(pl, w, r_prev, r_new, gpu_node, None)  # no node preference: the lightest GPU
    assert pl.p2l[0, 2].tolist() == [3, 0]
    pl = placement(5.0)
    refill(pl, w, r_prev, r_new, gpu_node, np.array([0.5]))  # gap 5 > penalty 0.5
    assert pl.p2l[0, 2].tolist() == [3, 0]
    assert pl.loads[0].tolist() == [30.0, 10.0, 25.0, 30.0]


def test_changed_layers_lose_the_duplicates_of_a_previous_layout() -> None:
    # DeepSeek's packing can put two replicas of one expert on one GPU; a layer the planner
    # changes comes out without them.
    rng = np.random.default_rng(10)
    w = rng.random((4, 16)) ** 3 * 100
    p2l, _, _ = rebalance_experts(w, 24, 1, 1, 4)
    prev = Layout.from_phy2log(p2l, 16)
    assert _duplicates(prev, 4) > 0
    w2 = w * rng.uniform(0.5, 1.5, w.shape)
    res = plan_with_report(w2, num_gpus=4, num_physical_experts=24, previous=prev,
                           move_cost=0.0, min_gain=0.0)  # fmt: skip
    assert res.changed.all()
    assert _duplicates(res.layout, 4) == 0


def test_deepseek_policy_is_the_baseline() -> None:
    w = _heavy_tailed(3, 64, seed=8)
    lay = plan(w, num_gpus=8, num_physical_experts=72, policy="deepseek", num_nodes=2, num_groups=8)
    p2l, log2phy, logcnt = rebalance_experts(w, 72, 8, 2, 8)
    assert torch.equal(lay.phy2log, p2l) and torch.equal(lay.logcnt, logcnt)
    assert torch.equal(lay.log2phy, log2phy)


def test_report_figures() -> None:
    w = _heavy_tailed(3, 16, seed=9)
    res = plan_with_report(w, num_gpus=4, num_physical_experts=20)
    rows = res.layers()
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert all(r["reason"] == "from_scratch" for r in rows)
    assert all(r["balance_after"] >= r["lower_bound"] - 1e-12 for r in rows)
    s = res.summary()
    assert s["slots"] == 60 and s["moves"] == res.total_moves
    assert s["balance_after"] == pytest.approx(res.aggregate_after)
    assert s["bound_ratio"] == pytest.approx(bound_ratio(w, res.layout, 4))
    assert res.to_dict()["layers"] == rows


@pytest.mark.skipif(not DATA.exists(), reason="trace data missing")
def test_real_trace_sample_is_close_to_the_bound() -> None:
    ids = np.load(DATA)["law_topk_ids"][:2048]
    w = np.stack([np.bincount(ids[:, layer].ravel(), minlength=64) for layer in range(26)])
    for G, P in ((8, 72), (16, 80)):
        ours = plan_with_report(w, num_gpus=G, num_physical_experts=P)
        p2l, _, _ = rebalance_experts(w, P, 1, 1, G)
        assert ours.bound_ratio <= 1.01
        assert ours.bound_ratio <= bound_ratio(w, p2l, G) + 1e-9


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"num_gpus": 3}, "cannot be split evenly over 3 GPUs"),
        ({"num_physical_experts": 8}, "8 physical slots cannot hold 16"),
        ({"num_nodes": 3}, "4 GPUs cannot be split evenly over 3 nodes"),
        ({"policy": "magic"}, "unknown policy"),
        ({"min_gain": -1.0}, "min_gain"),
        ({"max_moves": -1}, "max_moves"),
        ({"move_cost": -0.5}, "move_cost"),
        ({"tolerance": "x"}, "tolerance"),
        ({"previous": Layout.default(2, 16, 20)}, "previous layout has 2 layers"),
        ({"previous": "layout"}, "must be an eplbd.layout.Layout"),
        ({"load": np.full((3, 16), np.inf)}, "not finite"),
        ({"load": -np.ones((3, 16))}, "negative"),
        ({"load": np.ones(16)}, "2-D"),
        ({"policy": "deepseek", "num_groups": 3, "num_nodes": 1}, "into 3 groups"),
    ],
)
def test_bad_arguments(kwargs: dict, msg: str) -> None:
    args = {"load": np.ones((3, 16)), "num_gpus": 4, "num_physical_experts": 20, **kwargs}
    load = args.pop("load")
    with pytest.raises(ValueError, match=msg):
        plan(load, **args)
