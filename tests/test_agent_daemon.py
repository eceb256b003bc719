"""The agent on real sockets: an agent in a thread (or a process), a fake planner bound on
loopback TCP and fake workers on the agent's ipc sockets, all speaking eplbd.wire."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zmq
from _scrape import scrape

from eplbd.agent import AgentSettings, RunningAgent, check_agent_settings, start_agent
from eplbd.wire import (
    BindError,
    CurveServerKeys,
    Message,
    WireSocket,
    control_client,
    control_server,
    generate_keypair,
    load_server_keys,
    snapshot_receiver,
    snapshot_sender,
)

pytestmark = pytest.mark.timeout(60)

L, E, P = 2, 4, 8
HB = 0.2
DEAD = 1.5  # agent dead timeout in these tests: generous, CI machines stall


def hello_body(
    worker: str, rank: int, *, ep_size: int = 4, inc: str | None = None, group: str = "g0"
) -> dict:
    return {
        "worker": worker,
        "incarnation": inc or f"{worker}-i1",
        "group": group,
        "ep_rank": rank,
        "ep_size": ep_size,
        "node": "n0",
        "num_layers": L,
        "num_logical_experts": E,
        "num_physical_experts": P,
        "epoch": 0,
        "software_version": "test",
        "protocol_version": 1,
    }


def wait_for(
    pred: Callable[[], Any],
    timeout: float = 5.0,
    what: str = "condition",
    keep: list[FakeWorker] | None = None,
) -> Any:
    """Poll ``pred`` until true; heartbeat the ``keep`` workers meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        for w in keep or ():
            w.heartbeat()
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class FakePlanner:
    """A ROUTER + PULL on loopback that welcomes agents and heartbeats them."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        control: str = "tcp://127.0.0.1:*",
        snapshots: str | None = "tcp://127.0.0.1:*",
        incarnation: str = "pl-1",
        curve: CurveServerKeys | None = None,
    ) -> None:
        self.ctrl: WireSocket = control_server(ctx, control, curve=curve)
        # None: no snapshot socket yet (bind_snapshots later)
        self.pull: WireSocket | None = (
            None if snapshots is None else snapshot_receiver(ctx, snapshots, curve=curve)
        )
        self._ctx, self._curve = ctx, curve
        self.incarnation = incarnation
        self.control: list[Message] = []
        self.snapshots: list[Message] = []
        self.agent: bytes | None = None
        self.keepalive: list[FakeWorker] = []  # workers heartbeated while pumping
        self._next_hb = 0.0
        self._next_worker_hb = 0.0

    @property
    def endpoints(self) -> tuple[str, str]:
        assert self.pull is not None
        return self.ctrl.endpoint, self.pull.endpoint

    def bind_snapshots(self, endpoint: str) -> None:
        assert self.pull is None
        self.pull = snapshot_receiver(self._ctx, endpoint, curve=self._curve)

    def send(self, msg_type: str, body: dict, tensors: dict | None = None) -> None:
        assert self.agent is not None
        assert self.ctrl.send(msg_type, body, tensors, to=self.agent)

    def pump(self, until: Callable[[FakePlanner], Any], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.ctrl.recv(10)
            if got is not None:
                self.control.append(got.message)
                if got.message.type == "agent_hello":
                    self.agent = got.peer
                    body = {
                        "incarnation": self.incarnation,
                        "epoch": 0,
                        "schedule": {"window_steps": 8, "record_steps": 4, "enabled": True},
                    }
                    self.ctrl.send("welcome", body, to=got.peer)
            snap = None if self.pull is None else self.pull.recv(0)
            if snap is not None:
                self.snapshots.append(snap.message)
            if self.agent is not None and time.monotonic() >= self._next_hb:
                self._next_hb = time.monotonic() + HB
                self.ctrl.send(
                    "heartbeat",
                    {"sender": "planner", "incarnation": self.incarnation},
                    to=self.agent,
                )
            if time.monotonic() >= self._next_worker_hb:
                self._next_worker_hb = time.monotonic() + HB
                for w in self.keepalive:
                    w.heartbeat()
            v = until(self)
            if v:
                return v
        raise AssertionError("fake planner timed out")

    def of(self, msg_type: str) -> list[Message]:
        return [m for m in self.control if m.type == msg_type]

    def told(self) -> list[str]:
        """Workers the agent announced: in an agent_hello or a worker_joined."""
        names = [w["worker"] for m in self.of("agent_hello") for w in m.body["workers"]]
        return names + [m.body["worker"] for m in self.of("worker_joined")]

    def close(self) -> None:
        self.ctrl.close()
        if self.pull is not None:
            self.pull.close()


class FakeWorker:
    def __init__(
        self, ctx: zmq.Context[Any], agent_ep: str, snap_ep: str, name: str, rank: int, **kw: Any
    ) -> None:
        self.name, self.rank = name, rank
        self.hello = hello_body(name, rank, **kw)
        self.ctrl = control_client(ctx, agent_ep, identity=name)
        self.push = snapshot_sender(ctx, snap_ep)
        self.seq = 0

    def say_hello(self) -> Message:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.ctrl.send("hello", self.hello):
                return self.expect("welcome")
            time.sleep(0.01)
        raise AssertionError("could not send hello")

    def expect(self, msg_type: str, timeout: float = 5.0) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.ctrl.recv(20)
            if got is not None and got.message.type == msg_type:
                return got.message
        raise AssertionError(f"{self.name}: no {msg_type}")

    def heartbeat(self) -> None:
        inc, epoch = self.hello["incarnation"], self.hello["epoch"]
        self.ctrl.send("heartbeat", {"sender": self.name, "incarnation": inc, "epoch": epoch})

    def snapshot(self, counts: torch.Tensor, s0: int = 0) -> None:
        self.seq += 1
        body = {
            "worker": self.name,
            "incarnation": self.hello["incarnation"],
            "group": self.hello["group"],
            "ep_rank": self.rank,
            "seq": self.seq,
            "epoch": 0,
            "step_start": s0,
            "step_end": s0 + 8,
            "tokens": int(counts.sum()),
        }
        assert self.push.send("snapshot", body, {"counts": counts}, timeout_ms=1000)

    def answer(self, msg_type: str, epoch: int, **extra: Any) -> None:
        body = {"group": "g0", "epoch": epoch, "ep_rank": self.rank, "worker": self.name, **extra}
        assert self.ctrl.send(msg_type, body)

    def close(self) -> None:
        self.ctrl.close()
        self.push.close()


def settings_for(rundir: Path, planner: FakePlanner | tuple[str, str], **kw: Any) -> AgentSettings:
    ctl, snap = planner.endpoints if isinstance(planner, FakePlanner) else planner
    base: dict[str, Any] = dict(
        planner=ctl,
        planner_snapshots=snap,
        runtime_dir=rundir,
        node="n0",
        heartbeat_s=HB,
        dead_timeout_s=DEAD,
        merge_timeout_s=0.4,
        window_steps=8,
        record_steps=4,
        metrics=None,
    )
    base.update(kw)
    s = AgentSettings(**base)
    check_agent_settings(s)
    return s


def p2l(shift: int) -> torch.Tensor:
    return ((torch.arange(P) + shift) % E).repeat(L, 1).to(torch.int64)


def test_workers_register_merge_relay_and_late_worker_gets_layout(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    fp = FakePlanner(ctx)
    agent = start_agent(settings_for(rundir, fp, metrics="127.0.0.1:0"))
    workers: list[FakeWorker] = []
    try:
        fp.pump(lambda p: p.agent)
        w0 = FakeWorker(ctx, agent.endpoint, agent.snapshot_endpoint, "w0", 0)
        w1 = FakeWorker(ctx, agent.endpoint, agent.snapshot_endpoint, "w1", 1)
        workers += [w0, w1]
        fp.keepalive = workers
        for w in (w0, w1):
            welcome = w.say_hello()
            assert welcome.body["schedule"] == {
                "window_steps": 8,
                "record_steps": 4,
                "enabled": True,
            }
            assert welcome.body["epoch"] == 0
        fp.pump(lambda p: sorted(p.told()) == ["w0", "w1"])
        # snapshots of one window from both local ranks: one merged message
        c0 = torch.randint(0, 9, (L, P), dtype=torch.int32)
        c1 = torch.randint(0, 9, (L, P), dtype=torch.int32)
        w0.snapshot(c0)
        w1.snapshot(c1)
        fp.pump(lambda p: p.snapshots)
        (merged,) = fp.snapshots
        assert merged.body["ep_ranks"] == [0, 1] and merged.body["agent"] == "n0"
        assert np.array_equal(merged.tensors["counts"], (c0 + c1).numpy())
        # prepare goes down to both, staged and committed come up
        fp.send("prepare", {"group": "g0", "epoch": 1, "timeout_s": 5.0}, {"phy2log": p2l(1)})
        for w in (w0, w1):
            prep = w.expect("prepare")
            assert np.array_equal(prep.tensors["phy2log"], p2l(1))
            w.answer("staged", 1, ok=True, reason="", staged_bytes=64)
        fp.pump(lambda p: len(p.of("staged")) == 2)
        assert {m.body["worker"] for m in fp.of("staged")} == {"w0", "w1"}
        w0.answer("committed", 1, step=40)
        w1.answer("committed", 1, step=40)
        fp.pump(lambda p: len(p.of("committed")) == 2)
        # abort goes down to both
        fp.send("abort", {"group": "g0", "epoch": 2, "reason": "operator"})
        assert w0.expect("abort").body["reason"] == "operator"
        w1.expect("abort")
        # a worker that starts late is handed the committed layout
        w2 = FakeWorker(ctx, agent.endpoint, agent.snapshot_endpoint, "w2", 2)
        workers.append(w2)
        welcome = w2.say_hello()
        assert welcome.body["epoch"] == 1
        assert np.array_equal(welcome.tensors["phy2log"], p2l(1))
        wait_for(lambda: agent.status()["relayed"].get("abort:down") == 2, 5, "status")
        st = agent.status()
        assert st["relayed"]["prepare:down"] == 2 and st["relayed"]["committed:up"] == 2
        m = scrape(f"http://127.0.0.1:{agent.daemon.metrics_port}/metrics")
        assert m["eplbd_agent_workers"] == 3
        assert m["eplbd_agent_planner_connected"] == 1
        assert m['eplbd_agent_relayed_total{direction="down",type="prepare"}'] == 2
        assert m['eplbd_agent_snapshots_forwarded_total{kind="complete"}'] == 1
    finally:
        agent.stop()
        for w in workers:
            w.close()
        fp.close()


def _planner_goes_away_with_three_held(
    fp: FakePlanner, agent: RunningAgent, w0: FakeWorker, timeout: float
) -> None:
    """``w0`` joins through ``fp``'s session, ``fp`` closes; once the agent has lost the
    session, ``w0`` is still served and three of its snapshots (counts 1, 2, 3) are held."""
    fp.pump(lambda p: p.agent)
    fp.keepalive = [w0]
    w0.say_hello()
    fp.pump(lambda p: p.told())
    fp.close()  # the planner goes away

    # the dropped connection (or the planner's silence) ends the session
    def away() -> bool:
        ev = agent.status()["events"]
        return bool(ev.get("planner_resync:disconnected") or ev.get("planner_lost"))

    wait_for(away, timeout, "planner away", [w0])
    # the worker keeps being served: hello again, heartbeats, snapshots held
    assert w0.say_hello().body["incarnation"] == agent.daemon.incarnation
    for i in range(3):
        w0.heartbeat()
        w0.snapshot(torch.full((L, P), i + 1, dtype=torch.int32), s0=8 * i)
    wait_for(lambda: agent.status()["groups"]["g0"]["held_snapshots"] == 3, timeout, "held", [w0])


def test_planner_outage_agent_reconnects_and_workers_unaffected(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    fp = FakePlanner(ctx)
    endpoints = fp.endpoints
    agent = start_agent(settings_for(rundir, fp))
    w0 = FakeWorker(ctx, agent.endpoint, agent.snapshot_endpoint, "w0", 0, ep_size=1)
    try:
        _planner_goes_away_with_three_held(fp, agent, w0, timeout=5)
        assert [w["worker"] for w in agent.status()["workers"]] == ["w0"]
        assert agent.status()["events"].get("worker_left:timeout") is None
        # a new planner on the same endpoints: agent_hello again, with the worker; held data
        fp = FakePlanner(ctx, *endpoints, incarnation="pl-2")
        fp.keepalive = [w0]
        fp.pump(lambda p: p.agent and len(p.snapshots) == 3, timeout=10)
        ah = fp.of("agent_hello")[-1]  # (one, or a retry if the welcome came late)
        assert [w["worker"] for w in ah.body["workers"]] == ["w0"]
        assert [int(m.tensors["counts"][0, 0]) for m in fp.snapshots] == [1, 2, 3]
        wait_for(lambda: agent.status()["planner"]["synced"], 5, "resynced")
    finally:
        agent.stop()
        w0.close()
        fp.close()


def test_held_snapshots_wait_for_the_planners_snapshot_socket(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    """After a planner restart the control connection can come back before the snapshot
    one: the held snapshots, flushed when the session comes up, must wait for it, in order,
    rather than be dropped by the PUSH (IMMEDIATE: it queues nothing for a missing peer)."""
    fp = FakePlanner(ctx)
    ctl, snap = fp.endpoints
    agent = start_agent(settings_for(rundir, fp))
    w0 = FakeWorker(ctx, agent.endpoint, agent.snapshot_endpoint, "w0", 0, ep_size=1)
    try:
        _planner_goes_away_with_three_held(fp, agent, w0, timeout=10)
        # the new planner's control socket only: the session comes up, the flush finds no
        # snapshot peer
        fp = FakePlanner(ctx, ctl, None, incarnation="pl-2")
        fp.keepalive = [w0]
        fp.pump(lambda p: p.agent, timeout=10)
        wait_for(lambda: agent.status()["planner"]["synced"], 10, "session up", [w0])
        st = agent.status()
        assert st["groups"]["g0"]["held_snapshots"] == 3  # kept, not dropped
        assert st["dropped"].get("snapshot:held_evicted") is None
        # one more while it waits: it queues behind the three
        w0.snapshot(torch.full((L, P), 4, dtype=torch.int32), s0=24)
        wait_for(lambda: agent.status()["groups"]["g0"]["held_snapshots"] == 4, 10, "4th", [w0])
        fp.bind_snapshots(snap)
        fp.pump(lambda p: len(p.snapshots) == 4, timeout=20)
        assert [int(m.tensors["counts"][0, 0]) for m in fp.snapshots] == [1, 2, 3, 4]
        seqs = [m.body["seq"] for m in fp.snapshots]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4
        wait_for(lambda: agent.status()["groups"]["g0"]["held_snapshots"] == 0, 10, "sent")
    finally:
        agent.stop()
        w0.close()
        fp.close()


def test_second_agent_on_same_runtime_dir_is_refused(ctx: zmq.Context[Any], rundir: Path) -> None:
    fp = FakePlanner(ctx)
    agent = start_agent(settings_for(rundir, fp))
    w0 = FakeWorker(ctx, agent.endpoint, agent.snapshot_endpoint, "w0", 0)
    try:
        with pytest.raises(BindError, match="in use"):
            start_agent(settings_for(rundir, fp, node="n1"))
        assert w0.say_hello().body["incarnation"] == agent.daemon.incarnation  # still serving
    finally:
        agent.stop()
        w0.close()
        fp.close()
    # once the first is gone, the directory can be used again
    again = start_agent(settings_for(rundir, ("tcp://127.0.0.1:9", "tcp://127.0.0.1:10")))
    again.stop()


def test_garbage_on_both_agent_sockets_is_counted_and_dropped(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    fp = FakePlanner(ctx)
    agent = start_agent(settings_for(rundir, fp))
    raw_ctrl = ctx.socket(zmq.DEALER)
    raw_push = ctx.socket(zmq.PUSH)
    w0 = FakeWorker(ctx, agent.endpoint, agent.snapshot_endpoint, "w0", 0)
    try:
        raw_ctrl.connect(agent.endpoint)
        raw_push.connect(agent.snapshot_endpoint)
        garbage = [
            [b"hello"],
            [b"EPLBD", b"\x02", b"hello", b"\x80"],
            [b"EPLBD", b"\x01", b"hello", b"\xc1\xc1"],
            [b"EPLBD", b"\x01", b"snapshot", b"\x81\xa6schema\x01", b"extra"],
            [os.urandom(100) for _ in range(5)],
        ]
        for frames in garbage:
            raw_ctrl.send_multipart(frames)
            raw_push.send_multipart(frames)
        # the control socket answers each bad message with an error
        poller = zmq.Poller()
        poller.register(raw_ctrl, zmq.POLLIN)
        errors = 0
        deadline = time.monotonic() + 5
        while errors < len(garbage) and time.monotonic() < deadline:
            if poller.poll(50):
                frames = raw_ctrl.recv_multipart()
                assert frames[2] == b"error"
                errors += 1
        assert errors == len(garbage)
        wait_for(
            lambda: sum(agent.status()["bad_worker"].values()) == 2 * len(garbage),
            5,
            "bad messages counted",
        )
        # and it still serves
        assert w0.say_hello().body["epoch"] == 0
        fp.pump(lambda p: p.told())
    finally:
        raw_ctrl.close(linger=0)
        raw_push.close(linger=0)
        agent.stop()
        w0.close()
        fp.close()


# Speaks the wire format with plain pyzmq + msgpack (no torch import: starts in a blink).
_WORKER_SCRIPT = """
import sys, time, msgpack, zmq
s = zmq.Context().socket(zmq.DEALER)
s.setsockopt(zmq.IDENTITY, b"wk")
s.connect(sys.argv[1])
def send(t, body):
    s.send_multipart([b"EPLBD", b"\\x01", t, msgpack.packb(dict(body, schema=1))])
