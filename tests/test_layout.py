from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplbd.layout import Layout, LayoutError, default_phy2log, log2phy_from_phy2log


def test_worked_example() -> None:
    lay = Layout.from_phy2log([[0, 1, 2, 3, 0, 1]], 4)
    assert lay.logcnt.tolist() == [[2, 2, 1, 1]]
    assert lay.log2phy.tolist() == [[[0, 4], [1, 5], [2, -1], [3, -1]]]
    assert lay.max_replicas == 2


def test_default_layout_is_p_mod_e() -> None:
    assert default_phy2log(2, 4, 6).tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    lay = Layout.default(3, 8, 8)
    assert lay.max_replicas == 1
    assert lay.log2phy[:, :, 0].tolist() == [list(range(8))] * 3


@pytest.mark.parametrize(
    ("p2l", "E", "msg"),
    [
        ([[0, 1, 2, 4]], 4, "outside"),
        ([[0, 1, -1, 3]], 4, "outside"),
        ([[0, 1, 1, 1]], 4, "no replica"),
        ([0, 1, 2, 3], 4, "2-D"),
        ([[0.0, 1.0, 2.0, 3.0]], 4, "integers"),
        ([[0, 1, 2]], 4, "cannot hold"),
        ([[0, 1], [0]], 2, "rectangular"),
    ],
)
def test_invalid_layouts_are_refused(p2l: object, E: int, msg: str) -> None:
    with pytest.raises(LayoutError, match=msg):
        Layout.from_phy2log(p2l, E)


def test_size_checks() -> None:
    with pytest.raises(LayoutError, match="layers"):
        Layout.from_phy2log([[0, 1]], 2, num_layers=2)
    with pytest.raises(LayoutError, match="slots"):
        Layout.from_phy2log([[0, 1]], 2, num_physical_experts=4)
    with pytest.raises(LayoutError, match="GPUs"):
        Layout.from_phy2log([[0, 1, 0]], 2, num_gpus=2)


def test_inconsistent_maps_are_detected() -> None:
    lay = Layout.from_phy2log([[0, 1, 0, 1]], 2)
    bad = Layout(lay.phy2log, torch.tensor([[3, 1]]), lay.log2phy)
    with pytest.raises(LayoutError, match="logcnt"):
        bad.validate_consistent()
    swapped = lay.log2phy.clone()
    swapped[0, 0] = swapped[0, 0].flip(0)
    with pytest.raises(LayoutError, match="log2phy"):
        Layout(lay.phy2log, lay.logcnt, swapped).validate_consistent()


def test_moves() -> None:
    a = Layout.from_phy2log([[0, 1, 2, 3], [0, 1, 2, 3]], 4)
    b = Layout.from_phy2log([[0, 1, 3, 2], [0, 1, 2, 3]], 4)
    assert b.moves_from(a).tolist() == [2, 0]


def test_json_roundtrip_and_errors() -> None:
    lay = Layout.from_phy2log([[0, 1, 2, 0], [2, 1, 0, 1]], 3)
    text = lay.to_json()
    assert json.loads(text)["schema_version"] == 1
    assert Layout.from_json(text) == lay
    with pytest.raises(LayoutError, match="schema_version"):
        Layout.from_dict({**json.loads(text), "schema_version": 99})
    with pytest.raises(LayoutError, match="JSON"):
        Layout.from_json("{nope")
    with pytest.raises(LayoutError, match="lacks"):
        Layout.from_dict({"schema_version": 1, "phy2log": [[0]]})


@settings(max_examples=60, deadline=None)
@given(
    L=st.integers(1, 3),
    E=st.integers(1, 9),
    extra=st.integers(0, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_maps_agree(L: int, E: int, extra: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    P = E + extra
    rows = []
    for _ in range(L):
        row = torch.cat([torch.arange(E), torch.randint(0, E, (extra,), generator=g)])
        rows.append(row[torch.randperm(P, generator=g)])
    lay = Layout.from_phy2log(torch.stack(rows), E)
    lay.validate_consistent()
    assert int(lay.logcnt.sum()) == L * P
    assert lay.max_replicas == int(lay.logcnt.max())
    for layer in range(L):
        for e in range(E):
            slots = [int(s) for s in lay.log2phy[layer, e] if s >= 0]
            assert slots == sorted(slots)
            assert len(slots) == int(lay.logcnt[layer, e])
            assert all(int(lay.phy2log[layer, s]) == e for s in slots)
    wide = log2phy_from_phy2log(lay.phy2log, E, lay.max_replicas + 2)
    assert (wide[:, :, lay.max_replicas :] == -1).all()
