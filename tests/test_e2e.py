"""The whole controller path with real processes and real sockets (issue 6, "Proof").

``eplbd planner`` and ``eplbd agent`` run as processes; the workers are processes that embed
``EplbClient(agent="ipc://...")`` and serve the reference MoE engine, their ranks joined by
torch.distributed on gloo, under a router with a fixed hot spot (tests/_e2e.py has the
harness). Each worker records, per step, the epoch it served, the error against the no-EPLB
reference and the tokens each GPU computed; the tests compare those records across ranks and
ask the planner through its control socket.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch
import zmq
from _e2e import Stack, balance, epoch_switches, free_port_pair

from eplbd.wire import (
    COMMAND,
    COMMITTED,
    HEARTBEAT,
    HELLO,
    PREPARE,
    SNAPSHOT,
    STAGED,
    STATUS_REQUEST,
    encode,
)

pytestmark = pytest.mark.slow

TOL = 1e-9  # float64 outputs equal the reference up to summation order (about 1e-15 here)


def _wait_first_commit_served(st: Stack, names: list[str], commit_s: float) -> None:
    """Wait for group g's first automatic rebalance to commit (``commit_s``), then for every
    worker of ``names`` to serve the new epoch."""
    st.wait_until(
        lambda: [a["state"] for a in st.attempts("g")] == ["committed"],
        commit_s,
        "an automatic rebalance committed",
    )
    st.wait_until(
        lambda: all(epoch_switches(st.records(n)) for n in names),
        10,
        "the workers serve the new epoch",
    )


def _check_served(stack: Stack, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every output equals the reference; every rank served the same epoch at every step."""
    recs = {n: stack.records(n) for n in names}
    for n, rs in recs.items():
        worst = max(r["err"] for r in rs)
        assert worst < TOL, f"{n}: output differs from the no-EPLB reference by {worst}"
    first = recs[names[0]]
    for n in names[1:]:
        common = min(len(first), len(recs[n]))
        assert common > 0
        split = [s for s in range(common) if recs[n][s]["e"] != first[s]["e"]]
        assert not split, f"{n} served another epoch than {names[0]} at steps {split[:5]}"
    return recs


@pytest.mark.timeout(90)
def test_skewed_load_is_rebalanced_and_committed_on_every_rank() -> None:
    """Planner, agent and two ranks on loopback; the router sends most tokens to a few
    experts. The planner decides on its own (windows of load, forecast, gain above min_gain)
    and commits one new layout: both ranks switch at the same consensus step, every output
    equals the no-EPLB reference, and the balance the ranks measure (tokens each GPU
    computed) improves."""
    with Stack() as st:
        st.start_planner(min_windows=2, min_tokens=1, cooldown_s=600.0)
        agent = st.start_agent("n0")
        specs = st.start_group("g", [agent, agent], sync_interval=8)
        names = [s.name for s in specs]
        _wait_first_commit_served(st, names, 40)
        st.wait_steps(names, 80)
        st.stop_group("g")
        recs = _check_served(st, names)
        switches = {n: epoch_switches(recs[n]) for n in names}
        ((first_new, epoch),) = switches[names[0]]
        assert all(sw == [(first_new, 1)] for sw in switches.values()), switches
        assert first_new % specs[0].sync_interval == 0 and first_new >= 16, first_new
        (att,) = st.attempts("g")
        assert att["trigger"] == "auto" and att["epoch"] == epoch == 1
        assert att["committed"] == {"0": first_new, "1": first_new}, att
        decision = att["decision"]
        assert decision["reason"] == "changed" and decision["moves"] > 0, decision
        assert decision["balance_after"] < decision["balance_now"], decision
        grp = st.group("g")
        assert grp["epoch"] == 1 and grp["complete"] and grp["pending"] is None
        # the balance measured from the tokens each GPU computed improves
        per_rank = [recs[n] for n in names]
        last = min(len(r) for r in per_rank)
        before = balance(per_rank, range(max(0, first_new - 80), first_new))
        after = balance(per_rank, range(first_new, last))
        print(f"measured balance: before {before:.3f}, after {after:.3f}; planner: {decision}")
        assert after < before - 0.05, (before, after)


def _ready_for_commands(st: Stack, group: str, snapshots: int = 2) -> None:
    """The planner sees the whole group and has some of its load."""
    st.wait_until(
        lambda: (g := st.group(group)).get("complete") and g["data"]["snapshots"] >= snapshots,
        40,
        f"group {group} complete with load data",
    )