send(b"hello", {"worker": "wk", "incarnation": "wk-1", "group": "g0", "ep_rank": 3,
     "ep_size": 4, "node": "n0", "num_layers": 2, "num_logical_experts": 4,
     "num_physical_experts": 8, "epoch": 0, "software_version": "t", "protocol_version": 1})
while True:
    send(b"heartbeat", {"sender": "wk", "incarnation": "wk-1"})
    time.sleep(0.05)
"""


def test_sigkilled_worker_is_reported_as_worker_left(ctx: zmq.Context[Any], rundir: Path) -> None:
    fp = FakePlanner(ctx)
    agent = start_agent(settings_for(rundir, fp))
    proc = subprocess.Popen([sys.executable, "-c", _WORKER_SCRIPT, agent.endpoint])
    try:
        fp.pump(lambda p: p.told(), timeout=20)
        time.sleep(DEAD + 0.3)  # alive past the dead timeout while it heartbeats
        assert not fp.of("worker_left")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        t0 = time.monotonic()
        fp.pump(lambda p: p.of("worker_left"), timeout=DEAD + 10)
        # the dead timeout, not something much later (slack for a loaded machine)
        assert time.monotonic() - t0 < DEAD + 5.0
        (left,) = fp.of("worker_left")
        assert (left.body["worker"], left.body["ep_rank"], left.body["reason"]) == (
            "wk",
            3,
            "timeout",
        )
        wait_for(lambda: agent.status()["workers"] == [], 2, "worker gone from status")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        agent.stop()
        fp.close()


def _agent_cmd(rundir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "eplbd",
        "agent",
        "--runtime-dir",
        str(rundir),
        "--node",
        "n0",
        "--heartbeat-s",
        str(HB),
        "--dead-timeout-s",
        str(DEAD),
        "--metrics",
        "127.0.0.1:0",
        *extra,
    ]


@pytest.mark.timeout(300)  # two agent processes start here
def test_agent_process_serves_refuses_a_second_and_stops_on_sigterm(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    fp = FakePlanner(ctx)
    ctl, snap = fp.endpoints
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(rundir / "notify"))
    notify.settimeout(0.05)
    env = dict(
        os.environ,
        EPLBD_AGENT_LOG_LEVEL="warning",
        NOTIFY_SOCKET=str(rundir / "notify"),
        WATCHDOG_USEC="400000",
    )
    first = subprocess.Popen(
        _agent_cmd(rundir, "--planner", ctl, "--planner-snapshots", snap),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    notes: list[str] = []

    def drain_notify() -> list[str]:
        with contextlib.suppress(TimeoutError):
            while True:
                notes.extend(notify.recv(4096).decode().splitlines())
        return notes

    second = None
    w0 = None
    try:
        fp.pump(lambda p: p.agent, timeout=120)  # an agent process starting on a loaded machine
        w0 = FakeWorker(
            ctx, f"ipc://{rundir}/agent.sock", f"ipc://{rundir}/snapshots.sock", "w0", 0
        )
        w0.say_hello()
        fp.pump(lambda p: p.told(), timeout=20)
        second = subprocess.run(
            _agent_cmd(rundir, "--planner", ctl),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert "in use" in second.stderr
        assert first.poll() is None
        wait_for(lambda: "WATCHDOG=1" in drain_notify(), 5, "watchdog pings")
        assert "READY=1" in notes and any(n.startswith("STATUS=") for n in notes)
        first.send_signal(signal.SIGTERM)
        assert first.wait(10) == 0
        assert "STOPPING=1" in drain_notify()
    finally:
        notify.close()
        if first.poll() is None:
            first.kill()
            first.wait(5)
        if w0 is not None:
            w0.close()
        fp.close()


def test_bad_configuration_exits_78_naming_the_field(
    rundir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from eplbd.cli.main import main

    base = ["agent", "--runtime-dir", str(rundir), "--planner", "tcp://h:1"]
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--window-steps", "8", "--record-steps", "9"], {}, "record_steps"),
        ([], {"EPLBD_AGENT_HEARTBEAT_S": "often"}, "heartbeat_s"),
        (["--heartbeat-s", "2", "--dead-timeout-s", "1"], {}, "dead_timeout_s"),
        (["--runtime-dir", "relative/dir"], {}, "runtime_dir"),
        (["--runtime-dir", "/" + "d" * 100], {}, "runtime_dir"),
        (["--embedded-planner"], {}, "planner"),
        (["--curve-secret-key", "/k/agent.key_secret"], {}, "curve_server_key"),
        (["--config", str(rundir / "a.toml")], {}, "wndow_steps"),
        (["--config", str(rundir / "b.toml")], {}, "unknown table [planer]"),
        (["--config", str(rundir / "c.toml")], {}, "unknown table [agnet]"),
    ]
    (rundir / "a.toml").write_text("[agent]\nwndow_steps = 8\n")
    (rundir / "b.toml").write_text("[planer]\ncooldown_s = 5\n")
    (rundir / "c.toml").write_text('[agnet]\nplanner = "tcp://h:1"\n')
    for flags, env, field in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert main(base + flags) == 78, (flags, env)
        err = capsys.readouterr().err
        assert field in err, (flags, err)


def test_a_planner_endpoint_without_a_default_snapshot_endpoint_is_refused(
    rundir: Path,
) -> None:
    """The planner's snapshot endpoint derived from --planner must exist: port + 1 <= 65535."""
    from eplbd.ops import ConfigError

    with pytest.raises(ConfigError) as e:
        check_agent_settings(AgentSettings(planner="tcp://h:65535", runtime_dir=rundir))
    assert e.value.field == "planner_snapshots" and "above 65535" in e.value.message
    given = AgentSettings(
        planner="tcp://h:65535", planner_snapshots="tcp://h:7051", runtime_dir=rundir
    )
    check_agent_settings(given)


