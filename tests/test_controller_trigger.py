"""The trigger policy: threshold, cooldown, data minimum, move budget, freeze, force, rollback.

The planner function is injected; here a small greedy planner written for the test (replica
counts by apportionment, then longest-processing-time placement) so the policy is tested on
its own. Every decision must carry a reason and per-layer figures.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from eplbd.controller import TriggerPolicy, decide, gpu_loads, rollback_decision, total_balance
from eplbd.layout import Layout

L, E, G, P = 3, 4, 3, 6


def toy_plan(
    load: torch.Tensor,
    *,
    num_gpus: int,
    num_physical_experts: int,
    num_nodes: int = 1,
    previous: Layout | None = None,
    policy: Any = None,
) -> Layout:
    Lx, Ex = load.shape
    S = num_physical_experts // num_gpus
    rows = []
    for layer in range(Lx):
        w = load[layer].tolist()
        r = [1] * Ex
        for _ in range(num_physical_experts - Ex):
            e = max((i for i in range(Ex) if r[i] < num_gpus), key=lambda i: (w[i] / r[i], -i))
            r[e] += 1
        items = sorted(
            ((w[e] / r[e], e) for e in range(Ex) for _ in range(r[e])), key=lambda t: (-t[0], t[1])
        )
        gpu_load = [0.0] * num_gpus
        slots: list[list[int]] = [[] for _ in range(num_gpus)]
        for wl, e in items:
            g = min(
                (g for g in range(num_gpus) if len(slots[g]) < S and e not in slots[g]),
                key=lambda g: (gpu_load[g], g),
                default=None,
            )
            if g is None:
                g = min(
                    (g for g in range(num_gpus) if len(slots[g]) < S), key=lambda g: gpu_load[g]
                )
            slots[g].append(e)
            gpu_load[g] += wl
        rows.append([e for s in slots for e in s])
    return Layout.from_phy2log(rows, Ex)


def balanced() -> torch.Tensor:
    """A load the default layout serves perfectly (experts 0 and 1 have two replicas)."""
    return torch.tensor([[20.0, 20.0, 10.0, 10.0]] * L, dtype=torch.float64)


def skewed(hot_layers: tuple[int, ...] = (0, 1, 2)) -> torch.Tensor:
    f = balanced()
    for layer in hot_layers:
        f[layer, 2] = 100.0
    return f


def run(**kw: Any) -> Any:
    args: dict[str, Any] = {
        "group": "g",
        "now": 1000.0,
        "wall": 5.0,
        "policy": TriggerPolicy(min_gain=0.05, cooldown_s=60.0, min_windows=2, min_tokens=10),
        "plan_fn": toy_plan,
        "current": Layout.default(L, E, P),
        "forecast": skewed(),
        "windows": 5,
        "tokens": 1000,
        "num_gpus": G,
    }
    args.update(kw)
    return decide(**args)


def test_skewed_load_is_rebalanced_with_figures() -> None:
    d = run()
    assert d.action == "prepare" and d.reason == "changed"
    assert d.changed_layers == [0, 1, 2]
    assert d.layout is not None
    assert d.balance_after < d.balance_now
    assert d.lower_bound <= d.balance_after + 1e-9
    # the figures of the new layout are recomputed, not copied from the plan
    assert d.balance_after == total_balance(gpu_loads(skewed(), d.layout.phy2log, G))
    for f in d.layers:
        assert f.changed and f.why == "changed" and f.moves > 0
        assert f.balance_planned < f.balance_now
    assert d.moves == sum(f.moves for f in d.layers)
    assert d.to_dict()["layers"][0]["why"] == "changed"


def test_only_layers_whose_gain_beats_the_threshold_change() -> None:
    d = run(forecast=skewed(hot_layers=(1,)))
    assert d.changed_layers == [1]
    assert d.layout is not None
    cur = Layout.default(L, E, P).phy2log
    assert torch.equal(d.layout.phy2log[0], cur[0]) and torch.equal(d.layout.phy2log[2], cur[2])
    whys = {f.layer: f.why for f in d.layers}
    assert whys[1] == "changed"
    assert whys[0] in ("gain_below_threshold", "no_moves")


def test_threshold_too_high_gives_no_gain_with_reasons() -> None:
    d = run(policy=TriggerPolicy(min_gain=10.0, min_windows=1))
    assert d.action == "none" and d.reason == "no_gain"
    assert "threshold" in d.message
    assert all(f.why == "gain_below_threshold" for f in d.layers)
    assert d.layout is None
    assert d.balance_now is not None and d.balance_planned is not None


def test_cooldown_blocks_auto_but_not_force() -> None:
    d = run(last_rebalance_at=1000.0 - 10.0)
    assert d.action == "none" and d.reason == "cooldown"
    assert "50.0 s left" in d.message
    assert len(d.layers) == L and d.balance_now is not None  # figures even when not acting
    assert run(last_rebalance_at=1000.0 - 60.0).action == "prepare"
    forced = run(last_rebalance_at=1000.0 - 10.0, force=True)
    assert forced.action == "prepare" and forced.trigger == "force"


def test_minimum_data_before_acting() -> None:
    assert run(windows=1).reason == "insufficient_data"
    assert run(tokens=5).reason == "insufficient_data"
    assert run(forecast=None).reason == "insufficient_data"
    assert run(windows=1, force=True).action == "prepare"


def test_move_budget_per_rank_picks_the_best_layers() -> None:
    full = run()
    per_layer_rank = [
        int((full.layout.phy2log[i] != Layout.default(L, E, P).phy2log[i]).view(G, -1).sum(1).max())
        for i in range(L)
    ]
    cap = max(per_layer_rank)  # room for one layer, not for all three
    d = run(policy=TriggerPolicy(min_gain=0.05, min_windows=1, max_moves_per_rank=cap))
    assert d.action == "prepare"
    assert 1 <= len(d.changed_layers) < L
    assert d.max_rank_moves <= cap
    assert any(f.why == "over_move_budget" for f in d.layers)
    moved = (d.layout.phy2log != Layout.default(L, E, P).phy2log).view(L, G, -1).sum(2).sum(0)
    assert int(moved.max()) <= cap


def test_budget_smaller_than_any_layer_is_reported() -> None:
    d = run(policy=TriggerPolicy(min_gain=0.05, min_windows=1, max_moves=1))
    assert d.action == "none" and d.reason == "over_move_budget"
    assert all(f.why == "over_move_budget" for f in d.layers)


def test_freeze_group_and_layers() -> None:
    assert run(frozen=True).reason == "frozen"
    assert run(frozen=True, force=True).reason == "frozen"
    d = run(frozen_layers=[0, 2])
    assert d.changed_layers == [1]
    assert {f.layer: f.why for f in d.layers}[0] == "frozen"


def test_blocked_groups_never_act_but_show_figures() -> None:
    for reason in ("pending_commit", "group_incomplete", "layout_unknown"):
        d = run(blocked=reason, force=True)
        assert d.action == "none" and d.reason == reason
        assert len(d.layers) == L


def test_force_on_some_layers_and_dry_run() -> None:
    d = run(force=True, layers=[2], dry_run=True)
    assert d.action == "dry_run" and d.changed_layers == [2]
    assert {f.layer: f.why for f in d.layers}[0] == "not_requested"
    assert d.layout is not None


def test_balanced_load_needs_nothing() -> None:
    d = run(forecast=balanced(), force=True)
    assert d.action == "none" and d.reason == "no_gain"


def test_rollback_decision() -> None:
    cur = run().layout
    assert cur is not None
    old = Layout.default(L, E, P)
    d = rollback_decision(
        group="g", wall=1.0, current=cur, target=old, target_epoch=3, forecast=skewed(), num_gpus=G
    )
    assert d.action == "prepare" and d.reason == "rollback" and d.trigger == "rollback"
    assert d.layout == old and d.target_epoch == 3
    assert d.moves == int((cur.phy2log != old.phy2log).sum())
    assert d.balance_after > d.balance_now  # going back to the default layout is worse here
    same = rollback_decision(
        group="g", wall=1.0, current=old, target=old, target_epoch=0, forecast=None, num_gpus=G
    )
    assert same.action == "none" and same.reason == "same_layout"
    assert same.layers[0].balance_now is None


def test_time_objective_measures_modelled_time_and_may_change_only_the_split() -> None:
    """Decode-like steps (a few rows per expert): in rows every GPU already has half of
    every expert, so the token objective sees nothing to gain; in time every GPU reads all
    four experts' weights each step, and idling one replica of each (no weights move)
    halves the reads. The gain, the figures and the bound are in time."""
    from eplbd.controller import TimeModel
    from eplbd.planner import default_cost_model, gpu_times, plan

    Lx, Ex, Px, Gx = 2, 4, 8, 2
    cur = Layout.default(Lx, Ex, Px)  # every expert once on each GPU
    load = torch.tensor([[40.0, 40, 40, 40], [80, 10, 10, 10]])  # rows over 10 steps
    tm = TimeModel(default_cost_model(2048, 1408), 10.0)
    args = dict(
        group="g", now=0.0, wall=0.0, policy=TriggerPolicy(min_gain=0.01, min_windows=1),
        plan_fn=plan, current=cur, forecast=load, windows=3, tokens=1000, num_gpus=Gx,
    )  # fmt: skip
    d = decide(**args)  # type: ignore[arg-type]
    assert d.objective == "tokens" and d.reason == "no_gain"
    d = decide(**args, time=tm)  # type: ignore[arg-type]
    assert d.objective == "time" and d.reason == "changed" and d.action == "prepare"
    assert d.moves == 0 and d.layout is not None and d.layout.share is not None
    assert torch.equal(d.layout.phy2log, cur.phy2log)
    assert all(f.changed and f.moves == 0 for f in d.layers)
    # the figures are the modelled times over the ideal mean time
    t_now = gpu_times(load, cur, Gx, tm.cost_model, steps=10.0)
    t_new = gpu_times(load, d.layout, Gx, tm.cost_model, steps=10.0)
    ideal = tm.ideal(load, Gx)
    assert d.balance_now == pytest.approx(float(t_now.max(dim=1).values.sum() / ideal.sum()))
    assert d.balance_after == pytest.approx(float(t_new.max(dim=1).values.sum() / ideal.sum()))
    assert d.balance_after < d.balance_now - 0.3
    assert 1.0 <= d.lower_bound <= d.balance_after + 1e-9  # type: ignore[operator]
    # a higher threshold than the modelled gain holds the layout
    args["policy"] = TriggerPolicy(min_gain=0.9, min_windows=1)
    assert decide(**args, time=tm).reason == "no_gain"  # type: ignore[arg-type]
    # rolling the split back is a change (no slot moves) measured in time too
    back = rollback_decision(
        group="g", wall=0.0, current=d.layout, target=cur, target_epoch=0,
        forecast=load, num_gpus=Gx, time=tm,
    )  # fmt: skip
    assert back.reason == "rollback" and back.moves == 0 and back.objective == "time"
    assert back.balance_after == pytest.approx(d.balance_now)
    assert back.balance_now == pytest.approx(d.balance_after)