def _serving(st: Stack, names: list[str], epoch: int, timeout_s: float = 20.0) -> int:
    """Wait until every worker serves ``epoch``; the first step served with it."""
    st.wait_until(
        lambda: all((r := st.records(n)) and r[-1]["e"] == epoch for n in names),
        timeout_s,
        f"{names} serve epoch {epoch}",
    )
    return min(r["s"] for r in st.records(names[0]) if r["e"] == epoch)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("outcome", ["aborted", "committed"])
def test_planner_sigkilled_mid_commit_restores_epoch_and_history(outcome: str) -> None:
    """SIGKILL the planner after its PREPARE reached every rank and before any rank could
    commit (the ranks' weight transfer waits on a file). "aborted": it restarts while the
    ranks still stage, sees them all on the old epoch and aborts the restored attempt.
    "committed": the transfer finishes while the planner is down, the ranks flip by
    consensus on their own, and the restarted planner learns it from the agent's hello."""
    with Stack() as st:
        planner = st.start_planner()
        agent = st.start_agent("n0")
        hold = st.dir / "hold"
        specs = st.start_group("g", [agent, agent], hold_file=str(hold))
        names = [s.name for s in specs]
        _ready_for_commands(st, "g")
        rep = st.command("rebalance", "g")
        assert rep["ok"] and rep["data"]["epoch"] == 1, rep
        _serving(st, names, 1)
        st.wait_until(
            lambda: [a["state"] for a in st.attempts("g")] == ["committed"], 10, "epoch 1 done"
        )

        hold.touch()  # epoch 2: every rank validates it, then its transfer waits
        rep = st.command("rollback", "g", epoch=0)
        assert rep["ok"] and rep["data"]["epoch"] == 2, rep
        st.wait_until(
            lambda: all(st.records(n)[-1]["p"] == 2 for n in names), 10, "PREPARE 2 on all ranks"
        )
        state = json.loads((st.dir / "state" / "groups" / "g.json").read_text())
        assert state["epoch"] == 1 and state["pending"]["epoch"] == 2, state
        planner.daemon.kill()
        if outcome == "committed":
            hold.unlink()
            _serving(st, names, 2)  # the planner is down
        st.start_planner(port=planner.port)  # same state dir, same endpoints
        st.wait_until(
            lambda: [a["state"] for a in st.attempts("g")] == ["committed", outcome],
            20,
            f"the restored attempt {outcome}",
        )
        atts = st.attempts("g")
        assert [(a["epoch"], a["restored"]) for a in atts] == [(1, False), (2, True)], atts
        if outcome == "aborted":
            assert "restarted" in atts[1]["reason"], atts[1]
        else:
            assert any("registration" in f for f in atts[1]["flags"]), atts[1]
        grp = st.group("g")
        assert grp["epoch"] == (1 if outcome == "aborted" else 2) and grp["max_epoch"] == 2
        assert grp["layout_known"], grp

        if outcome == "aborted":
            st.wait_until(
                lambda: all(st.records(n)[-1]["p"] == -1 for n in names), 10, "epoch 2 dropped"
            )
            hold.unlink()
            rep = st.command("rollback", "g", epoch=0)
        else:
            _ready_for_commands(st, "g", 1)
            rep = st.command("rebalance", "g")
        assert rep["ok"] and rep["data"]["epoch"] == 3, rep
        _serving(st, names, 3)
        st.wait_until(
            lambda: [a["state"] for a in st.attempts("g")] == ["committed", outcome, "committed"],
            10,
            "epoch 3 committed",
        )
        st.wait_steps(names, 10)
        st.stop_group("g")
        recs = _check_served(st, names)
        served = [e for _, e in epoch_switches(recs[names[0]])]
        assert served == ([1, 3] if outcome == "aborted" else [1, 2, 3]), served
        assert st.group("g")["epoch"] == 3 == recs[names[0]][-1]["e"]


