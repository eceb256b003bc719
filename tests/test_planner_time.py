"""The cost model of a GPU's expert work and the planner's time objective: weight reads
and tiles of rows, idle replicas, activity moved without moving weights, and metrics."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplbd.layout import Layout
from eplbd.planner import (
    CostModel,
    CostTier,
    activated_slots,
    default_cost_model,
    gpu_times,
    plan,
    plan_with_report,
    time_balance,
)

# DeepSeek-V2-Lite's expert (hidden 2048, ffn 1408), bf16, on an H100, no dispatch term
V2 = default_cost_model(2048, 1408, link_bandwidth=None)


def _skewed(L: int, E: int, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.lognormal(0.0, 1.0, (L, E))
    p /= p.sum(axis=1, keepdims=True)
    return np.stack([rng.multinomial(rows, row) for row in p]).astype(float)


# --- the cost model --------------------------------------------------------------------


def test_default_model_from_bandwidth_and_flops() -> None:
    m = default_cost_model(1024, 512, mem_bandwidth=1e12, peak_flops=1e15, tile_rows=64)
    assert m.fixed_us == pytest.approx(3 * 1024 * 512 * 2 / 1e12 * 1e6)  # weights read
    assert m.tile_us == pytest.approx(6 * 1024 * 512 * 64 / 1e15 * 1e6)  # 6 H F per row
    assert m.row_us == pytest.approx(2 * 1024 * 2 / 4.5e11 * 1e6)  # there and back
    assert m.source == "default" and (m.hidden, m.ffn) == (1024, 512)
    with pytest.raises(ValueError, match="dtype"):
        default_cost_model(8, 8, "int4")
    with pytest.raises(ValueError, match="hidden"):
        default_cost_model(0, 8)


def test_exact_time_is_the_formula() -> None:
    m = CostModel(fixed_us=10.0, tile_us=3.0, tile_rows=128, row_us=0.5)
    got = m.slot_time([0, 1, 128, 129, 1000], "exact")
    want = [0, 10 + 3 + 0.5, 10 + 3 + 64, 10 + 6 + 64.5, 10 + 8 * 3 + 500]
    assert got.tolist() == pytest.approx(want)
    assert m.gemm_time([0, 5, 300]) == pytest.approx(2 * 10 + (1 + 3) * 3)


@pytest.mark.parametrize("x", [0.02, 0.7, 3.0, 90.0, 128.0, 200.0, 3000.0])
def test_poisson_time_is_the_expectation_over_steps(x: float) -> None:
    m = CostModel(fixed_us=10.0, tile_us=3.0, tile_rows=128, row_us=0.01)
    t = m.slot_time(np.random.default_rng(0).poisson(x, 400_000), "exact")
    se = t.std() / np.sqrt(t.size)  # the Monte Carlo estimate's standard error
    assert abs(float(m.slot_time(x)) - t.mean()) <= 4 * se + 2e-3 * t.mean()
    assert float(m.slot_time(0.0)) == 0.0


def test_json_round_trip_and_bad_files() -> None:
    m = CostModel(fixed_us=5.5, tile_us=2.0, tile_rows=64, device="NVIDIA H100 80GB HBM3",
                  hidden=2048, ffn=1408, source="calibrated", fit={"median_error": 0.03})  # fmt: skip
    back = CostModel.from_json(m.to_json())
    assert back == m and back.fit == m.fit
    d = json.loads(m.to_json())
    for bad, msg in (
        ({**d, "schema_version": 9}, "schema"),
        ({**d, "kind": "other"}, "schema"),
        ({k: v for k, v in d.items() if k != "tile_us"}, "lacks tile_us"),
        ({**d, "fixed_us": -1.0}, "fixed_us"),
        ({**d, "fixed_us": float("nan")}, "fixed_us"),
        ({**d, "tile_rows": 0}, "tile_rows"),
        ({**d, "hidden": "big"}, "hidden"),
        ({**d, "fixed_us": 0.0, "tile_us": 0.0, "row_us": 0.0}, "all 0"),
        ({**d, "tile_row": 64}, "unknown tile_row"),  # misspelt: not left at its default
        ({**d, "schema_version": 1.0}, "schema"),
        ({**d, "ffn": -5}, "ffn"),
    ):
        with pytest.raises(ValueError, match=msg):
            CostModel.from_dict(bad)
    with pytest.raises(ValueError, match="JSON"):
        CostModel.from_json("{")
    for bad_kw, msg in (({"hidden": -5}, "hidden"), ({"device": 3}, "device")):
        with pytest.raises(ValueError, match=msg):
            CostModel(fixed_us=1.0, tile_us=1.0, **bad_kw)  # type: ignore[arg-type]
    # a fit's NaN (an empty set's error) is written as null: the file stays JSON
    nan_fit = CostModel(fixed_us=1.0, tile_us=1.0, fit={"errors": [0.1, float("nan")]})
    assert CostModel.from_json(nan_fit.to_json()).fit == {"errors": [0.1, None]}


def test_bad_rows_are_refused() -> None:
    m = CostModel(fixed_us=10.0, tile_us=3.0, tile_rows=128)
    for rows in ([1.0, -1.0], [float("nan")], [float("inf")]):
        for call in (lambda r: m.slot_time(r), lambda r: m.slot_time(r, "exact"),
                     m.gemm_time, m.rank_time):  # fmt: skip
            with pytest.raises(ValueError, match="rows"):
                call(rows)


@pytest.mark.parametrize("tile_rows", [1, 4, 16, 128, 256])
def test_expected_tiles_is_the_poisson_expectation(tile_rows: int) -> None:
    from math import lgamma

    from eplbd.planner._cost import expected_tiles

    xs = np.array([1e-3, 0.4, 3.0, 17.0, 130.0, 255.0, 600.0, 5000.0])
    want = []
    for x in xs:  # summed over the distribution, by brute force
        n = np.arange(max(0, int(x - 40 * x**0.5)), int(x + 40 * x**0.5 + 60))
        pmf = np.exp(n * np.log(x) - x - np.array([lgamma(k + 1) for k in n]))
        want.append(float((pmf * np.ceil(n / tile_rows)).sum()))
    # summed below 64 rows a tile; the normal tails above are within 0.5%
    rtol = 1e-6 if tile_rows < 64 else 5e-3
    np.testing.assert_allclose(expected_tiles(xs, tile_rows), want, rtol=rtol)


# A kernel with two tile shapes, as torch._grouped_mm on an H100: up to 128 rows a slot on
# average the small one (a read, then 128-row tiles), above it 256-row tiles and no read
TIERED = CostModel(fixed_us=11.0, tile_us=22.0, tile_rows=128, base_us=40.0,
                   tiers=(CostTier(above_mean_rows=128, fixed_us=0.5, tile_us=32.0,
                                   tile_rows=256, base_us=64.0),))  # fmt: skip


def test_tiers_pick_each_gpus_regime_by_its_mean_rows_per_slot() -> None:
    small, big = TIERED.at_mean(128.0), TIERED.at_mean(128.5)
    assert small.tiers == () and (small.fixed_us, small.tile_rows, small.base_us) == (11, 128, 40)
    assert big.tiers == () and (big.fixed_us, big.tile_rows, big.base_us) == (0.5, 256, 64)
    # [300, 0]: mean 150, the big tiles: 64 + 0.5 + 2 * 32; [200, 56]: mean 128, the small
    assert TIERED.gemm_time([300, 0]) == pytest.approx(64 + 0.5 + 2 * 32)
    assert TIERED.gemm_time([200, 56]) == pytest.approx(40 + 2 * 11 + 3 * 22)
    ranks = np.array([[[300, 0], [200, 56]], [[0, 0], [1, 1]]])
    want = [[TIERED.gemm_time(r) for r in step] for step in ranks]
    np.testing.assert_allclose(TIERED.rank_time(ranks), want)
    # a load's regime: its rows per step over L layers of P slots
    assert TIERED.for_load(np.full((2, 8), 150.0), 8) == big
    assert TIERED.for_load(np.full((2, 8), 150.0), 16) == small
    # a layer with no load yet does not pull the others' regime down
    assert TIERED.for_load(np.array([[150.0] * 8, [0.0] * 8]), 8) == big
    assert TIERED.for_load(np.zeros((2, 8)), 8) == small
    untiered = CostModel(fixed_us=1.0, tile_us=1.0)
    assert untiered.at_mean(1e6) is untiered and untiered.for_load([[1e6]], 1) is untiered
    assert TIERED.without_dispatch() == TIERED  # no row cost anywhere: the same model


def test_dispatch_cost_is_the_models_in_every_tier() -> None:
    """row_us (dispatch and combine) does not depend on the GEMM's tile shape: a serving
    model's dispatch cost holds above the tier's boundary too."""
    serving = replace(TIERED, row_us=0.5)
    assert serving.at_mean(128).row_us == serving.at_mean(129).row_us == 0.5
    t = serving.rank_time([[128] * 8, [129] * 8])
    assert t[1] > t[0]  # more rows, more dispatch: not 3x faster past the boundary
    assert t[1] - TIERED.rank_time([[129] * 8])[0] == pytest.approx(0.5 * 129 * 8)
    assert serving.without_dispatch() == TIERED


def test_tiers_json_round_trip_and_bad_tiers_refused() -> None:
    back = CostModel.from_json(TIERED.to_json())
    assert back == TIERED and back.tiers == TIERED.tiers
    d = json.loads(TIERED.to_json())
    assert d["schema_version"] == 2  # an old reader refuses it rather than misread it
    # the first tiered files wrote a row_us of 0 per tier: still read, as the model's
    old = {**d, "row_us": 0.25, "tiers": [{**d["tiers"][0], "row_us": 0.0}]}
    assert CostModel.from_dict(old) == replace(TIERED, row_us=0.25)
    assert json.loads(CostModel(fixed_us=1.0, tile_us=1.0).to_json())["schema_version"] == 1
    t = d["tiers"][0]
    for bad, msg in (
        ({**d, "tiers": {"above_mean_rows": 128}}, "must be a list"),
        ({**d, "tiers": [5]}, "tier 0 must be an object"),
        ({**d, "tiers": [{k: v for k, v in t.items() if k != "tile_rows"}]}, "lacks tile_rows"),
        ({**d, "tiers": [{**t, "speed": 2}]}, "unknown speed"),
        ({**d, "tiers": [{**t, "above_mean_rows": 0}]}, "above_mean_rows"),
        ({**d, "tiers": [{**t, "tile_us": -1}]}, "tile_us"),
        ({**d, "tiers": [t, {**t, "above_mean_rows": 64}]}, "ascend"),
        ({**d, "schema_version": 1}, "schema 1 cannot have tiers"),
        ({**d, "tiers": [{**t, "row_us": 0.3}]}, "row_us 0.3 differs"),
    ):
        with pytest.raises(ValueError, match=msg):
            CostModel.from_dict(bad)


def test_the_planner_plans_in_the_regime_of_its_load() -> None:
    G, P = 8, 72
    # 64 tokens per step (top-6): ~6 rows a slot, the small tiles; 8192: the big ones
    for tokens in (64, 8192):
        load = _skewed(3, 64, tokens * 6, seed=5)
        regime = TIERED.for_load(load, P)
        assert regime == TIERED.at_mean(tokens * 6 / P)
        got = plan_with_report(load, num_gpus=G, num_physical_experts=P, cost_model=TIERED)
        want = plan_with_report(load, num_gpus=G, num_physical_experts=P, cost_model=regime)
        assert got.layout == want.layout
        assert got.max_after.tolist() == pytest.approx(want.max_after.tolist())
        # the metrics use the same regime
        assert time_balance(load, got.layout, G, TIERED) == pytest.approx(
            time_balance(load, got.layout, G, regime)
        )
    # not vacuous: the big tiles' cheap read activates replicas the small tiles' leave idle
    load = _skewed(3, 64, 8192 * 6, seed=5)
    load[:, 7] = load.sum(axis=1) / 5
    kw = {"num_gpus": G, "num_physical_experts": P}
    assert plan(load, **kw, cost_model=TIERED) != plan(load, **kw, cost_model=TIERED.at_mean(0))


# --- metrics -----------------------------------------------------------------------------


def test_time_metrics_on_a_hand_worked_layout() -> None:
    m = CostModel(fixed_us=10.0, tile_us=1.0, tile_rows=4)
    # 2 GPUs x 2 slots; expert 0 on slots 0 and 2, expert 1 on slot 1, expert 2 on slot 3
    lay = Layout.from_phy2log([[0, 1, 0, 2]], 3)
    load = [[8.0, 4.0, 0.0]]  # rows per step
    # even split: slot 0 and 2 get 4 rows each: GPU 0 = (10 + 1) + (10 + 1), GPU 1 = 11 + 0
    t = gpu_times(load, lay, 2, m, sampling="exact")
    assert t.tolist() == [[22.0, 11.0]]
    assert time_balance(load, lay, 2, m, sampling="exact") == pytest.approx(22 / 16.5)
    assert activated_slots(load, lay, 2, sampling="exact").tolist() == [[2.0, 1.0]]
    # all of expert 0 on slot 2 (slot 0 idle): GPU 0 = 11, GPU 1 = 10 + 2
    idle = lay.with_share([[0, 1, 1, 1]])
    assert gpu_times(load, idle, 2, m, sampling="exact").tolist() == [[11.0, 12.0]]
    assert activated_slots(load, idle, 2, sampling="exact").tolist() == [[1.0, 1.0]]
    # counted over 4 steps: 2 rows per step on expert 0, 1 per replica: each read with
    # probability 1 - e^-1
    exp = activated_slots([[8.0, 0.0, 0.0]], lay, 2, steps=4)
    assert exp[0].tolist() == pytest.approx([1 - np.exp(-1), 1 - np.exp(-1)])
    with pytest.raises(ValueError, match="steps"):
        gpu_times(load, lay, 2, m, steps=0)
    with pytest.raises(ValueError, match="CostModel"):
        time_balance(load, lay, 2, "fast")  # type: ignore[arg-type]


# --- the time objective ------------------------------------------------------------------


def _check(res_layout: Layout, G: int, E: int, P: int) -> None:
    res_layout.validate_consistent()
    assert (res_layout.logcnt >= 1).all()
    table, count = res_layout.dispatch()
    assert (count >= 1).all()  # every expert has an active replica
    assert res_layout.dispatch_width <= P - E + 1


def test_decode_regime_leaves_replicas_idle_and_beats_token_balance() -> None:
    # 128 tokens per step over 64 experts (top-6): about 12 rows per expert, so a
    # replica is a second weight read for a handful of rows
    load = _skewed(6, 64, 128 * 6, seed=1)
    G, P = 8, 72
    res = plan_with_report(
        load, num_gpus=G, num_physical_experts=P, cost_model=V2, sampling="exact"
    )
    assert res.objective == "time" and res.unit == "us"
    _check(res.layout, G, 64, P)
    assert int(res.layout.active.sum()) < 6 * P  # idle replicas
    tok = plan(load, num_gpus=G, num_physical_experts=P)
    none = Layout.default(6, 64, P)

    def t(lay: Layout) -> float:
        return float(gpu_times(load, lay, G, V2, sampling="exact").max(dim=1).values.sum())

    assert t(res.layout) < t(tok) and t(res.layout) < t(none)
    assert float(res.max_after.sum()) == pytest.approx(t(res.layout))
    assert (res.max_after >= res.bound * (1 - 1e-9)).all()


def test_prefill_regime_activates_the_replicas_of_a_hot_expert() -> None:
    # 8192 tokens per step, one expert taking a fifth of the rows: more compute than one
    # GPU's share, so its replicas split it
    load = _skewed(4, 64, 8192 * 6, seed=2)
    load[:, 5] = load.sum(axis=1) / 4
    G, P = 8, 72
    res = plan_with_report(load, num_gpus=G, num_physical_experts=P, cost_model=V2)
    _check(res.layout, G, 64, P)
    assert (res.layout.active.sum(dim=1) > 64).all()
    assert ((res.layout.active & (res.layout.phy2log == 5)).sum(dim=1) > 1).all()
    tok = plan(load, num_gpus=G, num_physical_experts=P)

    def t(lay: Layout) -> float:
        return float(gpu_times(load, lay, G, V2).max(dim=1).values.sum())

    assert t(res.layout) <= t(tok) * (1 + 1e-9)


def test_prefill_regime_is_no_slower_than_token_balance() -> None:
    # reads are cheap beside the compute of 768 rows per expert, but still count: the
    # time plan may leave replicas idle, and is no slower than the rows plan
    load = _skewed(4, 64, 8192 * 6, seed=2)
    G, P = 8, 72
    res = plan_with_report(load, num_gpus=G, num_physical_experts=P, cost_model=V2)
    _check(res.layout, G, 64, P)
    tok = plan(load, num_gpus=G, num_physical_experts=P)
    t_res = float(gpu_times(load, res.layout, G, V2).max(dim=1).values.sum())
    assert t_res <= float(gpu_times(load, tok, G, V2).max(dim=1).values.sum())


def test_regime_change_toggles_activity_without_moving_weights() -> None:
    G, P = 8, 72
    prefill = _skewed(4, 64, 8192 * 6, seed=3)
    served = plan(prefill, num_gpus=G, num_physical_experts=P)  # every replica active
    assert served.share is None
    decode = prefill / 64.0  # the same experts, 64x fewer rows per step
    # moves priced out: a change of split alone, which moves nothing, still pays
    res = plan_with_report(decode, num_gpus=G, num_physical_experts=P, cost_model=V2,
                           previous=served, move_cost=100.0)  # fmt: skip
    assert res.changed.all() and res.total_moves == 0
    assert (~res.layout.active).any(dim=1).all()
    assert torch.equal(res.layout.phy2log, served.phy2log)
    assert (res.max_after < res.max_before).all()


def test_steps_scale_the_load_to_a_step() -> None:
    load = _skewed(2, 64, 64 * 6, seed=4)
    G, P = 8, 72
    one = plan(load, num_gpus=G, num_physical_experts=P, cost_model=V2)
    many = plan(load * 100, num_gpus=G, num_physical_experts=P, cost_model=V2, steps=100)
    assert one == many


def test_objective_arguments() -> None:
    load = np.ones((2, 8))
    kw = {"num_gpus": 2, "num_physical_experts": 10}
    assert plan_with_report(load, **kw).objective == "tokens"
    assert plan_with_report(load, **kw, cost_model=V2, objective="tokens").objective == "tokens"
    with pytest.raises(ValueError, match="needs a cost_model"):
        plan(load, **kw, objective="time")
    with pytest.raises(ValueError, match="unknown objective"):
        plan(load, **kw, objective="speed")
    with pytest.raises(ValueError, match="CostModel"):
        plan(load, **kw, cost_model={"fixed_us": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        plan(load, **kw, cost_model=V2, steps=-1)
    with pytest.raises(ValueError, match="sampling"):
        plan(load, **kw, cost_model=V2, sampling="gauss")


@st.composite
def _time_case(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int, float]:
    nodes = draw(st.sampled_from([1, 2]))
    G = nodes * draw(st.integers(1, 3))
    E = draw(st.integers(2, 12))
    S = max(1, -(-E // G)) + draw(st.integers(0, 2))
    L = draw(st.integers(1, 3))
    rows = draw(st.sampled_from([0.0, 3.0, 40.0, 400.0, 40000.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    w = rng.lognormal(0.0, 1.5, (L, E))
    w = w / w.sum(axis=1, keepdims=True) * rows * E
    return w, G, G * S, nodes, rows


@settings(max_examples=50, deadline=None)
@given(_time_case(), st.integers(0, 2**16))
def test_time_plans_are_valid_and_free_moves_never_end_worse_than_scratch(
    case: tuple[np.ndarray, int, int, int, float], seed: int
) -> None:
    w, G, P, N, _ = case
    L, E = w.shape
    kw = {"num_gpus": G, "num_physical_experts": P, "num_nodes": N, "cost_model": V2}
    rng = np.random.default_rng(seed)
    served = plan(w * rng.uniform(0.1, 3.0, w.shape), **kw)
    scratch = plan_with_report(w, **kw)
    res = plan_with_report(w, **kw, previous=served, move_cost=0, min_gain=0)
    for r in (scratch, res):
        _check(r.layout, G, E, P)
        t = gpu_times(w, r.layout, G, V2).max(dim=1).values
        assert torch.allclose(t, r.max_after, rtol=1e-9, atol=1e-9)
        assert (r.max_after >= r.bound * (1 - 1e-9) - 1e-9).all()
    assert (res.max_after <= scratch.max_after * (1 + 1e-9) + 1e-9).all()


@pytest.mark.parametrize("objective", ["tokens", "time"])
def test_a_weighted_previous_split_is_priced_as_served_and_kept_where_kept(objective: str) -> None:
    """A served layout may carry a weighted split (an operator's or an agent's): the plan
    prices it as served, and a layer it keeps keeps its split, in the layout and report."""
    # layer 0: expert 0's rows 2 : 1 over slots 4, 0; layer 1: the same placement, equal
    prev = Layout.from_phy2log(torch.tensor([[0, 1, 2, 3, 0, 1]] * 2), 4,
                               share=torch.tensor([[1, 1, 1, 1, 2, 1], [1] * 6]))  # fmt: skip
    w = torch.tensor([[400.0, 100.0, 200.0, 100.0]] * 2)
    model = CostModel(fixed_us=1.0, tile_us=1.0, tile_rows=16)
    kw: dict = {"num_gpus": 2, "num_physical_experts": 6, "previous": prev,
                "objective": objective, "move_cost": 10.0}  # fmt: skip
    if objective == "time":
        kw["cost_model"] = model
    res = plan_with_report(w, **kw)
    if objective == "time":
        served = gpu_times(w, prev, 2, model).max(dim=1).values.numpy()
    else:
        served = np.stack([_gpu_rows(w[i], prev, i) for i in range(2)]).max(axis=1)
    assert res.max_before.tolist() == pytest.approx(served.tolist())
    assert served[0] != served[1]  # the weighted split is what layer 0 is priced by
    # moving costs more than any gain here: every layer kept, each with its own split
    assert not res.changed.any() and int(res.moves.sum()) == 0
    assert torch.equal(res.layout.shares, prev.shares)
    # DeepSeek's policy splits evenly: the weighted layer counts as changed
    ds = plan_with_report(w, num_gpus=2, num_physical_experts=6, previous=prev,
                          policy="deepseek")  # fmt: skip
    assert bool(ds.changed[0])


def _gpu_rows(w: torch.Tensor, lay: Layout, layer: int) -> np.ndarray:
    """Rows of each of 2 GPUs (3 slots each) of one layer under the layout's shares."""
    p2l, sh = lay.phy2log[layer].numpy(), lay.shares[layer].numpy().astype(float)
    tot = np.bincount(p2l, weights=sh, minlength=w.shape[0])
    rows = w.numpy()[p2l] * sh / tot[p2l]
    return rows.reshape(2, 3).sum(axis=1)


def test_move_cost_must_be_finite() -> None:
    w = _skewed(2, 8, 400, seed=1)
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="move_cost"):
            plan_with_report(w, num_gpus=2, num_physical_experts=12, move_cost=bad)


def test_a_bad_weighted_split_is_replaced_without_moving_weights() -> None:
    """The even split of the same placement beats a served 2 : 1 split: taken, 0 moves."""
    prev = Layout.from_phy2log(torch.tensor([[0, 1, 2, 3, 0, 1]]), 4,
                               share=torch.tensor([[2, 1, 1, 1, 1, 1]]))  # fmt: skip
    w = torch.tensor([[400.0, 100.0, 200.0, 100.0]])
    res = plan_with_report(w, num_gpus=2, num_physical_experts=6, previous=prev,
                           objective="tokens", move_cost=10.0)  # fmt: skip
    assert res.max_before.tolist() == pytest.approx([400 * 2 / 3 + 50 + 200])
    assert bool(res.changed[0]) and int(res.moves.sum()) == 0
    assert res.layout.share is None and res.max_after.tolist() == pytest.approx([450.0])
