"""map_and_record on a CUDA device: every strategy of the fast kernel and the baseline against
the torch implementation across the strategy thresholds, and capture in a CUDA graph with
``should_record`` and ``num_valid_tokens`` changed between replays."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from eplbd.kernels import _triton, backend, map_and_record, map_and_record_torch

pytestmark = pytest.mark.gpu

E, P = 256, 288
STRATEGIES = {
    "atomic-128": _triton.Config(False, 128, 4),
    "atomic-1024": _triton.Config(False, 1024, 4),
    "histogram-2048": _triton.Config(True, 2048, 8),
    "histogram-4096-persistent": _triton.Config(True, 4096, 8, programs_per_sm=1),
    "histogram-1024-persistent": _triton.Config(True, 1024, 8, programs_per_sm=2),
    "histogram-2048-w16-persistent": _triton.Config(True, 2048, 16, programs_per_sm=2),
    "histogram-4096-w32-persistent": _triton.Config(True, 4096, 32, programs_per_sm=1),
}
# element counts around select_config's thresholds (top-8: tokens x 8)
TOKENS = (1, 3, 64, 512, 2048, 2049, 8192, 8193, 16384, 65536 + 7)


def layout(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial layout (slot p holds p mod E) with adversarial edits: a count of 0, a count
    above the real replicas (reaching -1 padding), a slot past P."""
    g = torch.Generator().manual_seed(seed)
    phy2log = torch.randperm(P, generator=g) % E
    cnt = torch.bincount(phy2log, minlength=E)
    l2p = torch.full((E, int(cnt.max()) + 1), -1, dtype=torch.int64)
    fill = torch.zeros(E, dtype=torch.int64)
    for p, e in enumerate(phy2log.tolist()):
        l2p[e, fill[e]] = p
        fill[e] += 1
    cnt[3] = 0
    cnt[5] += 1
    l2p[7, 0] = P + 4
    return l2p.cuda(), cnt.cuda()


def routing(tokens: int, dtype: torch.dtype, seed: int, skew: bool) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.arange(1, E + 1, device="cuda", dtype=torch.float32)
    w = w.pow(-1.2) if skew else torch.ones_like(w)
    ids = torch.multinomial(w.expand(tokens, E), 8, replacement=False, generator=g)
    noise = torch.rand(tokens, 8, device="cuda", generator=g)
    ids[noise < 0.02] = -1
    ids[noise > 0.99] = E + 5
    return ids.to(dtype)