@pytest.mark.timeout(120)
def test_sigkilled_agent_and_worker_are_reported_and_block_commits() -> None:
    """Two nodes (agents na and nb) serve group g (rank 0 on na, rank 1 on nb); na also
    serves a one-rank group "solo". SIGKILL the solo worker and agent nb: the ranks of g keep
    serving, the planner shows nb dead, g's rank 1 dead and solo's rank left, and refuses to
    rebalance either group; once nb is back, g rebalances again."""
    with Stack() as st:
        st.start_planner()
        na, nb = st.start_agent("na"), st.start_agent("nb")
        g = [s.name for s in st.start_group("g", [na, nb])]
        st.start_group("solo", [na])
        _ready_for_commands(st, "g")
        _ready_for_commands(st, "solo")

        t_kill = time.perf_counter()  # the workers' record times are perf_counter() too
        st.kill_worker("solo-r0")
        nb.daemon.kill()

        def reported() -> bool:
            s = st.status()
            agents = {a["agent"]: a["state"] for a in s["agents"]}
            ranks = {
                (grp["group"], r["ep_rank"]): r["state"]
                for grp in s["groups"]
                for r in grp["ranks"]
            }
            return (
                agents.get("nb") == "dead"
                and ranks.get(("g", 1)) == "dead"
                and ranks.get(("solo", 0)) == "left"
            )

        st.wait_until(reported, 20, "the planner reports agent nb dead and solo-r0 gone")
        s = st.status()
        assert {a["agent"]: a["state"] for a in s["agents"]}["na"] == "alive"
        groups = {grp["group"]: grp for grp in s["groups"]}
        assert not groups["g"]["complete"] and not groups["solo"]["complete"]
        solo_rank = groups["solo"]["ranks"][0]
        assert solo_rank["worker"] == "solo-r0" and solo_rank["left_reason"], solo_rank
        for grp in ("g", "solo"):
            rep = st.command("rebalance", grp)
            assert not rep["ok"], rep
            assert rep["data"]["decision"]["reason"] == "group_incomplete", rep
        st.start_agent("nb")  # the same runtime dir: rank 1 will register again
        # the ranks of g kept serving without a pause, on their layout, with nothing prepared
        st.wait_steps(g, 60)
        for n in g:
            recs = st.records(n)
            assert all(r["e"] == 0 and r["p"] == -1 for r in recs), n
            times = [r["t"] for r in recs if r["t"] > t_kill]
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            # no step waited on the dead agent (a blocked step would stall until the end);
            # the bound leaves room for a loaded machine descheduling a worker
            assert len(times) >= 60 and max(gaps) < 3.0, (n, max(gaps))
        assert st.attempts("g") == [] and st.attempts("solo") == []
        assert na.metrics().get('eplbd_agent_events_total{event="worker_left_timeout"}') == 1

        _ready_for_commands(st, "g", 1)
        rep = st.command("rebalance", "g")
        assert rep["ok"] and rep["data"]["epoch"] == 1, rep
        _serving(st, g, 1)
        st.wait_until(
            lambda: [a["state"] for a in st.attempts("g")] == ["committed"], 10, "committed"
        )
        st.stop_group("g")
        _check_served(st, g)
        assert not st.group("solo")["complete"]


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


