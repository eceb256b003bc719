"""map_and_record on the CPU: the torch implementation against hand-worked cases and a slow
reference; the Triton kernels (fast, every strategy, and the baseline) run by triton's
interpreter (TRITON_INTERPRET=1) against the torch implementation; the dispatch."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from eplbd.kernels import _triton, backend, map_and_record, map_and_record_torch
from eplbd.layout import Layout

ROOT = Path(__file__).resolve().parent.parent

KNUTH = 2654435769


def reference(
    ids: torch.Tensor,
    l2p: torch.Tensor,
    cnt: torch.Tensor,
    load: torch.Tensor,
    rec: bool,
    nvalid: int | None = None,
) -> torch.Tensor:
    """The fixed-interface semantics, one element at a time (slow, obviously right)."""
    E, R = l2p.shape
    top_k = ids.shape[-1]
    out = []
    for o, e in enumerate(ids.reshape(-1).tolist()):
        t = o // top_k
        if not (0 <= e < E) or R == 0:
            out.append(-1)
            continue
        j = min(((t * KNUTH) % 2**32) % max(1, int(cnt[e])), R - 1)
        phys = int(l2p[e, j])
        out.append(phys)
        if rec and 0 <= phys < load.shape[0] and (nvalid is None or t < nvalid):
            load[phys] += 1
    return torch.tensor(out, dtype=ids.dtype).reshape(ids.shape)


def hand_layout() -> tuple[torch.Tensor, torch.Tensor]:
    # expert 0 in slots 0, 3; expert 1 in slots 1, 4, 5; expert 2 in slot 2 only
    l2p = torch.tensor([[0, 3, -1], [1, 4, 5], [2, -1, -1]])
    return l2p, torch.tensor([2, 3, 1])


def test_hand_worked_hash_replicas() -> None:
    # h(t) = t * 2654435769 mod 2^32:  h(0) = 0;  h(1) = 2654435769 (digit sum 51, so
    # divisible by 3, odd);  h(2) = 5308871538 - 4294967296 = 1013904242 (digit sum 26:
    # = 2 mod 3, even);  h(3) = 7963307307 - 4294967296 = 3668340011 (digit sum 32: = 2
    # mod 3, odd).
    l2p, cnt = hand_layout()
    ids = torch.tensor([[0, 1], [1, 2], [0, 1], [2, 0]])
    load = torch.zeros(6, dtype=torch.int64)
    out = map_and_record_torch(ids, l2p, cnt, load, torch.ones(1, dtype=torch.bool))
    # t0: e0 j=0 -> 0, e1 j=0 -> 1;  t1: e1 j=h%3=0 -> 1, e2 -> 2;
    # t2: e0 j=h%2=0 -> 0, e1 j=h%3=2 -> 5;  t3: e2 -> 2, e0 j=h%2=1 -> 3
    assert out.tolist() == [[0, 1], [1, 2], [0, 5], [2, 3]]
    assert load.tolist() == [2, 2, 2, 1, 0, 1]


def test_hand_worked_invalid_and_padding() -> None:
    l2p, cnt = hand_layout()
    cnt = torch.tensor([0, 3, 3])  # e0: count 0 acts as 1; e2: count 3 but one real slot
    # t0 (h=0): ids -1 and 3 are out of range;  t1 (h%3 = 0): e2 -> slot 2, e0 -> slot 0;
    # t2 (h%3 = 2): e2 -> l2p[2, 2] = -1 (padding), e1 -> slot 5 (past a 5-slot load: no count)
    ids = torch.tensor([[-1, 3], [2, 0], [2, 1]], dtype=torch.int32)
    load = torch.zeros(5, dtype=torch.int32)
    out = map_and_record_torch(ids, l2p, cnt, load, torch.tensor([1]))
    assert out.dtype == torch.int32
    assert out.tolist() == [[-1, -1], [2, 0], [-1, 5]]
    assert load.tolist() == [1, 0, 1, 0, 0]


def test_hand_worked_record_flag_and_valid_tokens() -> None:
    l2p, cnt = hand_layout()
    ids = torch.tensor([[0, 1], [1, 2], [0, 1], [2, 0]])
    load = torch.zeros(6, dtype=torch.int64)
    off = map_and_record_torch(ids, l2p, cnt, load, torch.zeros(1, dtype=torch.int32))
    assert off.tolist() == [[0, 1], [1, 2], [0, 5], [2, 3]]
    assert load.tolist() == [0] * 6
    out = map_and_record_torch(ids, l2p, cnt, load, torch.ones(1), torch.tensor([2]))
    assert torch.equal(out, off)  # tokens 2 and 3 are still mapped ...
    assert load.tolist() == [1, 2, 1, 0, 0, 0]  # ... but only tokens 0 and 1 counted


def random_case(
    seed: int, tokens: int, top_k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Adversarial layout: counts 0, inconsistent counts over -1 padding, ids -1 and >= E."""
    g = torch.Generator().manual_seed(seed)
    E, R = 12, 4
    P = 30
    l2p = torch.randint(0, P + 3, (E, R), generator=g)  # some slots past P
    cnt = torch.randint(-1, R + 2, (E,), generator=g)  # <= 0, consistent and too large
    pad = torch.rand(E, R, generator=g) < 0.3
    l2p[pad] = -1
    ids = torch.randint(-2, E + 3, (tokens, top_k), generator=g).to(dtype)
    return ids, l2p, cnt, P


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_torch_matches_reference_on_adversarial_inputs(seed: int, dtype: torch.dtype) -> None:
    tokens, top_k = [(1, 1), (1, 8), (37, 1), (50, 3), (64, 8), (200, 6)][seed]
    ids, l2p, cnt, P = random_case(seed, tokens, top_k, dtype)
    for rec, nvalid in ((True, None), (False, None), (True, tokens // 2), (True, 0)):
        want_load = torch.zeros(P, dtype=torch.int64)
        want = reference(ids, l2p, cnt, want_load, rec, nvalid)
        load = torch.zeros(P, dtype=torch.int64)
        nv = None if nvalid is None else torch.tensor([nvalid])
        got = map_and_record_torch(ids, l2p, cnt, load, torch.tensor([int(rec)]), nv)
        assert got.dtype == dtype and got.shape == ids.shape
        assert torch.equal(got, want)
        assert torch.equal(load, want_load)


def test_non_contiguous_and_higher_rank_input() -> None:
    ids, l2p, cnt, P = random_case(7, 40, 8, torch.int64)
    base = torch.zeros(P, dtype=torch.int64)
    want = reference(ids, l2p, cnt, base, True)
    wide = torch.full((40, 16), 99, dtype=torch.int64)
    wide[:, ::2] = ids
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    load = torch.zeros(P, dtype=torch.int64)
    assert torch.equal(map_and_record(strided, l2p, cnt, load, torch.ones(1)), want)
    assert torch.equal(load, base)
    transposed = ids.t().contiguous().t()  # [40, 8] with strides (1, 40)
    load.zero_()
    assert torch.equal(map_and_record(transposed, l2p, cnt, load, torch.ones(1)), want)
    assert torch.equal(load, base)
    load.zero_()
    out3 = map_and_record(ids.reshape(5, 8, 8), l2p, cnt, load, torch.ones(1))
    assert out3.shape == (5, 8, 8) and torch.equal(out3.reshape(40, 8), want)


def test_empty_input_returned_as_is() -> None:
    l2p, cnt = hand_layout()
    load = torch.zeros(6, dtype=torch.int64)
    for ids in (torch.empty(0, 8, dtype=torch.int32), torch.empty(3, 0, dtype=torch.int64)):
        assert map_and_record(ids, l2p, cnt, load, torch.ones(1)) is ids
        assert map_and_record_torch(ids, l2p, cnt, load, torch.ones(1)) is ids
    assert load.sum() == 0


@pytest.mark.parametrize("replicas", [2, 3, 4, 7])
def test_hot_expert_spreads_evenly_over_its_replicas(replicas: int) -> None:
    # every token routes to expert 0 (top-1, then top-4 with expert 0 first)
    E, P = 4, 4 + replicas - 1
    l2p = torch.full((E, replicas), -1)
    l2p[0] = torch.tensor([0, *range(E, P)])
    l2p[1:, 0] = torch.arange(1, E)
    cnt = torch.tensor([replicas, 1, 1, 1])
    tokens = 4200
    for top_k in (1, 4):
        ids = torch.zeros(tokens, top_k, dtype=torch.int64)
        ids[:, 1:] = torch.arange(1, top_k)
        load = torch.zeros(P, dtype=torch.int64)
        map_and_record(ids, l2p, cnt, load, torch.ones(1))
        hot = load[l2p[0]]
        assert int(hot.sum()) == tokens
        # the hash spreads consecutive tokens: every replica within 2% of an even share
        assert (hot - tokens / replicas).abs().max() <= 0.02 * tokens / replicas, hot


def test_strategy_by_size_and_slot_count() -> None:
    few, many = _triton.select_config(8, 288), _triton.select_config(8 * 65536, 288)
    assert not few.histogram and many.histogram and many.programs_per_sm > 0
    # a histogram too wide for the kernel's registers falls back to per-element atomics
    assert not _triton.select_config(8 * 65536, 4000).histogram
    assert _triton.num_bins(288) == 512 and _triton.num_bins(511) == 512


def test_cpu_dispatch_is_torch_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backend(torch.device("cpu")) == "torch"


def test_rejects_bad_arguments() -> None:
    l2p, cnt = hand_layout()
    load = torch.zeros(6, dtype=torch.int64)
    ids = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(TypeError):
        map_and_record(ids.float(), l2p, cnt, load, torch.ones(1))
    with pytest.raises(ValueError):
        map_and_record(ids, l2p, cnt[:2], load, torch.ones(1))
    with pytest.raises(ValueError):
        map_and_record(ids, l2p[0], cnt, load, torch.ones(1))
    with pytest.raises(ValueError):
        map_and_record(ids, l2p, cnt, load.reshape(2, 3), torch.ones(1))
    with pytest.raises(ValueError):
        map_and_record(ids, l2p, cnt, load, torch.ones(0))


# --- Triton kernels under the interpreter -------------------------------------------


# Small tiles so that a few dozen elements span several programs, and a persistent grid
# (2 "SMs" on the CPU) so that a program loops over several tiles.
CONFIGS = {
    "atomic": _triton.Config(histogram=False, block=32, num_warps=4),
    "histogram": _triton.Config(histogram=True, block=32, num_warps=4),
    "histogram-persistent": _triton.Config(
        histogram=True, block=16, num_warps=4, programs_per_sm=1
    ),
}


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def run_both(
    launch: Callable[..., torch.Tensor],
    ids: torch.Tensor,
    l2p: torch.Tensor,
    cnt: torch.Tensor,
    P: int,
    rec: int,
    nvalid: int | None,
    load_dtype: torch.dtype = torch.int64,
) -> None:
    nv = None if nvalid is None else torch.tensor([nvalid], dtype=torch.int32)
    flag = torch.tensor([rec], dtype=torch.bool)
    want_load = torch.full((P,), 5, dtype=load_dtype)
    want = map_and_record_torch(ids, l2p, cnt, want_load, flag, nv)
    load = torch.full((P,), 5, dtype=load_dtype)
    got = launch(ids, l2p, cnt, load, flag, nv)
    assert got.dtype == ids.dtype and got.shape == ids.shape
    assert torch.equal(got, want)
    assert torch.equal(load, want_load)


CASES = [  # seed, tokens, top_k, ids dtype, record, num_valid_tokens
    (0, 1, 1, torch.int64, 1, None),
    (1, 1, 8, torch.int32, 1, None),
    (2, 13, 1, torch.int64, 1, 5),
    (3, 9, 8, torch.int32, 0, None),
    (4, 21, 3, torch.int64, 1, 0),
    (5, 40, 2, torch.int32, 1, 40),
]


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
def test_fast_kernel_matches_torch(name: str, case: tuple) -> None:
    seed, tokens, top_k, dtype, rec, nvalid = case
    ids, l2p, cnt, P = random_case(seed, tokens, top_k, dtype)
    cfg = CONFIGS[name]
    launch = functools.partial(_triton.launch_fast, config=cfg)

    run_both(launch, ids, l2p, cnt, P, rec, nvalid)
    assert type(_triton._kernel("_map_record_fast")).__name__ == "InterpretedFunction"


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
def test_baseline_kernel_matches_torch(case: tuple) -> None:
    seed, tokens, top_k, dtype, rec, nvalid = case
    ids, l2p, cnt, P = random_case(seed, tokens, top_k, dtype)
    launch = functools.partial(_triton.launch_baseline, block=32)

    run_both(launch, ids, l2p, cnt, P, rec, nvalid)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_kernel_strided_maps_and_int32_counters(name: str) -> None:
    ids, l2p, cnt, P = random_case(11, 24, 4, torch.int64)
    wide = torch.full((24, 12), 7, dtype=torch.int64)
    wide[:, 1::3] = ids  # non-contiguous ids, strides (12, 3)
    l2p_t = l2p.t().contiguous().t()  # column-major map
    cnt32 = torch.stack([cnt.int(), cnt.int()], 1)[:, 0]  # stride 2
    cfg = CONFIGS[name]

    def launch(
        ids_: torch.Tensor,
        _l2p: torch.Tensor,
        _cnt: torch.Tensor,
        load: torch.Tensor,
        flag: torch.Tensor,
        nv: torch.Tensor | None,
    ) -> torch.Tensor:
        return _triton.launch_fast(ids_, l2p_t, cnt32, load, flag, nv, config=cfg)

    run_both(launch, wide[:, 1::3], l2p, cnt, P, 1, 20, load_dtype=torch.int32)


def test_public_dispatch_follows_the_variable_at_call_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids, l2p, cnt, P = random_case(3, 30, 8, torch.int64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend(torch.device("cpu")) == "triton-interpreter"
    run_both(map_and_record, ids, l2p, cnt, P, 1, None)
    run_both(map_and_record, ids.reshape(-1)[:0].reshape(0, 8), l2p, cnt, P, 1, None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend(torch.device("cpu")) == "torch"


def test_variable_set_before_import_runs_the_interpreted_kernel() -> None:
    script = textwrap.dedent(
        """
        import torch
        from eplbd.kernels import _triton, backend, map_and_record, map_and_record_torch
        assert backend(torch.device("cpu")) == "triton-interpreter"
        l2p = torch.tensor([[0, 3], [1, -1], [2, -1]])
        cnt = torch.tensor([2, 1, 1])
        ids = torch.tensor([[0, 1], [0, 2], [0, 7], [-1, 0]], dtype=torch.int32)
        a, b = torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
        out = map_and_record(ids, l2p, cnt, a, torch.ones(1))
        assert torch.equal(out, map_and_record_torch(ids, l2p, cnt, b, torch.ones(1)))
        assert torch.equal(a, b) and a.sum() == 6, a
        kernel = _triton._kernel("_map_record_fast")
        assert type(kernel).__name__ == "InterpretedFunction", type(kernel)
        print("interpreted ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "interpreted ok" in res.stdout


# --- weighted split: a dispatch table through the same kernels -----------------------------


def share_layout() -> Layout:
    """E = 4, P = 8: expert 0 in slots 0, 4, 6 with shares 1 : 3 : 0 (slot 6 idle),
    expert 1 in slots 1, 5 with shares 1 : 1, expert 2 in slots 2, 7 with 0 : 1."""
    return Layout.from_phy2log([[0, 1, 2, 3, 0, 1, 0, 2]], 4, share=[[1, 1, 0, 1, 3, 1, 0, 1]])


def test_dispatch_table_splits_rows_by_share() -> None:
    lay = share_layout()
    table, count = lay.dispatch()
    tokens = 8000
    ids = torch.tensor([0, 1, 2, 3]).repeat(tokens, 1)  # every token routes to all four
    load = torch.zeros(8, dtype=torch.int64)
    phys = map_and_record(ids, table[0], count[0], load, torch.ones(1))
    assert (lay.phy2log[0][phys] == ids).all()  # every row lands on a slot of its expert
    # idle slots get nothing; the others their share of the rows, within 2%
    assert load[[2, 6]].tolist() == [0, 0]
    for slots, shares in (([0, 4], [1, 3]), ([1, 5], [1, 1]), ([7], [1]), ([3], [1])):
        want = torch.tensor(shares, dtype=torch.float64) / sum(shares) * tokens
        assert (load[slots].double() - want).abs().max() <= 0.02 * tokens, (slots, load)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernels_agree_on_a_dispatch_table(name: str) -> None:
    lay = share_layout()
    table, count = lay.dispatch(width=5)  # padded wider than needed, as engines allocate
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(-1, 5, (37, 3), generator=g)
    launch = functools.partial(_triton.launch_fast, config=CONFIGS[name])
    run_both(launch, ids, table[0], count[0], 8, 1, 30)
    run_both(
        functools.partial(_triton.launch_baseline, block=32), ids, table[0], count[0], 8, 1, None
    )


def test_weighted_split_never_changes_an_output() -> None:
    """A tiny MoE layer: slot p computes with its expert's weights, so whichever replica a
    row is sent to, the output equals the one with no EPLB at all."""
    g = torch.Generator().manual_seed(0)
    lay = share_layout()
    T, K, H = 64, 3, 8
    w = torch.randn(4, H, H, generator=g, dtype=torch.float64)  # expert weights
    slot_w = w[lay.phy2log[0]]  # [P, H, H]: what each slot holds
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(4, generator=g)[:K] for _ in range(T)])
    ref = torch.einsum("th,tkhj->tj", x, w[ids])
    for table, count in (lay.dispatch(), lay.with_share(None).dispatch()):
        phys = map_and_record(ids, table[0], count[0], torch.zeros(8), torch.zeros(1))
        out = torch.einsum("th,tkhj->tj", x, slot_w[phys])
        assert torch.allclose(out, ref, rtol=0, atol=1e-12)
