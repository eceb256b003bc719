"""Forecast helpers: a sliding window of loads and an exponentially weighted average."""

from __future__ import annotations

import pytest
import torch

from eplbd.planner import Ewma, SlidingWindow


def _load(v: float) -> torch.Tensor:
    return torch.full((2, 3), v)


def test_sliding_window_keeps_the_last_capacity_loads() -> None:
    win = SlidingWindow(3)
    assert len(win) == 0 and not win.full and win.shape is None
    with pytest.raises(ValueError, match="empty"):
        win.sum()
    win.push(_load(1))
    win.push(_load(2))
    assert len(win) == 2 and not win.full
    assert torch.equal(win.sum(), _load(3).double())
    assert torch.equal(win.mean(), _load(1.5).double())
    win.push(_load(3))
    win.push(_load(10))  # 1 drops out
    assert len(win) == 3 and win.full and win.shape == (2, 3)
    assert torch.equal(win.sum(), _load(15).double())
    assert torch.equal(win.mean(), _load(5).double())
    win.clear()
    assert len(win) == 0
    win.push([[1, 2, 3], [4, 5, 6]])
    assert win.mean().tolist() == [[1, 2, 3], [4, 5, 6]]


def test_sliding_window_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="capacity"):
        SlidingWindow(0)
    win = SlidingWindow(2)
    win.push(_load(1))
    with pytest.raises(ValueError, match="expected"):
        win.push(torch.ones(3, 2))
    with pytest.raises(ValueError, match="2-D"):
        win.push(torch.ones(6))
    with pytest.raises(ValueError, match="finite"):
        win.push(_load(float("nan")))
    with pytest.raises(ValueError, match=">= 0"):
        win.push(_load(-1))
    assert len(win) == 1


def test_ewma() -> None:
    ew = Ewma(0.25)
    assert ew.value is None and ew.updates == 0
    assert torch.equal(ew.update(_load(8)), _load(8).double())  # first update: the load
    v = ew.update(_load(0))
    assert torch.allclose(v, _load(6).double())  # 0.25 * 0 + 0.75 * 8
    v = ew.update(_load(16))
    assert torch.allclose(v, _load(8.5).double())  # 0.25 * 16 + 0.75 * 6
    assert ew.updates == 3
    v.fill_(0)  # the returned tensor is a copy
    assert ew.value is not None and float(ew.value[0, 0]) == pytest.approx(8.5)
    ew.reset()
    assert ew.value is None
    last = Ewma(1.0)
    last.update(_load(3))
    assert torch.equal(last.update(_load(5)), _load(5).double())


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.5, True, "0.5"])
def test_ewma_alpha_must_be_in_range(alpha: object) -> None:
    with pytest.raises(ValueError, match="alpha"):
        Ewma(alpha)  # type: ignore[arg-type]


def test_ewma_refuses_another_shape() -> None:
    ew = Ewma(0.5)
    ew.update(_load(1))
    with pytest.raises(ValueError, match="expected"):
        ew.update(torch.ones(2, 4))