@pytest.mark.timeout(120)
def test_planner_and_agent_that_never_answer_cost_the_workers_nothing() -> None:
    """SIGSTOP the planner, then also the agent: the workers keep serving their committed
    layout, their step time does not grow and client.step() never blocks; after SIGCONT the
    controller resynchronises and the next rebalance commits."""
    with Stack() as st:
        planner = st.start_planner()
        # One snapshot a second keeps this test about step times; a stopped daemon with a
        # full snapshot queue is the last test's subject.
        agent = st.start_agent("n0", window_steps=32, record_steps=8)
        names = [s.name for s in st.start_group("g", [agent, agent])]
        _ready_for_commands(st, "g")
        assert st.command("rebalance", "g")["ok"]
        _serving(st, names, 1)  # the layout that must keep serving

        def lowest_step() -> int:
            return min(st.last_step(n) for n in names)

        def phase(done: Callable[[], bool]) -> list[dict[str, Any]]:
            """The records of every rank from now until ``done()``."""
            first = lowest_step() + 1
            st.wait_until(done, 30, "the end of a phase")
            last = lowest_step()
            return [{**r, "w": n} for n in names for r in st.records(n) if first <= r["s"] <= last]

        def lasted(seconds: float, steps: int = 100) -> Callable[[], bool]:
            t0, s0 = time.perf_counter(), lowest_step()
            return lambda: time.perf_counter() - t0 > seconds and lowest_step() > s0 + steps

        base = phase(lasted(0.0))
        planner.daemon.signal(signal.SIGSTOP)
        assert st.request(STATUS_REQUEST, {"what": "status"}, timeout_s=0.5) is None
        # until the agent has given the planner up (3 s of silence) and some more
        long_enough = lasted(4.0)
        no_planner = phase(
            lambda: long_enough() and agent.metrics().get("eplbd_agent_planner_connected") == 0.0
        )
        agent.daemon.signal(signal.SIGSTOP)
        nothing = phase(lasted(6.0))  # the workers' link gives the agent up after 5 s
        agent.daemon.signal(signal.SIGCONT)
        planner.daemon.signal(signal.SIGCONT)

        for ph in (no_planner, nothing):
            assert {r["e"] for r in ph} == {1}, "the committed layout keeps serving"
        step_s = {
            name: [r["fwd"] + r["st"] for r in ph]
            for name, ph in (("base", base), ("no_planner", no_planner), ("nothing", nothing))
        }
        med = {k: _median(v) for k, v in step_s.items()}
        worst_step_call = max(r["st"] for ph in (base, no_planner, nothing) for r in ph)
        print(
            f"median step s {med}, steps {[len(v) for v in step_s.values()]}, "
            f"worst client.step() {worst_step_call:.4f} s"
        )
        for k in ("no_planner", "nothing"):
            assert med[k] <= 2 * med["base"] + 1e-3, med
        assert worst_step_call < 0.25, worst_step_call
        for ph in (no_planner, nothing):  # and serving never paused
            for n in names:
                times = [r["t"] for r in ph if r["w"] == n]
                gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
                assert max(gaps) < 1.0, (n, max(gaps))

        # resynchronised: the agent's session is up again and the planner sees the group
        st.wait_until(
            lambda: agent.metrics().get("eplbd_agent_planner_connected") == 1.0, 20, "session"
        )
        _ready_for_commands(st, "g", 1)
        rep = st.command("rollback", "g", epoch=0)
        assert rep["ok"] and rep["data"]["epoch"] == 2, rep
        _serving(st, names, 2)
        st.stop_group("g")
        _check_served(st, names)


def _raw(st: Stack, kind: int, endpoint: str, identity: bytes | None = None) -> zmq.Socket[Any]:
    s = st.ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        s.setsockopt(zmq.IDENTITY, identity)
    s.connect(endpoint)
    return s


def _frames(
    msg_type: str, body: dict[str, Any], tensors: dict[str, Any] | None = None
) -> list[bytes]:
    return encode(msg_type, body, tensors)


def _packed(body: dict[str, Any]) -> bytes:
    return msgpack.packb(dict(body, schema=1))


def _answers(sock: zmq.Socket[Any], n: int, timeout_s: float = 10.0) -> Counter[str]:
    """The `error` codes of n replies on a raw DEALER."""
    codes: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    while sum(codes.values()) < n and time.monotonic() < deadline:
        if sock.poll(50):
            frames = sock.recv_multipart()
            if frames[2] == b"error":
                codes[msgpack.unpackb(frames[3])["code"]] += 1
    return codes


def _random_messages(n: int) -> list[list[bytes]]:
    rng = random.Random(7)
    return [
        [rng.randbytes(rng.randrange(1, 300)) for _ in range(rng.randrange(4, 7))] for _ in range(n)
    ]


def _bad_metrics(m: dict[str, float], prefix: str) -> dict[str, float]:
    """{reason: n} of the series ``prefix{reason="...",side="workers"}``."""
    tail = '",side="workers"}'
    return {
        k[len(prefix) : -len(tail)]: v
        for k, v in m.items()
        if k.startswith(prefix) and k.endswith(tail)
    }


