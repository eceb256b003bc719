"""PlannerCore without sockets: frames in, messages out, a FakeClock for every time rule.

Fake agents are written against the protocol with eplbd.wire (encode here, and every
message the core sends must decode and validate). The state directory is real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from eplbd.controller import (
    CoreConfig,
    Outbound,
    PlannerCore,
    StateStore,
    TriggerPolicy,
    logical_load,
)
from eplbd.controller._registration import WELCOME_SCHEDULE
from eplbd.layout import Layout
from eplbd.ops import FakeClock
from eplbd.wire import (
    ABORT,
    AGENT_HELLO,
    COMMAND,
    COMMAND_REPLY,
    COMMITTED,
    ERROR,
    HEARTBEAT,
    LAYOUT,
    PREPARE,
    SNAPSHOT,
    STAGED,
    STATUS_REPLY,
    STATUS_REQUEST,
    WELCOME,
    WORKER_JOINED,
    WORKER_LEFT,
    decode,
    encode,
    layout_digest,
    validate,
)

L, E, G, P = 2, 4, 2, 6
HOT = 2  # expert 2 lives only on GPU 0 in the default layout [0 1 2 | 3 0 1]


def hello(rank: int, epoch: int = 0, inc: str | None = None) -> dict[str, Any]:
    return {
        "worker": f"w{rank}",
        "incarnation": inc or f"wi{rank}",
        "group": "g",
        "ep_rank": rank,
        "ep_size": G,
        "node": "n0" if rank < 1 else "n1",
        "num_layers": L,
        "num_logical_experts": E,
        "num_physical_experts": P,
        "epoch": epoch,
        "software_version": "test",
        "protocol_version": 1,
    }


class Harness:
    """One planner core plus fake agents a0 (rank 0) and a1 (rank 1)."""

    def __init__(
        self, tmp: Path, clock: FakeClock, plan_fn: Any = None, metrics: Any = None, **cfg: Any
    ) -> None:
        self.tmp = tmp
        self.clock = clock
        policy = cfg.pop(
            "policy", TriggerPolicy(min_gain=0.05, cooldown_s=30.0, min_windows=2, min_tokens=1)
        )
        self.config = CoreConfig(
            window_s=10.0,
            num_windows=4,
            ewma_alpha=0.5,
            policy=policy,
            prepare_timeout_s=20.0,
            commit_timeout_s=20.0,
            heartbeat_s=1.0,
            **cfg,
        )
        self.seq = 0
        self.plan_fn = plan_fn
        self.metrics = metrics
        self.core = self.new_core()

    def new_core(self) -> PlannerCore:
        store = StateStore(self.tmp)
        store.open()
        core = PlannerCore(
            self.config, store=store, clock=self.clock, plan_fn=self.plan_fn, metrics=self.metrics
        )
        core.restore()
        return core

    def restart(self) -> None:
        self.core.close()
        self.core = self.new_core()

    def send(
        self, identity: bytes, mtype: str, body: dict[str, Any], tensors: Any = None
    ) -> list[Outbound]:
        out = self.core.on_control_frames(identity, encode(mtype, body, tensors))
        check_valid(out)
        return out

    def hello_all(
        self, epochs: tuple[int, int] = (0, 0), extra: tuple[dict[str, Any], ...] = ({}, {})
    ) -> list[Outbound]:
        out = []
        for r in range(G):
            out += self.send(
                f"a{r}".encode(),
                AGENT_HELLO,
                {
                    "agent": f"a{r}",
                    "incarnation": f"ai{r}",
                    "node": f"n{r}",
                    "software_version": "test",
                    "protocol_version": 1,
                    "workers": [hello(r, epochs[r])],
                    **extra[r],
                },
            )
        return out

    def heartbeats(self) -> None:
        for r in range(G):
            assert (
                self.send(f"a{r}".encode(), HEARTBEAT, {"sender": f"a{r}", "incarnation": f"ai{r}"})
                == []
            )

    def snapshot(self, counts: torch.Tensor, epoch: int, agent: int = 0) -> None:
        self.seq += 1
        body = {
            "agent": f"a{agent}",
            "incarnation": f"ai{agent}",
            "group": "g",
            "ep_ranks": [agent],
            "seq": self.seq,
            "epoch": epoch,
            "step_start": 0,
            "step_end": 10,
            "tokens": int(counts.abs().max()) + 1,
        }
        self.core.on_snapshot_frames(encode(SNAPSHOT, body, {"counts": counts}))

    def skewed_counts(self, layout: Layout) -> torch.Tensor:
        """Counts that put most load on expert HOT whatever the layout."""
        counts = torch.zeros(L, P, dtype=torch.int32)
        for layer in range(L):
            for p in range(P):
                e = int(layout.phy2log[layer, p])
                counts[layer, p] = 100 if e == HOT else 10
        return counts

    def feed_windows(self, n: int, epoch: int = 0, layout: Layout | None = None) -> list[Outbound]:
        """n windows of skewed load from both agents; heartbeats; tick at each window end."""
        lay = layout or Layout.default(L, E, P)
        out: list[Outbound] = []
        for _ in range(n):
            for a in range(G):
                self.snapshot(self.skewed_counts(lay), epoch, a)
            self.clock.advance(10.0)
            self.heartbeats()
            ticked = self.core.tick()
            check_valid(ticked)
            out += ticked
        return out

    def answer(self, mtype: str, epoch: int, rank: int, **extra: Any) -> list[Outbound]:
        body = {"group": "g", "epoch": epoch, "ep_rank": rank, "worker": f"w{rank}", **extra}
        return self.send(f"a{rank}".encode(), mtype, body)

    def state_file(self) -> dict[str, Any]:
        return json.loads((self.tmp / "groups" / "g.json").read_text())


def check_valid(out: list[Outbound]) -> None:
    for o in out:
        validate(decode(encode(o.type, o.body, o.tensors)))


def types(out: list[Outbound]) -> list[tuple[bytes, str]]:
    return [(o.identity, o.type) for o in out if o.type != HEARTBEAT]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path, FakeClock())


def test_registration_and_welcome(h: Harness) -> None:
    out = h.hello_all()
    assert types(out) == [(b"a0", WELCOME), (b"a1", WELCOME)]
    assert out[0].body["schedule"] == WELCOME_SCHEDULE  # the agents' own settings decide
    st = h.core.status("status")
    (g,) = st["groups"]
    assert g["complete"] and g["epoch"] == 0 and g["num_nodes"] == 2
    assert [r["state"] for r in g["ranks"]] == ["alive", "alive"]
    assert {a["agent"] for a in st["agents"]} == {"a0", "a1"}
    # a heartbeat from an agent the planner does not know asks for agent_hello
    (err,) = h.send(b"zz", HEARTBEAT, {"sender": "zz", "incarnation": "x"})
    assert err.type == ERROR and err.body["code"] == "hello_required"
    # a mismatching model is refused and counted
    bad = dict(hello(0), worker="w9", num_layers=L + 1)
    out = h.send(
        b"a9",
        AGENT_HELLO,
        {
            "agent": "a9",
            "incarnation": "x",
            "node": "n9",
            "software_version": "",
            "protocol_version": 1,
            "workers": [bad],
        },
    )
    assert ERROR in [o.type for o in out]
    assert h.core.counters.bad["model_mismatch"] == 1


def test_snapshots_are_converted_with_their_epoch(h: Harness) -> None:
    h.hello_all()
    d0 = Layout.default(L, E, P)
    counts = h.skewed_counts(d0)
    h.snapshot(counts, 0)
    g = h.core.groups["g"]
    assert torch.equal(g.window.best_estimate(), logical_load(counts, d0.phy2log, E))
    h.snapshot(counts, 5)  # nobody ever served epoch 5
    assert g.drops["unknown_epoch"] == 1
    h.seq -= 1
    h.snapshot(counts, 0)  # replayed seq
    assert h.core.counters.bad["replay"] == 1
    h.snapshot(-counts, 0)
    assert h.core.counters.bad["bad_count"] == 1
    h.snapshot(torch.zeros(L, P + 1, dtype=torch.int32), 0)
    assert h.core.counters.bad["bad_shape"] == 1
    assert g.snapshots == 1


def test_auto_rebalance_prepare_stage_commit(h: Harness) -> None:
    h.hello_all()
    out = h.feed_windows(1)
    assert [o for o in out if o.type == PREPARE] == []  # one window: below min_windows
    assert h.core.groups["g"].last_decision.reason == "insufficient_data"
    out = h.feed_windows(1)
    prepares = [o for o in out if o.type == PREPARE]
    assert sorted(o.identity for o in prepares) == [b"a0", b"a1"]
    assert prepares[0].body["epoch"] == 1 and prepares[0].body["timeout_s"] == 20.0
    # persisted before it was sent
    disk = h.state_file()
    assert disk["max_epoch"] == 1 and disk["pending"]["epoch"] == 1
    assert disk["pending"]["state"] == "preparing"
    new = Layout.from_phy2log(prepares[0].tensors["phy2log"], E)
    assert h.core.status()["groups"][0]["pending"]["waiting_for"] == [0, 1]

    assert h.answer(STAGED, 1, 0, ok=True, reason="", staged_bytes=64) == []
    assert h.answer(STAGED, 1, 1, ok=True, reason="", staged_bytes=64) == []
    assert h.core.groups["g"].attempt.state == "staged"
    h.clock.advance(0.5)
    out = h.answer(COMMITTED, 1, 1, step=1234)
    assert sorted(types(out)) == [(b"a0", LAYOUT), (b"a1", LAYOUT)]
    assert h.core.groups["g"].record.epoch == 1
    assert h.state_file()["epoch"] == 1
    h.answer(COMMITTED, 1, 0, step=1234)
    hist = h.state_file()["history"]
    assert hist[-1]["epoch"] == 1 and hist[-1]["state"] == "committed"
    assert hist[-1]["decision"]["reason"] == "changed"
    assert h.state_file()["pending"] is None
    assert h.core.groups["g"].ranks[0].epoch == 1
    # snapshots of the new epoch are converted with the new layout; the old still accepted
    g = h.core.groups["g"]
    before = g.snapshots
    h.snapshot(h.skewed_counts(new), 1)
    h.snapshot(h.skewed_counts(Layout.default(L, E, P)), 0)
    assert g.snapshots == before + 2
    # the new layout serves the forecast better
    st = h.core.status("status")["groups"][0]
    assert st["balance_now"] < 1.3
    assert st["last_rebalance"]["epoch"] == 1 and st["last_rebalance"]["outcome"] == "committed"


def test_layouts_go_to_each_agent_in_the_form_it_reads(h: Harness) -> None:
    """An agent that declares phy2log_dtypes gets int16 PREPAREs and layouts; one of an
    older version (no declaration) int64; both carry the same layout."""
    h.hello_all(extra=({"phy2log_dtypes": ["int16", "int32", "int64"]}, {}))
    out = h.feed_windows(2)
    prep = {o.identity: o.tensors["phy2log"] for o in out if o.type == PREPARE}
    assert prep[b"a0"].dtype == np.int16 and prep[b"a1"].dtype == np.int64
    assert np.array_equal(prep[b"a0"], prep[b"a1"])
    h.answer(STAGED, 1, 0, ok=True, reason="", staged_bytes=1)
    h.answer(STAGED, 1, 1, ok=True, reason="", staged_bytes=1)
    out = h.answer(COMMITTED, 1, 0, step=5)
    lay = {o.identity: o.tensors["phy2log"] for o in out if o.type == LAYOUT}
    assert lay[b"a0"].dtype == np.int16 and lay[b"a1"].dtype == np.int64


def _agent_restarts(h: Harness, workers: list[dict[str, Any]]) -> list[Outbound]:
    """Agent a1 comes back with a new incarnation, listing ``workers`` so far."""
    body = {
        "agent": "a1",
        "incarnation": "ai1-b",
        "node": "n1",
        "software_version": "test",
        "protocol_version": 1,
        "workers": workers,
    }
    return h.send(b"a1", AGENT_HELLO, body)


def _beat(h: Harness, seconds: float) -> list[Outbound]:
    out = []
    for _ in range(int(seconds)):
        h.clock.advance(1.0)
        h.send(b"a0", HEARTBEAT, {"sender": "a0", "incarnation": "ai0"})
        h.send(b"a1", HEARTBEAT, {"sender": "a1", "incarnation": "ai1-b"})
        out += h.core.tick()
    return out


def test_ranks_of_a_restarted_agent_get_a_grace_period_to_rejoin(h: Harness) -> None:
    h.hello_all()
    e = _prepare_epoch(h)
    # a1 restarted before its worker said hello to it again: the commit waits for the rank
    out = _agent_restarts(h, [])
    assert ABORT not in [o.type for o in out]
    g = h.core.groups["g"]
    assert g.attempt.in_flight and h.core.rank_state(g, 1) == "rejoining"
    assert not h.core.complete(g)  # nothing new is prepared meanwhile
    assert ABORT not in [o.type for o in _beat(h, 5)]
    # the worker (same process, still staging) re-registers through the new agent
    out = h.send(
        b"a1",
        WORKER_JOINED,
        {"agent": "a1", "group": "g", "ep_rank": 1, "worker": "w1", "incarnation": "wi1",
         "hello": hello(1, 0)},
    )  # fmt: skip
    assert h.core.rank_state(g, 1) == "alive" and g.attempt.in_flight
    h.answer(STAGED, e, 0, ok=True, reason="", staged_bytes=1)
    h.answer(STAGED, e, 1, ok=True, reason="", staged_bytes=1)
    h.answer(COMMITTED, e, 0, step=9)
    h.answer(COMMITTED, e, 1, step=9)
    assert h.state_file()["history"][-1]["state"] == "committed"
    assert _beat(h, 15) == [] or g.ranks[1].present  # the grace lapsed harmlessly


def test_a_rank_that_does_not_rejoin_in_time_is_lost(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeClock(), rejoin_grace_s=6.0)
    h.hello_all()
    e = _prepare_epoch(h)
    _agent_restarts(h, [])
    assert ABORT not in [o.type for o in _beat(h, 5)]
    out = _beat(h, 1)
    assert [(o.identity, o.body["epoch"]) for o in out if o.type == ABORT] == [(b"a0", e)]
    g = h.core.groups["g"]
    assert "not re-registered within 6 s" in g.attempt.reason
    assert h.core.rank_state(g, 1) == "left"
    # with no grace, the rank is lost at once (the behaviour before the setting)
    h2 = Harness(tmp_path / "b", FakeClock(), rejoin_grace_s=0.0)
    h2.hello_all()
    _prepare_epoch(h2)
    assert ABORT in [o.type for o in _agent_restarts(h2, [])]


def test_a_ranks_epoch_never_goes_back_for_the_same_incarnation(h: Harness) -> None:
    h.hello_all()
    e = _prepare_epoch(h)
    for r in (0, 1):
        h.answer(STAGED, e, r, ok=True, reason="", staged_bytes=1)
    h.answer(COMMITTED, e, 1, step=3)
    g = h.core.groups["g"]
    assert g.ranks[1].epoch == e
    # an older hello of the same process (re-sent by its agent, overtaken by the report)
    h.send(
        b"a1",
        WORKER_JOINED,
        {"agent": "a1", "group": "g", "ep_rank": 1, "worker": "w1", "incarnation": "wi1",
         "hello": hello(1, 0)},
    )  # fmt: skip
    assert g.ranks[1].epoch == e
    # a new process of that rank starts over from what it says
    h.send(
        b"a1",
        WORKER_JOINED,
        {"agent": "a1", "group": "g", "ep_rank": 1, "worker": "w1", "incarnation": "wi1-c",
         "hello": hello(1, 0, inc="wi1-c")},
    )  # fmt: skip
    assert g.ranks[1].epoch == 0


def test_a_hello_storm_is_answered_with_welcomes_and_the_layout_once(h: Harness) -> None:
    h.hello_all()
    e = _prepare_epoch(h)
    for r in (0, 1):
        h.answer(STAGED, e, r, ok=True, reason="", staged_bytes=1)
        h.answer(COMMITTED, e, r, step=3)
    digest = layout_digest(h.core.groups["g"].record.layouts[e].phy2log.numpy())

    def hello_a1(inc: str, layouts: Any = None) -> list[str]:
        body = {
            "agent": "a1", "incarnation": inc, "node": "n1", "software_version": "test",
            "protocol_version": 1, "workers": [hello(1, e)],
        }  # fmt: skip
        if layouts is not None:
            body["layouts"] = layouts
        return [o.type for o in h.send(b"a1", AGENT_HELLO, body)]

    # an agent that holds the layout gets the welcome alone, however often it asks
    held = [{"group": "g", "epoch": e, "digest": digest}]
    assert hello_a1("ai1", held) == [WELCOME]
    assert hello_a1("ai1", held) == [WELCOME]
    # another digest, an older epoch or a malformed list: the layout follows
    assert hello_a1("ai1", [{"group": "g", "epoch": e, "digest": digest ^ 1}]) == [WELCOME, LAYOUT]
    h.clock.advance(1.0)
    assert hello_a1("ai1", [{"group": "g", "epoch": e - 1, "digest": 5}]) == [WELCOME, LAYOUT]
    h.clock.advance(1.0)
    assert hello_a1("ai1", "garbage") == [WELCOME, LAYOUT]
    # a restarted agent holding nothing (or of an older version) gets it once per heartbeat
    # interval while it repeats its agent_hello
    assert hello_a1("ai1-b") == [WELCOME, LAYOUT]
    assert hello_a1("ai1-b") == [WELCOME]
    h.clock.advance(0.5)
    assert hello_a1("ai1-b") == [WELCOME]
    h.clock.advance(0.6)
    assert hello_a1("ai1-b") == [WELCOME, LAYOUT]
    assert hello_a1("ai1-c") == [WELCOME, LAYOUT]  # a new process: at once


def test_the_planners_own_stall_is_not_its_agents_silence(h: Harness) -> None:
    h.hello_all()
    e = _prepare_epoch(h)
    core, g = h.core, h.core.groups["g"]
    assert core.loop_turn(0.1) == 0.0  # the first turn
    h.clock.advance(0.3)
    assert core.loop_turn(0.1) == 0.0  # a normal turn: 0.1 s poll plus some work
    deadline = g.attempt.deadline
    h.clock.advance(30.0)  # stopped: past the prepare deadline (20 s), agents dead after 5 s
    assert core.loop_turn(0.1) == pytest.approx(29.9)
    assert g.attempt.deadline == pytest.approx(deadline + 29.9)
    assert [o for o in core.tick() if o.type == ABORT] == []
    assert g.attempt.in_flight and core.complete(g)
    st = core.status()
    assert st["planner"]["counters"]["stalls"] == 1 and [
        r["state"] for r in st["groups"][0]["ranks"]
    ] == ["alive", "alive"]
    # time it runs still counts: agents silent for 5 heartbeat intervals of it are dead
    out = []
    for _ in range(6):
        h.clock.advance(1.0)
        assert core.loop_turn(1.0) == 0.0
        out += core.tick()
    assert [o.type for o in out if o.type == ABORT] and "dead" in g.attempt.reason
    assert e == g.attempt.epoch


def _prepare_epoch(h: Harness) -> int:
    out = h.feed_windows(2)
    (p, *_) = [o for o in out if o.type == PREPARE]
    return int(p.body["epoch"])


def test_a_rank_that_cannot_stage_aborts_and_the_epoch_is_never_reused(h: Harness) -> None:
    h.hello_all()
    e1 = _prepare_epoch(h)
    h.answer(STAGED, e1, 0, ok=True, reason="", staged_bytes=1)
    out = h.answer(STAGED, e1, 1, ok=False, reason="no staging memory", staged_bytes=0)
    aborts = [o for o in out if o.type == ABORT]
    assert sorted(o.identity for o in aborts) == [b"a0", b"a1"]
    assert "no staging memory" in aborts[0].body["reason"]
    assert h.state_file()["history"][-1]["state"] == "aborted"
    assert h.core.groups["g"].record.epoch == 0
    # a forced retry takes a new epoch
    ok, msg, data, out = h.core.command({"op": "rebalance", "group": "g", "dry_run": False})
    assert ok, msg
    assert data["epoch"] == e1 + 1


def test_deadline_and_dead_agent_and_worker_left_abort(h: Harness) -> None:
    h.hello_all()
    e = _prepare_epoch(h)
    h.clock.advance(19.0)
    h.heartbeats()
    assert [o for o in h.core.tick() if o.type == ABORT] == []
    h.clock.advance(1.0)
    h.heartbeats()
    out = h.core.tick()
    assert [o.type for o in out if o.type == ABORT] == [ABORT, ABORT]
    assert "deadline" in h.core.groups["g"].attempt.reason

    # dead agent: a1 goes silent for 5 heartbeat intervals
    ok, _, data, _ = h.core.command({"op": "rebalance", "group": "g"})
    assert ok and data["epoch"] == e + 1
    for _ in range(6):
        h.clock.advance(1.0)
        h.send(b"a0", HEARTBEAT, {"sender": "a0", "incarnation": "ai0"})
        out = h.core.tick()
    a = h.core.groups["g"].attempt
    assert a.state == "aborted" and "agent a1 is dead" in a.reason
    st = h.core.status()["groups"][0]
    assert not st["complete"] and st["ranks"][1]["state"] == "dead"
    ok, msg, _, _ = h.core.command({"op": "rebalance", "group": "g"})
    assert not ok and "group_incomplete" in msg  # never prepares without every rank

    # the agent comes back; then a worker leaves mid-commit
    h.hello_all()
    ok, _, data, _ = h.core.command({"op": "rebalance", "group": "g"})
    assert ok and data["epoch"] == e + 2
    out = h.send(
        b"a1",
        WORKER_LEFT,
        {
            "agent": "a1",
            "group": "g",
            "ep_rank": 1,
            "worker": "w1",
            "incarnation": "wi1",
            "reason": "crashed",
        },
    )
    assert ABORT in [o.type for o in out]
    assert "crashed" in h.core.groups["g"].attempt.reason
    # ... and rejoins with a new incarnation, carrying its hello
    out = h.send(
        b"a1",
        WORKER_JOINED,
        {
            "agent": "a1",
            "group": "g",
            "ep_rank": 1,
            "worker": "w1",
            "incarnation": "wi1-b",
            "epoch": 0,
            "hello": hello(1, 0, inc="wi1-b"),
        },
    )
    assert h.core.complete(h.core.groups["g"])
    epochs = [x["epoch"] for x in h.state_file()["history"]]
    assert epochs == [e, e + 1, e + 2] and all(
        x["state"] == "aborted" for x in h.state_file()["history"]
    )


def test_restart_mid_commit_when_the_ranks_committed(h: Harness) -> None:
    h.hello_all()
    e = _prepare_epoch(h)
    h.answer(STAGED, e, 0, ok=True, reason="", staged_bytes=1)
    h.restart()  # the planner dies before any committed report
    g = h.core.groups["g"]
    assert g.attempt is not None and g.attempt.restored and g.record.max_epoch == e
    # the agents re-register; their workers already serve epoch e
    h.hello_all(epochs=(e, e))
    assert g.record.epoch == e
    hist = h.state_file()["history"]
    assert hist[-1]["epoch"] == e and hist[-1]["state"] == "committed"
    assert hist[-1]["restored"] is True
    ok, _, data, _ = h.core.command({"op": "rollback", "group": "g", "epoch": 0})
    assert ok and data["epoch"] == e + 1


def test_restart_mid_commit_when_the_ranks_did_not_commit(h: Harness) -> None:
    h.hello_all()
    e = _prepare_epoch(h)
    h.restart()
    out = h.hello_all(epochs=(0, 0))
    aborts = [o for o in out if o.type == ABORT]
    assert aborts and aborts[0].body["epoch"] == e
    assert h.state_file()["history"][-1]["state"] == "aborted"
    assert h.core.groups["g"].record.epoch == 0
    # a commit that raced the abort still wins
    h.answer(COMMITTED, e, 0, step=77)
    assert h.core.groups["g"].record.epoch == e


def test_a_commit_that_raced_its_abort_is_committed_after_a_restart(h: Harness) -> None:
    h.hello_all()
    e = _prepare_epoch(h)
    _stage_all(h, e)
    h.clock.advance(h.core.config.commit_timeout_s + 1)
    h.heartbeats()
    h.core.tick()
    assert h.state_file()["history"][-1]["state"] == "aborted"
    h.answer(COMMITTED, e, 0, step=77)  # the flip raced the abort: the group serves e
    assert h.state_file()["pending"]["state"] == "committing"
    h.restart()  # before rank 1's report
    h.hello_all(epochs=(e, e))
    hist = h.state_file()["history"]
    assert [x["state"] for x in hist if x["epoch"] == e] == ["committed"]
    assert h.core.groups["g"].record.epoch == e


def test_registration_keeps_the_commit_steps_the_ranks_reported(h: Harness) -> None:
    h.hello_all()
    e = _prepare_epoch(h)
    _stage_all(h, e)
    h.answer(COMMITTED, e, 1, step=1234)
    h.restart()
    h.hello_all(epochs=(e, e))  # rank 0 says it serves e at registration: its step is unknown
    last = h.state_file()["history"][-1]
    assert last["state"] == "committed" and last["committed"] == {"0": -1, "1": 1234}
    assert not [f for f in last["flags"] if "different commit steps" in f]


def test_an_older_epochs_layout_is_kept_not_taken_for_the_served_one(h: Harness) -> None:
    h.hello_all(epochs=(9, 9))  # the ranks serve 9, its layout unknown here
    g = h.core.groups["g"]
    old = Layout.from_phy2log([[0, 1, 2, 3, 1, 1]] * L, E)
    h.send(b"a0", LAYOUT, {"agent": "a0", "group": "g", "epoch": 4}, {"phy2log": old.phy2log})
    assert g.record.epoch == 0 and g.layout_unknown
    ok, msg, _, _ = h.core.command({"op": "rebalance", "group": "g"})
    assert not ok and "layout_unknown" in msg  # never planned from epoch 4's layout


def test_unknown_epoch_is_adopted_from_an_agent_layout(h: Harness) -> None:
    h.hello_all(epochs=(9, 9))  # e.g. the state directory was reset
    g = h.core.groups["g"]
    assert g.layout_unknown and g.record.max_epoch == 9
    ok, msg, _, _ = h.core.command({"op": "rebalance", "group": "g"})
    assert not ok and "layout_unknown" in msg
    lay = Layout.from_phy2log([[0, 1, 2, 3, 2, 2]] * L, E)
    h.snapshot(h.skewed_counts(lay), 9)
    assert g.drops["unknown_epoch"] == 1
    assert (
        h.send(b"a0", LAYOUT, {"agent": "a0", "group": "g", "epoch": 9}, {"phy2log": lay.phy2log})
        == []
    )
    assert g.record.epoch == 9 and not g.layout_unknown
    h.snapshot(h.skewed_counts(lay), 9)
    assert g.snapshots == 1
    out = h.send(
        b"a0",
        LAYOUT,
        {"agent": "a0", "group": "g", "epoch": 10},
        {"phy2log": torch.full((L, P), E, dtype=torch.int64)},
    )
    assert out[0].type == ERROR and out[0].body["code"] == "bad_layout"


SPLIT = Layout.from_phy2log(
    [[0, 1, 2, 3, 2, 2]] * L, E, share=[[1, 1, 2, 1, 1, 0]] * L
)  # expert 2's rows 2 : 1 : 0 over its slots 2, 4, 5


def test_a_weighted_split_is_prepared_committed_kept_and_sent_down(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeClock(), plan_fn=lambda load, **kw: SPLIT)
    h.hello_all()
    prepares = [o for o in h.feed_windows(2) if o.type == PREPARE]
    assert prepares and all(torch.equal(o.tensors["share"], SPLIT.share) for o in prepares)
    epoch = int(prepares[0].body["epoch"])
    # an agent's report of this epoch with another split is refused
    equal = {"phy2log": SPLIT.phy2log}
    out = h.send(b"a0", LAYOUT, {"agent": "a0", "group": "g", "epoch": epoch}, equal)
    assert out[0].type == ERROR and out[0].body["code"] == "bad_layout"
    for r in range(G):
        h.answer(STAGED, epoch, r, ok=True, reason="", staged_bytes=1)
    out = h.answer(COMMITTED, epoch, 0, step=16)
    layouts = [o for o in out if o.type == LAYOUT]
    assert len(layouts) == G and all(torch.equal(o.tensors["share"], SPLIT.share) for o in layouts)
    assert h.state_file()["layouts"][-1]["layout"]["share"] == SPLIT.share.tolist()
    h.restart()
    assert h.core.groups["g"].current_layout == SPLIT


def test_an_agent_layout_keeps_its_split(h: Harness) -> None:
    h.hello_all(epochs=(9, 9))
    tensors = {"phy2log": SPLIT.phy2log, "share": SPLIT.share}
    assert h.send(b"a0", LAYOUT, {"agent": "a0", "group": "g", "epoch": 9}, tensors) == []
    assert h.core.groups["g"].current_layout == SPLIT
    bad = SPLIT.share.clone()
    bad[0, 0] = 0  # expert 0 has no replica with a share
    tensors = {"phy2log": SPLIT.phy2log, "share": bad}
    h.core.groups["g"].ranks[0].epoch = 10
    out = h.send(b"a0", LAYOUT, {"agent": "a0", "group": "g", "epoch": 10}, tensors)
    assert out[0].type == ERROR and out[0].body["code"] == "bad_layout"
    assert h.core.groups["g"].record.epoch == 9


def test_operator_commands(h: Harness) -> None:
    h.hello_all()
    h.feed_windows(1)
    ok, msg, data, out = h.core.command({"op": "freeze", "group": "g", "layers": [1]})
    assert ok and data["frozen_layers"] == [1] and out == []
    assert h.state_file()["frozen_layers"] == [1]
    ok, msg, data, out = h.core.command({"op": "rebalance", "group": "g", "dry_run": True})
    assert ok and out == [] and msg.startswith("dry run")
    assert data["decision"]["changed_layers"] == [0]
    assert data["decision"]["layers"][1]["why"] == "frozen"
    ok, msg, data, _ = h.core.command({"op": "freeze", "group": "g"})
    ok, msg, data, _ = h.core.command({"op": "rebalance", "group": "g"})
    assert not ok and "frozen" in msg
    ok, msg, data, _ = h.core.command({"op": "unfreeze", "group": "g"})
    assert ok and data == {"schema_version": 1, "group": "g", "frozen": False, "frozen_layers": []}
    ok, msg, _, _ = h.core.command({"op": "rollback", "group": "g", "epoch": 4})
    assert not ok and "no layout of epoch 4" in msg
    ok, msg, _, _ = h.core.command({"op": "rollback", "group": "g", "epoch": 0})
    assert not ok and "same_layout" in msg
    ok, msg, _, _ = h.core.command({"op": "freeze", "group": "nope"})
    assert not ok and "unknown group" in msg
    ok, msg, _, _ = h.core.command({"op": "freeze", "group": "g", "layers": [L]})
    assert not ok and "do not exist" in msg
    # through the socket path: command -> command_reply
    (rep,) = h.send(b"cli", COMMAND, {"op": "unfreeze", "group": "g", "layers": [1]})
    assert rep.type == COMMAND_REPLY and rep.body["ok"] is True


def _stage_all(h: Harness, epoch: int) -> None:
    for r in range(G):
        h.answer(STAGED, epoch, r, ok=True, reason="", staged_bytes=1)


def _commit(h: Harness, epoch: int) -> None:
    _stage_all(h, epoch)
    for r in range(G):
        h.answer(COMMITTED, epoch, r, step=10)


def test_an_empty_layer_list_is_refused_not_read_as_the_whole_group(h: Harness) -> None:
    h.hello_all()
    for op in ("freeze", "unfreeze", "rebalance"):
        ok, msg, _, _ = h.core.command({"op": op, "group": "g", "layers": []})
        assert not ok and "empty" in msg, (op, msg)
    rec = h.core.groups["g"].record
    assert not rec.frozen and rec.frozen_layers == []


def test_a_cooldown_stamped_in_the_future_still_holds_after_a_restart(h: Harness) -> None:
    """The wall clock stepped back across a restart: the last rebalance looks like it is yet
    to come. The cooldown then runs from the restart, it is not dropped."""
    h.hello_all()
    _commit(h, _prepare_epoch(h))
    h.clock.advance(3600.0)
    rec = h.core.groups["g"].record
    rec.last_rebalance_wall = h.clock.time() + 600.0
    h.core._persist(h.core.groups["g"])
    h.restart()
    g = h.core.groups["g"]
    assert g.last_rebalance_mono is not None
    assert h.clock.monotonic() - g.last_rebalance_mono < h.core.config.policy.cooldown_s


def test_a_refused_command_is_not_shown_as_the_planners_intention(h: Harness) -> None:
    """status and top show what the planner means to do; a rollback it refused, or a dry run,
    is in the decisions list but not in BALANCE/PLANNED."""
    h.hello_all()
    _commit(h, _prepare_epoch(h))  # epoch 1 in service, the skew balanced
    h.feed_windows(1, epoch=1, layout=h.core.groups["g"].current_layout)

    def views() -> tuple[Any, ...]:
        st = h.core.status("status")["groups"][0]
        top = h.core.status("top")["groups"][0]
        layers = [(x["balance_planned"], x["moves"], x["why"]) for x in top["layers"]]
        return st["balance_planned"], st["balance_after"], top["balance_planned"], layers

    before = views()
    # rank 1 leaves: the group is incomplete and the rollback to epoch 0 is refused
    h.send(
        b"a1",
        WORKER_LEFT,
        {"agent": "a1", "group": "g", "ep_rank": 1, "worker": "w1", "incarnation": "wi1",
         "reason": "timeout"},
    )  # fmt: skip
    ok, msg, data, out = h.core.command({"op": "rollback", "group": "g", "epoch": 0})
    assert not ok and out == [] and "group_incomplete" in msg
    assert data["decision"]["trigger"] == "rollback"
    assert views() == before
    ok, msg, data, out = h.core.command(
        {"op": "rollback", "group": "g", "epoch": 0, "dry_run": True}
    )
    assert ok and out == []
    assert views() == before
    hist = h.core.status("history")["groups"][0]["decisions"]
    assert [d["trigger"] for d in hist[-2:]] == ["rollback", "rollback"]


def test_status_views(h: Harness) -> None:
    h.hello_all()
    h.feed_windows(1)
    (rep,) = h.send(b"cli", STATUS_REQUEST, {"what": "top"})
    assert rep.type == STATUS_REPLY
    top = rep.body["data"]["groups"][0]
    assert top["source"] == "forecast" and len(top["layers"]) == L
    assert top["layers"][0]["hot"][0]["expert"] == HOT
    assert top["layers"][0]["hot"][0]["replicas"] == 1
    assert top["balance_now"] > top["lower_bound"]
    (rep,) = h.send(b"cli", STATUS_REQUEST, {"what": "heatmap", "group": "g"})
    hm = rep.body["data"]["groups"][0]
    assert len(hm["by_gpu"]) == L and len(hm["by_gpu"][0]) == G and len(hm["by_expert"][0]) == E
    assert hm["by_gpu"][0][0] > hm["by_gpu"][0][1]  # the hot expert is on GPU 0
    (rep,) = h.send(b"cli", STATUS_REQUEST, {"what": "history"})
    hist = rep.body["data"]["groups"][0]
    assert hist["decisions"][-1]["reason"] == "insufficient_data"
    assert hist["decisions"][-1]["layers"][0]["balance_now"] is not None
    (rep,) = h.send(b"cli", STATUS_REQUEST, {"what": "status"})
    data = rep.body["data"]
    assert data["schema_version"] == 1 and data["planner"]["incarnation"] == h.core.incarnation
    assert data["groups"][0]["data"]["windows"] == 1
    (err,) = h.send(b"cli", STATUS_REQUEST, {"what": "nope"})
    assert err.type == ERROR and err.body["code"] == "bad_field"
    (err,) = h.send(b"cli", STATUS_REQUEST, {"what": "status", "group": "zz"})
    assert err.type == ERROR and err.body["code"] == "unknown_group"


def test_garbage_on_the_control_path_is_answered_and_counted(h: Harness) -> None:
    h.hello_all()
    cases = [
        [b"junk"],
        [b"EPLBD", b"\x02", b"hello", b"\x80"],
        [b"EPLBD", b"\x01", b"nope", b"\x80"],
        [b"EPLBD", b"\x01", b"status_request", b"\xc1"],
        encode(STAGED, {"group": "g"}),  # missing fields
        encode(
            PREPARE,
            {"group": "g", "epoch": 1, "timeout_s": 1.0},
            {"phy2log": torch.zeros(L, P, dtype=torch.int64)},
        ),
    ]
    for frames in cases:
        (out,) = h.core.on_control_frames(b"evil", frames)
        assert out.type == ERROR
    assert h.core.counters.bad_total == len(cases)
    h.core.on_snapshot_frames([b"junk", b"more"])
    h.core.on_snapshot_frames(encode(HEARTBEAT, {"sender": "x", "incarnation": "y"}))
    assert h.core.counters.bad_total == len(cases) + 2
    (rep,) = h.send(b"cli", STATUS_REQUEST, {"what": "status"})
    assert rep.type == STATUS_REPLY


def test_a_layout_no_rank_serves_is_not_believed(h: Harness) -> None:
    h.hello_all()
    lay = Layout.from_phy2log([[0, 1, 2, 3, 2, 2]] * L, E)
    assert (
        h.send(b"a0", LAYOUT, {"agent": "a0", "group": "g", "epoch": 4}, {"phy2log": lay.phy2log})
        == []
    )
    g = h.core.groups["g"]
    assert g.record.epoch == 0 and 4 not in g.record.layouts
    assert g.drops["layout_not_served"] == 1


def test_an_error_is_never_answered_with_an_error(h: Harness) -> None:
    assert h.send(b"x", ERROR, {"code": "bad_field", "message": "no", "in_reply_to": ""}) == []


def test_a_store_that_stops_being_writable_shows_in_status_text_and_metrics(
    h: Harness,
) -> None:
    import io

    from eplbd.cli._output import Output
    from eplbd.cli.status import render
    from eplbd.controller import PlannerMetrics

    metrics = PlannerMetrics()
    h.core.metrics = metrics
    h.hello_all()
    h.core.command({"op": "freeze", "group": "g", "layers": [0]})

    def text() -> str:
        buf = io.StringIO()
        render(Output(buf, color=False), {"endpoint": "x", **h.core.status("status")})
        return buf.getvalue()

    assert h.core.status("status")["planner"]["store"]["writable"] is True
    assert "not writable" not in text()
    assert metrics.registry.collector_registry.get_sample_value("eplbd_planner_store_writable") == 1

    def refuse(src: str, dst: str) -> None:
        raise OSError(30, "Read-only file system")

    assert h.core.store is not None
    h.core.store._replace = refuse
    ok, msg, _, _ = h.core.command({"op": "freeze", "group": "g", "layers": [1]})
    assert not ok and "not persisted" in msg
    store = h.core.status("status")["planner"]["store"]
    assert store["writable"] is False and store["errors"] == 1
    assert "Read-only file system" in store["last_error"]
    shown = text()
    assert "state directory not writable" in shown and "Read-only file system" in shown, shown
    reg = metrics.registry.collector_registry
    assert reg.get_sample_value("eplbd_planner_store_writable") == 0
    assert reg.get_sample_value("eplbd_planner_store_errors_total") == 1
    # writable again: the next write clears it (the count stays)
    h.core.store._replace = os.replace
    ok, _, _, _ = h.core.command({"op": "unfreeze", "group": "g"})
    assert ok and h.core.status("status")["planner"]["store"]["writable"] is True
    assert "not writable" not in text()
    assert reg.get_sample_value("eplbd_planner_store_writable") == 1


def test_load_windows_survive_a_restart_at_a_bounded_write_cost(tmp_path: Path) -> None:
    clock = FakeClock()
    h = Harness(tmp_path, clock, window_save_s=25.0)
    h.hello_all()
    h.feed_windows(1)
    store = h.core.store
    assert store is not None and store.window_writes == 1  # the first closed window
    h.feed_windows(2)  # 10 s apart: within window_save_s of the last write
    assert store.window_writes == 1
    h.feed_windows(1)  # 30 s after the first write
    assert store.window_writes == 2
    h.feed_windows(1)
    forecast = h.core.groups["g"].window.forecast()
    _, _, before, _ = h.core.command({"op": "rebalance", "group": "g", "dry_run": True})
    clock.advance(5.0)
    h.restart()  # close() writes what the last save missed
    assert store.window_writes == 3
    g = h.core.groups["g"]
    assert torch.equal(g.window.forecast(), forecast) and g.window.windows == 4
    h.hello_all()
    _, _, after, _ = h.core.command({"op": "rebalance", "group": "g", "dry_run": True})
    for key in ("balance_now", "balance_planned", "moves", "changed_layers", "layers"):
        assert after["decision"][key] == before["decision"][key], key
    restored = h.core.status()["groups"][0]["data"]["restored"]
    assert restored["windows"] == 4 and restored["epoch"] == 0 and restored["age_s"] == 5.0
    # too old: not restored, and the start-up notes say why
    clock.advance(4000.0)
    h.restart()
    assert h.core.groups["g"].window.windows == 0
    assert any("not restored" in n and "more than 3600 s" in n for n in h.core.notes)
    # unreadable: skipped with a note, never fatal
    (tmp_path / "windows" / "g.npz").write_bytes(b"garbage")
    h.restart()
    assert h.core.groups["g"].window.windows == 0
    assert any("not restored" in n and "g.npz" in n for n in h.core.notes), h.core.notes


def test_time_objective_plans_rows_per_step_from_the_snapshots(tmp_path: Path) -> None:
    """With objective "time" the trigger's figures are modelled times of the forecast
    divided by the forward steps the snapshots recorded (10 per window here)."""
    from eplbd.controller import TimeModel
    from eplbd.planner import default_cost_model

    cm = default_cost_model(2048, 1408)
    with pytest.raises(ValueError, match="cost_model"):
        CoreConfig(objective="time")
    h = Harness(tmp_path, FakeClock(), objective="time", cost_model=cm)
    h.hello_all()
    out = h.feed_windows(2)
    g = h.core.groups["g"]
    assert g.window.steps_per_window() == 10.0
    d = g.last_decision
    assert d is not None and d.objective == "time"
    tm = TimeModel(cm, 10.0)
    forecast = g.window.forecast()
    cur = Layout.default(L, E, P)
    t_now = tm.gpu_times(forecast, cur, G)
    assert d.balance_now == pytest.approx(
        float(t_now.max(dim=1).values.sum() / tm.ideal(forecast, G).sum())
    )
    prepares = [o for o in out if o.type == PREPARE]
    assert d.reason == "changed" and prepares
    assert d.balance_after < d.balance_now


def test_modelled_time_metrics_beside_token_balance(tmp_path: Path) -> None:
    """With a cost model (token objective) status, top and the Prometheus aggregates show
    the modelled time balance and the activated slots per GPU of the layout in service."""
    from eplbd.controller import PlannerMetrics, TimeFigures, TimeModel
    from eplbd.planner import activated_slots, default_cost_model, time_balance

    cm = default_cost_model(2048, 1408)
    metrics = PlannerMetrics()
    h = Harness(tmp_path, FakeClock(), metrics=metrics, cost_model=cm)
    h.hello_all()
    g = h.core.groups["g"]
    assert h.core.status()["groups"][0]["time"] is None  # no window counted its steps yet
    h.feed_windows(2)
    cur = g.current_layout
    forecast = g.window.forecast()
    st = h.core.status()["groups"][0]
    assert st["objective"] == "tokens" and g.last_decision.objective == "tokens"
    t = st["time"]
    assert t["time_balance"] == pytest.approx(time_balance(forecast, cur, G, cm, steps=10.0))
    act = activated_slots(forecast, cur, G, steps=10.0)
    assert t["activated_slots_max"] == pytest.approx(float(act.max()), abs=1e-4)
    assert t["activated_slots_mean"] == pytest.approx(float(act.mean()), abs=1e-4)
    tf = TimeFigures.of(TimeModel(cm, 10.0), forecast, cur, G)
    top = h.core.status("top")["groups"][0]
    assert top["time"] == t
    assert [row["time_balance"] for row in top["layers"]] == pytest.approx(tf.layer_balance)
    assert [row["activated_slots"] for row in top["layers"]] == pytest.approx(
        tf.layer_activated, abs=1e-4
    )
    series = dict(
        line.rsplit(" ", 1) for line in metrics.render().splitlines() if not line.startswith("#")
    )
    assert float(series['eplbd_planner_time_balance{group="g"}']) == pytest.approx(tf.balance)
    assert float(series['eplbd_planner_step_seconds{group="g"}']) == pytest.approx(tf.step_us / 1e6)
    max_series = series['eplbd_planner_activated_slots{group="g",kind="max"}']
    assert float(max_series) == pytest.approx(tf.activated_max)
    # the tables show them (eplbd status, eplbd top)
    import io

    from eplbd.cli import status as status_cmd
    from eplbd.cli import top as top_cmd
    from eplbd.cli._output import Output

    buf = io.StringIO()
    status_cmd.render(Output(buf, color=False), h.core.status())
    text = buf.getvalue()
    assert "TIME BAL" in text and "ACTIVE/GPU" in text
    assert f"{t['activated_slots_mean']:.1f}/{t['activated_slots_max']:.1f}" in text
    buf = io.StringIO()
    top_cmd.render(Output(buf, color=False), h.core.status("top"))
    text = buf.getvalue()
    assert "TIME BAL" in text and f"{t['step_us']:.0f} us/step" in text


def test_the_regime_forecast_restarts_at_a_change_of_traffic_and_counts_it(
    tmp_path: Path,
) -> None:
    """forecast = regime: six windows with expert HOT hot, then two with expert 0 hot. The
    change is found once (status, the counter), the forecast is the new traffic's mean, and
    the count survives a restart (the saved regime state)."""
    from eplbd.controller import PlannerMetrics

    metrics = PlannerMetrics()
    quiet = TriggerPolicy(min_gain=1000.0, cooldown_s=30.0, min_windows=2, min_tokens=1)
    h = Harness(tmp_path, FakeClock(), metrics=metrics, forecast="regime", policy=quiet,
                window_save_s=0.0)  # fmt: skip
    h.hello_all()
    h.feed_windows(6)
    lay = Layout.default(L, E, P)

    def counts(hot: int) -> torch.Tensor:
        return torch.where(lay.phy2log == hot, 100, 10).to(torch.int32)

    reg = metrics.registry.collector_registry
    name = "eplbd_planner_traffic_changes_total"
    assert not reg.get_sample_value(name, {"group": "g"})
    for _ in range(2):
        for a in range(G):
            h.snapshot(counts(0), 0, a)
        h.clock.advance(10.0)
        h.heartbeats()
        h.core.tick()
    data = h.core.status("status")["groups"][0]["data"]
    assert data["forecast"] == "regime"
    assert data["regime"]["changes"] == 1 and data["regime"]["windows_in_mean"] == 2, data
    assert data["regime"]["last_change"] == "switch" and data["regime"]["following_drift"] is False
    assert reg.get_sample_value(name, {"group": "g"}) == 1
    f = h.core.groups["g"].window.forecast()  # type: ignore[union-attr]
    assert f is not None and int(f[0].argmax()) == 0  # the new traffic's hot expert
    import io

    from eplbd.cli._output import Output
    from eplbd.cli.status import render

    buf = io.StringIO()
    render(Output(buf, color=False), {"endpoint": "x", **h.core.status("status")})
    assert (
        "forecast: regime mean of 2 windows, 1 changes of traffic found (the last a switch)"
        in buf.getvalue()
    )
    st = h.core.status("status")
    st["groups"][0]["data"]["regime"].update(last_change="drift", following_drift=True)
    buf = io.StringIO()
    render(Output(buf, color=False), {"endpoint": "x", **st})
    assert "found (the last a drift), following the drift; last dispersion" in buf.getvalue()
    h.restart()
    data = h.core.status("status")["groups"][0]["data"]
    assert data["regime"]["changes"] == 1 and data["regime"]["windows_in_mean"] == 2, data
