"""The agent's rules without sockets: AgentCore and SnapshotMerger driven by a FakeClock."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from eplbd.agent import (
    PLANNER,
    PLANNER_SNAPSHOTS,
    WORKER,
    AgentCore,
    CoreConfig,
    Schedule,
    Send,
    SnapshotMerger,
)
from eplbd.ops import FakeClock
from eplbd.wire import decode, encode, layout_digest, validate

L, E, P = 2, 4, 8


def hello(worker: str, rank: int, *, inc: str | None = None, epoch: int = 0, **kw: Any) -> dict:
    body = {
        "worker": worker,
        "incarnation": inc or f"{worker}-i1",
        "group": "g0",
        "ep_rank": rank,
        "ep_size": 2,
        "node": "n0",
        "num_layers": L,
        "num_logical_experts": E,
        "num_physical_experts": P,
        "epoch": epoch,
        "software_version": "test",
        "protocol_version": 1,
    }
    body.update(kw)
    return body


def snap(
    worker: str,
    rank: int,
    seq: int,
    counts: torch.Tensor,
    *,
    s0: int = 0,
    epoch: int = 0,
    inc: str | None = None,
) -> list[bytes]:
    body = {
        "worker": worker,
        "incarnation": inc or f"{worker}-i1",
        "group": "g0",
        "ep_rank": rank,
        "seq": seq,
        "epoch": epoch,
        "step_start": s0,
        "step_end": s0 + 8,
        "tokens": int(counts.sum()),
    }
    return encode("snapshot", body, {"counts": counts})


def p2l(shift: int = 1) -> torch.Tensor:
    return ((torch.arange(P) + shift) % E).repeat(L, 1).to(torch.int64)


def of(out: list[Send], to: str, msg_type: str | None = None) -> list[Send]:
    return [s for s in out if s.to == to and (msg_type is None or s.msg_type == msg_type)]


def roundtrip(s: Send) -> Any:
    """What the peer would receive: encode, decode, validate (proves the message is valid)."""
    return validate(decode(encode(s.msg_type, s.body, s.tensors or None)))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_core(clock: FakeClock, **kw: Any) -> AgentCore:
    cfg = CoreConfig(
        agent_id="n0",
        node="n0",
        schedule=Schedule(8, 4, True),
        heartbeat_s=1.0,
        dead_s=5.0,
        merge_timeout_s=2.0,
        held_per_group=3,
        **kw,
    )
    return AgentCore(cfg, incarnation="agent-i1", clock=clock)


def synced_core(clock: FakeClock, **kw: Any) -> AgentCore:
    core = make_core(clock, **kw)
    out = core.tick()
    assert [s.msg_type for s in of(out, PLANNER)] == ["agent_hello"]
    core.on_planner(
        encode("welcome", {"incarnation": "pl-1", "epoch": 0, "schedule": Schedule().body()})
    )
    assert core.synced
    return core


def register(core: AgentCore, ident: bytes, body: dict) -> list[Send]:
    return core.on_worker(ident, encode("hello", body))


def test_hello_gets_welcome_with_schedule_and_planner_hears_of_it(clock: FakeClock) -> None:
    core = synced_core(clock)
    out = register(core, b"w0", hello("w0", 0))
    (welcome,) = of(out, WORKER, "welcome")
    assert welcome.identity == b"w0"
    msg = roundtrip(welcome)
    assert msg.body["incarnation"] == "agent-i1"
    assert msg.body["epoch"] == 0 and "phy2log" not in msg.tensors
    assert msg.body["schedule"] == {"window_steps": 8, "record_steps": 4, "enabled": True}
    (joined,) = of(out, PLANNER, "worker_joined")
    body = roundtrip(joined).body
    assert (body["group"], body["ep_rank"], body["worker"]) == ("g0", 0, "w0")
    assert body["hello"]["num_physical_experts"] == P
    # a schedule change reaches every registered worker
    register(core, b"w1", hello("w1", 1))
    out = core.set_schedule(Schedule(16, 16, True))
    assert sorted(s.identity for s in of(out, WORKER, "schedule")) == [b"w0", b"w1"]
    assert roundtrip(out[0]).body["window_steps"] == 16


def test_agent_hello_lists_workers_with_their_current_epoch(clock: FakeClock) -> None:
    core = make_core(clock)
    register(core, b"w0", hello("w0", 0, epoch=3))
    hello_msg = roundtrip(core.agent_hello())
    (w,) = hello_msg.body["workers"]
    assert (w["worker"], w["epoch"]) == ("w0", 3)
    # only what the planner reads (docs/protocol.md): the layouts go as `layout` messages
    assert set(hello_msg.body) == {
        "schema", "agent", "incarnation", "node", "software_version", "protocol_version",
        "workers", "phy2log_dtypes", "layouts",
    }  # fmt: skip
    assert hello_msg.body["layouts"] == []  # no committed layout held yet
    core.on_planner(encode("layout", {"group": "g0", "epoch": 4}, {"phy2log": p2l(1)}))
    (held,) = roundtrip(core.agent_hello()).body["layouts"]
    assert held == {"group": "g0", "epoch": 4, "digest": layout_digest(p2l(1).numpy())}
    assert hello_msg.body["phy2log_dtypes"] == ["int16", "int32", "int64"]


def test_bad_hellos_are_refused_with_an_error(clock: FakeClock) -> None:
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    # another model shape in the same group
    out = register(core, b"w1", hello("w1", 1, num_physical_experts=12, ep_size=2))
    (err,) = of(out, WORKER, "error")
    assert err.body["code"] == "model_mismatch" and err.identity == b"w1"
    # ep_rank out of range, missing field
    out = register(core, b"w2", hello("w2", 5))
    assert of(out, WORKER, "error")[0].body["code"] == "bad_field"
    bad = hello("w3", 1)
    del bad["group"]
    assert of(register(core, b"w3", bad), WORKER, "error")[0].body["code"] == "missing_field"
    assert [w for w in core.workers] == ["w0"]
    assert core.worker_counters.bad == {"model_mismatch": 1, "bad_field": 1, "missing_field": 1}


def test_late_worker_gets_layout_from_planner_layout_message(clock: FakeClock) -> None:
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    core.on_planner(encode("layout", {"group": "g0", "epoch": 4}, {"phy2log": p2l(1)}))
    out = register(core, b"w1", hello("w1", 1))
    msg = roundtrip(of(out, WORKER, "welcome")[0])
    assert msg.body["epoch"] == 4
    assert np.array_equal(msg.tensors["phy2log"], p2l(1))
    # an older layout does not replace it
    core.on_planner(encode("layout", {"group": "g0", "epoch": 2}, {"phy2log": p2l(2)}))
    assert core.groups["g0"].epoch == 4


def test_prepare_abort_down_staged_committed_up_and_commit_kept(clock: FakeClock) -> None:
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    register(core, b"w1", hello("w1", 1))
    out = core.on_planner(
        encode("prepare", {"group": "g0", "epoch": 1, "timeout_s": 5.0}, {"phy2log": p2l(1)})
    )
    assert sorted(s.identity for s in of(out, WORKER, "prepare")) == [b"w0", b"w1"]
    assert np.array_equal(roundtrip(out[0]).tensors["phy2log"], p2l(1))
    staged = {
        "group": "g0",
        "epoch": 1,
        "ep_rank": 0,
        "worker": "w0",
        "ok": True,
        "reason": "",
        "staged_bytes": 10,
    }
    up = of(core.on_worker(b"w0", encode("staged", staged)), PLANNER, "staged")
    assert roundtrip(up[0]).body["worker"] == "w0"
    # a worker cannot speak for another rank
    out = core.on_worker(b"w1", encode("staged", staged))
    assert not of(out, PLANNER) and of(out, WORKER, "error")
    committed = {"group": "g0", "epoch": 1, "ep_rank": 1, "worker": "w1", "step": 77}
    up = of(core.on_worker(b"w1", encode("committed", committed)), PLANNER, "committed")
    assert roundtrip(up[0]).body["step"] == 77
    # the completed commit is the group's layout now: a late worker gets it
    out = register(core, b"w1b", hello("w1b", 1, inc="w1b-i1"))
    msg = roundtrip(of(out, WORKER, "welcome")[0])
    assert msg.body["epoch"] == 1 and np.array_equal(msg.tensors["phy2log"], p2l(1))
    # abort goes to every worker of the group; a stale prepare is refused
    out = core.on_planner(encode("abort", {"group": "g0", "epoch": 2, "reason": "op"}))
    assert len(of(out, WORKER, "abort")) == 2
    out = core.on_planner(
        encode("prepare", {"group": "g0", "epoch": 1, "timeout_s": 5.0}, {"phy2log": p2l(2)})
    )
    assert out == [] and core.planner_counters.bad["stale_epoch"] == 1
    # a prepare whose layout does not fit the group's model is refused
    out = core.on_planner(
        encode(
            "prepare",
            {"group": "g0", "epoch": 2, "timeout_s": 5.0},
            {"phy2log": torch.zeros(L, P + 1, dtype=torch.int64)},
        )
    )
    assert out == [] and core.planner_counters.bad["bad_shape"] == 1


def test_shares_travel_with_their_layout(clock: FakeClock) -> None:
    """A layout's weighted split goes down with its prepare, is kept with the committed
    layout (welcome of a late worker, layouts up to a planner) and replaced by the next one;
    a bad split is refused like a bad phy2log."""
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    share = torch.ones(L, P, dtype=torch.int64)
    share[:, 0], share[:, 4] = 0, 2  # expert 1 (slots 0 and 4): all rows to slot 4
    out = core.on_planner(
        encode(
            "prepare",
            {"group": "g0", "epoch": 1, "timeout_s": 5.0},
            {"phy2log": p2l(1), "share": share},
        )
    )
    (prep,) = of(out, WORKER, "prepare")
    assert np.array_equal(roundtrip(prep).tensors["share"], share)
    committed = {"group": "g0", "epoch": 1, "ep_rank": 0, "worker": "w0", "step": 5}
    core.on_worker(b"w0", encode("committed", committed))
    welcome = roundtrip(of(register(core, b"w1", hello("w1", 1)), WORKER, "welcome")[0])
    assert welcome.body["epoch"] == 1 and np.array_equal(welcome.tensors["share"], share)
    (up,) = core._layouts_up()
    assert np.array_equal(roundtrip(up).tensors["share"], share)
    # the planner's next layout has the equal split: no share travels any more
    core.on_planner(encode("layout", {"group": "g0", "epoch": 2}, {"phy2log": p2l(1)}))
    welcome = roundtrip(of(register(core, b"w2", hello("w2", 1)), WORKER, "welcome")[0])
    assert welcome.body["epoch"] == 2 and "share" not in welcome.tensors
    bad = share.clone()
    bad[1, 4] = 0  # expert 1 of layer 1: no replica receives its rows
    out = core.on_planner(
        encode(
            "prepare",
            {"group": "g0", "epoch": 3, "timeout_s": 5.0},
            {"phy2log": p2l(1), "share": bad},
        )
    )
    assert out == [] and core.planner_counters.bad["bad_layout"] == 1
    assert 3 not in core.groups["g0"].pending


def test_layouts_go_to_each_worker_in_the_form_it_reads(clock: FakeClock) -> None:
    """int16 to a worker that declares it (the compact form), int64 to one of an older
    version (no phy2log_dtypes); a compact prepare from the planner is kept as int64."""
    core = synced_core(clock)
    register(core, b"new", hello("new", 0, phy2log_dtypes=["int16", "int32", "int64"]))
    register(core, b"old", hello("old", 1))
    share = torch.ones(L, P, dtype=torch.int64)  # another tensor: relayed as it came
    out = core.on_planner(
        encode(
            "prepare",
            {"group": "g0", "epoch": 1, "timeout_s": 5.0, "extra_field": 1},
            {"phy2log": p2l(1).to(torch.int16), "share": share},
        )
    )
    down = [roundtrip(s) for s in of(out, WORKER, "prepare")]
    assert all(np.array_equal(m.tensors["share"], share) for m in down)
    assert all(m.body["extra_field"] == 1 for m in down)
    got = {s.identity: roundtrip(s).tensors["phy2log"] for s in of(out, WORKER, "prepare")}
    assert got[b"new"].dtype == np.int16 and got[b"old"].dtype == np.int64
    assert all(np.array_equal(t, p2l(1)) for t in got.values())
    assert core.groups["g0"].pending[1][0].dtype == np.int64
    core.on_planner(encode("layout", {"group": "g0", "epoch": 1}, {"phy2log": p2l(1).short()}))
    assert core.groups["g0"].phy2log is not None and core.groups["g0"].phy2log.dtype == np.int64
    # welcomes too; the layout the agent hands the planner stays int64 (any planner reads it)
    for ident, dtype in ((b"new2", np.int16), (b"old2", np.int64)):
        extra = {"phy2log_dtypes": ["int16"]} if dtype == np.int16 else {}
        w = ident.decode()
        out = register(core, ident, hello(w, 0, inc=f"{w}-i9", **extra))
        msg = roundtrip(of(out, WORKER, "welcome")[0])
        assert msg.tensors["phy2log"].dtype == dtype and msg.body["epoch"] == 1
    (up,) = core._layouts_up()
    assert up.tensors["phy2log"].dtype == np.int64


def test_merge_complete_window_sums_counts(clock: FakeClock) -> None:
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    register(core, b"w1", hello("w1", 1))
    c0 = torch.randint(0, 5, (L, P), dtype=torch.int32)
    c1 = torch.randint(0, 5, (L, P), dtype=torch.int32)
    assert core.on_snapshot(snap("w0", 0, 1, c0)) == []
    (fwd,) = core.on_snapshot(snap("w1", 1, 1, c1))
    assert fwd.to == PLANNER_SNAPSHOTS
    msg = roundtrip(fwd)
    assert msg.body["ep_ranks"] == [0, 1] and msg.body["agent"] == "n0"
    assert msg.body["tokens"] == int(c0.sum() + c1.sum())
    assert np.array_equal(msg.tensors["counts"], (c0 + c1).numpy())
    assert core.forwarded == {"complete": 1, "partial": 0}


def test_merge_incomplete_window_goes_out_after_timeout_then_late_alone(clock: FakeClock) -> None:
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    register(core, b"w1", hello("w1", 1))
    c = torch.ones(L, P, dtype=torch.int32)
    assert core.on_snapshot(snap("w0", 0, 1, c)) == []
    clock.advance(1.0)
    assert of(core.tick(), PLANNER_SNAPSHOTS) == []
    clock.advance(1.5)
    (fwd,) = of(core.tick(), PLANNER_SNAPSHOTS)
    assert roundtrip(fwd).body["ep_ranks"] == [0]
    (late,) = core.on_snapshot(snap("w1", 1, 1, 2 * c))
    assert roundtrip(late).body["ep_ranks"] == [1]
    assert core.forwarded == {"complete": 0, "partial": 2}
    # replayed seq and duplicate-rank snapshots are dropped
    assert core.on_snapshot(snap("w1", 1, 1, c)) == []
    assert core.worker_counters.bad["replay"] == 1


def test_snapshots_are_checked(clock: FakeClock) -> None:
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    ok = torch.ones(L, P, dtype=torch.int32)
    cases = [
        snap("w9", 0, 1, ok),  # unregistered worker
        snap("w0", 0, 1, ok, inc="old"),  # replaced incarnation
        snap("w0", 0, 1, torch.ones(L, P + 1, dtype=torch.int32)),  # wrong shape
        snap("w0", 0, 1, -ok),  # negative counts
        [b"garbage"],
        encode("heartbeat", {"sender": "x", "incarnation": "y"}),  # wrong type on PULL
    ]
    for frames in cases:
        assert core.on_snapshot(frames) == []
    assert core.worker_counters.bad_total == len(cases)
    assert core.merger.open_windows() == 0


def test_planner_outage_holds_newest_snapshots_then_resyncs(clock: FakeClock) -> None:
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0, ep_size=1, num_physical_experts=P))
    core.on_planner(encode("layout", {"group": "g0", "epoch": 3}, {"phy2log": p2l(1)}))
    # the planner goes silent: after dead_s the agent starts over with agent_hello
    for _ in range(6):
        clock.advance(1.0)
        core.on_worker(b"w0", encode("heartbeat", {"sender": "w0", "incarnation": "w0-i1"}))
        out = core.tick()
    assert not core.synced
    assert of(out, PLANNER, "agent_hello")
    assert core.workers["w0"]  # the worker is unaffected
    # snapshots are held, newest kept (held_per_group=3)
    for seq in range(1, 6):
        c = torch.full((L, P), seq, dtype=torch.int32)
        assert core.on_snapshot(snap("w0", 0, seq, c, s0=8 * seq)) == []
    assert len(core.groups["g0"].held) == 3
    assert core.dropped["snapshot:held_evicted"] == 2
    # a worker's answer waits for the planner
    committed = {"group": "g0", "epoch": 3, "ep_rank": 0, "worker": "w0", "step": 5}
    assert not of(core.on_worker(b"w0", encode("committed", committed)), PLANNER)
    # agent_hello is retried with backoff while nobody answers
    sent = []
    for _ in range(40):
        clock.advance(0.25)
        core.on_worker(b"w0", encode("heartbeat", {"sender": "w0", "incarnation": "w0-i1"}))
        sent += of(core.tick(), PLANNER, "agent_hello")
    assert 2 <= len(sent) <= 8
    # a new planner incarnation answers: the session is up, layouts and held snapshots go up
    out = core.on_planner(
        encode("welcome", {"incarnation": "pl-2", "epoch": 0, "schedule": Schedule().body()})
    )
    assert core.synced and core.planner_incarnation == "pl-2"
    (lay,) = of(out, PLANNER, "layout")
    assert roundtrip(lay).body["epoch"] == 3
    (up,) = of(out, PLANNER, "committed")
    assert roundtrip(up).body["step"] == 5
    held = [roundtrip(s) for s in of(out, PLANNER_SNAPSHOTS)]
    assert [int(m.tensors["counts"][0, 0]) for m in held] == [3, 4, 5]


def test_planner_restart_seen_in_heartbeat_or_error_triggers_agent_hello(clock: FakeClock) -> None:
    core = synced_core(clock)
    assert core.on_planner(encode("heartbeat", {"sender": "planner", "incarnation": "pl-1"})) == []
    out = core.on_planner(encode("heartbeat", {"sender": "planner", "incarnation": "pl-2"}))
    assert [s.msg_type for s in out] == ["agent_hello"] and not core.synced
    core.on_planner(
        encode("welcome", {"incarnation": "pl-2", "epoch": 0, "schedule": Schedule().body()})
    )
    out = core.on_planner(
        encode("error", {"code": "hello_required", "message": "who?", "in_reply_to": "heartbeat"})
    )
    assert [s.msg_type for s in out] == ["agent_hello"]
    assert core.on_planner([b"EPLBD", b"\x07", b"welcome", b""]) == []
    assert core.planner_counters.bad["bad_version"] == 1


def test_dead_worker_and_new_incarnation_are_reported(clock: FakeClock) -> None:
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    register(core, b"w1", hello("w1", 1))
    # w1 restarts: a new incarnation replaces the old one
    out = register(core, b"w1x", hello("w1", 1, inc="w1-i2"))
    left = of(out, PLANNER, "worker_left")
    assert [(s.body["incarnation"], s.body["reason"]) for s in left] == [("w1-i1", "restarted")]
    assert of(out, PLANNER, "worker_joined")[0].body["incarnation"] == "w1-i2"
    assert core.workers["w1"].identity == b"w1x"
    # w0 keeps talking, w1 goes silent: after dead_s it is reported gone
    for _ in range(5):
        clock.advance(1.0)
        core.on_worker(b"w0", encode("heartbeat", {"sender": "w0", "incarnation": "w0-i1"}))
        out = core.tick()
    left = of(out, PLANNER, "worker_left")
    assert [(s.body["worker"], s.body["reason"]) for s in left] == [("w1", "timeout")]
    assert list(core.workers) == ["w0"]
    # a message from the forgotten worker is answered with hello_required
    out = core.on_worker(b"w1x", encode("heartbeat", {"sender": "w1", "incarnation": "w1-i2"}))
    assert of(out, WORKER, "error")[0].body["code"] == "hello_required"
    # the same incarnation saying hello again (e.g. after an agent restart) is welcomed
    out = register(core, b"w0", hello("w0", 0))
    assert of(out, WORKER, "welcome") and not of(out, PLANNER, "worker_joined")


def test_garbage_on_the_control_socket_is_answered_and_counted(clock: FakeClock) -> None:
    core = synced_core(clock)
    for frames in (
        [b"x"],
        [b"EPLBD", b"\x01", b"nope", b"\x80"],
        [b"EPLBD", b"\x01", b"hello", b"\xc1"],
    ):
        out = core.on_worker(b"junk", frames)
        assert of(out, WORKER, "error")
    assert core.worker_counters.bad == {"truncated": 1, "unknown_type": 1, "bad_body": 1}
    assert of(register(core, b"w0", hello("w0", 0)), WORKER, "welcome")


# --- the agent's own stalls, lost reports, what ranks serve -------------------------------


def heartbeat(core: AgentCore, ident: bytes, worker: str, epoch: int | None = None) -> list[Send]:
    body: dict[str, Any] = {"sender": worker, "incarnation": f"{worker}-i1"}
    if epoch is not None:
        body["epoch"] = epoch
    return core.on_worker(ident, encode("heartbeat", body))


def test_a_gap_between_ticks_is_the_agents_stall_not_its_workers_silence(clock: FakeClock) -> None:
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    register(core, b"w1", hello("w1", 1))
    clock.advance(30.0)  # SIGSTOP: no tick ran for 30 s (dead_s is 5)
    out = core.tick()
    assert list(core.workers) == ["w0", "w1"] and not of(out, PLANNER, "worker_left")
    (ah,) = of(out, PLANNER, "agent_hello")  # the session starts over at once
    assert {w["worker"] for w in ah.body["workers"]} == {"w0", "w1"} and not core.synced
    assert core.events["stalled"] == 1
    # the grace is one dead timeout: a worker still silent after it is gone
    for _ in range(6):
        clock.advance(1.0)
        heartbeat(core, b"w0", "w0")
        out = core.tick()
        if of(out, PLANNER, "worker_left") or "w1" not in core.workers:
            break
    assert list(core.workers) == ["w0"] and core.events["worker_left:timeout"] == 1


def test_a_refused_send_to_the_planner_keeps_the_answer_and_resyncs(clock: FakeClock) -> None:
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    committed = {"group": "g0", "epoch": 3, "ep_rank": 0, "worker": "w0", "step": 5}
    (up,) = of(core.on_worker(b"w0", encode("committed", committed)), PLANNER)
    out = core.planner_send_failed(up)  # the loop could not send it: no planner connection
    assert of(out, PLANNER, "agent_hello") and not core.synced
    assert core.workers["w0"].epoch == 3
    assert roundtrip(of(out, PLANNER, "agent_hello")[0]).body["workers"][0]["epoch"] == 3
    assert core.planner_send_failed(of(out, PLANNER)[0]) == []  # agent_hello: retried later
    out = core.on_planner(
        encode("welcome", {"incarnation": "pl-1", "epoch": 0, "schedule": Schedule().body()})
    )
    assert [roundtrip(s).body["step"] for s in of(out, PLANNER, "committed")] == [5]


def test_a_worker_serving_a_newer_epoch_than_reported_is_told_to_the_planner(
    clock: FakeClock,
) -> None:
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    register(core, b"w1", hello("w1", 1))
    core.on_planner(
        encode("prepare", {"group": "g0", "epoch": 2, "timeout_s": 9.0}, {"phy2log": p2l(1)})
    )
    # w0's committed was lost; its next hello says it serves epoch 2
    out = register(core, b"w0", hello("w0", 0, epoch=2))
    (joined,) = of(out, PLANNER, "worker_joined")
    assert roundtrip(joined).body["hello"]["epoch"] == 2 and joined.body["worker"] == "w0"
    assert core.groups["g0"].epoch == 2  # the layout it relayed is the group's now
    # w1's heartbeats say so too: told once its committed had a heartbeat's time to arrive
    assert heartbeat(core, b"w1", "w1", epoch=2) == []
    assert not of(core.tick(), PLANNER, "worker_joined")
    clock.advance(1.0)
    heartbeat(core, b"w1", "w1", epoch=2)
    (joined,) = of(core.tick(), PLANNER, "worker_joined")
    assert joined.body["worker"] == "w1" and joined.body["epoch"] == 2
    clock.advance(1.0)
    heartbeat(core, b"w1", "w1", epoch=2)
    assert not of(core.tick(), PLANNER, "worker_joined")  # said once


def test_an_epoch_change_during_the_hello_is_sent_after_the_welcome(clock: FakeClock) -> None:
    core = make_core(clock)
    register(core, b"w0", hello("w0", 0))
    (ah,) = of(core.tick(), PLANNER, "agent_hello")
    assert ah.body["workers"][0]["epoch"] == 0
    register(core, b"w0", hello("w0", 0, epoch=4))  # before the planner's welcome
    out = core.on_planner(
        encode("welcome", {"incarnation": "pl-1", "epoch": 0, "schedule": Schedule().body()})
    )
    (joined,) = of(out, PLANNER, "worker_joined")
    assert joined.body["epoch"] == 4


def test_the_planner_connection_events_start_and_restart_the_session(clock: FakeClock) -> None:
    core = synced_core(clock)
    assert core.planner_link_up() == []  # a session is up: nothing to do
    (ah,) = core.planner_link_lost()  # what was queued on the connection may be lost
    assert ah.msg_type == "agent_hello" and not core.synced
    assert core.planner_link_lost() == []
    for _ in range(20):  # no planner: agent_hello backs off
        clock.advance(0.25)
        core.tick()
    (ah,) = core.planner_link_up()  # the connection is back: at once, not at the backoff
    assert ah.msg_type == "agent_hello"


def test_merger_bounds_open_windows_per_group() -> None:
    m = SnapshotMerger(timeout_s=10.0, max_open_per_group=2)
    ranks = {0, 1}
    c = np.ones((2, 3), dtype=np.int32)
    for s0 in range(4):
        out = m.add("g", 0, s0, s0 + 1, 0, 6, c, now=0.0, expected=lambda g: ranks)
        assert len(out) == (1 if s0 >= 2 else 0)
    assert m.open_windows() == 2
    # a sum that does not fit int32 is sent as int64
    big = np.full((2, 3), 2**31 - 1, dtype=np.int64)
    m.add("h", 0, 0, 1, 0, 2**32, big, now=0.0, expected=lambda g: ranks)
    (merged,) = m.add("h", 0, 0, 1, 1, 2**32, big, now=0.0, expected=lambda g: ranks)
    assert merged.counts.dtype == np.int64 and merged.complete and merged.tokens == 2**33


def test_public_surface_is_sorted_and_importable() -> None:
    import eplbd.agent as agent

    assert agent.__all__ == sorted(agent.__all__)
    for name in agent.__all__:
        assert getattr(agent, name) is not None


def test_snapshots_the_loop_could_not_send_wait_in_order_bounded(clock: FakeClock) -> None:
    """What the planner's snapshot socket could not take yet is kept in order (each keeps
    its seq), counted as held in the status, and bounded like the held snapshots."""
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0, ep_size=1, num_physical_experts=P))
    sends = []
    for seq in range(1, 6):
        c = torch.full((L, P), seq, dtype=torch.int32)
        sends += of(core.on_snapshot(snap("w0", 0, seq, c, s0=8 * seq)), PLANNER_SNAPSHOTS)
    assert len(sends) == 5 and not core.has_unsent_snapshots
    for s in sends:  # the loop found the socket not writable
        core.snapshot_unsent(s)
    assert core.has_unsent_snapshots
    assert core.status()["groups"]["g0"]["held_snapshots"] == 3  # held_per_group=3, 1 group
    assert core.dropped["snapshot:held_evicted"] == 2
    kept = [roundtrip(s) for s in core.take_unsent_snapshots()]
    assert [int(m.tensors["counts"][0, 0]) for m in kept] == [3, 4, 5]
    assert [m.body["seq"] for m in kept] == [s.body["seq"] for s in sends[2:]]
    assert not core.has_unsent_snapshots
    assert core.status()["groups"]["g0"]["held_snapshots"] == 0


# --- bad input from a worker or the planner: refused, counted, never relayed or applied --


def test_a_worker_cannot_name_another_agent_in_its_answers(clock: FakeClock) -> None:
    """The planner routes an agent's messages by their `agent`: a worker's answer naming
    another agent is refused (it moved that agent's route to this connection); one naming
    this agent, or none, goes up with this agent's id."""
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    committed = {"group": "g0", "epoch": 1, "ep_rank": 0, "worker": "w0", "step": 7}
    out = core.on_worker(b"w0", encode("committed", {**committed, "agent": "node-7"}))
    assert not of(out, PLANNER) and of(out, WORKER, "error")[0].body["code"] == "bad_field"
    assert core.worker_counters.bad == {"bad_field": 1} and core.workers["w0"].epoch == 0
    for extra in ({"agent": "n0"}, {}):
        (up,) = of(core.on_worker(b"w0", encode("committed", {**committed, **extra})), PLANNER)
        assert roundtrip(up).body["agent"] == "n0"


def test_only_the_schemas_fields_of_a_workers_answer_go_up(clock: FakeClock) -> None:
    """A worker's staged, aborted or committed goes up with its schema's fields and the
    agent's id only: an extra field (a big one could make the answer too large for the
    planner's socket) stays behind."""
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    ids = {"group": "g0", "epoch": 1, "ep_rank": 0, "worker": "w0"}
    answers = {
        "staged": {**ids, "ok": True, "reason": "", "staged_bytes": 8},
        "aborted": {**ids, "reason": "no memory"},
        "committed": {**ids, "step": 7},
    }
    for msg_type, body in answers.items():
        sent = {**body, "padding": "x" * 100_000, "note": 1}
        (up,) = of(core.on_worker(b"w0", encode(msg_type, sent)), PLANNER)
        got = {k: v for k, v in roundtrip(up).body.items() if k != "schema"}  # the wire's own
        assert got == {**body, "agent": "n0"}, msg_type


def test_a_layout_held_before_the_groups_model_is_checked_by_the_first_hello(
    clock: FakeClock,
) -> None:
    """A `layout` for a group with no worker yet is checked without a model; the first hello
    brings the model: a held layout that does not fit it is dropped and counted (welcomes
    carried it and the worker refused them all), one that fits is kept."""
    core = synced_core(clock)
    bad = torch.full((L, P), 99, dtype=torch.int64)  # expert id 99, but E = 4
    core.on_planner(encode("layout", {"group": "g0", "epoch": 3}, {"phy2log": bad}))
    core.on_planner(encode("layout", {"group": "g1", "epoch": 2}, {"phy2log": p2l(1)}))
    assert core.planner_counters.bad_total == 0  # no model yet to check them against
    welcome = roundtrip(of(register(core, b"w0", hello("w0", 0)), WORKER, "welcome")[0])
    assert welcome.body["epoch"] == 0 and "phy2log" not in welcome.tensors
    assert core.planner_counters.bad == {"bad_layout": 1}
    assert [h["group"] for h in roundtrip(core.agent_hello()).body["layouts"]] == ["g1"]
    out = register(core, b"w1", hello("w1", 0, group="g1"))
    welcome = roundtrip(of(out, WORKER, "welcome")[0])
    assert welcome.body["epoch"] == 2 and np.array_equal(welcome.tensors["phy2log"], p2l(1))
    # the planner's next layout for g0 is checked against the model and taken
    core.on_planner(encode("layout", {"group": "g0", "epoch": 3}, {"phy2log": p2l(2)}))
    assert core.groups["g0"].epoch == 3


def test_a_replaced_incarnation_is_refused_in_hellos_and_heartbeats(clock: FakeClock) -> None:
    """A worker incarnation replaced by a newer one (restarted, or its rank taken) never
    comes back: its late hello is refused (it pushed out the newer process), and heartbeats
    of another incarnation than the registered one are ignored and counted (their liveness
    and epoch are not the registered worker's). A restart with a new incarnation still
    replaces the old one."""
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0, inc="old"))
    register(core, b"w0", hello("w0", 0, inc="new"))  # restarted: new replaces old
    out = register(core, b"w0", hello("w0", 0, inc="old"))  # a late hello of the old one
    (err,) = of(out, WORKER, "error")
    assert not of(out, PLANNER) and err.body["code"] == "stale_incarnation"
    assert core.workers["w0"].incarnation == "new"
    # a worker whose rank another worker took is refused as well
    register(core, b"x1", hello("x1", 1))
    register(core, b"y1", hello("y1", 1))
    out = register(core, b"x1", hello("x1", 1))
    assert of(out, WORKER, "error") and "x1" not in core.workers and "y1" in core.workers
    assert core.worker_counters.bad == {"stale_incarnation": 2}
    # heartbeats: another incarnation (or another sender) is neither liveness nor an epoch
    core.on_planner(
        encode("prepare", {"group": "g0", "epoch": 9, "timeout_s": 9.0}, {"phy2log": p2l(1)})
    )
    for _ in range(5):
        for body in (
            {"sender": "w0", "incarnation": "old", "epoch": 9},
            {"sender": "w1", "incarnation": "new", "epoch": 9},
        ):
            assert core.on_worker(b"w0", encode("heartbeat", body)) == []
        heartbeat(core, b"y1", "y1")
        core.on_planner(encode("heartbeat", {"sender": "planner", "incarnation": "pl-1"}))
        clock.advance(1.0)
        out = core.tick()
        assert core.synced and not of(out, PLANNER, "worker_joined")
    assert core.groups["g0"].epoch == 0 and "w0" not in core.workers  # silent: timed out
    assert core.worker_counters.bad == {"stale_incarnation": 7, "bad_field": 5}
    # a new incarnation is welcomed
    out = register(core, b"w0", hello("w0", 0, inc="newer"))
    assert of(out, WORKER, "welcome") and core.workers["w0"].incarnation == "newer"