FLOOD = 300


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["planner", "embedded"])
def test_garbage_on_every_daemon_socket_is_counted_and_dropped(mode: str) -> None:
    """Random bytes, truncated frames, a wrong protocol version, bad msgpack, NaN and
    negative counts, wrong shapes, replayed sequence numbers, unknown epochs, answers for
    epochs never prepared and registrations that contradict the group: on the planner's
    control ROUTER and snapshot PULL and on the agent's ROUTER and PULL (``mode``: a
    standalone planner on tcp, or the agent's embedded planner on ipc). Each is answered or
    dropped, counted per reason, never raises inside a daemon; the workers keep serving and
    a rebalance still commits."""
    L, E, P = 2, 8, 12
    with Stack() as st:
        if mode == "planner":
            st.start_planner()
            agent = st.start_agent("n0")
        else:
            agent = st.start_agent("n0", embedded_planner=True)
        planner = st.planner
        assert planner is not None
        names = [s.name for s in st.start_group("g", [agent, agent])]
        _ready_for_commands(st, "g")
        s0 = st.status()
        assert s0["planner"]["counters"]["bad"] == {}, "a clean run has no bad messages"
        agent_inc = s0["agents"][0]["incarnation"]
        worker_inc = st.ready("g-r0")["inc"]
        good = torch.zeros(L, P, dtype=torch.int32)
        hb = _packed({"sender": "x", "incarnation": "y"})

        def snap(**kw: Any) -> dict[str, Any]:
            b = {"incarnation": "x", "group": "g", "seq": 1, "epoch": 0, "step_start": 0}
            b.update(step_end=8, tokens=100, agent="ghost", ep_ranks=[0, 1])
            b.update(kw)
            return b

        def hello(**kw: Any) -> dict[str, Any]:
            b = {"worker": "junk", "incarnation": "junk-1", "group": "junk", "ep_rank": 0}
            b.update(ep_size=1, node="n0", num_layers=L, num_logical_experts=E)
            b.update(num_physical_experts=P, epoch=0, software_version="t", protocol_version=1)
            b.update(kw)
            return b

        # --- the planner's control socket (ROUTER): every bad message is answered `error`
        ctrl = _raw(st, zmq.DEALER, planner.control)
        bad_ctrl = [
            [b"\x00" * 64],
            [b"EPLBD", b"\x01"],
            [b"XXXXX", b"\x01", b"heartbeat", hb],
            [b"EPLBD", b"\x02", b"heartbeat", hb],
            [b"EPLBD", b"\x01", b"nonsense", hb],
            [b"EPLBD", b"\x01", b"heartbeat", b"\xc1\xc1"],
            [b"EPLBD", b"\x01", b"heartbeat", msgpack.packb({"sender": "x"})],
            _frames(
                COMMITTED,
                {
                    "agent": "ghost",
                    "group": "g",
                    "epoch": 1,
                    "ep_rank": 0,
                    "worker": "g-r0",
                    "step": 5,
                },
            ),
            _frames(STATUS_REQUEST, {"what": "everything"}),
            _frames(COMMAND, {"op": "explode", "group": "g"}),
        ]
        for f in bad_ctrl + _random_messages(FLOOD):
            ctrl.send_multipart(f)
        codes = _answers(ctrl, len(bad_ctrl) + FLOOD)
        assert codes == Counter(
            truncated=2,
            bad_protocol=1 + FLOOD,
            bad_version=1,
            unknown_type=1,
            bad_body=1,
            bad_schema=1,
            hello_required=1,
            bad_field=2,
        ), codes

        # --- the planner's snapshot socket (PULL): counted, nobody to answer
        push = _raw(st, zmq.PUSH, planner.snapshots)
        bad_snaps = [
            [b"\x00" * 64],
            _frames(SNAPSHOT, snap(), {"counts": torch.full((L, P), float("nan"))}),
            _frames(SNAPSHOT, snap(), {"counts": torch.full((L, P), -1, dtype=torch.int32)}),
            _frames(SNAPSHOT, snap(), {"counts": torch.full((L, P), 101, dtype=torch.int32)}),
            _frames(SNAPSHOT, snap(), {"counts": torch.zeros(L, P + 1, dtype=torch.int32)}),
            _frames(SNAPSHOT, snap(), {"counts": good})[:-1] + [b"\x00" * 7],
            _frames(SNAPSHOT, snap(), {"counts": good})[:-1],
            [*_frames(SNAPSHOT, snap(), {"counts": good}), *([b"\x00" * (5 << 20)] * 4)],
            _frames(SNAPSHOT, snap(agent="n0", incarnation=agent_inc, seq=0), {"counts": good}),
            # well formed, but from an agent that never registered: never added to the load
            _frames(SNAPSHOT, snap(agent="ghost2", epoch=999), {"counts": good}),
            _frames(SNAPSHOT, snap(agent="ghost3", group="nope"), {"counts": good}),
            _frames(HEARTBEAT, {"sender": "x", "incarnation": "y"}),
        ]
        for f in bad_snaps + _random_messages(FLOOD):
            push.send_multipart(f)
        want_planner = Counter(
            truncated=3,
            bad_protocol=1 + 2 * FLOOD,
            bad_version=1,
            unknown_type=2,
            bad_body=1,
            bad_schema=1,
            bad_field=4,
            bad_dtype=1,
            bad_count=2,
            bad_shape=1,
            tensor_size=1,
            frame_count=1,
            too_large=1,
            replay=1,
        )
        st.wait_until(
            lambda: Counter(st.status()["planner"]["counters"]["bad"]) == want_planner,
            15,
            "the planner counted every bad message",
        )
        drops = st.group("g")["drops"]
        assert drops == {
            "bad_dtype": 1,
            "bad_count": 2,
            "bad_shape": 1,
            "replay": 1,
            "bad_field": 1,
        }, drops

        # --- the agent's control socket (ROUTER, ipc)
        actl = _raw(st, zmq.DEALER, agent.endpoint)
        bad_actl = [
            [b"\x00" * 64],
            [b"EPLBD", b"\x02", b"heartbeat", hb],
            [b"EPLBD", b"\x01", b"heartbeat", b"\xc1\xc1"],
            _frames(HEARTBEAT, {"sender": "x", "incarnation": "y"}),
            _frames(
                COMMITTED, {"group": "g", "epoch": 1, "ep_rank": 0, "worker": "g-r0", "step": 5}
            ),
            _frames(HELLO, hello(protocol_version=2)),
            _frames(HELLO, hello(group="g", ep_size=2, ep_rank=1, num_logical_experts=9)),
            _frames(HELLO, hello(ep_rank=5, ep_size=2)),
        ]
        for f in bad_actl + _random_messages(FLOOD):
            actl.send_multipart(f)
        codes = _answers(actl, len(bad_actl) + FLOOD)
        assert codes == Counter(
            truncated=1,
            bad_version=2,
            bad_body=1,
            hello_required=2,
            model_mismatch=1,
            bad_field=1,
            bad_protocol=FLOOD,
        ), codes
        # a worker that registers properly (its own group), then misbehaves
        junk = _raw(st, zmq.DEALER, agent.endpoint, b"junk")
        junk.send_multipart(_frames(HELLO, hello()))
        assert junk.poll(5000) and junk.recv_multipart()[2] == b"welcome"
        junk.send_multipart(
            _frames(
                STAGED,
                {
                    "group": "junk",
                    "epoch": 3,
                    "ep_rank": 3,
                    "worker": "junk",
                    "ok": True,
                    "reason": "",
                    "staged_bytes": 1,
                },
            )
        )
        junk.send_multipart(
            _frames(
                PREPARE,
                {"group": "junk", "epoch": 7, "timeout_s": 1.0},
                {"phy2log": torch.zeros(L, P, dtype=torch.int64)},
            )
        )
        junk.send_multipart(
            _frames(
                COMMITTED, {"group": "junk", "epoch": 7, "ep_rank": 0, "worker": "junk", "step": 5}
            )
        )
        assert _answers(junk, 2) == Counter(bad_field=2)

        # --- the agent's snapshot socket (PULL, ipc)
        apush = _raw(st, zmq.PUSH, agent.snapshot_endpoint)

        def js(**kw: Any) -> dict[str, Any]:
            return snap(
                worker="junk",
                incarnation="junk-1",
                group="junk",
                ep_rank=0,
                agent=None,
                ep_ranks=None,
                **kw,
            )

        bad_asnaps = [
            [b"\x00" * 64],
            _frames(
                SNAPSHOT,
                snap(worker="nobody", ep_rank=0, agent=None, ep_ranks=None),
                {"counts": good},
            ),
            _frames(
                SNAPSHOT,
                snap(
                    worker="g-r0",
                    ep_rank=0,
                    agent=None,
                    ep_ranks=None,
                    incarnation=worker_inc + "-old",
                ),
                {"counts": good},
            ),
            _frames(SNAPSHOT, js(), {"counts": torch.full((L, P), float("nan"))}),
            _frames(SNAPSHOT, js(), {"counts": torch.full((L, P), -1, dtype=torch.int32)}),
            _frames(SNAPSHOT, js(seq=1), {"counts": good}),  # accepted
            _frames(SNAPSHOT, js(seq=1, step_start=8, step_end=16), {"counts": good}),  # replay
            # accepted here, forwarded, dropped by the planner: an epoch it never had
            _frames(SNAPSHOT, js(seq=2, epoch=999, step_start=16, step_end=24), {"counts": good}),
        ]
        for f in bad_asnaps + _random_messages(FLOOD):
            apush.send_multipart(f)
        want_agent = {
            "truncated": 2,
            "bad_version": 2,
            "bad_body": 1,
            "bad_field": 3,
            "model_mismatch": 1,
            "stale_incarnation": 2,
            "bad_dtype": 1,
            "bad_count": 1,
            "replay": 1,
            "bad_protocol": 2 * FLOOD,
        }
        prefix = 'eplbd_agent_bad_messages_total{reason="'
        st.wait_until(
            lambda: _bad_metrics(agent.metrics(), prefix) == want_agent,
            15,
            "the agent counted every bad message",
        )
        st.wait_until(
            lambda: st.group("junk").get("drops") == {"unknown_attempt": 1, "unknown_epoch": 1},
            10,
            "the planner dropped what the agent relayed",
        )
        for s in (ctrl, push, actl, junk, apush):
            s.close()

        # nothing raised inside a daemon, and the system still serves
        assert Counter(st.status()["planner"]["counters"]["bad"]) == want_planner
        assert not any("internal_error" in k for k in planner.metrics()), planner.metrics()
        for d in st.daemons:
            text = d.log.read_text()
            for what in (
                "message handling failed",
                "control message failed",
                "snapshot failed",
                "tick failed",
                "Traceback",
            ):
                assert what not in text, f"{d.name}: {what}"
        rep = st.command("rebalance", "g")
        assert rep["ok"] and rep["data"]["epoch"] == 1, rep
        _serving(st, names, 1)
        st.wait_until(
            lambda: [a["state"] for a in st.attempts("g")] == ["committed"], 10, "committed"
        )
        st.stop_group("g")
        _check_served(st, names)


