"""Windows, EWMA forecast, physical -> logical conversion, and the balance figures."""

from __future__ import annotations

import itertools

import pytest
import torch

from eplbd.controller import (
    LoadWindow,
    balance,
    gpu_loads,
    logical_load,
    lower_bound_balance,
    total_balance,
)
from eplbd.layout import Layout


def test_logical_load_sums_replicas_with_the_given_layout() -> None:
    # E = 3, P = 4: slot 3 is a second replica of expert 0 in layout a, of expert 2 in b
    a = torch.tensor([[0, 1, 2, 0]])
    b = torch.tensor([[0, 1, 2, 2]])
    counts = torch.tensor([[5, 7, 11, 13]], dtype=torch.int32)
    assert logical_load(counts, a, 3).tolist() == [[18.0, 7.0, 11.0]]
    assert logical_load(counts, b, 3).tolist() == [[5.0, 7.0, 24.0]]
    assert logical_load(counts, a, 3).dtype == torch.float64
    with pytest.raises(ValueError):
        logical_load(counts, torch.tensor([[0, 1, 2]]), 3)


def test_window_closes_buckets_and_updates_the_ewma() -> None:
    w = LoadWindow(1, 2, window_s=10.0, num_windows=2, alpha=0.5)
    assert w.forecast() is None and w.best_estimate() is None
    w.add(torch.tensor([[4.0, 0.0]]), 4, now=0.0)
    assert w.best_estimate() is not None  # the open bucket, before any closes
    assert w.roll(9.9) == 0 and w.windows == 0
    w.add(torch.tensor([[2.0, 2.0]]), 4, now=9.0)
    assert w.next_close() == 10.0
    assert w.roll(10.0) == 1
    assert w.forecast().tolist() == [[6.0, 2.0]]
    w.add(torch.tensor([[0.0, 8.0]]), 8, now=20.0)
    w.roll(31.0)
    # f = 0.5 * [0, 8] + 0.5 * [6, 2]
    assert w.forecast().tolist() == [[3.0, 5.0]]
    assert w.windows == 2 and w.tokens == 16
    w.add(torch.tensor([[1.0, 1.0]]), 2, now=40.0)
    w.roll(50.0)
    assert w.windows == 2  # the oldest bucket left the sliding window
    assert w.window_sum().tolist() == [[1.0, 9.0]]
    assert w.closed == 3 and w.snapshots == 4


def test_empty_buckets_do_not_move_the_forecast() -> None:
    w = LoadWindow(1, 2, window_s=1.0, num_windows=4, alpha=0.5)
    w.add(torch.tensor([[1.0, 3.0]]), 4, now=0.0)
    w.roll(1.0)
    before = w.forecast()
    w.add(torch.zeros(1, 2), 0, now=2.0)
    assert w.roll(5.0) == 0
    assert torch.equal(w.forecast(), before)
    assert w.windows == 1


def test_window_checks_shapes_and_parameters() -> None:
    w = LoadWindow(2, 3, window_s=1.0, num_windows=1, alpha=1.0)
    with pytest.raises(ValueError):
        w.add(torch.zeros(3, 2), 0, now=0.0)
    with pytest.raises(ValueError):
        LoadWindow(1, 1, window_s=0.0, num_windows=1, alpha=0.5)
    with pytest.raises(ValueError):
        LoadWindow(1, 1, window_s=1.0, num_windows=1, alpha=0.0)


def test_balance_splits_an_expert_over_its_replicas() -> None:
    # G = 2, S = 2. Expert 0 (load 8) has two replicas, one per GPU.
    lay = Layout.from_phy2log([[0, 1, 0, 2]], 3)
    load = torch.tensor([[8.0, 2.0, 6.0]])
    g = gpu_loads(load, lay.phy2log, 2)
    assert g.tolist() == [[6.0, 10.0]]
    assert balance(g).tolist() == [pytest.approx(10.0 / 8.0)]
    assert total_balance(g) == pytest.approx(10.0 / 8.0)
    assert balance(torch.zeros(1, 2)).tolist() == [1.0]


def _brute_lower_bound(w: list[float], G: int, P: int) -> float:
    E = len(w)
    best = float("inf")
    for r in itertools.product(range(1, G + 1), repeat=E):
        if sum(r) != P:
            continue
        best = min(best, max(x / k for x, k in zip(w, r, strict=True)))
    mean = sum(w) / G
    return max(mean, best) / mean


@pytest.mark.parametrize("seed", range(6))
def test_lower_bound_matches_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    E, G, P = 4, 3, 6
    load = torch.randint(0, 50, (2, E), generator=gen).to(torch.float64) + 1
    lb = lower_bound_balance(load, G, P)
    for layer in range(2):
        want = _brute_lower_bound(load[layer].tolist(), G, P)
        assert lb[layer].item() == pytest.approx(want)


def test_no_layout_beats_the_lower_bound() -> None:
    gen = torch.Generator().manual_seed(1)
    E, G, P = 4, 2, 6
    load = torch.randint(1, 30, (1, E), generator=gen).to(torch.float64)
    lb = lower_bound_balance(load, G, P).item()
    best = float("inf")
    for row in itertools.product(range(E), repeat=P):
        if len(set(row)) < E:
            continue
        bal = balance(gpu_loads(load, torch.tensor([row]), G)).item()
        best = min(best, bal)
    assert best >= lb - 1e-9