def test_a_registered_incarnation_cannot_move_to_another_rank_group_or_model(
    clock: FakeClock,
) -> None:
    """A hello of a registered incarnation again is welcomed when it says the same thing; one
    claiming another rank, group or model is refused (it moved the worker silently and
    pushed out the worker holding that rank)."""
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    register(core, b"w1", hello("w1", 1))
    for body, code in (
        (hello("w0", 1), "bad_field"),
        (hello("w0", 0, group="g1"), "bad_field"),
        (hello("w0", 0, num_physical_experts=2 * P), "model_mismatch"),
        (hello("w0", 0, ep_size=4), "model_mismatch"),
    ):
        out = register(core, b"w0", body)
        assert not of(out, PLANNER) and of(out, WORKER, "error")[0].body["code"] == code
    assert {k: (w.group, w.ep_rank) for k, w in core.workers.items()} == {
        "w0": ("g0", 0),
        "w1": ("g0", 1),
    }
    assert core.worker_counters.bad == {"bad_field": 2, "model_mismatch": 2}
    assert of(register(core, b"w0", hello("w0", 0)), WORKER, "welcome")


def test_only_the_hellos_schema_fields_are_relayed_to_the_planner(clock: FakeClock) -> None:
    """A worker's unknown hello fields stay at the agent: relayed, a big one pushed the
    agent_hello past the size limit (this node's planner session never came up)."""
    core = make_core(clock)
    big = "x" * (9 * 2**20)
    register(core, b"w0", hello("w0", 0, blob=big, phy2log_dtypes=["int16", "int8", 3]))
    register(core, b"w1", hello("w1", 1, blob=big))
    (ah,) = of(core.tick(), PLANNER, "agent_hello")
    frames = encode(ah.msg_type, ah.body)
    assert sum(len(f) for f in frames) < 4096
    w0, w1 = decode(frames).body["workers"]
    assert "blob" not in w0 and "blob" not in w1
    assert w0["phy2log_dtypes"] == ["int16", "int64"] and "phy2log_dtypes" not in w1
    core.on_planner(
        encode("welcome", {"incarnation": "pl-1", "epoch": 0, "schedule": Schedule().body()})
    )
    out = register(core, b"w2", hello("w2", 0, group="g1", blob=big))
    (joined,) = of(out, PLANNER, "worker_joined")
    assert set(roundtrip(joined).body["hello"]) == set(w1)


