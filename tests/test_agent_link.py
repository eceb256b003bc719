"""AgentLink, the client's IO thread, against a real agent (thread or process) and a fake one."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
from eplbd_client._agent_link import AgentLink
from test_agent_daemon import (  # the fake planner and helpers of the daemon tests
    DEAD,
    HB,
    FakePlanner,
    hello_body,
    p2l,
    settings_for,
    wait_for,
)

from eplbd.agent import Schedule, start_agent
from eplbd.wire import control_server, encode

pytestmark = pytest.mark.timeout(90)

L, P = 2, 8


class Inbox:
    """What deliver() received, as (type, body, tensors), in order."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[str, dict, dict]] = queue.Queue()

    def __call__(self, msg_type: str, body: dict, tensors: dict) -> None:
        self.q.put((msg_type, body, tensors))

    def expect(self, msg_type: str, timeout: float = 5.0) -> tuple[dict, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                t, b, ts = self.q.get(timeout=0.05)
            except queue.Empty:
                continue
            if t == msg_type:
                return b, ts
        raise AssertionError(f"deliver() never got {msg_type}")


def snapshot_item(seq: int, value: int = 1, s0: int = 0) -> tuple[str, dict, dict]:
    counts = torch.full((L, P), value, dtype=torch.int32)
    body = {
        "worker": "w0",
        "incarnation": "w0-i1",
        "group": "g0",
        "ep_rank": 0,
        "seq": seq,
        "epoch": 0,
        "step_start": s0,
        "step_end": s0 + 8,
        "tokens": int(counts.sum()),
    }
    return ("snapshot", body, {"counts": counts})


def outcome(msg_type: str, epoch: int, **extra: Any) -> tuple[str, dict, dict]:
    return (msg_type, {"group": "g0", "epoch": epoch, "ep_rank": 0, "worker": "w0", **extra}, {})


def worker_link(endpoint: str, deliver: Any, outbox: queue.Queue[Any] | None = None) -> AgentLink:
    """The link of worker w0 (rank 0 of a group of one) to the agent at ``endpoint``."""
    return AgentLink(
        endpoint,
        deliver=deliver,
        outbox=queue.Queue() if outbox is None else outbox,
        hello=lambda: hello_body("w0", 0, ep_size=1),
        heartbeat_s=HB,
    )


def test_link_hello_deliver_and_outbox_against_a_real_agent(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    fp = FakePlanner(ctx)
    agent = start_agent(settings_for(rundir, fp))
    inbox, outbox = Inbox(), queue.Queue[Any]()
    link = worker_link(agent.endpoint, inbox, outbox)
    try:
        fp.pump(lambda p: p.agent)
        link.start()
        welcome, _ = inbox.expect("welcome")
        assert welcome["schedule"]["window_steps"] == 8
        assert welcome["incarnation"] == agent.daemon.incarnation
        assert link.connected
        fp.pump(lambda p: p.told())
        # a schedule change
        agent.daemon.set_schedule(Schedule(16, 8, True))
        sched, _ = inbox.expect("schedule")
        assert (sched["window_steps"], sched["record_steps"]) == (16, 8)
        # prepare from the planner arrives through deliver, with its tensor
        fp.send("prepare", {"group": "g0", "epoch": 1, "timeout_s": 3.0}, {"phy2log": p2l(1)})
        prep, tensors = inbox.expect("prepare")
        assert prep["epoch"] == 1 and torch.equal(tensors["phy2log"], p2l(1))
        # the outbox is drained: staged up the DEALER, a snapshot up the PUSH
        outbox.put_nowait(outcome("staged", 1, ok=True, reason="", staged_bytes=8))
        outbox.put_nowait(snapshot_item(1, value=3))
        fp.pump(lambda p: p.of("staged") and p.snapshots)
        assert fp.of("staged")[0].body["worker"] == "w0"
        assert int(fp.snapshots[0].tensors["counts"].sum()) == 3 * L * P
        fp.send("abort", {"group": "g0", "epoch": 1, "reason": "test"})
        assert inbox.expect("abort")[0]["reason"] == "test"
        # a quiet link stays connected: heartbeats both ways
        time.sleep(1.0)
        assert link.connected
        stats = link.stats()
        assert stats["sent_staged"] == 1 and stats["sent_snapshot"] == 1
        assert "agent_silent" not in stats and "agent_restarts" not in stats
        assert stats.get("sent_heartbeat", 0) == 0  # heartbeats go through the socket directly
    finally:
        link.close()
        agent.stop()
        fp.close()
    assert link._thread is not None and not link._thread.is_alive()


def _agent_proc(rundir: Path, fp: FakePlanner) -> subprocess.Popen[bytes]:
    ctl, snap = fp.endpoints
    cmd = [
        sys.executable,
        "-m",
        "eplbd",
        "agent",
        "--runtime-dir",
        str(rundir),
        "--node",
        "n0",
        "--planner",
        ctl,
        "--planner-snapshots",
        snap,
        "--heartbeat-s",
        str(HB),
        "--dead-timeout-s",
        str(DEAD),
        "--log-level",
        "warning",
        "--metrics",
        "127.0.0.1:0",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_link_says_hello_again_after_the_agent_is_killed_and_restarted(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    fp = FakePlanner(ctx)
    procs = [_agent_proc(rundir, fp)]
    inbox, outbox = Inbox(), queue.Queue[Any]()
    link = worker_link(f"ipc://{rundir}/agent.sock", inbox, outbox)
    try:
        link.start()
        first, _ = inbox.expect("welcome", timeout=30)
        assert link.connected
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(5)
        wait_for(lambda: not link.connected, 3, "link notices the agent is gone")
        # the serving thread keeps putting; nothing blocks, the outbox is drained anyway
        t0 = time.perf_counter()
        for i in range(200):
            outbox.put_nowait(snapshot_item(i + 1))
        outbox.put_nowait(outcome("committed", 1, step=9))
        assert time.perf_counter() - t0 < 5  # a link waiting on the dead agent would block
        wait_for(lambda: outbox.empty(), 3, "outbox drained while the agent is down")
        assert link.stats()["dropped_snapshot"] >= 190
        # a new agent on the same runtime dir (the lock of the dead one is free): hello again
        procs.append(_agent_proc(rundir, fp))
        second, _ = inbox.expect("welcome", timeout=30)
        assert second["incarnation"] != first["incarnation"]
        assert link.stats()["hellos"] >= 2 and link.connected
        # the committed report held while the agent was away reaches the planner
        fp.pump(lambda p: p.of("committed"), timeout=10)
        assert fp.of("committed")[0].body["step"] == 9
    finally:
        link.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        fp.close()


def test_link_never_blocks_the_serving_thread_without_an_agent(rundir: Path) -> None:
    inbox, outbox = Inbox(), queue.Queue[Any]()
    link = worker_link(f"ipc://{rundir}/agent.sock", inbox, outbox)
    link.start()
    try:
        items = [
            snapshot_item(i + 1)
            if i % 10
            else outcome("staged", 1, ok=True, reason="", staged_bytes=0)
            for i in range(5000)
        ]
        times = []
        for item in items:
            t0 = time.perf_counter()
            outbox.put_nowait(item)
            times.append(time.perf_counter() - t0)
        # put_nowait only takes the queue's lock, which the link holds for one get at a time,
        # never across a network wait (its reconnect interval alone is 100 ms). The median is
        # far below that on any machine; a link that waited on the network would show it.
        times.sort()
        assert times[len(times) // 2] < 0.05, times[len(times) // 2]
        wait_for(lambda: outbox.empty(), 10, "outbox drained")
        stats = link.stats()
        assert stats["dropped_snapshot"] == 4500
        assert stats["dropped_staged"] == 500 - 256  # a bounded buffer waits for the agent
        # it keeps trying, with backoff (how many tries by now depends on the machine's speed)
        wait_for(lambda: link.stats()["hellos"] >= 2, 10, "a second hello")
        assert not link.connected
        outbox.put_nowait(("bogus",))
        outbox.put_nowait(("layout", {}, {}))
        wait_for(lambda: link.stats().get("outbox_unknown_type") == 1, 2, "bad items counted")
        assert link.stats()["outbox_malformed"] == 1
    finally:
        # without an agent nothing holds the thread (linger 0): it stops when told
        assert link.close(timeout=30)


def test_close_says_when_the_link_thread_is_still_running(
    ctx: zmq.Context[Any], rundir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A thread that outlives close() is reported (and close returns False), not left
    silently running into the interpreter's exit."""
    fp = FakePlanner(ctx)
    agent = start_agent(settings_for(rundir, fp))
    entered, release = threading.Event(), threading.Event()

    def deliver(msg_type: str, body: dict, tensors: dict) -> None:
        entered.set()
        release.wait(60)  # a deliver that blocks (it should only enqueue)

    link = worker_link(agent.endpoint, deliver)
    try:
        fp.pump(lambda p: p.agent)
        link.start()
        assert entered.wait(10), "the welcome never reached deliver()"
        with caplog.at_level("WARNING", logger="eplbd_client"):
            assert link.close(timeout=0.2) is False
        assert "agent link thread did not stop" in caplog.text
        release.set()
        assert link.close(timeout=30) is True  # idempotent: now it has stopped
    finally:
        release.set()
        link.close(timeout=30)
        agent.stop()
        fp.close()


def test_link_drops_bad_messages_and_survives_a_failing_deliver(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    agent = control_server(ctx, f"ipc://{rundir}/agent.sock")  # a fake agent
    calls: list[str] = []

    def deliver(msg_type: str, body: dict, tensors: dict) -> None:
        calls.append(msg_type)
        if len(calls) == 1:
            raise RuntimeError("engine bug")

    link = worker_link(f"ipc://{rundir}/agent.sock", deliver)
    link.start()
    try:
        got = agent.recv(5000)
        assert got is not None and got.message.type == "hello"
        peer = got.peer
        assert peer == b"w0"
        sched = {"window_steps": 8, "record_steps": 8, "enabled": True}
        bad = [
            [b"junk"],
            [b"EPLBD", b"\x01", b"welcome", b"\x80"],  # body is not a map
            encode(
                "welcome",
                {"incarnation": "a1", "epoch": 2, "schedule": sched},
                {"phy2log": torch.zeros(L, P + 1, dtype=torch.int64)},
            ),  # wrong shape
            encode(
                "prepare", {"group": "g0", "epoch": 1, "timeout_s": -1.0}, {"phy2log": p2l(1)}
            ),  # negative timeout
            encode("status_reply", {"data": {}}),  # not for workers
        ]
        for frames in bad:
            agent.socket.send_multipart([peer, *frames])
        agent.send("welcome", {"incarnation": "a1", "epoch": 0, "schedule": sched}, to=peer)
        agent.send("schedule", sched, to=peer)
        wait_for(lambda: calls == ["welcome", "schedule"], 5, "deliveries")
        stats = link.stats()
        assert stats["deliver_errors"] == 1
        assert sum(v for k, v in stats.items() if k.startswith("bad_")) == len(bad)
        assert link.connected
        # "hello_required" makes it say hello again
        agent.send("error", {"code": "hello_required", "message": "", "in_reply_to": ""}, to=peer)
        # the next hello, past the heartbeats the welcomed link sends meanwhile
        deadline = time.monotonic() + 10
        seen: list[str] = []
        while "hello" not in seen and time.monotonic() < deadline:
            again = agent.recv(200)
            if again is not None:
                seen.append(again.message.type)
        assert "hello" in seen, seen
    finally:
        link.close()
        agent.close()


def test_link_heartbeats_keep_it_registered_at_the_agent(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    fp = FakePlanner(ctx)
    agent = start_agent(settings_for(rundir, fp))
    inbox = Inbox()
    link = worker_link(agent.endpoint, inbox)
    try:
        link.start()
        inbox.expect("welcome")
        deadline = time.monotonic() + DEAD + 1.0  # past the agent's dead timeout
        fp.pump(lambda p: time.monotonic() >= deadline, timeout=5)
        assert fp.told() == ["w0"] and not fp.of("worker_left")
        assert "agent_silent" not in link.stats() and link.connected
    finally:
        link.close()
        agent.stop()
        fp.close()
