"""EplbClient in one process: routing state, prepare/validation, staging, recording windows,
agent messages, and the no-agent guarantees. Multi-rank behaviour: test_client_multiproc.py."""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import eplbd_client
import pytest
import torch
from eplbd_client import (
    EplbClient,
    FetchRequest,
    HostExpertPool,
    HostPoolWeightSource,
    PeerWeightSource,
    PrepareError,
    WeightSource,
)

from eplbd.kernels import map_and_record
from eplbd.layout import Layout
from eplbd.testing import EPMoEEngine, MoEConfig, MoEModel, random_layout
from eplbd.wire import PHY2LOG_DTYPES

L, E, P = 2, 8, 12
CFG = MoEConfig(num_layers=L, num_experts=E, top_k=2, hidden=16, ffn=32, seed=5)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny tensors: intra-op threads only fight over the 2 CI cores (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _layouts(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [random_layout(L, E, P, generator=g) for _ in range(n)]


def _wait(cond: Callable[[], bool], client: EplbClient | None = None, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        if client is not None:
            client.step()
        time.sleep(0.001)


def _is_epoch(client: EplbClient, epoch: int) -> bool:
    return client.epoch == epoch


def _is_staged(client: EplbClient, epoch: int) -> bool:
    return client.staged_epoch == epoch


def _drain(client: EplbClient) -> list[tuple[str, dict[str, Any], dict[str, torch.Tensor]]]:
    out = []
    while True:
        try:
            out.append(client.outbox.get_nowait())
        except queue.Empty:
            return out


def _socket_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return n


class GatedSource(WeightSource):
    """A source that blocks until released (a slow peer or disk), then fills from a pool."""

    def __init__(self, model: MoEModel) -> None:
        self.gate = threading.Event()
        self.pool = HostExpertPool([model.expert_weights(i) for i in range(L)])
        self.calls = 0

    def fetch(self, request: FetchRequest) -> None:
        self.calls += 1
        assert self.gate.wait(10)
        HostPoolWeightSource(self.pool).fetch(request)


# --- public surface ------------------------------------------------------------------------


@pytest.mark.parametrize("mod", ["eplbd_client", "eplbd.testing"])
def test_all_is_sorted_and_exported(mod: str) -> None:
    m = __import__(mod, fromlist=["__all__"])
    assert list(m.__all__) == sorted(m.__all__)
    for name in m.__all__:
        assert getattr(m, name) is not None
    public = {
        n
        for n, v in vars(m).items()
        if not n.startswith("_") and n != "annotations" and not isinstance(v, types.ModuleType)
    }  # a subpackage (eplbd_client.vllm) is an attribute once imported, not an export
    assert public == set(m.__all__)


# --- no agent: serves, records nothing, costs nothing -----------------------------------


def test_no_agent_no_threads_no_sockets_no_recording() -> None:
    threads, socks = set(threading.enumerate()), _socket_fds()
    client = EplbClient(L, E, P, agent=None)
    ids = torch.randint(0, E, (32, 2))
    for _ in range(100):
        for layer in range(L):
            client.map_and_record(layer, ids)
        client.step()
    assert set(threading.enumerate()) == threads
    assert _socket_fds() == socks
    assert int(client.layer_state(0).should_record) == 0
    assert all(int(client.layer_state(i).expert_load.abs().sum()) == 0 for i in range(L))
    assert client.outbox.empty() and client.epoch == 0 and client.step_count == 100
    client.close()


def test_idle_step_runs_no_tensor_op() -> None:
    client = EplbClient(L, E, P)
    client.set_schedule(window_steps=1000, record_steps=500)
    for _ in range(1000):
        client.step()  # windows start at multiples of 1000 steps: step 1000 opens one
    with torch.autograd.profiler.profile() as prof:
        for _ in range(200):
            client.step()
        torch.zeros(1)  # the profiler does see tensor ops
    names = [e.name for e in prof.function_events]
    assert names and all(n.startswith("aten::") for n in names)
    assert "aten::zeros" in names and "aten::fill_" not in names and len(names) <= 3
    assert int(client.layer_state(1).should_record) == 1


# --- routing state -----------------------------------------------------------------------


def test_layer_state_shapes_and_fixed_addresses() -> None:
    client = EplbClient(L, E, P, require_weights=False)
    st = client.layer_state(1)
    R = P - E + 1
    assert st.logical_to_physical_map.shape == (E, R) and st.logical_replica_count.shape == (E,)
    assert st.expert_load.shape == (P,) and st.should_record.shape == (1,)
    assert st.expert_load.dtype == torch.int32 and st.logical_to_physical_map.dtype == torch.int64
    ref = Layout.default(L, E, P)
    assert torch.equal(st.logical_to_physical_map[:, :2], ref.log2phy[1])
    assert (st.logical_to_physical_map[:, 2:] == -1).all()
    ptrs = [t.data_ptr() for s in map(client.layer_state, range(L)) for t in s]
    for e, p2l in enumerate(_layouts(3), start=1):
        client.prepare(p2l, e)
        _wait(functools.partial(_is_epoch, client, e), client)
        want = Layout.from_phy2log(p2l, E)
        got = client.layer_state(0)
        assert torch.equal(got.logical_replica_count, want.logcnt[0])
        assert torch.equal(got.logical_to_physical_map[:, : want.max_replicas], want.log2phy[0])
        assert (got.logical_to_physical_map[:, want.max_replicas :] == -1).all()
    assert [t.data_ptr() for s in map(client.layer_state, range(L)) for t in s] == ptrs


def test_map_and_record_uses_the_kernel_on_the_layer_state() -> None:
    p2l = _layouts(1, seed=4)[0]
    client = EplbClient(L, E, P, initial_layout=p2l)
    client.set_schedule(1, 1)  # windows of one step: recording from the next step on
    client.step()
    ids = torch.randint(0, E, (50, 3), generator=torch.Generator().manual_seed(1))
    lay = Layout.from_phy2log(p2l, E)
    load = torch.zeros(P, dtype=torch.int32)
    want = map_and_record(ids, lay.log2phy[1], lay.logcnt[1], load, torch.ones(1))
    got = client.map_and_record(1, ids)
    assert torch.equal(got, want)
    assert torch.equal(client.layer_state(1).expert_load, load)
    assert int(client.layer_state(0).expert_load.sum()) == 0


# --- commits on one rank ---------------------------------------------------------------


def _serve(
    client: EplbClient,
    engine: EPMoEEngine,
    model: MoEModel,
    steps: range,
    prepare_at: dict[int, tuple[torch.Tensor, int]],
) -> list[float]:
    errs = []
    for step in steps:
        if step in prepare_at:
            p2l, e = prepare_at[step]
            client.prepare(p2l, e)
            _wait(functools.partial(_is_staged, client, e))
        x = model.tokens(step, 0, 6)
        errs.append(float((engine.forward(x, step) - model.reference_forward(x, step)).abs().max()))
        client.step()
    return errs


def test_single_rank_commits_keep_outputs_equal() -> None:
    model = MoEModel(CFG)
    client = EplbClient(L, E, P, top_k=CFG.top_k)
    engine = EPMoEEngine(model, client)
    lays = _layouts(4, seed=9)
    plan = {3 + 5 * i: (p2l, i + 1) for i, p2l in enumerate(lays)}
    errs = _serve(client, engine, model, range(30), plan)
    assert max(errs) < 1e-12
    assert client.epoch == 4 and torch.equal(client.layout.phy2log, lays[-1])
    for layer in range(L):
        assert torch.equal(engine.w13[layer], model.w13[layer][lays[-1][layer]])
    msgs = _drain(client)
    assert [b["epoch"] for t, b, _ in msgs if t == "committed"] == [1, 2, 3, 4]
    assert [b["step"] for t, b, _ in msgs if t == "committed"] == [4, 9, 14, 19]
    staged = [b for t, b, _ in msgs if t == "staged"]
    assert all(b["ok"] and b["reason"] == "" and b["staged_bytes"] > 0 for b in staged)
    assert client.stats["commits"] == 4


def test_reference_check_catches_maps_moved_without_weights() -> None:
    """Negative control: moving maps but not weights must show up in the outputs."""
    model = MoEModel(CFG)
    client = EplbClient(L, E, P, require_weights=False)
    engine = EPMoEEngine(model, client)
    client._weights.clear()  # the engine's weights are no longer moved by commits
    errs = _serve(client, engine, model, range(10), {2: (_layouts(1, seed=2)[0], 1)})
    assert max(errs[:3]) < 1e-12
    assert max(errs[3:]) > 1e-3


# --- refusals ------------------------------------------------------------------------------


def _bad_inputs() -> list[tuple[str, Any, int, str]]:
    good = _layouts(1, seed=11)[0]
    missing = good.clone()
    missing[0][missing[0] == 3] = 4
    out_of_range = good.clone()
    out_of_range[1, 5] = E
    negative = good.clone()
    negative[0, 0] = -1
    lay = Layout.from_phy2log(good, E)
    inconsistent = Layout(lay.phy2log, lay.logcnt, lay.log2phy.flip(-1))
    return [
        ("too few layers", good[:1], 5, "layers"),
        ("too many slots", torch.cat([good, good[:, :4]], dim=1), 6, "slots"),
        ("expert without replica", missing, 7, "no replica"),
        ("id out of range", out_of_range, 8, "outside"),
        ("negative id", negative, 9, "outside"),
        ("float ids", good.double(), 10, "integers"),
        ("inconsistent maps", inconsistent, 11, "log2phy does not match"),
        ("older epoch", good, 1, "not newer"),
        ("same epoch", good, 2, "not newer"),
        ("epoch not an integer", good, "3", "not an integer"),  # type: ignore[list-item]
        ("epoch beyond int64", good, 2**63, "not an integer in"),
        ("epoch already failed", good, 9, "already failed"),
    ]


def test_bad_layouts_are_refused_and_never_staged() -> None:
    model = MoEModel(CFG)
    client = EplbClient(L, E, P, initial_layout=_layouts(1, seed=1)[0], initial_epoch=2)
    engine = EPMoEEngine(model, client)
    before = client.layout.phy2log.clone()
    w_before = [w.clone() for w in engine.w13]
    for what, p2l, epoch, needle in _bad_inputs():
        with pytest.raises(PrepareError) as ei:
            client.prepare(p2l, epoch)
        assert needle in str(ei.value), (what, str(ei.value))
        assert client.pending_epoch is None, what
    for _ in range(40):
        client.step()
    assert client.epoch == 2 and torch.equal(client.layout.phy2log, before)
    assert all(torch.equal(a, b) for a, b in zip(engine.w13, w_before, strict=True))
    msgs = _drain(client)
    assert not [m for m in msgs if m[0] in ("staged", "committed")]
    aborted = [b for t, b, _ in msgs if t == "aborted"]
    assert len(aborted) == len(_bad_inputs()) - 2  # two epochs refused have none to name
    assert "staged" not in client.stats and client.stats["refused"] == len(_bad_inputs())
    # The client still takes a good layout at a fresh epoch.
    client.prepare(_layouts(1, seed=12)[0], 12)
    _wait(lambda: client.epoch == 12, client)


def test_bad_shares_are_refused_and_never_applied() -> None:
    from _client_scenarios import random_share

    p2l = _layouts(1, seed=21)[0]
    share = random_share(p2l, E, 3)
    model = MoEModel(CFG)
    client = EplbClient(L, E, P, top_k=CFG.top_k)
    engine = EPMoEEngine(model, client)
    client.prepare(p2l, 1, share=share)
    _wait(lambda: client.epoch == 1, client)
    assert client.layout.share is not None and torch.equal(client.layout.share, share)
    table, count = client.layout.dispatch(width=P - E + 1)
    assert torch.equal(client._log2phy.cpu(), table) and torch.equal(client._logcnt.cpu(), count)
    maps = client._log2phy.clone(), client._logcnt.clone()
    w_before = [w.clone() for w in engine.w13]
    idle = share.clone()
    e0 = int(p2l[1, 0])
    idle[1][p2l[1] == e0] = 0
    wide = share.clone()
    wide[0, 0] = P
    bad = [
        ("negative", share - 3, "negative"),
        ("expert without a share", idle, "no replica with a share"),
        ("too wide", wide, "add up to more than"),
        ("wrong shape", share[:, :-1], "shape"),
        ("float", share.double(), "integers"),
    ]
    for i, (what, sh, needle) in enumerate(bad):
        with pytest.raises(PrepareError) as ei:
            client.prepare(p2l, 2 + i, share=sh)
        assert needle in str(ei.value), (what, str(ei.value))
        assert client.pending_epoch is None, what
    # through the agent's path: a malformed tensor is dropped, bad values refused
    body = {"group": "default", "epoch": 9, "timeout_s": 30.0}
    client.deliver("prepare", body, {"phy2log": p2l, "share": share[:1]})
    client.deliver("prepare", {**body, "epoch": 10}, {"phy2log": p2l, "share": share - 3})
    _wait(lambda: client.stats.get("refused", 0) == len(bad) + 1, client)
    for _ in range(20):
        client.step()
    assert client.epoch == 1 and torch.equal(client.layout.share, share)
    assert torch.equal(client._log2phy, maps[0]) and torch.equal(client._logcnt, maps[1])
    assert all(torch.equal(a, b) for a, b in zip(engine.w13, w_before, strict=True))
    assert client.stats["dropped_bad_tensor"] == 1
    # the consensus digest covers the split, and an equal split keeps the digest of a
    # client that knows no shares (mixed versions agree on layouts without shares)
    import zlib

    from eplbd_client._client import _digest

    plain = Layout.from_phy2log(p2l, E)
    assert _digest(plain) == zlib.crc32(p2l.numpy().tobytes()) & 0x7FFFFFFF
    assert _digest(plain.with_share(share)) != _digest(plain)
    assert _digest(plain.with_share(share)) != _digest(plain.with_share(random_share(p2l, E, 4)))
    # a late joiner's welcome carries the committed layout's split
    late = EplbClient(L, E, P, require_weights=False)
    sched = {"window_steps": 4, "record_steps": 2, "enabled": True}
    body = {"incarnation": "x", "epoch": 3, "schedule": sched}
    late.deliver("welcome", body, {"phy2log": p2l, "share": share})
    _wait(lambda: late.epoch == 3, late)
    assert torch.equal(late.layout.share, share) and torch.equal(late._log2phy, table)
    # a client whose maps are narrower than a split needs refuses it
    narrow = EplbClient(L, E, P, max_replicas=2, require_weights=False)
    lay = random_layout(L, E, P, generator=torch.Generator().manual_seed(2), max_replicas=2)
    with pytest.raises(PrepareError, match="dispatch entries"):
        narrow.prepare(lay, 1, share=_split_all_on_first(lay, 3))


def _split_all_on_first(p2l: torch.Tensor, n: int) -> torch.Tensor:
    """Each expert's rows all on its first slot, with share ``n``."""
    share = torch.zeros_like(p2l)
    for layer in range(p2l.shape[0]):
        for e in range(E):
            share[layer, int((p2l[layer] == e).nonzero()[0])] = n
    return share


def test_refused_without_weights_over_budget_or_replicas() -> None:
    p2l = _layouts(1, seed=13)[0]
    client = EplbClient(L, E, P)
    with pytest.raises(PrepareError, match="no registered expert weights"):
        client.prepare(p2l, 1)
    client.register_expert_weights(0, [torch.zeros(P, 4)])
    client.register_expert_weights(1, [torch.zeros(P, 4)])
    small = EplbClient(L, E, P, staging_budget_bytes=100)
    small.register_expert_weights(0, [torch.zeros(P, 64)])
    small.register_expert_weights(1, [torch.zeros(P, 64)])
    with pytest.raises(PrepareError, match="budget"):
        small.prepare(p2l, 1)
    narrow = EplbClient(L, E, P, max_replicas=2, require_weights=False)
    heavy = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 1, 2]] * L)
    with pytest.raises(PrepareError, match="max_replicas"):
        narrow.prepare(heavy, 1)
    with pytest.raises(PrepareError, match="already failed"):
        client.prepare(p2l, 1)  # a refused epoch stays failed
    client.prepare(p2l, 2)  # with weights registered it goes through
    _wait(lambda: client.epoch == 2, client)
    with pytest.raises(ValueError, match="S=12"):
        client.register_expert_weights(0, [torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="contiguous"):
        client.register_expert_weights(0, [torch.zeros(4, P).t()])


# --- deadline, abort, supersede (one rank, gated source) ------------------------------------


def test_deadline_missed_keeps_old_layout() -> None:
    model = MoEModel(CFG)
    now = [0.0]
    src = GatedSource(model)
    client = EplbClient(L, E, P, weight_source=src, clock=lambda: now[0])
    engine = EPMoEEngine(model, client)
    old = client.layout.phy2log.clone()
    client.prepare(_layouts(1, seed=3)[0], 1, timeout_s=5.0)
    _wait(lambda: src.calls == 1)
    for _ in range(3):
        client.step()
    now[0] = 6.0
    client.step()
    assert client.pending_epoch is None and client.epoch == 0
    src.gate.set()
    for _ in range(20):
        client.step()
        time.sleep(0.002)
    assert client.epoch == 0 and torch.equal(client.layout.phy2log, old)
    msgs = _drain(client)
    assert [(t, b["epoch"]) for t, b, _ in msgs] == [("aborted", 1)]
    assert "deadline missed while staging" in msgs[0][1]["reason"]
    assert client.staged_bytes == 0
    x = model.tokens(0, 0, 5)
    assert torch.allclose(engine.forward(x, 0), model.reference_forward(x, 0), atol=1e-12)


def test_abort_and_supersede() -> None:
    model = MoEModel(CFG)
    src = GatedSource(model)
    client = EplbClient(L, E, P, weight_source=src)
    EPMoEEngine(model, client)
    a, b, c = _layouts(3, seed=21)
    client.prepare(a, 1)
    client.deliver("abort", {"group": "default", "epoch": 1, "reason": "planner gave up"}, {})
    client.step()
    assert client.pending_epoch is None
    src.gate.set()
    with pytest.raises(PrepareError, match="already failed"):
        client.prepare(a, 1)
    src.gate.clear()
    client.prepare(b, 2)
    client.prepare(b, 2)  # a duplicate is harmless
    client.prepare(c, 3)  # supersedes 2
    src.gate.set()
    _wait(lambda: client.epoch == 3, client)
    aborted = [(bd["epoch"], bd["reason"]) for t, bd, _ in _drain(client) if t == "aborted"]
    assert (1, "planner gave up") in aborted and (2, "superseded by epoch 3") in aborted
    assert client.stats["duplicate_prepare"] == 1
    assert torch.equal(client.layout.phy2log, c)


def test_abort_refuses_an_epoch_the_consensus_cannot_carry() -> None:
    client = EplbClient(L, E, P, require_weights=False)
    for bad in (2**63, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="not an integer"):
            client.abort(bad)  # type: ignore[arg-type]
    client.abort(2**63 - 1)  # the largest is fine (and fails every epoch up to it)
    for _ in range(3):
        client.step()
    assert client.epoch == 0


def test_weights_registered_again_while_pending_fail_the_epoch() -> None:
    """Buffers staged for the tensors registered before are never applied to new ones: a
    commit would change some layers' weights and not others (and not the maps)."""
    model = MoEModel(CFG)
    src = GatedSource(model)
    client = EplbClient(L, E, P, weight_source=src)
    engine = EPMoEEngine(model, client)
    old = client.layout.phy2log.clone()
    w_before = [w.clone() for w in engine.w13]
    a, b = _layouts(2, seed=31)
    client.prepare(a, 1)
    _wait(lambda: src.calls == 1)  # staging, blocked in the source
    # the engine registers layer 1 again, now with one tensor: staged buffers no longer fit
    client.register_expert_weights(1, [engine.w13[1]])
    src.gate.set()
    for _ in range(20):
        client.step()
        time.sleep(0.002)
    assert client.epoch == 0 and client.pending_epoch is None
    assert torch.equal(client.layout.phy2log, old)
    assert all(torch.equal(w, w0) for w, w0 in zip(engine.w13, w_before, strict=True))
    aborted = [bd for t, bd, _ in _drain(client) if t == "aborted"]
    assert [bd["epoch"] for bd in aborted] == [1]
    assert "registered again" in aborted[0]["reason"]
    # the engine's registration as it was, and a later epoch commits with outputs kept
    client.register_expert_weights(1, [engine.w13[1], engine.w2[1]])
    client.prepare(b, 2)
    _wait(lambda: client.epoch == 2, client)
    for step in range(3):
        x = model.tokens(step, 0, 5)
        assert torch.allclose(engine.forward(x, step), model.reference_forward(x, step), atol=1e-12)


# --- agent messages ------------------------------------------------------------------------


def _prepare_msg(
    p2l: torch.Tensor, epoch: int, **kw: Any
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    body = {"group": "default", "epoch": epoch, "timeout_s": 30.0, **kw}
    return "prepare", body, {"phy2log": p2l}


def test_deliver_drops_malformed_messages_without_raising() -> None:
    client = EplbClient(L, E, P, require_weights=False)
    p2l = _layouts(1)[0]
    bad: list[tuple[Any, Any, Any, str]] = [
        ("nonsense", {}, {}, "unknown_type"),
        (7, {}, {}, "bad_type"),
        ("schedule", [1, 2], {}, "bad_body"),
        ("schedule", {"window_steps": 4, "record_steps": 5, "enabled": True}, {}, "bad_field"),
        ("schedule", {"window_steps": True, "record_steps": 0, "enabled": True}, {}, "bad_field"),
        ("prepare", {"group": "default", "epoch": 1, "timeout_s": 1.0}, {}, "missing_tensor"),
        (
            "prepare",
            {"group": "default", "epoch": 1, "timeout_s": float("nan")},
            {"phy2log": p2l},
            "bad_field",
        ),
        (
            "prepare",
            {"group": "default", "epoch": 1, "timeout_s": 1.0},
            {"phy2log": p2l[:, :5]},
            "bad_tensor",
        ),
        (  # only int16, int32, int64 are phy2log forms
            "prepare",
            {"group": "default", "epoch": 1, "timeout_s": 1.0},
            {"phy2log": p2l.to(torch.int8)},
            "bad_tensor",
        ),
        (
            "prepare",
            {"group": "default", "epoch": 1, "timeout_s": 1.0},
            {"phy2log": p2l.double()},
            "bad_tensor",
        ),
        (
            "prepare",
            {"group": "other", "epoch": 1, "timeout_s": 1.0},
            {"phy2log": p2l},
            "wrong_group",
        ),
        ("abort", {"epoch": 1}, {}, "bad_field"),
        ("abort", {"group": "default", "epoch": 2**63}, {}, "bad_field"),  # past int64
        (
            "prepare",
            {"group": "default", "epoch": 2**63, "timeout_s": 1.0},
            {"phy2log": p2l},
            "bad_field",
        ),
        ("welcome", {"epoch": 2, "schedule": None}, {}, "missing_tensor"),
        ("prepare", {"group": "default", "epoch": 1, "timeout_s": 1.0}, "frames", "bad_tensors"),
    ]
    for t, b, ts, _ in bad:
        client.deliver(t, b, ts)
    for _ in range(10):
        client.step()
    stats = client.stats
    for _, _, _, reason in bad:
        assert stats.get(f"dropped_{reason}", 0) >= 1, reason
    assert sum(v for k, v in stats.items() if k.startswith("dropped_")) == len(bad)
    assert client.epoch == 0 and client.pending_epoch is None


def test_agent_prepare_welcome_schedule_flow() -> None:
    client = EplbClient(L, E, P, require_weights=False, top_k=2)
    a, b = _layouts(2, seed=31)
    sched = {"window_steps": 4, "record_steps": 2, "enabled": True}
    client.deliver("welcome", {"incarnation": "x", "epoch": 3, "schedule": sched}, {"phy2log": a})
    _wait(lambda: client.epoch == 3, client)
    assert int(client.layer_state(0).should_record) in (0, 1)
    client.deliver(*_prepare_msg(b.short(), 4))  # the compact wire form
    _wait(lambda: client.epoch == 4, client)
    assert torch.equal(client.layout.phy2log, b) and client.layout.phy2log.dtype == torch.int64
    client.deliver(*_prepare_msg(a, 4))  # conflicting layout for a known epoch: refused
    client.deliver(*_prepare_msg(a, 2))  # stale
    _wait(lambda: client.stats.get("refused", 0) == 2, client)
    msgs = _drain(client)
    types = [(t, bd.get("epoch")) for t, bd, _ in msgs if t != "snapshot"]
    assert ("committed", 3) in types and ("committed", 4) in types
    assert ("aborted", 2) in types and ("aborted", 4) in types
    assert client.stats["received_welcome"] == 1 and client.stats["received_prepare"] == 3


def test_hello_body() -> None:
    c1, c2 = EplbClient(L, E, P, group_name="g1", worker="w"), EplbClient(L, E, P)
    h = c1.hello_body()
    assert set(h) == {
        "worker",
        "incarnation",
        "group",
        "ep_rank",
        "ep_size",
        "node",
        "num_layers",
        "num_logical_experts",
        "num_physical_experts",
        "epoch",
        "software_version",
        "protocol_version",
        "phy2log_dtypes",
    }
    assert h["phy2log_dtypes"] == list(PHY2LOG_DTYPES)  # the compact layouts it reads
    assert (h["worker"], h["group"], h["num_physical_experts"], h["protocol_version"]) == (
        "w",
        "g1",
        P,
        1,
    )
    assert h["incarnation"] != c2.hello_body()["incarnation"] and len(h["incarnation"]) == 32


# --- recording windows and snapshots -------------------------------------------------------


def test_windows_flip_flag_and_ship_counts() -> None:
    client = EplbClient(L, E, P, require_weights=False, top_k=2)
    client.set_schedule(window_steps=5, record_steps=3)
    ids = torch.randint(0, E, (4, 2), generator=torch.Generator().manual_seed(0))
    flags, expected = [], torch.zeros(L, P, dtype=torch.int64)
    per_step = []
    client.step()  # step 1: the schedule takes effect for forward 1
    for fwd in range(1, 23):
        flag = int(client.layer_state(0).should_record)
        flags.append(flag)
        for layer in range(L):
            phys = client.map_and_record(layer, ids)
            expected[layer] = torch.bincount(phys.reshape(-1), minlength=P)
        per_step.append((fwd, flag, expected.clone()))
        if fwd == 11:
            client.prepare(_layouts(1, seed=41)[0], 1)
            _wait(lambda: client.staged_epoch == 1)
        client.step()
    snaps = [(b, ts["counts"]) for t, b, ts in _drain(client) if t == "snapshot"]
    ranges = [(b["step_start"], b["step_end"], b["epoch"]) for b, _ in snaps]
    # Windows are [0,5) [5,10) [10,15) ..., recording their first 3 steps. The schedule came
    # at step 1, in the middle of [0,5): recording starts with [5,10). The commit after
    # forward 11 splits [10,13) into [10,12) under epoch 0 and [12,13) under epoch 1.
    assert ranges == [(5, 8, 0), (10, 12, 0), (12, 13, 1), (15, 18, 1), (20, 23, 1)]
    assert flags == [0, 0, 0, 0] + [1, 1, 1, 0, 0] * 3 + [1, 1, 1]
    for b, counts in snaps:
        want = torch.stack([e for f, _, e in per_step if b["step_start"] <= f < b["step_end"]]).sum(
            0
        )
        assert torch.equal(counts.long(), want)
        assert b["tokens"] == 4 * (b["step_end"] - b["step_start"])
        assert b["ep_rank"] == 0 and b["group"] == "default"
    assert [b["seq"] for b, _ in snaps] == list(range(5))
    client.set_schedule(5, 3, enabled=False)
    client.step()
    assert int(client.layer_state(0).should_record) == 0
    assert all(int(client.layer_state(i).expert_load.sum()) == 0 for i in range(L))


def test_ranks_welcomed_at_different_steps_record_the_same_windows() -> None:
    """The agent merges one window of every local rank into one snapshot: the ranks' windows
    must be the same step ranges however late each got its schedule, and a second welcome
    with the same schedule must not cut a window short."""
    sched = {"window_steps": 16, "record_steps": 4, "enabled": True}
    ranges: list[list[tuple[int, int]]] = []
    for welcome_at in (0, 3, 7, 17, 30):
        client = EplbClient(L, E, P, require_weights=False, top_k=2)
        for step in range(100):
            if step in (welcome_at, welcome_at + 34):  # welcomed, then welcomed again
                client.deliver("welcome", {"incarnation": "a", "epoch": 0, "schedule": sched}, {})
            client.map_and_record(0, torch.zeros(2, 2, dtype=torch.int64))
            client.step()
        snaps = [b for t, b, _ in _drain(client) if t == "snapshot"]
        ranges.append([(b["step_start"], b["step_end"]) for b in snaps if b["step_start"] >= 48])
        assert all(b["step_end"] - b["step_start"] == 4 for b in snaps)
        client.close()
    assert ranges[0] == [(48, 52), (64, 68), (80, 84), (96, 100)]
    assert all(r == ranges[0] for r in ranges)


def test_full_outbox_drops_and_never_blocks() -> None:
    client = EplbClient(L, E, P, outbox_size=2)
    client.set_schedule(1, 1)
    ids = torch.zeros(3, 2, dtype=torch.int64)
    t0 = time.monotonic()
    for _ in range(20):
        client.map_and_record(0, ids)
        client.step()
    assert time.monotonic() - t0 < 5
    # step 1 opens the first window, steps 2..20 each ship one snapshot
    assert client.outbox.qsize() == 2 and client.stats["outbox_dropped"] == 17


# --- sources and pool --------------------------------------------------------------------


def test_host_pool_is_shared_between_openers(tmp_path: Path) -> None:
    model = MoEModel(CFG)
    created = HostExpertPool.create(tmp_path / "pool", [model.expert_weights(i) for i in range(L)])
    other = HostExpertPool.open(tmp_path / "pool")
    assert other.num_layers == L and other.num_experts == E
    assert torch.equal(other.layer(1)[0], model.w13[1]) and torch.equal(
        other.layer(0)[1], model.w2[0]
    )
    created.layer(0)[0][3, 0, 0] = 123.0  # the same pages: a write shows through
    assert float(other.layer(0)[0][3, 0, 0]) == 123.0
    assert created.nbytes() == sum(t.numel() * 8 for i in range(L) for t in model.expert_weights(i))


def test_pool_source_fills_requested_rows() -> None:
    model = MoEModel(CFG)
    src = HostPoolWeightSource(HostExpertPool([model.expert_weights(i) for i in range(L)]))
    out = {
        (1, 5): [
            torch.empty(2 * CFG.ffn, CFG.hidden, dtype=torch.float64),
            torch.empty(CFG.hidden, CFG.ffn, dtype=torch.float64),
        ]
    }
    req = FetchRequest(1, 0, 2, torch.zeros(L, P), torch.zeros(L, P), {}, [(1, 5)], out)
    src.fetch(req)
    assert torch.equal(out[(1, 5)][0], model.w13[1][5]) and torch.equal(
        out[(1, 5)][1], model.w2[1][5]
    )


def test_peer_source_single_rank_is_a_no_op() -> None:
    src = PeerWeightSource()
    src.bind(ep_rank=0, ep_size=1, group=None, device=torch.device("cpu"))
    src.fetch(FetchRequest(1, 0, 1, torch.zeros(L, P), torch.zeros(L, P), {}, [], {}))
    with pytest.raises(RuntimeError):
        src.fetch(FetchRequest(1, 0, 1, torch.zeros(L, P), torch.zeros(L, P), {}, [(0, 1)], {}))


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        EplbClient(L, E, 7)  # P < E
    with pytest.raises(ValueError, match="group"):
        EplbClient(L, E, P, ep_rank=0, ep_size=2)
    with pytest.raises(ValueError, match="max_replicas"):
        EplbClient(L, E, P, max_replicas=P)
    assert isinstance(eplbd_client.Schedule(4, 2, True), eplbd_client.Schedule)


def test_host_pool_open_refuses_a_file_of_the_wrong_size(tmp_path: Path) -> None:
    """A shared mapping would grow a short file with zeros and serve them as weights."""
    model = MoEModel(CFG)
    HostExpertPool.create(tmp_path / "pool", [model.expert_weights(i) for i in range(L)])
    f = tmp_path / "pool" / "l1_t0.bin"
    full = f.stat().st_size
    os.truncate(f, 64)
    with pytest.raises(ValueError, match=f"has 64 bytes, the manifest says {full}"):
        HostExpertPool.open(tmp_path / "pool")
    assert f.stat().st_size == 64  # not grown (nor zero-filled) by the refused open
    os.truncate(f, full + 8)
    with pytest.raises(ValueError, match="bytes, the manifest says"):
        HostExpertPool.open(tmp_path / "pool")


def test_pool_source_refuses_a_pool_of_another_model() -> None:
    """copy_ would broadcast a wrong shape and convert a wrong dtype: the fetch raises instead,
    before writing any row, also when it has nothing to copy."""
    model = MoEModel(CFG)
    w = [model.expert_weights(i) for i in range(L)]
    good = _layouts(1, seed=41)[0]
    weights = {i: [t[good[i]] for t in w[i]] for i in range(L)}  # one rank, slot-major
    bad: list[tuple[str, list[list[torch.Tensor]], str]] = [
        ("broadcastable shape", [[w[i][0][:, :, :1], w[i][1]] for i in range(L)], "per slot"),
        ("dtype", [[w[i][0].float(), w[i][1]] for i in range(L)], "torch.float32"),
        ("fewer experts", [[t[: E - 1] for t in w[i]] for i in range(L)], "experts"),
        ("fewer layers", w[:1], "layers"),
        ("fewer tensors", [w[i][:1] for i in range(L)], "tensors"),
    ]
    for what, layers, needle in bad:
        src = HostPoolWeightSource(HostExpertPool(layers))
        out = {(1, 5): [torch.full_like(t[0], -7.0) for t in weights[1]]}
        for wanted, o in (([(1, 5)], out), ([], {})):
            req = FetchRequest(1, 0, 1, good, good, weights, wanted, o)
            with pytest.raises(RuntimeError, match=needle):
                src.fetch(req)
        assert all(bool((t == -7.0).all()) for t in out[(1, 5)]), what
    # without registered weights, the staging row itself is checked before the copy
    src = HostPoolWeightSource(HostExpertPool(bad[0][1]))
    out = {(1, 5): [torch.empty_like(t[0]) for t in weights[1]]}
    with pytest.raises(RuntimeError, match="staging row"):
        src.fetch(FetchRequest(1, 0, 2, good, good, {}, [(1, 5)], out))


def test_pool_of_another_model_fails_staging_and_keeps_the_old_layout() -> None:
    model = MoEModel(CFG)
    pool = HostExpertPool([[model.w13[i][:, :, :1], model.w2[i]] for i in range(L)])
    client = EplbClient(L, E, P, weight_source=HostPoolWeightSource(pool))
    engine = EPMoEEngine(model, client)
    old = client.layout.phy2log.clone()
    w_before = [t.clone() for t in (*engine.w13, *engine.w2)]
    client.prepare(_layouts(1, seed=42)[0], 1)
    _wait(lambda: client.pending_epoch is None, client)
    assert client.epoch == 0 and torch.equal(client.layout.phy2log, old)
    w_after = (*engine.w13, *engine.w2)
    assert all(torch.equal(a, b) for a, b in zip(w_after, w_before, strict=True))
    aborted = [b for t, b, _ in _drain(client) if t == "aborted"]
    assert [b["epoch"] for b in aborted] == [1] and "per expert" in aborted[0]["reason"]
    assert "commits" not in client.stats


def test_prepare_refuses_a_timeout_that_would_never_or_already_expire() -> None:
    client = EplbClient(L, E, P, require_weights=False)
    lay = _layouts(1, seed=41)[0]
    for bad in (float("nan"), float("inf"), -1.0, 0, True, "5"):
        with pytest.raises(ValueError, match="timeout_s"):
            client.prepare(lay, 1, timeout_s=bad)  # type: ignore[arg-type]
        assert client.pending_epoch is None
    client.prepare(lay, 1, timeout_s=30)
    _wait(lambda: client.epoch == 1, client)