def test_a_small_dead_timeout_does_not_make_every_idle_turn_a_stall(clock: FakeClock) -> None:
    """The stall threshold is dead_s / 2 but at least four of the loop's longest polls: an
    idle turn (one 50 ms poll and the turn's work) with dead_s 0.06 is no stall (every turn
    was one, and the planner session started over each time, never up)."""
    cfg = CoreConfig(agent_id="n0", node="n0", heartbeat_s=0.04, dead_s=0.06)
    assert cfg.stall_after_s == pytest.approx(0.2)
    assert CoreConfig(agent_id="n0", node="n0").stall_after_s == 2.5  # dead_s 5: dead_s / 2
    core = AgentCore(cfg, incarnation="agent-i1", clock=clock)
    core.tick()
    core.on_planner(
        encode("welcome", {"incarnation": "pl-1", "epoch": 0, "schedule": Schedule().body()})
    )
    register(core, b"w0", hello("w0", 0))
    for _ in range(20):
        clock.advance(0.055)
        heartbeat(core, b"w0", "w0")
        core.on_planner(encode("heartbeat", {"sender": "planner", "incarnation": "pl-1"}))
        assert not of(core.tick(), PLANNER, "agent_hello")
    assert core.synced and "stalled" not in core.events
    clock.advance(0.5)  # a real stall is still one
    core.tick()
    assert core.events["stalled"] == 1