def test_embedded_planner_registers_workers_and_answers_the_cli_socket(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    state = rundir / "state"
    state.mkdir()
    s = AgentSettings(
        embedded_planner=True,
        runtime_dir=rundir,
        state_dir=state,
        node="n0",
        heartbeat_s=HB,
        dead_timeout_s=DEAD,
        window_steps=8,
        record_steps=4,
        metrics=None,
    )
    check_agent_settings(s)
    agent = start_agent(s)
    w0 = FakeWorker(ctx, agent.endpoint, agent.snapshot_endpoint, "w0", 0, ep_size=1)
    cli = control_client(ctx, f"ipc://{rundir}/planner.sock")
    try:
        assert w0.say_hello().body["schedule"]["window_steps"] == 8

        def planner_sees_rank() -> bool:
            w0.heartbeat()
            cli.send("status_request", {"what": "status"})
            got = cli.recv(500)
            if got is None or got.message.type != "status_reply":
                return False
            agents = got.message.body["data"]["agents"]
            return any(a["agent"] == "n0" and a["ranks"] for a in agents)

        wait_for(planner_sees_rank, 10, "the embedded planner lists the worker's rank")
        wait_for(lambda: agent.status()["planner"]["synced"], 5, "status shows the session")
    finally:
        cli.close()
        w0.close()
        agent.stop()
    again = start_agent(s)  # stop released the sockets and the state dir: a new one starts
    again.stop()


def test_two_groups_on_one_agent_show_no_missing_snapshots(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    """The agent numbers its snapshots per group, as the planner checks them: serving two
    groups must not look like lost snapshots."""
    state = rundir / "state"
    s = AgentSettings(
        embedded_planner=True, runtime_dir=rundir, state_dir=state, node="n0",
        heartbeat_s=HB, dead_timeout_s=DEAD, window_steps=8, record_steps=4, metrics=None,
    )  # fmt: skip
    agent = start_agent(s)
    workers = [
        FakeWorker(ctx, agent.endpoint, agent.snapshot_endpoint, f"w{g}", 0, ep_size=1, group=g)
        for g in ("ga", "gb")
    ]
    cli = control_client(ctx, f"ipc://{rundir}/planner.sock")
    try:
        for w in workers:
            w.say_hello()

        def planner_status() -> dict[str, Any] | None:
            for w in workers:
                w.heartbeat()
            cli.send("status_request", {"what": "status"})
            got = cli.recv(500)
            ok = got is not None and got.message.type == "status_reply"
            return got.message.body["data"] if ok else None  # type: ignore[union-attr]

        def registered() -> bool:
            st = planner_status()
            return (
                st is not None
                and all(g["complete"] for g in st["groups"])
                and len(st["groups"]) == 2
            )

        wait_for(registered, 10, "both groups registered at the planner")
        counts = torch.ones(L, P, dtype=torch.int32)
        for i in range(3):
            for w in workers:
                w.snapshot(counts, s0=8 * i)

        def all_arrived() -> dict[str, Any] | None:
            st = planner_status()
            if st is None or [g["data"]["snapshots"] for g in st["groups"]] != [3, 3]:
                return None
            return st

        st = wait_for(all_arrived, 10, "every snapshot at the planner")
        assert st["planner"]["counters"]["missing"] == {}, st["planner"]["counters"]
    finally:
        cli.close()
        for w in workers:
            w.close()
        agent.stop()


def test_curve_to_the_planner_with_allowed_keys_only(ctx: zmq.Context[Any], rundir: Path) -> None:
    keys = rundir / "keys"
    allowed = keys / "allowed"
    allowed.mkdir(parents=True)
    _, planner_secret = generate_keypair(keys, "planner")
    agent_public, agent_secret = generate_keypair(keys, "agent")
    _, stranger_secret = generate_keypair(keys, "stranger")
    shutil.copy(agent_public, allowed / "agent.key")
    fp = FakePlanner(ctx, curve=load_server_keys(planner_secret, allowed))
    curve_ok = dict(curve_secret_key=agent_secret, curve_server_key=keys / "planner.key")
    agent = start_agent(settings_for(rundir / "a", fp, **curve_ok))
    try:
        fp.pump(lambda p: p.agent)
        wait_for(lambda: agent.status()["planner"]["synced"], 5, "CURVE session")
    finally:
        agent.stop()
    stranger = dict(curve_secret_key=stranger_secret, curve_server_key=keys / "planner.key")
    agent = start_agent(settings_for(rundir / "b", fp, **stranger))
    try:
        with pytest.raises(AssertionError, match="timed out"):
            fp.pump(lambda p: len(p.of("agent_hello")) > 1, timeout=1.0)
        assert len(fp.of("agent_hello")) == 1  # the stranger never got through
    finally:
        agent.stop()
        fp.close()


def _start_fails(argv: list[str]) -> tuple[int, str]:
    p = subprocess.run(
        [sys.executable, "-m", "eplbd", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")},
    )
    return p.returncode, p.stderr


@pytest.mark.timeout(600)  # five daemon processes start here, slowly on a loaded machine
def test_embedded_planner_fails_to_start_as_the_planner_does(rundir: Path) -> None:
    """Same message, same exit code, same --reset-state for both ways to run a planner."""
    state = rundir / "state"
    (state / "groups").mkdir(parents=True)
    torn = state / "groups" / "g.json"
    torn.write_text("{torn")
    not_a_dir = rundir / "file"
    not_a_dir.write_text("x")
    quiet = ["--metrics", "", "--log-level", "error"]

    def planner(state_dir: Path) -> list[str]:
        return ["planner", "--listen", f"ipc://{rundir}/p.sock", "--state-dir", str(state_dir)]

    def agent(state_dir: Path, rt: str = "rt") -> list[str]:
        return ["agent", "--embedded-planner", "--runtime-dir", str(rundir / rt), "--node",
                "n0", "--state-dir", str(state_dir)]  # fmt: skip

    for state_dir, code, words in (
        (state, 78, ["g.json", "--reset-state"]),  # a corrupt state file
        (not_a_dir / "state", 78, ["cannot use state directory", "state_dir"]),
    ):
        p_rc, p_err = _start_fails([*planner(state_dir), *quiet])
        a_rc, a_err = _start_fails([*agent(state_dir), *quiet])
        assert (p_rc, a_rc) == (code, code), (p_err, a_err)
        assert p_err.startswith("eplbd planner: ") and a_err.startswith("eplbd agent: ")
        message = p_err.removeprefix("eplbd planner: ")
        assert a_err.removeprefix("eplbd agent: ") == message and message.count("\n") == 1
        assert all(w in message for w in words) and "Errno" not in message, message
    assert torn.read_text() == "{torn"  # never replaced without --reset-state
    # a taken metrics port: the message says which listener
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ep = ["--metrics", f"127.0.0.1:{port}", "--log-level", "error"]
        rc, err = _start_fails([*agent(rundir / "other", rt="rt2"), *ep])
        assert rc == 1 and f"cannot serve metrics at 127.0.0.1:{port}" in err, err
        assert "Errno" not in err
    # the agent's --reset-state moves the file aside and serves
    log = rundir / "agent.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "eplbd", *agent(state), "--reset-state", "--metrics", ""],
        env={k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: (rundir / "rt" / "planner.sock").exists(), 300, "the embedded planner")
        assert not torn.exists() and list((state / "groups").glob("g.json.corrupt-*"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        # like the agent's, the embedded planner's effective settings are logged at start
        events = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        (planner_settings,) = [e for e in events if e["event"] == "embedded planner settings"]
        assert planner_settings["reset_state"] is True and "cooldown_s" in planner_settings
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