def test_physical_counts_are_converted_per_epoch_when_the_bucket_closes() -> None:
    a = torch.tensor([[0, 1, 2, 0]])
    b = torch.tensor([[0, 1, 2, 2]])
    w = LoadWindow(1, 3, window_s=1.0, num_windows=2, alpha=1.0)
    c1 = torch.tensor([[1, 2, 3, 4]], dtype=torch.int32)
    c2 = torch.tensor([[10, 20, 30, 40]], dtype=torch.int64)
    w.add_counts(0, a, c1, 10, now=0.0)
    w.add_counts(0, a, c1, 10, now=0.1)
    w.add_counts(1, b, c2, 100, now=0.2)
    want = logical_load(c1 * 2, a, 3) + logical_load(c2, b, 3)
    assert torch.equal(w.best_estimate(), want)
    w.roll(1.0)
    assert torch.equal(w.forecast(), want) and w.tokens == 120


def test_int32_accumulation_never_overflows() -> None:
    p2l = torch.tensor([[0, 1]])
    w = LoadWindow(1, 2, window_s=1.0, num_windows=1, alpha=1.0)
    big = 2**31 - 10
    c = torch.tensor([[big, 1]], dtype=torch.int32)
    for _ in range(3):
        w.add_counts(0, p2l, c, big, now=0.0)
    w.roll(1.0)
    assert w.forecast().tolist() == [[3.0 * big, 3.0]]


def test_public_surface_is_honest() -> None:
    import subprocess
    import sys

    import eplbd.controller as c

    assert c.__all__ == sorted(c.__all__)
    assert set(c.__all__) == set(c._EXPORTS)
    for name in c.__all__:
        assert getattr(c, name) is not None
    # the settings (and so `eplbd planner --help` and exit 78) need neither torch nor zmq
    code = (
        "import sys, eplbd.controller, eplbd.controller._settings as s; "
        "s.check_planner_settings(s.PlannerSettings()); "
        "assert 'torch' not in sys.modules and 'zmq' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_state_and_restore_carry_the_forecast_over() -> None:
    w = LoadWindow(2, 3, window_s=1.0, num_windows=3, alpha=0.5)
    for i in range(5):
        w.add(torch.tensor([[1.0 + i, 2.0, 3.0], [0.0, 1.0, 5.0 * i]]), 10 + i, float(i))
    w.roll(10.0)
    st = w.state()
    assert len(st.buckets) == 3 and st.bucket_tokens == [12, 13, 14]
    fresh = LoadWindow(2, 3, window_s=1.0, num_windows=3, alpha=0.5)
    assert fresh.restore(st) == 3
    assert torch.equal(fresh.forecast(), w.forecast())
    assert torch.equal(fresh.window_sum(), w.window_sum())
    assert (fresh.windows, fresh.tokens) == (w.windows, w.tokens)
    # a smaller window keeps the newest buckets; the forecast is the same
    small = LoadWindow(2, 3, window_s=1.0, num_windows=2, alpha=0.5)
    assert small.restore(st) == 2 and small.tokens == 13 + 14
    assert torch.equal(small.forecast(), w.forecast())
    with pytest.raises(ValueError, match="shape"):
        LoadWindow(3, 3, window_s=1.0, num_windows=3, alpha=0.5).restore(st)


def test_the_regime_forecast_is_the_mean_since_the_traffic_changed() -> None:
    from eplbd.planner import RegimeMean

    w = LoadWindow(1, 4, window_s=1.0, num_windows=3, alpha=0.5, forecast="regime")
    ref = RegimeMean()
    a = [torch.tensor([[100.0 + i, 50.0, 30.0, 20.0]]) for i in range(6)]
    b = [torch.tensor([[10.0, 20.0 + i, 60.0, 110.0]]) for i in range(3)]
    for i, x in enumerate(a + b):
        w.add(x, 200, float(i))
        ref.update(x)
    w.roll(100.0)
    assert torch.equal(w.forecast(), ref.value)  # the regime's mean, not the EWMA
    view = w.regime_view()
    assert view is not None and view["changes"] == 1 and view["windows_in_mean"] == 3
    assert w.windows == 3  # the sliding window is the same as with the EWMA
    ewma = LoadWindow(1, 4, window_s=1.0, num_windows=3, alpha=0.5)
    assert ewma.regime_view() is None
    with pytest.raises(ValueError, match="forecast"):
        LoadWindow(1, 4, window_s=1.0, num_windows=3, alpha=0.5, forecast="median")


def test_the_regime_forecast_survives_a_restart_and_seeds_from_saved_buckets() -> None:
    def filled(kind: str) -> LoadWindow:
        w = LoadWindow(2, 3, window_s=1.0, num_windows=4, alpha=0.5, forecast=kind)
        for i in range(7):
            w.add(torch.tensor([[5.0 + i, 2.0, 3.0], [1.0, 1.0, 4.0 + i]]), 10, float(i))
        w.roll(10.0)
        return w

    w = filled("regime")
    fresh = LoadWindow(2, 3, window_s=1.0, num_windows=4, alpha=0.5, forecast="regime")
    fresh.restore(w.state())
    assert torch.equal(fresh.forecast(), w.forecast())
    assert fresh.regime_view() == dict(w.regime_view() or {}, dispersion=None)
    # a file saved with the EWMA: the saved buckets, oldest first, seed the regime mean
    seeded = LoadWindow(2, 3, window_s=1.0, num_windows=4, alpha=0.5, forecast="regime")
    seeded.restore(filled("ewma").state())
    view = seeded.regime_view()
    assert view is not None and view["windows_in_mean"] == 4
    assert torch.allclose(seeded.forecast(), filled("ewma").window_sum() / 4)