def test_an_older_layout_and_an_abort_without_local_workers_are_counted(
    clock: FakeClock,
) -> None:
    """Both are dropped as before, no longer silently: a `layout` older than the one held
    counts as `stale_epoch` (like a stale `prepare`), an `abort` for a group without local
    workers as `abort:no_local_workers` (like such a `prepare`)."""
    core = synced_core(clock)
    register(core, b"w0", hello("w0", 0))
    core.on_planner(encode("layout", {"group": "g0", "epoch": 5}, {"phy2log": p2l(1)}))
    assert core.on_planner(encode("layout", {"group": "g0", "epoch": 3}, {"phy2log": p2l(2)})) == []
    assert core.groups["g0"].epoch == 5
    assert np.array_equal(core.groups["g0"].phy2log, p2l(1))
    # the same epoch again is the planner's usual resend: not counted
    core.on_planner(encode("layout", {"group": "g0", "epoch": 5}, {"phy2log": p2l(1)}))
    assert core.planner_counters.bad == {"stale_epoch": 1}
    assert core.on_planner(encode("abort", {"group": "g9", "epoch": 2, "reason": "op"})) == []
    assert core.dropped == {"abort:no_local_workers": 1}
    out = core.on_planner(encode("abort", {"group": "g0", "epoch": 6, "reason": "op"}))
    assert [s.identity for s in of(out, WORKER, "abort")] == [b"w0"]
