"""DeepSeek's EPLB baseline: worked examples by hand, the straightforward oracle, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplbd.layout import log2phy_from_phy2log
from eplbd.planner import rebalance_experts
from eplbd.planner._reference import reference_rebalance


def test_global_worked_example() -> None:
    # E = 4, P = 6, G = 2, one group, one node: the global policy.
    # Replicate (2 extra): priorities w/1 = 40 10 20 30 -> expert 0; then 20 10 20 30 ->
    # expert 3. Counts [2, 1, 1, 2]; replicas in slot order [e0 e1 e2 e3 e0 e3] with loads
    # [20 10 20 15 20 15].
    # Pack into 2 GPUs of 3, heaviest first (ties: lower index): r0 20 -> g0; r2 20 -> g1;
    # r4 20 -> g0 (tie at 20, lower GPU); r3 15 -> g1 (20 < 40); r5 15 -> g1 (35 < 40), now
    # full; r1 10 -> g0. GPU 0 holds r0 r4 r1 = e0 e0 e1, GPU 1 holds r2 r3 r5 = e2 e3 e3:
    # both at 50, with two copies of one expert on one GPU (DeepSeek does not avoid that).
    phy2log, log2phy, logcnt = rebalance_experts(torch.tensor([[40, 10, 20, 30]]), 6, 1, 1, 2)
    assert phy2log.tolist() == [[0, 0, 1, 2, 3, 3]]
    assert logcnt.tolist() == [[2, 1, 1, 2]]
    assert log2phy.tolist() == [[[0, 1], [2, -1], [3, -1], [4, 5]]]


def test_hierarchical_worked_example() -> None:
    # E = 4 in 2 groups ({0, 1} and {2, 3}), 2 nodes of 1 GPU, P = 6 (3 slots a node).
    # Groups to nodes: one group per node, so group 0 -> node 0 and group 1 -> node 1.
    # Node 0: loads [10, 30], 1 extra -> expert 1; replicas [e0 e1 e1] with [10 15 15];
    # packed heaviest first into its GPU: e1 e1 e0. Node 1: [25, 5] -> extra to expert 2;
    # replicas [e2 e3 e2] with [12.5 5 12.5] -> e2 e2 e3. GPU loads 40 and 30: each group
    # stays on its node.
    w = torch.tensor([[10.0, 30.0, 25.0, 5.0]])
    phy2log, _, logcnt = rebalance_experts(w, 6, 2, 2, 2)
    assert phy2log.tolist() == [[1, 1, 0, 2, 2, 3]]
    assert logcnt.tolist() == [[1, 2, 2, 1]]
    # Same load, global policy (3 groups do not divide over 2 nodes): extras to expert 1
    # (30), then expert 2 (25 > 15); replicas [e0 e1 e2 e3 e1 e2] with loads
    # [10 15 12.5 5 15 12.5]; packing order r1 r4 r2 r5 r0 r3: g0 g1 g0 g1 g0 (tie at 27.5),
    # then g1 (g0 full): GPU 0 = e1 e2 e0 (37.5), GPU 1 = e1 e2 e3 (32.5).
    phy2log, _, logcnt = rebalance_experts(w, 6, 1, 2, 2)
    assert phy2log.tolist() == [[1, 2, 0, 1, 2, 3]]
    assert logcnt.tolist() == [[1, 2, 2, 1]]


def test_ties_go_to_the_lower_index() -> None:
    # All loads equal: extras to experts 0 then 1; replicas [e0 e1 e2 e3 e0 e1] with loads
    # [.5 .5 1 1 .5 .5]; stable order r2 r3 r0 r1 r4 r5 -> g0 g1 g0 g1 g0 g1.
    phy2log, _, logcnt = rebalance_experts(torch.ones(1, 4), 6, 1, 1, 2)
    assert logcnt.tolist() == [[2, 2, 1, 1]]
    assert phy2log.tolist() == [[2, 0, 0, 3, 1, 1]]


@pytest.mark.parametrize(
    ("w", "args", "expected"),
    [
        ([[40, 10, 20, 30]], (6, 1, 1, 2), [[0, 0, 1, 2, 3, 3]]),
        ([[10.0, 30.0, 25.0, 5.0]], (6, 2, 2, 2), [[1, 1, 0, 2, 2, 3]]),
        ([[10.0, 30.0, 25.0, 5.0]], (6, 1, 2, 2), [[1, 2, 0, 1, 2, 3]]),
        ([[1, 1, 1, 1]], (6, 1, 1, 2), [[2, 0, 0, 3, 1, 1]]),
    ],
)
def test_the_straightforward_reference_gives_the_worked_examples(
    w: list[list[float]], args: tuple[int, int, int, int], expected: list[list[int]]
) -> None:
    phy2log, _ = reference_rebalance(torch.tensor(w), *args)
    assert phy2log.tolist() == expected


def test_layers_are_independent_and_int_loads_work() -> None:
    a = torch.tensor([[40, 10, 20, 30]])
    b = torch.tensor([[1, 1, 1, 1]])
    both, _, _ = rebalance_experts(torch.cat([a, b]), 6, 1, 1, 2)
    assert both[0].tolist() == rebalance_experts(a, 6, 1, 1, 2)[0][0].tolist()
    assert both[1].tolist() == rebalance_experts(b, 6, 1, 1, 2)[0][0].tolist()


@st.composite
def _problem(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int, int]:
    nodes = draw(st.sampled_from([1, 2]))
    gpus = nodes * draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    experts = groups * nodes * draw(st.integers(1, 4))
    per_gpu = draw(st.integers(1, 4))
    slots = gpus * per_gpu
    if slots < experts:
        slots = gpus * -(-experts // gpus)
    layers = draw(st.integers(1, 3))
    if draw(st.booleans()):  # small integers: many ties
        w = torch.randint(
            0,
            4,
            (layers, experts),
            generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))),
        )
    else:
        w = (
            torch.rand(
                layers,
                experts,
                generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))),
            )
            * 100
        )
    return w, slots, groups, nodes, gpus


@settings(max_examples=60, deadline=None)
@given(_problem())
def test_same_results_as_the_straightforward_reference(
    problem: tuple[torch.Tensor, int, int, int, int],
) -> None:
    w, P, groups, nodes, gpus = problem
    phy2log, log2phy, logcnt = rebalance_experts(w, P, groups, nodes, gpus)
    ref_p2l, ref_cnt = reference_rebalance(w, P, groups, nodes, gpus)
    assert torch.equal(phy2log, ref_p2l)
    assert torch.equal(logcnt, ref_cnt)
    assert torch.equal(log2phy, log2phy_from_phy2log(phy2log, w.shape[1]))
    assert logcnt.sum(dim=1).tolist() == [P] * w.shape[0]
    assert log2phy.shape[2] == int(logcnt.max())


def test_deepseek_v3_size_matches_reference_once() -> None:
    g = torch.Generator().manual_seed(3)
    w = (torch.rand(2, 256, generator=g) ** 4 * 1000).round()
    for groups in (8, 1):
        phy2log, _, logcnt = rebalance_experts(w, 288, groups, 4, 32)
        ref_p2l, ref_cnt = reference_rebalance(w, 288, groups, 4, 32)
        assert torch.equal(phy2log, ref_p2l) and torch.equal(logcnt, ref_cnt)


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        ((torch.ones(2, 8), 10, 1, 1, 4), "cannot be split evenly over 4 GPUs"),
        ((torch.ones(2, 8), 12, 1, 2, 3), "3 GPUs cannot be split evenly over 2 nodes"),
        ((torch.ones(2, 8), 12, 3, 1, 2), "8 logical experts cannot be split evenly into 3 groups"),
        ((torch.ones(2, 8), 6, 1, 1, 2), "6 physical slots cannot hold 8"),
        ((torch.ones(8), 8, 1, 1, 2), "2-D"),
        ((torch.tensor([[1.0, -1.0]]), 2, 1, 1, 1), "negative"),
        ((torch.tensor([[1.0, float("nan")]]), 2, 1, 1, 1), "not finite"),
        ((torch.ones(2, 8), 8, 0, 1, 2), "num_groups must be >= 1"),
        ((torch.ones(2, 8), 8, 1, 1, 0), "num_gpus must be >= 1"),
        ((torch.zeros(0, 8), 8, 1, 1, 2), "no layers"),
    ],
)
def test_bad_arguments_raise_value_error(args: tuple, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        rebalance_experts(*args)
