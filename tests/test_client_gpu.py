"""EplbClient on a GPU: CUDA-graph replay across a commit, async snapshots, pinned pool.

Marked gpu (skipped without CUDA). The two-GPU NCCL runs of the multi-rank scenario are in
test_client_multiproc.py (test_layout_changes_nccl).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from eplbd_client import EplbClient, HostExpertPool, HostPoolWeightSource

from eplbd.kernels import map_and_record_torch
from eplbd.layout import Layout
from eplbd.testing import EPMoEEngine, MoEConfig, MoEModel, random_layout

pytestmark = pytest.mark.gpu

CFG = MoEConfig(num_layers=2, num_experts=8, top_k=2, hidden=64, ffn=128, seed=7)
P = 12


def _wait(cond: Callable[[], bool], limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.001)


def _is_staged(client: EplbClient, epoch: int) -> bool:
    return client.staged_epoch == epoch


def _pool_source(tmp: Path) -> HostPoolWeightSource:
    cpu = MoEModel(CFG)  # same seed: the same weights, on the host
    pool = HostExpertPool.create(tmp / "pool", [cpu.expert_weights(i) for i in range(2)])
    return HostPoolWeightSource(pool)


def test_cuda_graph_replay_after_commit(tmp_path: Path) -> None:
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    model = MoEModel(CFG, dev)
    client = EplbClient(2, 8, P, device=dev, top_k=2, weight_source=_pool_source(tmp_path))
    engine = EPMoEEngine(model, client, dense=True)
    T = 40
    x = model.tokens(0, 0, T).clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            engine.forward(x, 0)
    torch.cuda.current_stream().wait_stream(side)
    client.set_schedule(window_steps=10_000, record_steps=10_000)
    client.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = engine.forward(x, 0)
    ptrs = [t.data_ptr() for i in range(2) for t in client.layer_state(i)]
    g = torch.Generator().manual_seed(3)
    for epoch in range(1, 4):
        new = random_layout(2, 8, P, generator=g)
        x.copy_(model.tokens(epoch, 0, T))
        client.prepare(new, epoch)
        _wait(functools.partial(_is_staged, client, epoch))
        client.step()  # applies before the next forward (closes the window, zeroes counters)
        assert client.epoch == epoch
        graph.replay()
        torch.cuda.synchronize()
        routed: list[torch.Tensor] = []
        ref = model.reference_forward(x, 0, routed)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        lay = Layout.from_phy2log(new, 8)
        for layer in range(2):
            want = map_and_record_torch(
                routed[layer].cpu(),
                lay.log2phy[layer],
                lay.logcnt[layer],
                torch.zeros(P, dtype=torch.int32),
                torch.zeros(1),
            )
            assert torch.equal(engine.last_phys[layer].cpu(), want)
            load = client.layer_state(layer).expert_load.cpu().long()
            assert torch.equal(load, torch.bincount(want.reshape(-1), minlength=P))
    assert [t.data_ptr() for i in range(2) for t in client.layer_state(i)] == ptrs
    client.close()


def test_async_snapshots_on_cuda() -> None:
    dev = torch.device("cuda", 0)
    client = EplbClient(2, 8, P, device=dev, top_k=2, require_weights=False)
    client.set_schedule(window_steps=3, record_steps=2)
    client.step()
    gen = torch.Generator().manual_seed(0)
    expected: dict[int, torch.Tensor] = {}
    for fwd in range(1, 31):
        ids = torch.randint(0, 8, (64, 2), generator=gen).to(dev)
        phys = [client.map_and_record(layer, ids) for layer in range(2)]
        expected[fwd] = torch.stack(
            [torch.bincount(p.reshape(-1).cpu(), minlength=P) for p in phys]
        )
        client.step()
    torch.cuda.synchronize()
    for fwd in range(31, 34):  # steps with no forward pass: windows close with nothing routed
        expected[fwd] = torch.zeros(2, P, dtype=torch.int64)
        client.step()
    snaps = []
    while not client.outbox.empty():
        t, body, tensors = client.outbox.get_nowait()
        if t == "snapshot":
            snaps.append((body, tensors["counts"]))
    assert len(snaps) >= 9
    for body, counts in snaps:
        assert counts.device.type == "cpu" and counts.dtype == torch.int32
        s0, s1 = body["step_start"], body["step_end"]
        assert s1 - s0 == 2
        want = torch.stack([expected[f] for f in range(s0, s1)]).sum(0)
        assert torch.equal(counts.long(), want)
        assert body["tokens"] == 64 * sum(1 for f in range(s0, s1) if f <= 30)
    client.close()


def test_single_gpu_commits_with_pinned_pool(tmp_path: Path) -> None:
    dev = torch.device("cuda", 0)
    model = MoEModel(CFG, dev)
    client = EplbClient(2, 8, P, device=dev, top_k=2, weight_source=_pool_source(tmp_path))
    engine = EPMoEEngine(model, client)
    g = torch.Generator().manual_seed(5)
    for step in range(20):
        if step % 4 == 1:
            client.prepare(random_layout(2, 8, P, generator=g), step // 4 + 1)
            _wait(functools.partial(_is_staged, client, step // 4 + 1))
        x = model.tokens(step, 0, 33)
        torch.testing.assert_close(
            engine.forward(x, step), model.reference_forward(x, step), rtol=0, atol=1e-10
        )
        client.step()
    assert client.epoch == 5
    client.close()