def check(
    launch: Callable[..., torch.Tensor], ids: torch.Tensor, l2p: torch.Tensor, cnt: torch.Tensor
) -> None:
    tokens = ids.shape[0]
    for rec, nvalid in ((1, None), (0, None), (1, tokens // 2)):
        flag = torch.tensor([rec], dtype=torch.int32, device="cuda")
        nv = None if nvalid is None else torch.tensor([nvalid], device="cuda")
        want_load = torch.full((P,), 3, dtype=torch.int64, device="cuda")
        want = map_and_record_torch(ids, l2p, cnt, want_load, flag, nv)
        load = torch.full((P,), 3, dtype=torch.int64, device="cuda")
        got = launch(ids, l2p, cnt, load, flag, nv)
        torch.cuda.synchronize()
        assert got.dtype == ids.dtype and got.shape == ids.shape
        assert torch.equal(got, want), (tokens, rec, nvalid)
        assert torch.equal(load, want_load), (tokens, rec, nvalid)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("tokens", TOKENS)
def test_public_kernel_matches_torch(tokens: int, dtype: torch.dtype) -> None:
    assert backend(torch.device("cuda")) == "triton"
    l2p, cnt = layout(tokens)
    for skew in (False, True):
        check(map_and_record, routing(tokens, dtype, tokens, skew), l2p, cnt)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("tokens", TOKENS)
def test_every_strategy_matches_torch(name: str, tokens: int) -> None:
    cfg = STRATEGIES[name]
    l2p, cnt = layout(tokens + 1)
    launch = functools.partial(_triton.launch_fast, config=cfg)

    check(launch, routing(tokens, torch.int64, tokens + 1, True), l2p, cnt)


@pytest.mark.parametrize("tokens", TOKENS)
def test_baseline_matches_torch(tokens: int) -> None:
    l2p, cnt = layout(tokens + 2)
    check(_triton.launch_baseline, routing(tokens, torch.int32, tokens + 2, True), l2p, cnt)


@pytest.mark.parametrize("tokens", [5, 20000])
def test_strided_input_and_int32_counters(tokens: int) -> None:
    l2p, cnt = layout(9)
    ids = routing(tokens, torch.int64, 9, True)
    wide = torch.zeros(tokens, 24, dtype=torch.int64, device="cuda")
    wide[:, 2::3] = ids
    strided = wide[:, 2::3]
    flag = torch.ones(1, dtype=torch.bool, device="cuda")
    want_load = torch.zeros(P, dtype=torch.int32, device="cuda")
    want = map_and_record_torch(ids, l2p, cnt, want_load, flag)
    load = torch.zeros(P, dtype=torch.int32, device="cuda")
    got = map_and_record(strided, l2p, cnt.int(), load, flag)
    assert torch.equal(got, want) and torch.equal(load, want_load)


@pytest.mark.parametrize("tokens", [64, 16384])
def test_cuda_graph_replay_with_recording_toggled(tokens: int) -> None:
    l2p, cnt = layout(4)
    ids = routing(tokens, torch.int32, 4, True)
    load = torch.zeros(P, dtype=torch.int64, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    nvalid = torch.tensor([tokens], dtype=torch.int64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compile) outside the capture
        map_and_record(ids, l2p, cnt, load, flag, nvalid)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = map_and_record(ids, l2p, cnt, load, flag, nvalid)
    torch.cuda.synchronize()
    load.zero_()

    want_load = torch.zeros_like(load)
    steps = [(1, tokens), (0, tokens), (1, tokens), (1, tokens // 3), (0, 1), (1, 0)]
    for step, (rec, nv) in enumerate(steps):
        ids.copy_(routing(tokens, torch.int32, 100 + step, step % 2 == 0))
        flag.fill_(rec)
        nvalid.fill_(nv)
        graph.replay()
        want = map_and_record_torch(ids, l2p, cnt, want_load, flag, nvalid)
        torch.cuda.synchronize()
        assert torch.equal(out, want), step
        assert torch.equal(load, want_load), step
    assert int(load.sum()) > 0


@pytest.mark.parametrize("tokens", [64, 16384, 65536 + 7])
def test_dispatch_table_on_the_gpu(tokens: int) -> None:
    """A weighted split (a dispatch table with slots listed share times, idle replicas
    left out) through the Triton kernel: same as torch, rows in proportion to the shares,
    captured in a CUDA graph with the table rewritten in place between replays."""
    from eplbd.layout import Layout

    g = torch.Generator().manual_seed(tokens)
    phy2log = torch.randperm(P, generator=g) % E
    share = torch.randint(0, 3, (P,), generator=g)
    for e in range(E):  # every expert keeps a slot with rows
        slots = (phy2log == e).nonzero().flatten()
        share[slots[0]] = max(1, int(share[slots[0]]))
    lay = Layout.from_phy2log(phy2log[None], E, share=share[None])
    table, count = (t[0].cuda() for t in lay.dispatch(width=P - E + 1))
    ids = routing(tokens, torch.int64, 7, True)
    check(map_and_record, ids, table, count)
    flag = torch.ones(1, dtype=torch.int32, device="cuda")
    load = torch.zeros(P, dtype=torch.int64, device="cuda")
    map_and_record(ids, table, count, load, flag)
    assert int(load[lay.shares[0].cuda() == 0].sum()) == 0  # idle replicas get no rows
    # the same tensors, rewritten in place (a new split), inside a captured graph
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        map_and_record(ids, table, count, load, flag)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = map_and_record(ids, table, count, load, flag)
    even_t, even_c = (t[0].cuda() for t in lay.with_share(None).dispatch(width=P - E + 1))
    for tab, cnt in ((even_t, even_c), (table.clone(), count.clone())):
        table.copy_(tab)
        count.copy_(cnt)
        graph.replay()
        want = map_and_record_torch(ids, tab, cnt, torch.zeros_like(load), flag)
        torch.cuda.synchronize()
        assert torch.equal(out, want)