@pytest.mark.timeout(60)
def test_snapshots_from_an_unregistered_agent_are_not_applied() -> None:
    """A well-formed snapshot on the planner's snapshot socket from an agent id the planner
    has never seen (no agent_hello), claiming the group's ranks, must be dropped and counted
    like a control message from an unknown agent (answered hello_required), not added to
    the group's load window."""
    L, E, P = 2, 8, 12
    with Stack() as st:
        agent = st.start_agent("n0", embedded_planner=True)
        assert st.planner is not None
        worker = _raw(st, zmq.DEALER, agent.endpoint, b"w0")
        hello = {"worker": "w0", "incarnation": "w0-1", "group": "g", "ep_rank": 0}
        hello.update(ep_size=1, node="n0", num_layers=L, num_logical_experts=E)
        hello.update(num_physical_experts=P, epoch=0, software_version="t", protocol_version=1)
        worker.send_multipart(_frames(HELLO, hello))
        st.wait_until(lambda: st.group("g").get("complete"), 30, "group g registered")
        body = {"agent": "ghost", "incarnation": "ghost-1", "group": "g", "seq": 1, "epoch": 0}
        body.update(step_start=0, step_end=8, tokens=10**6, ep_ranks=[0])
        push = _raw(st, zmq.PUSH, st.planner.snapshots)
        push.send_multipart(
            _frames(SNAPSHOT, body, {"counts": torch.full((L, P), 10**6, dtype=torch.int32)})
        )

        def handled() -> bool:
            g = st.group("g")
            bad = st.status()["planner"]["counters"]["bad"]
            return bool(g["data"]["snapshots"] or g["drops"] or bad)

        st.wait_until(handled, 10, "the planner handled the snapshot")
        data = st.group("g")["data"]
        worker.close()
        push.close()
        assert data["snapshots"] == 0 and data["tokens"] + data["open_tokens"] == 0, data


