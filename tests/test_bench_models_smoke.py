"""The cost-model calibration and the one-GPU EP emulation benchmarks, small, on the CPU.

- the dispatch of the emulation is the kernel's: rows per slot equal ``map_and_record``
  called on each rank's own tokens;
- the calibration's fit recovers a model's constants from times it made;
- both benchmarks run end to end on the CPU with tiny sizes and write their JSON (the
  emulation also through a saved replay), leaving the docs alone; so do the long runs
  scored by the cost model (``bench_ep_regimes``), whose routing source cycles through
  its regimes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    bench_cost_model,
    bench_ep_emulation,
    bench_ep_regimes,
    bench_model_on_layouts,
    bench_slot_curve,
)
from benchmarks._ep_policies import (  # noqa: E402
    POLICIES,
    Schedule,
    _confirmed,
    _deepseek,
    _expected_max,
    _oracle,
    deepseek_interval,
    replay,
)
from benchmarks._ep_trace import (  # noqa: E402
    RegimeSource,
    dispatch_counts,
    esft_stream,
    step_ids,
)
from eplbd.kernels import map_and_record  # noqa: E402
from eplbd.layout import Layout  # noqa: E402
from eplbd.planner import CostModel, CostTier, plan_with_report  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"


def test_emulated_dispatch_is_the_kernel_per_rank() -> None:
    stream = esft_stream([3])
    G, P, T = 4, 72, 37
    default = Layout.default(1, 64, P)  # slots 64..71 repeat experts 0..7
    share = torch.ones(1, P, dtype=torch.int64)
    share[0, 64:68] = 0  # idle replicas
    share[0, 68:] = 2  # a 1 : 2 split
    shuffled = torch.randperm(P, generator=torch.Generator().manual_seed(1))[None] % 64
    for lay in (default, default.with_share(share), Layout.from_phy2log(shuffled, 64)):
        table, count = lay.dispatch()
        ids = step_ids(stream, 5, G, T)[:, :, 0]  # [G, T, K]
        want = torch.zeros(P, dtype=torch.int64)
        for g in range(G):  # every rank hashes its own token index
            map_and_record(torch.from_numpy(ids[g]), table[0], count[0], want, torch.ones(1))
        got = dispatch_counts(ids, table[0].numpy(), count[0].numpy(), P)
        assert got.tolist() == want.tolist()


def test_fit_recovers_the_constants() -> None:
    truth = CostModel(fixed_us=7.0, tile_us=3.0, tile_rows=64, base_us=20.0)
    wl = bench_cost_model.uniform_workloads(False) + bench_cost_model.random_workloads(60, 3, False)
    t = np.array([truth.gemm_time(w) for w in wl])
    base, fixed, tile = bench_cost_model.fit(wl, t, 64)
    assert (base, fixed, tile) == pytest.approx((20.0, 7.0, 3.0), rel=1e-6)
    errs = bench_cost_model.errors(truth, wl, t)
    assert errs["max_abs"] == pytest.approx(0.0, abs=1e-12)


def test_fit_recovers_each_tiers_constants() -> None:
    """A kernel with two tile shapes (the regime by a workload's mean rows per slot): the
    calibration's fit finds each regime's constants and tile size, where one regime's
    constants cannot fit both."""
    truth = CostModel(
        fixed_us=7.0, tile_us=3.0, tile_rows=64, base_us=20.0,
        tiers=(CostTier(above_mean_rows=128, fixed_us=1.0, tile_us=9.0, tile_rows=256,
                        base_us=30.0),),
    )  # fmt: skip
    fit_wl = bench_cost_model.uniform_workloads(False) + bench_cost_model.random_workloads(
        120, 3, False
    )
    hold = bench_cost_model.random_workloads(60, 4, False)
    sets = {
        bench_cost_model.FIT_SET: (fit_wl, np.array([truth.gemm_time(w) for w in fit_wl])),
        "held out: random": (hold, np.array([truth.gemm_time(w) for w in hold])),
    }
    shape = {"name": "x", "hidden": 64, "ffn": 32, "dtype": "bfloat16"}
    meta = {"device": "GPU", "dtype": "bfloat16", "torch": "t"}
    r = bench_cost_model.fit_sets(shape, sets, {}, (128.0,), meta)
    got = CostModel.from_dict(r["model"])
    assert (got.tile_rows, got.tiers[0].tile_rows, got.tiers[0].above_mean_rows) == (64, 256, 128)
    for a, b in ((got, truth), (got.tiers[0], truth.tiers[0])):
        assert (a.base_us, a.fixed_us, a.tile_us) == pytest.approx(
            (b.base_us, b.fixed_us, b.tile_us), rel=1e-6
        )
    held = r["sets"]["held out: random"]
    assert held["calibrated"]["max_abs"] == pytest.approx(0.0, abs=1e-9)
    assert held["one_regime"]["median_abs"] > 0.01  # one set of constants does not fit
    assert not CostModel.from_dict(r["one_regime"]).tiers
    with pytest.raises(ValueError, match="too few"):  # no workload above 1e6 rows a slot
        bench_cost_model.fit_sets(shape, sets, {}, (128.0, 1e6), meta)


@pytest.mark.slow
def test_calibration_and_emulation_run_on_the_cpu(tmp_path: Path) -> None:
    before = DOC.read_bytes() if DOC.exists() else None
    cm = tmp_path / "cm"
    assert (
        bench_cost_model.main(["--tiny", "--device", "cpu", "--reps", "1", "--out", str(cm)]) == 0
    )
    res = json.loads((cm / "cost_model.json").read_text())
    assert [r["shape"]["name"] for r in res["shapes"]] == ["DeepSeek-V2-Lite", "DeepSeek-V3"]
    for r in res["shapes"]:
        model = CostModel.from_dict(r["model"])
        assert model.source == "calibrated" and model.tile_rows in bench_cost_model.TILES
        assert any(k.startswith("held out: ESFT") for k in r["sets"])
        fitted = bench_cost_model.forms(r)
        assert [f["form"] for f in fitted] == list(bench_cost_model.FORMS)
        assert all(np.isfinite(f["traces"]) and f["fit"] >= 0 for f in fitted)
    assert bench_cost_model.main(["--forms", str(cm / "cost_model.json"), "--doc", "no"]) == 0
    # fitted again from the saved points: no tiers on the CPU (none timed there), then with
    # one, or refused where too few workloads lie above it
    refit = ["--refit", str(cm / "cost_model.json"), "--doc", "no", "--tiers"]
    again = bench_cost_model.refit(res, ())
    for r, a in zip(res["shapes"], again["shapes"], strict=True):  # the same constants
        assert CostModel.from_dict(a["model"]) == CostModel.from_dict(r["model"])
    assert bench_cost_model.main([*refit, "none"]) == 0
    for bad in ("1e9", "128,64", "fast", "inf", "nan", "0"):
        with pytest.raises(SystemExit):
            bench_cost_model.main([*refit, bad])
    emu = tmp_path / "emu"
    rep = tmp_path / "replays.npz"
    args = ["--tiny", "--device", "cpu", "--models", str(cm / "cost_model.json")]
    assert bench_ep_emulation.main([*args, "--save-replays", str(rep)]) == 0
    assert (
        bench_ep_emulation.main([*args, "--replays", str(rep), "--reps", "1", "--out", str(emu)])
        == 0
    )
    out = json.loads((emu / "ep_emulation.json").read_text())
    assert len(out["cases"]) == 2
    for case in out["cases"]:
        pol = case["policies"]
        assert set(pol) == set(POLICIES)
        assert all(p["ms_mean"] > 0 for p in pol.values())
        assert pol["none"]["moves"] == 0 and pol["deepseek-every-step"]["rebalances"] >= 1
    assert "an emulation" in bench_ep_emulation.render(out)
    assert (DOC.read_bytes() if DOC.exists() else None) == before


def test_slot_curve_runs_on_the_cpu(tmp_path: Path) -> None:
    before = DOC.read_bytes() if DOC.exists() else None
    argv = ["--tiny", "--device", "cpu", "--reps", "1", "--shapes", "v3", "--out", str(tmp_path)]
    assert bench_slot_curve.main(argv) == 0
    res = json.loads((tmp_path / "slot_curve.json").read_text())
    (r,) = res["shapes"]
    assert len(r["us"]) == len(r["tags"]) == len(r["us_again"]) and min(r["us"]) > 0
    spread = bench_slot_curve.rank_spread(r, CostModel.from_dict(r["model"]))
    assert spread and all(0 < s["picked_over_slowest"] <= 1.0 for s in spread)
    assert all(s["measured_max_over_mean"] >= 1.0 for s in spread)
    assert "| 5 of 5 |" in bench_slot_curve.render(res)
    assert (DOC.read_bytes() if DOC.exists() else None) == before


def test_regime_source_cycles_and_repeats() -> None:
    regimes = (np.zeros((50, 1, 2), np.int64), np.ones((50, 1, 2), np.int64))
    src = RegimeSource("t", regimes, num_experts=4, regime_steps=3, warmup=2, contiguous=False)
    # warm-up from the last regime, then the regimes in turn
    assert [src.regime(s) for s in range(10)] == [1, 1, 0, 0, 0, 1, 1, 1, 0, 0]
    assert (src.ids(2, 2, 5) == 0).all() and (src.ids(5, 2, 5) == 1).all()
    assert src.ids(7, 4, 3).shape == (4, 3, 1, 2)
    assert np.array_equal(src.ids(7, 4, 3), src.ids(7, 4, 3))  # every policy sees one step
    assert deepseek_interval("deepseek-every-19-window-6", 8) == (19, 6)
    assert deepseek_interval("deepseek-every-N", 8) == (8, 8)
    assert deepseek_interval("deepseek-every-5", 8) == (5, 5)


@pytest.mark.slow
def test_long_runs_scored_by_the_cost_model_on_the_cpu(tmp_path: Path) -> None:
    before = DOC.read_bytes() if DOC.exists() else None
    out = tmp_path / "regimes.json"
    assert bench_ep_regimes.main(["--tiny", "--workers", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["scored"] == "cost model, CPU" and len(res["cases"]) == 2
    for case in res["cases"]:
        s = case["summary"]
        assert s["moves"]["none"] == 0 and s["moves"]["deepseek-every-1"] > 0
        assert all(t > 0 for t in s["time_us"].values())
        # perfect knowledge (plans of the step itself) beats the engines' default layout
        assert 0 < s["perfect_us"] < s["time_us"]["none"]
        assert set(s["vs"]) == set(s["schedules"])
        t, oracle = s["time_us"], s["time_us"]["oracle-regime"]
        for label, p in s["schedules"].items():
            got = s["vs"][label]["eplbd-time"]["closed_reachable"]
            if t[p] > oracle:
                assert got == pytest.approx((t[p] - t["eplbd-time"]) / (t[p] - oracle))
    assert (DOC.read_bytes() if DOC.exists() else None) == before


def test_the_verdict_names_what_the_regime_oracle_itself_closes() -> None:
    """The ceiling beside each schedule's verdict: (DS - oracle) / (DS - perfect), the median
    and worst over the cases at EP >= 16 (EP 8 left out), none without an oracle."""
    from types import SimpleNamespace

    def case(G: int, ds: float, oracle: float | None) -> dict:
        t = {"none": 130.0, "deepseek-every-7": ds, "eplbd-time": 95.0}
        if oracle is not None:
            t["oracle-regime"] = oracle
        vs = {"eplbd-time": {"closed": 0.5, "closed_reachable": None, "moves_ratio": 0.1,
                             "steady_moves_ratio": 0.1}}  # fmt: skip
        summary = {"time_us": t, "perfect_us": 80.0,
                   "schedules": {"v": "deepseek-every-7", "s": "deepseek-every-7"},
                   "vs": {"v": vs, "s": vs}}  # fmt: skip
        return {"case": SimpleNamespace(G=G), "summary": summary}

    res = [
        case(16, 100.0, 90.0),
        case(32, 120.0, 90.0),
        case(64, 100.0, 99.0),
        case(8, 100.0, 80.0),
    ]
    line = bench_ep_regimes.verdict(res, "v", "s")[0]
    assert "the regime oracle itself closes median 50% of the gap (worst 5%)" in line
    assert "itself closes" not in bench_ep_regimes.verdict([case(16, 100.0, None)], "v", "s")[0]


def _two_regimes(
    regime_steps: int, warmup: int
) -> tuple[RegimeSource, tuple[np.ndarray, np.ndarray], CostModel]:
    """Two regimes of 16 experts, one layer, top-2 (zipf, a fixed seed) whose popular experts
    differ; a small cost model."""
    rng = np.random.default_rng(0)
    hot = [np.minimum(rng.zipf(1.6, (400, 1, 2)) - 1, 15) for _ in range(2)]
    regimes = (hot[0], 15 - hot[1])
    src = RegimeSource("t", regimes, num_experts=16, regime_steps=regime_steps, warmup=warmup,
                       contiguous=False)  # fmt: skip
    return src, regimes, CostModel(fixed_us=5.0, tile_us=2.0, tile_rows=16)


def test_regime_oracle_plans_each_regime_on_its_own_mean() -> None:
    """The oracle serves one layout per regime (changing at the boundary, warm-up steps in
    the last regime), each layer no slower in expectation on the regime's mean than either
    DeepSeek's or eplbd's plan of that mean."""
    src, regimes, model = _two_regimes(regime_steps=3, warmup=2)
    G, P, step_tokens, cache = 4, 24, 4 * 32, {}
    lay = [_oracle(src, s, cache, step_tokens, model, G, P) for s in range(8)]
    assert lay[0] is lay[1] and lay[1] is lay[5] and lay[2] is lay[4] and lay[2] is not lay[1]
    assert not torch.equal(lay[2].phy2log, lay[5].phy2log)
    for r, pool in enumerate(regimes):
        mean = np.bincount(pool[:, 0].ravel(), minlength=16)[None] * (step_tokens / len(pool))
        ds = _deepseek(mean.astype(float), P, G, 16)
        ep = plan_with_report(
            mean.astype(float), num_gpus=G, num_physical_experts=P, cost_model=model
        ).layout
        mine = _expected_max(cache[(r, 0.0)], mean.astype(float), model, G)
        best = np.minimum(_expected_max(ds, mean, model, G), _expected_max(ep, mean, model, G))
        assert mine == pytest.approx(best)
    with pytest.raises(ValueError, match="RegimeSource"):
        _oracle(esft_stream([3]), 0, {}, step_tokens, model, G, P)


def test_regime_oracle_plans_a_drifting_step_on_its_mix() -> None:
    """While the traffic drifts the oracle plans each step on its expected load: the two
    regimes' means weighted by the step's share of each; after the drift, the regime's own
    mean again."""
    src, regimes, model = _two_regimes(regime_steps=4, warmup=2)
    src = RegimeSource("t", regimes, num_experts=16, regime_steps=4, warmup=2,
                       contiguous=False, blend_steps=2)  # fmt: skip
    G, P, step_tokens, cache = 4, 24, 4 * 32, {}
    means = [np.bincount(pool[:, 0].ravel(), minlength=16)[None].astype(float)
             * (step_tokens / len(pool)) for pool in regimes]  # fmt: skip
    mixes = [src.mix(s) for s in range(8)]
    assert [r for r, _ in mixes] == [1, 1, 0, 0, 0, 0, 1, 1]
    assert [old for _, old in mixes] == pytest.approx([0, 0, 2 / 3, 1 / 3, 0, 0, 2 / 3, 1 / 3])
    lay = [_oracle(src, s, cache, step_tokens, model, G, P) for s in range(8)]
    assert lay[4] is lay[5] and lay[2] is not lay[3] and lay[3] is not lay[4]
    for s, (r, old) in enumerate(src.mix(s) for s in range(8)):
        mix = (1 - old) * means[r] + old * means[1 - r]
        ds = _deepseek(mix, P, G, 16)
        ep = plan_with_report(mix, num_gpus=G, num_physical_experts=P, cost_model=model).layout
        best = np.minimum(_expected_max(ds, mix, model, G), _expected_max(ep, mix, model, G))
        assert _expected_max(lay[s], mix, model, G) == pytest.approx(best)


def test_incremental_regime_oracle_moves_only_at_regime_changes() -> None:
    src, _, model = _two_regimes(regime_steps=3, warmup=2)
    sched = Schedule(warmup=2, steps=9)
    rep = replay(src, 4, 24, 32, model, sched, policies=("none", "oracle-regime-incremental"))
    changes = rep.changes["oracle-regime-incremental"]
    assert changes and all(step % 3 == 0 for step, _ in changes)  # timed regimes start at 0, 3, 6
    assert rep.changes["none"] == []


def test_long_runs_plan_with_the_named_cards_calibration() -> None:
    """Each stored card's calibration can plan and score; a card with none is refused with the
    cards that have one, never silently replaced by another's."""
    cards = bench_ep_regimes.calibrated_cards()
    assert bench_ep_regimes.CALIBRATED_ON in cards
    for card in cards:
        models = bench_ep_regimes.stored_models(card)
        assert {m.device for m in models.values()} == {models["v3"].device}
        assert bench_cost_model.device_slug(models["v3"].device) == card
    with pytest.raises(SystemExit, match="no calibration for 'nvidia-b300'.*nvidia-h200"):
        bench_ep_regimes.stored_models("nvidia-b300")


def test_the_confirmation_experiment_keeps_only_layers_that_win_on_the_slow_forecast() -> None:
    """bench_ep_regimes --confirm-half-life: a plan for a hot expert is kept where the slow
    forecast sees that expert hot too, and dropped where it sees the load even (where the
    served layout is already balanced)."""
    model = CostModel(fixed_us=1.0, tile_us=4.0, tile_rows=16)
    sched = Schedule(min_gain=0.005, move_cost=0.35)
    cur = Layout.default(2, 4, 6)  # GPU 0: experts 0 1 2, GPU 1: 3 0 1
    hot = np.array([[10.0, 10.0, 400.0, 10.0]] * 2)
    even = np.array([[64.0, 64.0, 128.0, 128.0]] * 2)  # 192 rows on each GPU as served
    new = plan_with_report(torch.from_numpy(hot), num_gpus=2, num_physical_experts=6,
                           previous=cur, cost_model=model, min_gain=0.0, move_cost=0.0).layout  # fmt: skip
    assert not torch.equal(new.phy2log, cur.phy2log)
    assert _confirmed(cur, new, hot, model, sched, 2) is new
    assert _confirmed(cur, new, even, model, sched, 2) is None
    mixed = _confirmed(cur, new, np.stack([hot[0], even[1]]), model, sched, 2)
    assert mixed is not None
    assert torch.equal(mixed.phy2log[0], new.phy2log[0])
    assert torch.equal(mixed.phy2log[1], cur.phy2log[1])


def test_regime_forecast_replans_after_each_switch_and_moves_less_than_the_ewma() -> None:
    """eplbd-regime (RegimeMean: the mean since the last detected change) on regimes of 6
    steps: a new layout within two steps of each switch, fewer slots moved than eplbd-time
    (EWMA) on the same steps (a fixed seed: deterministic)."""
    src, _, model = _two_regimes(regime_steps=6, warmup=4)
    sched = Schedule(warmup=4, steps=24)
    rep = replay(src, 4, 24, 64, model, sched, policies=("eplbd-time", "eplbd-regime"))
    steps = [st for st, _ in rep.changes["eplbd-regime"]]
    for switch in (6, 12, 18):
        assert any(switch <= st <= switch + 2 for st in steps), (switch, steps)
    moved = {p: sum(m for _, m in c) for p, c in rep.changes.items()}
    assert 0 < moved["eplbd-regime"] < moved["eplbd-time"], moved


def test_regime_source_blends_a_drift() -> None:
    """--blend: in the first blend_steps of a regime a token (decode) or a rank's prompt
    (prefill) still comes from the previous regime, with a share falling linearly; without
    it the steps are the same as before the option existed."""
    regimes = (np.zeros((400, 1, 1), np.int64), np.ones((400, 1, 1), np.int64))
    kw = {"num_experts": 2, "regime_steps": 8, "warmup": 2}
    plain = RegimeSource("t", regimes, contiguous=False, **kw)  # type: ignore[arg-type]
    drift = RegimeSource("t", regimes, contiguous=False, blend_steps=8, **kw)  # type: ignore[arg-type]
    # regime 1 (all ones) from step 10: the share of ones rises across the drift
    share = [float(drift.ids(s, 16, 64).mean()) for s in range(10, 18)]
    want = [(i + 1) / 9 for i in range(8)]
    assert all(abs(a - b) < 0.06 for a, b in zip(share, want, strict=True)), share
    assert float(drift.ids(1, 16, 64).mean()) == 1.0  # warm-up: the last regime, no blend
    same = RegimeSource("t", regimes, contiguous=False, blend_steps=0, **kw)  # type: ignore[arg-type]
    assert all(np.array_equal(plain.ids(s, 4, 8), same.ids(s, 4, 8)) for s in range(20))
    # prefill-like: each rank's prompt comes whole from one regime
    pre = RegimeSource("t", regimes, contiguous=True, blend_steps=8, **kw)  # type: ignore[arg-type]
    ids = pre.ids(13, 32, 16)
    per_rank = ids.reshape(32, -1).mean(axis=1)
    assert set(per_rank.tolist()) <= {0.0, 1.0} and 0 < per_rank.mean() < 1


def test_regime_forecast_follows_a_drift_in_the_replay() -> None:
    """Traffic drifting all the time (--blend 1): with its drift test the regime forecast
    replans inside the drifts and is faster (modelled) than without it (a fixed seed)."""
    src, _, model = _two_regimes(regime_steps=16, warmup=4)
    src = RegimeSource("t", src.regimes, num_experts=16, regime_steps=16, warmup=4,
                       contiguous=False, blend_steps=16)  # fmt: skip
    t, inside = {}, {}
    for name, scales in (("drift test", None), ("none", ())):
        sched = Schedule(warmup=4, steps=48, drift_scales=scales)
        rep = replay(src, 4, 24, 64, model, sched, policies=("eplbd-regime",))
        t[name] = float(rep.modelled["eplbd-regime"].sum(axis=1).mean())
        inside[name] = sum(1 for st, _ in rep.changes["eplbd-regime"] if st % 16 >= 4)
    assert inside["drift test"] > inside["none"], inside
    assert t["drift test"] < t["none"], t


def test_gemm_timer_shuffles_the_order_and_keeps_each_time_with_its_workload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPU's clock wanders over a run, so workloads are timed in a random order (each
    policy's steps spread over the run); every time must still come back at its workload's
    place. A fake clock advances by a workload's rows in each call: its time is its rows."""
    from benchmarks import _gemm_timer
    from benchmarks._gemm_timer import ExpertShape, GemmTimer, drift_summary

    wl = [[r, 0, 1] for r in range(1, 80)] + [[0, 0, 0]]
    timer = GemmTimer(ExpertShape("t", 8, 4), 3, 100, "cpu")
    now = [0.0]
    calls: list[list[int]] = []

    def fake_call(counts: list[int], offs: object) -> None:
        calls.append(list(counts))
        now[0] += sum(counts) * 1e-6

    monkeypatch.setattr(timer, "_call", fake_call)
    monkeypatch.setattr(_gemm_timer.time, "perf_counter", lambda: now[0])
    busy = [w for w in wl if sum(w)]
    for order in _gemm_timer.TIMING_ORDERS:
        calls.clear()
        got = timer.time(wl, reps=2, warmup=0, order=order)
        assert got == pytest.approx([float(sum(w)) for w in wl])  # with its workload, 0 idle
        first, second = calls[: len(busy)], calls[len(busy) :]
        assert sorted(first) == sorted(second) == sorted(busy)
        if order == "given":
            assert first == second == busy
        else:  # each run its own order, neither the given one
            assert first != busy and second != busy and first != second
        assert timer.sentinel_us == []
    # a sentinel (the workload of median rows) ahead of every batch of 32: 3 a run
    calls.clear()
    got = timer.time(wl, reps=2, warmup=0, sentinel_every=1)
    assert got == pytest.approx([float(sum(w)) for w in wl])
    probe = sorted(busy, key=sum)[len(busy) // 2]
    assert timer.sentinel_us == pytest.approx([float(sum(probe))] * 6)
    assert len(calls) == 2 * len(busy) + 6
    d = drift_summary([10.0] * 5 + [11.0] * 5)
    assert d is not None and d["last_over_first"] == pytest.approx(1.1)
    assert (d["tenth_min"], d["tenth_max"]) == pytest.approx((10 / 10.5, 11 / 10.5))
    assert drift_summary([1.0] * 9) is None
    with pytest.raises(ValueError, match="order"):
        timer.time(wl, order="policy")


def test_measured_long_runs_save_every_workloads_time_on_the_cpu(tmp_path: Path) -> None:
    """``--measure --save-timings``: every distinct workload of the run and its time, per
    shape, and the clock's sentinel in the report (CPU, tiny shapes: wall-clock times)."""
    out, tim = tmp_path / "r.json", tmp_path / "t.npz"
    argv = ["--tiny", "--workers", "1", "--measure", "--reps", "1", "--json", str(out)]
    assert bench_ep_regimes.main([*argv, "--save-timings", str(tim)]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert meta["timing_order"] == "shuffled" and "random order" in meta["how"]
    assert ("CUDA events" in meta["how"]) == torch.cuda.is_available()  # the CPU: wall clock
    cases = json.loads(out.read_text())["cases"]
    with np.load(tim) as z:
        shapes = {k.split("/")[0] for k in z.files if k.endswith("/us")}
        assert shapes == set(meta["drift"]) == {"DeepSeek-V2-Lite", "DeepSeek-V3"}
        for s in shapes:
            w, us = z[f"{s}/workloads"], z[f"{s}/us"]
            assert w.ndim == 2 and len(w) == len(us) > 0 and (w >= -1).all()
            rows = np.where(w > 0, w, 0).sum(axis=1)
            assert ((us > 0) == (rows > 0)).all()  # an idle rank takes no time
            assert len({tuple(r) for r in w.tolist()}) == len(w)  # each timed once
        # each case's policies point at the workloads they ran: the report's measured time
        # per step is the slowest of those ranks' times, summed over layers
        for c in cases:
            key = f"EP{c['case']['G']}-{c['case']['shape']}-{c['case']['tokens']}"
            s = str(z[f"{key}/shape"])
            w, us = z[f"{s}/workloads"], z[f"{s}/us"]
            for p, t in c["summary"]["time_us"].items():
                where = z[f"{key}/{p}"]
                assert where.ndim == 3 and where.shape[2] == c["case"]["G"]
                assert (where >= 0).all() and (where < len(w)).all()
                slots = (w[where] >= 0).sum(axis=-1)
                assert (slots == c["case"]["P"] // c["case"]["G"]).all()
                assert us[where].max(axis=2).sum(axis=1).mean() == pytest.approx(t)
    with pytest.raises(SystemExit):
        bench_ep_regimes.main(["--tiny", "--save-timings", str(tim)])
    # the saved file is what bench_model_on_layouts reads (here priced by a stored card)
    assert bench_model_on_layouts.main([str(tim)]) == 0


def test_model_on_layouts_prices_each_policys_steps(tmp_path: Path, capsys: Any) -> None:
    """Measured and modelled step times per policy from saved timings: the slowest rank per
    layer, summed; the error on the rank the model calls slowest; active slots."""
    model = CostModel(fixed_us=10.0, tile_us=20.0, tile_rows=128, base_us=40.0,
                      hidden=7168, ffn=2048)  # fmt: skip
    (tmp_path / "m.json").write_text(model.to_json())
    w = np.array([[64, 64, 0], [128, 64, 64], [300, -1, -1], [32, 32, 32]], dtype=np.int32)
    rows = np.where(w > 0, w, 0).astype(np.float64)
    pred = np.array([model.rank_time(rows[i : i + 1, : (w[i] >= 0).sum()])[0] for i in range(4)])
    # the token objective's ranks take what the model says; workload 2, the time
    # objective's slowest rank by the model, takes 10% more
    us = pred.copy()
    us[2] *= 1.1
    np.savez(
        tmp_path / "t.npz",
        **{"DeepSeek-V3/workloads": w, "DeepSeek-V3/us": us, "EP2-v3-64/shape": np.array("DeepSeek-V3"),
           # [steps, layers, G]: two steps of one layer on two ranks
           "EP2-v3-64/eplbd-tokens": np.array([[[0, 1]], [[1, 3]]]),
           "EP2-v3-64/eplbd-time": np.array([[[2, 0]], [[2, 0]]])},
    )  # fmt: skip
    with np.load(tmp_path / "t.npz") as z:
        got = bench_model_on_layouts.score(z, {"v3": model})["EP2-v3-64"]
    tok, tim = got["eplbd-tokens"], got["eplbd-time"]
    assert tok["modelled_us"] == pytest.approx((max(pred[0], pred[1]) + max(pred[1], pred[3])) / 2)
    assert tok["ratio"] == pytest.approx(1.0) and tok["slowest_error"] == pytest.approx(0.0)
    assert tok["active"] == pytest.approx((2 + 3 + 3 + 3) / 4)
    assert pred[2] > pred[0]  # the model calls workload 2 the slowest of the time objective's
    assert tim["measured_us"] == pytest.approx(1.1 * pred[2])
    assert tim["ratio"] == pytest.approx(1.1) and tim["slowest_error"] == pytest.approx(0.1)
    argv = [str(tmp_path / "t.npz"), "--model", str(tmp_path / "m.json")]
    assert bench_model_on_layouts.main(argv) == 0
    assert "measured / modelled +10.0% against the token objective's" in capsys.readouterr().out
    # a serving model's per-row dispatch cost is left out: the saved times are GEMMs alone
    (tmp_path / "d.json").write_text(replace(model, row_us=0.5).to_json())
    assert (
        bench_model_on_layouts.main([str(tmp_path / "t.npz"), "--model", str(tmp_path / "d.json")])
        == 0
    )
    assert (
        "| eplbd-time | " + f"{1.1 * pred[2]:.1f} | {pred[2]:.1f} | 1.100 |"
        in capsys.readouterr().out
    )
    with pytest.raises(SystemExit, match="no such file"):
        bench_model_on_layouts.main([str(tmp_path / "absent.npz")])
    other = CostModel(fixed_us=1.0, tile_us=2.0, hidden=2048, ffn=1408)  # V2-Lite's shape
    (tmp_path / "o.json").write_text(other.to_json())
    with pytest.raises(SystemExit, match="no cost model of 'DeepSeek-V3'"):
        bench_model_on_layouts.main([str(tmp_path / "t.npz"), "--model", str(tmp_path / "o.json")])
