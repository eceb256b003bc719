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


def _random_phy2log(L: int, E: int, extra: int, g: torch.Generator) -> torch.Tensor:
    """[L, E + extra]: every expert once, ``extra`` more at random, shuffled."""
    rows = []
    for _ in range(L):
        row = torch.cat([torch.arange(E), torch.randint(0, E, (extra,), generator=g)])
        rows.append(row[torch.randperm(E + extra, generator=g)])
    return torch.stack(rows)


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
    lay = Layout.from_phy2log(_random_phy2log(L, E, extra, g), E)
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


# --- shares: the weighted split and its dispatch table --------------------------------------


def test_share_worked_example() -> None:
    # expert 0 in slots 0 and 4 (rows 1 : 2), expert 1 in slots 1 and 5 (slot 5 idle)
    lay = Layout.from_phy2log([[0, 1, 2, 3, 0, 1]], 4, share=[[1, 1, 1, 1, 2, 0]])
    table, count = lay.dispatch()
    assert table.tolist() == [[[0, 4, 4], [1, -1, -1], [2, -1, -1], [3, -1, -1]]]
    assert count.tolist() == [[3, 1, 1, 1]]
    assert lay.dispatch_width == 3
    assert lay.active.tolist() == [[True, True, True, True, True, False]]
    # the replica sets are unchanged: shares only change who gets rows
    assert lay.logcnt.tolist() == [[2, 2, 1, 1]]
    assert lay.log2phy.tolist() == [[[0, 4], [1, 5], [2, -1], [3, -1]]]
    wide, _ = lay.dispatch(width=5)
    assert wide[0, 0].tolist() == [0, 4, 4, -1, -1]


def test_equal_split_is_the_plain_maps() -> None:
    lay = Layout.from_phy2log([[0, 1, 2, 0]], 3, share=[[1, 1, 1, 1]])
    assert lay.share is None  # all ones: the equal split, stored as such
    table, count = lay.dispatch()
    assert torch.equal(table, lay.log2phy) and torch.equal(count, lay.logcnt)
    assert lay == Layout.from_phy2log([[0, 1, 2, 0]], 3)
    assert lay != lay.with_share([[1, 1, 1, 0]])


@pytest.mark.parametrize(
    ("share", "msg"),
    [
        ([[1, 1, 1, -1]], "negative"),
        ([[1, 1, 1]], "shape"),
        ([[0, 1, 1, 0]], "no replica with a share"),
        ([[3, 1, 1, 1]], "add up to more than 2"),
        ([[1.0, 1.0, 1.0, 1.0]], "integers"),
    ],
)
def test_bad_shares_are_refused(share: object, msg: str) -> None:
    with pytest.raises(LayoutError, match=msg):
        Layout.from_phy2log([[0, 1, 2, 0]], 3, share=share)


def test_json_with_shares() -> None:
    lay = Layout.from_phy2log([[0, 1, 2, 0], [2, 1, 0, 1]], 3, share=[[2, 1, 1, 0], [1, 0, 1, 2]])
    d = json.loads(lay.to_json())
    assert d["schema_version"] == 2 and d["share"] == [[2, 1, 1, 0], [1, 0, 1, 2]]
    back = Layout.from_json(lay.to_json())
    assert back == lay and torch.equal(back.shares, lay.shares)
    # a schema 1 file (older writers) still reads; schema 1 cannot carry shares
    plain = {k: v for k, v in d.items() if k != "share"} | {"schema_version": 1}
    assert Layout.from_dict(plain).share is None
    with pytest.raises(LayoutError, match="schema 1"):
        Layout.from_dict(plain | {"share": d["share"]})
    with pytest.raises(LayoutError, match="share"):
        Layout.from_dict(d | {"share": [[1, 1, 1, 1]]})


@settings(max_examples=60, deadline=None)
@given(
    L=st.integers(1, 3),
    E=st.integers(1, 8),
    extra=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_dispatch_table_lists_each_slot_share_times(L: int, E: int, extra: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    P = E + extra
    p2l = _random_phy2log(L, E, extra, g)
    share = torch.randint(0, 3, (L, P), generator=g)
    # every expert keeps one slot with a share; no expert over the width P - E + 1
    for layer in range(L):
        for e in range(E):
            slots = (p2l[layer] == e).nonzero().flatten()
            share[layer, slots[0]] = max(1, int(share[layer, slots[0]]))
            while int(share[layer, slots].sum()) > P - E + 1:
                share[layer, slots[int(share[layer, slots].argmax())]] -= 1
    lay = Layout.from_phy2log(p2l, E, share=share)
    lay.validate_consistent()
    table, count = lay.dispatch()
    assert table.shape[2] == lay.dispatch_width <= P - E + 1
    for layer in range(L):
        for e in range(E):
            entries = [int(s) for s in table[layer, e] if s >= 0]
            assert len(entries) == int(count[layer, e]) >= 1
            assert entries == sorted(entries)
            for s in set(entries):
                assert int(p2l[layer, s]) == e
                assert entries.count(s) == int(lay.shares[layer, s])
            idle = [s for s in range(P) if int(p2l[layer, s]) == e and s not in entries]
            assert all(int(lay.shares[layer, s]) == 0 for s in idle)