# The planner service as a process whose main loop stalls for a few seconds inside the plan
# function (a slow plan, a long fsync, a GC pause, a VM pause: the ZeroMQ I/O thread runs on).
_STALLING_PLANNER = """
import sys, time
from eplbd.controller import PlannerService, PlannerSettings
from eplbd.planner import plan

def slow_plan(*args, **kwargs):
    time.sleep(3.0)
    return plan(*args, **kwargs)

settings = PlannerSettings(listen=sys.argv[1], state_dir=sys.argv[2], metrics=None,
                           log_level="warning", log_format="json")
print("serving", flush=True)
PlannerService(settings, plan_fn=slow_plan).run()
"""


@pytest.mark.timeout(60)
def test_planner_survives_a_peer_that_disconnects_while_its_loop_stalls() -> None:
    """While the planner's loop is busy for 3 s, an agent pushes a burst of snapshots and goes
    away (it restarted, or its own heartbeat timed out). The planner must drop what it cannot
    use and keep serving, not abort."""
    L, E, P = 2, 8, 12
    with Stack() as st:
        port = free_port_pair()
        control = f"tcp://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-c", _STALLING_PLANNER, control, str(st.dir / "state")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"serving"
            ctrl = _raw(st, zmq.DEALER, control, b"a0")
            worker = {"worker": "w0", "incarnation": "w0-1", "group": "g", "ep_rank": 0}
            worker.update(ep_size=1, node="n0", num_layers=L, num_logical_experts=E)
            worker.update(num_physical_experts=P, epoch=0, software_version="t")
            worker.update(protocol_version=1)
            hello: dict[str, Any] = {"agent": "a0", "incarnation": "a0-1", "node": "n0"}
            hello.update(software_version="t")
            hello.update(protocol_version=1, workers=[worker])
            ctrl.send_multipart(_frames("agent_hello", hello))
            assert ctrl.poll(30000) and ctrl.recv_multipart()[2] == b"welcome"
            push = _raw(st, zmq.PUSH, f"tcp://127.0.0.1:{port + 1}")
            body = {"agent": "a0", "incarnation": "a0-1", "group": "g", "seq": 1, "epoch": 0}
            body.update(step_start=0, step_end=8, tokens=100, ep_ranks=[0])
            counts = torch.randint(0, 50, (L, P), dtype=torch.int32)
            push.send_multipart(_frames(SNAPSHOT, body, {"counts": counts}))
            time.sleep(0.5)
            ctrl.send_multipart(_frames(COMMAND, {"op": "rebalance", "group": "g"}))
            time.sleep(0.3)  # the loop is now inside the slow plan
            for seq in range(2, 202):
                push.send_multipart(_frames(SNAPSHOT, {**body, "seq": seq}, {"counts": counts}))
            push.close(linger=1000)  # the agent goes away
            time.sleep(4.0)
            assert proc.poll() is None, f"the planner died with {proc.returncode}"
            # and it still answers
            ctrl.send_multipart(_frames(STATUS_REQUEST, {"what": "status"}))
            assert ctrl.poll(5000)
            ctrl.close()
        finally:
            if proc.poll() is None:
                proc.kill()
            out = proc.communicate(timeout=10)[0].decode(errors="replace")
            print(out[-2000:])


@pytest.mark.timeout(120)
def test_time_objective_commits_a_weighted_split_on_every_rank() -> None:
    """The planner with objective = "time" (the default cost model of a DeepSeek-V2-Lite
    expert) on decode-like steps: reading an expert's weights costs more than its few rows,
    so it leaves replicas idle (a weighted split, shares 0 and 1) and prepares it through
    the real agent; both ranks switch at the same step, every output equals the no-EPLB
    reference, and status shows the time figures. (That idle replicas receive no rows is
    checked per slot in test_client_multiproc.py.)"""
    with Stack() as st:
        st.start_planner(
            min_windows=2,
            min_tokens=1,
            cooldown_s=600.0,
            objective="time",
            expert_shape="2048,1408",
        )
        agent = st.start_agent("n0")
        specs = st.start_group("g", [agent, agent], sync_interval=8, tokens=4)
        names = [s.name for s in specs]
        _wait_first_commit_served(st, names, 60)
        st.wait_steps(names, 40)
        grp = st.group("g")
        layout = st.group("g", "layout")["layout"]
        st.stop_group("g")
        recs = _check_served(st, names)
        ((first_new, epoch),) = epoch_switches(recs[names[0]])
        assert all(epoch_switches(recs[n]) == [(first_new, epoch)] for n in names)
        (att,) = st.attempts("g")
        assert att["decision"]["objective"] == "time", att["decision"]
        assert att["committed"] == {"0": first_new, "1": first_new}, att
        share = layout.get("share")
        assert share is not None and any(0 in row for row in share), layout  # idle replicas
        assert att["decision"]["balance_after"] < att["decision"]["balance_now"]
        assert grp["objective"] == "time" and grp["time"]["activated_slots_max"] > 0, grp
