"""The planner daemon on real sockets: in a thread (FakeClock for the rules) and as a real
process (``python3 -m eplbd planner``) that is SIGKILLed mid-commit and restarted.

The fake agent speaks the protocol through eplbd.wire (DEALER for control, PUSH for
snapshots), the way ``eplbd agent`` does: agent_hello, heartbeats, snapshots, and the
workers' staged / committed answers relayed up. Every receive has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
from _net import free_port_pair
from _scrape import scrape

from eplbd.controller import PlannerService, PlannerSettings, StoreLocked
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
    PREPARE,
    SNAPSHOT,
    STAGED,
    STATUS_REPLY,
    STATUS_REQUEST,
    WELCOME,
    BindError,
    Message,
    control_client,
    new_incarnation,
    snapshot_sender,
)

L, E, G, P = 2, 4, 2, 6
HOT = 2


def skewed_counts(layout: Layout) -> torch.Tensor:
    hot = layout.phy2log == HOT
    return torch.where(hot, 100, 10).to(torch.int32)


class FakeAgent:
    """One agent hosting every rank of group "g" (workers w0..w{G-1})."""

    def __init__(self, ctx: zmq.Context[Any], control: str, snapshots: str, name: str = "a0"):
        self.name = name
        self.inc = new_incarnation()
        self.ctrl = control_client(ctx, control, identity=name)
        self.push = snapshot_sender(ctx, snapshots)
        self.seq = 0
        self.epochs = [0] * G
        self.planner_inc: str | None = None
        self.seen: list[Message] = []

    def close(self) -> None:
        self.ctrl.close()
        self.push.close()

    def hello(self) -> None:
        workers = [
            {
                "worker": f"w{r}",
                "incarnation": f"wi{r}",
                "group": "g",
                "ep_rank": r,
                "ep_size": G,
                "node": "n0",
                "num_layers": L,
                "num_logical_experts": E,
                "num_physical_experts": P,
                "epoch": self.epochs[r],
                "software_version": "test",
                "protocol_version": 1,
            }
            for r in range(G)
        ]
        body = {
            "agent": self.name,
            "incarnation": self.inc,
            "node": "n0",
            "software_version": "test",
            "protocol_version": 1,
            "workers": workers,
        }
        self.ctrl.send(AGENT_HELLO, body, timeout_ms=2000)

    def heartbeat(self) -> None:
        self.ctrl.send(HEARTBEAT, {"sender": self.name, "incarnation": self.inc}, timeout_ms=1000)

    def snapshot(self, counts: torch.Tensor, epoch: int) -> None:
        self.seq += 1
        body = {
            "agent": self.name,
            "incarnation": self.inc,
            "group": "g",
            "ep_ranks": list(range(G)),
            "seq": self.seq,
            "epoch": epoch,
            "step_start": 0,
            "step_end": 10,
            "tokens": int(counts.max()) + 1,
        }
        self.push.send(SNAPSHOT, body, {"counts": counts}, timeout_ms=1000)

    def answer(self, mtype: str, epoch: int, rank: int, **extra: Any) -> None:
        body = {"agent": self.name, "group": "g", "epoch": epoch, "ep_rank": rank}
        body.update(worker=f"w{rank}", **extra)
        self.ctrl.send(mtype, body, timeout_ms=1000)

    def poll(self, timeout_s: float) -> Message | None:
        """One message (handling resync like a real agent), or None at the deadline."""
        got = self.ctrl.recv(int(timeout_s * 1000))
        if got is None:
            return None
        m = got.message
        self.seen.append(m)
        inc = m.body.get("incarnation")
        if m.type in (WELCOME, HEARTBEAT) and isinstance(inc, str):
            if self.planner_inc is not None and inc != self.planner_inc and m.type == HEARTBEAT:
                self.hello()  # the planner restarted
            self.planner_inc = inc
        if m.type == ERROR and m.body.get("code") == "hello_required":
            self.hello()
        return m

    def register(self, timeout_s: float = 30.0) -> Message:
        """agent_hello every 0.3 s until welcome (a real agent backs off the same way)."""
        last = [0.0]

        def again() -> None:
            if time.monotonic() - last[0] >= 0.3:
                last[0] = time.monotonic()
                self.hello()

        return self.expect(WELCOME, timeout_s, while_waiting=again)

    def expect(self, mtype: str, timeout_s: float = 10.0, while_waiting: Any = None) -> Message:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if while_waiting is not None:
                while_waiting()
            m = self.poll(0.05)
            if m is not None and m.type == mtype:
                return m
        raise AssertionError(f"no {mtype} within {timeout_s} s; saw {[m.type for m in self.seen]}")


def cli_request(ctx: zmq.Context[Any], endpoint: str, mtype: str, body: dict[str, Any]) -> Message:
    with control_client(ctx, endpoint) as c:
        assert c.send(mtype, body, timeout_ms=3000)
        got = c.recv(5000)
        assert got is not None, f"no answer to {mtype}"
        return got.message


def status(ctx: zmq.Context[Any], endpoint: str, what: str = "status") -> dict[str, Any]:
    m = cli_request(ctx, endpoint, STATUS_REQUEST, {"what": what})
    assert m.type == STATUS_REPLY
    return m.body["data"]  # type: ignore[no-any-return]


def wait_for(pred: Any, timeout_s: float = 10.0, every: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if every is not None:
            every()
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_in_thread_service_commit_status_garbage_metrics(tmp_path: Path, ctx: Any) -> None:
    clock = FakeClock()
    settings = PlannerSettings(
        listen="tcp://127.0.0.1:0",
        state_dir=tmp_path / "state",
        metrics="127.0.0.1:0",
        window_s=0.5,
        min_windows=1,
        cooldown_s=0.0,
        heartbeat_s=1.0,
        tick_s=0.02,
        log_level="warning",
    )
    svc = PlannerService(settings, clock=clock).run_in_thread()
    agent = None
    try:
        assert svc.control_endpoint is not None and svc.snapshot_endpoint is not None
        assert svc.control_endpoint.startswith("tcp://127.0.0.1:")
        agent = FakeAgent(ctx, svc.control_endpoint, svc.snapshot_endpoint)
        agent.register()
        st = status(ctx, svc.control_endpoint)
        assert st["groups"][0]["complete"] and st["agents"][0]["agent"] == "a0"

        # garbage on both sockets: counted, answered on control, still serving
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(svc.control_endpoint)
        raw.send_multipart([b"garbage"])
        assert raw.poll(5000)
        reply = raw.recv_multipart()
        assert reply[2] == b"error"
        raw.close()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 3000)  # close() waits for the frames to leave
        push.connect(svc.snapshot_endpoint)
        push.send_multipart([b"EPLBD", b"\x01", b"snapshot", b"\x81\xa1x\x01"])
        push.close()
        wait_for(
            lambda: (
                sum(status(ctx, svc.control_endpoint)["planner"]["counters"]["bad"].values()) >= 2
            )
        )
        bad = status(ctx, svc.control_endpoint)["planner"]["counters"]["bad"]
        assert bad.get("truncated") == 1 and bad.get("bad_schema") == 1

        # a full two-phase commit through the sockets; time rules on the fake clock
        default = Layout.default(L, E, P)
        wait_for(
            lambda: status(ctx, svc.control_endpoint)["groups"][0]["data"]["snapshots"] >= 2,
            every=lambda: agent.snapshot(skewed_counts(default), 0),
        )
        agent.heartbeat()
        clock.advance(0.5)  # the window closes at the next tick: decision, prepare
        prep = agent.expect(PREPARE)
        assert prep.body["epoch"] == 1
        new = Layout.from_phy2log(prep.tensors["phy2log"], E)
        for r in range(G):
            agent.answer(STAGED, 1, r, ok=True, reason="", staged_bytes=100)
        for r in range(G):
            agent.answer(COMMITTED, 1, r, step=42)
        wait_for(lambda: status(ctx, svc.control_endpoint)["groups"][0]["epoch"] == 1)
        hist = status(ctx, svc.control_endpoint, "history")["groups"][0]["attempts"]
        assert [(a["epoch"], a["state"]) for a in hist] == [(1, "committed")]
        assert new != default

        rep = cli_request(ctx, svc.control_endpoint, COMMAND, {"op": "freeze", "group": "g"})
        assert rep.type == COMMAND_REPLY and rep.body["ok"]
        assert status(ctx, svc.control_endpoint)["groups"][0]["frozen"] is True

        m = scrape(svc.metrics_url)
        assert m['eplbd_planner_dropped_total{reason="truncated"}'] == 1
        assert m['eplbd_planner_epoch{group="g"}'] == 1
        assert m['eplbd_planner_attempts_total{group="g",outcome="committed"}'] == 1
        assert m['eplbd_planner_peers{kind="rank",state="alive"}'] == 2
    finally:
        if agent is not None:
            agent.close()
        svc.stop()
    assert not svc.running


def test_embedded_ipc_binding_and_one_planner_per_state(tmp_path: Path, ctx: Any) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = PlannerSettings.embedded(run_dir, tmp_path / "state", log_level="warning")
    assert settings.listen == f"ipc://{run_dir}/planner.sock"
    assert settings.snapshot_endpoint == f"ipc://{run_dir}/planner-snapshots.sock"
    svc = PlannerService(settings).run_in_thread()
    try:
        assert svc.metrics_url is None
        st = status(ctx, svc.control_endpoint or "")
        assert st["planner"]["endpoints"]["control"] == settings.listen
        with pytest.raises(StoreLocked):
            PlannerService(settings).run_in_thread()
        other = PlannerSettings.embedded(run_dir, tmp_path / "state2", log_level="warning")
        with pytest.raises(BindError):
            PlannerService(other).run_in_thread()
    finally:
        svc.stop()


def _start_planner(
    tmp: Path, sock_dir: Path, log_name: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "eplbd",
        "planner",
        "--listen",
        f"ipc://{sock_dir}/p.sock",
        "--state-dir",
        str(tmp / "state"),
        "--metrics",
        "",
        "--window-s",
        "0.3",
        "--min-windows",
        "1",
        "--cooldown-s",
        "0",
        "--heartbeat-s",
        "0.5",
        "--prepare-timeout-s",
        "60",
        "--log-format",
        "json",
        *extra,
    ]
    out = open(tmp / log_name, "wb")  # noqa: SIM115 (closed with the process)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)


def test_planner_process_survives_sigkill_mid_commit(tmp_path: Path, ctx: Any) -> None:
    sock_dir = Path(tmp_path) / "s"
    sock_dir.mkdir()
    control, snaps = f"ipc://{sock_dir}/p.sock", f"ipc://{sock_dir}/planner-snapshots.sock"
    procs: list[subprocess.Popen[bytes]] = []
    agent = None
    default = Layout.default(L, E, P)
    try:
        procs.append(_start_planner(tmp_path, sock_dir, "planner1.log"))
        agent = FakeAgent(ctx, control, snaps)
        agent.register()

        def feed() -> None:
            agent.snapshot(skewed_counts(default), 0)
            agent.heartbeat()

        prep = agent.expect(PREPARE, timeout_s=20, while_waiting=feed)
        epoch1 = prep.body["epoch"]
        assert epoch1 == 1
        agent.answer(STAGED, epoch1, 0, ok=True, reason="", staged_bytes=1)
        time.sleep(0.2)
        procs[0].send_signal(signal.SIGKILL)  # mid-commit: rank 1 has not staged
        procs[0].wait(10)

        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(sock_dir / "notify"))
        notify.settimeout(0.2)
        notes: list[str] = []
        reading = threading.Event()

        def drain() -> None:  # like systemd: always read, so the sender never waits
            while not reading.is_set():
                with contextlib.suppress(TimeoutError):
                    notes.append(notify.recv(4096).decode())

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        sd_env = {"NOTIFY_SOCKET": str(sock_dir / "notify"), "WATCHDOG_USEC": "400000"}
        procs.append(_start_planner(tmp_path, sock_dir, "planner2.log", env=sd_env))
        # the agent notices (new incarnation / hello_required), re-registers; its workers
        # still serve epoch 0, so the restored attempt is aborted
        abort = agent.expect(ABORT, timeout_s=30, while_waiting=agent.heartbeat)
        assert abort.body["epoch"] == epoch1 and "restarted" in abort.body["reason"]
        hist = status(ctx, control, "history")["groups"][0]["attempts"]
        assert [(a["epoch"], a["state"], a["restored"]) for a in hist] == [
            (epoch1, "aborted", True)
        ]
        st = status(ctx, control)["groups"][0]
        assert st["epoch"] == 0 and st["max_epoch"] == epoch1

        # the next rebalance succeeds, with a higher epoch
        prep = agent.expect(PREPARE, timeout_s=20, while_waiting=feed)
        epoch2 = prep.body["epoch"]
        assert epoch2 == epoch1 + 1
        for r in range(G):
            agent.answer(STAGED, epoch2, r, ok=True, reason="", staged_bytes=1)
        for r in range(G):
            agent.answer(COMMITTED, epoch2, r, step=99)
        wait_for(lambda: status(ctx, control)["groups"][0]["epoch"] == epoch2)
        hist = status(ctx, control, "history")["groups"][0]["attempts"]
        assert [(a["epoch"], a["state"]) for a in hist] == [
            (epoch1, "aborted"),
            (epoch2, "committed"),
        ]

        # systemd: READY, then WATCHDOG every 0.2 s from the loop; clean shutdown on SIGTERM
        wait_for(lambda: notes.count("WATCHDOG=1") >= 3)
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(15) == 0
        wait_for(lambda: any(n.startswith("STOPPING=1") for n in notes))
        reading.set()
        reader.join(5)
        notify.close()
        assert notes[0].startswith("READY=1\nSTATUS=serving")
        assert notes[-1].startswith("STOPPING=1")
        lines = (tmp_path / "planner2.log").read_text().splitlines()
        events = [json.loads(x).get("event") for x in lines if x.startswith("{")]
        assert "settings" in events and "planner serving" in events and "planner stopped" in events
    finally:
        if agent is not None:
            agent.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_a_stopped_planner_does_not_blame_its_agents_for_its_own_stall(
    tmp_path: Path, ctx: Any
) -> None:
    """SIGSTOP the planner mid-commit for longer than the prepare deadline and the agents'
    dead time, with the agent silent meanwhile (a ZMTP heartbeat timeout drops what it sends
    to a stopped peer): after SIGCONT the commit goes on and commits, nobody is dead."""
    sock_dir = Path(tmp_path) / "s"
    sock_dir.mkdir()
    control, snaps = f"ipc://{sock_dir}/p.sock", f"ipc://{sock_dir}/planner-snapshots.sock"
    proc = _start_planner(tmp_path, sock_dir, "planner.log", "--prepare-timeout-s", "4")
    agent = None
    default = Layout.default(L, E, P)
    try:
        agent = FakeAgent(ctx, control, snaps)
        agent.register()

        def feed() -> None:
            agent.snapshot(skewed_counts(default), 0)
            agent.heartbeat()

        epoch = agent.expect(PREPARE, timeout_s=20, while_waiting=feed).body["epoch"]
        proc.send_signal(signal.SIGSTOP)  # dead after 5 x 0.5 s; the deadline is 4 s
        try:
            time.sleep(5.0)
        finally:
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.6)  # the ranks are still staging; the planner runs on its own meanwhile
        for r in range(G):
            agent.answer(STAGED, epoch, r, ok=True, reason="", staged_bytes=1)
        for r in range(G):
            agent.answer(COMMITTED, epoch, r, step=50)
        wait_for(lambda: status(ctx, control)["groups"][0]["epoch"] == epoch, 20, agent.heartbeat)
        lines = (tmp_path / "planner.log").read_text().splitlines()
        events = [json.loads(x) for x in lines if x.startswith("{")]
        assert not [e for e in events if e.get("event") == "commit aborted"]
        assert not [
            e for e in events if e.get("event") == "agent liveness" and e["state"] == "dead"
        ]
        (attempt,) = status(ctx, control, "history")["groups"][0]["attempts"]
        assert (attempt["epoch"], attempt["state"], attempt["flags"]) == (epoch, "committed", [])
        st = status(ctx, control)
        assert st["groups"][0]["max_epoch"] == epoch  # nothing was prepared in its place
        assert [a["state"] for a in st["agents"]] == ["alive"]
        assert st["planner"]["counters"]["stalls"] >= 1
        assert st["planner"]["counters"]["stalled_s"] >= 4.0
    finally:
        if agent is not None:
            agent.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)


def test_bad_configuration_and_corrupt_state_exit_78(tmp_path: Path) -> None:
    env = dict(os.environ, EPLBD_PLANNER_WINDOW_S="-1")
    p = subprocess.run(
        [sys.executable, "-m", "eplbd", "planner", "--state-dir", str(tmp_path)],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 78
    assert b"window_s" in p.stderr and b"EPLBD_PLANNER_WINDOW_S" in p.stderr

    (tmp_path / "state" / "groups").mkdir(parents=True)
    bad = tmp_path / "state" / "groups" / "g.json"
    bad.write_text("{torn")
    sock_dir = tmp_path / "s"
    sock_dir.mkdir()
    proc = _start_planner(tmp_path, sock_dir, "corrupt.log")
    try:
        assert proc.wait(60) == 78
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "g.json" in (tmp_path / "corrupt.log").read_text()
    assert bad.exists()  # never silently replaced


def test_curve_keys_authenticate_clients(tmp_path: Path, ctx: Any) -> None:
    from eplbd.wire import generate_keypair, load_client_keys

    keys = tmp_path / "keys"
    generate_keypair(keys, "planner")
    (keys / "allowed").mkdir()
    cli_pub, cli_sec = generate_keypair(tmp_path / "cli", "cli")
    (keys / "allowed" / "cli.key").write_bytes(cli_pub.read_bytes())
    _, stranger_sec = generate_keypair(tmp_path / "other", "other")
    settings = PlannerSettings(
        listen="tcp://127.0.0.1:0",
        state_dir=tmp_path / "state",
        curve_keys=keys,
        metrics=None,
        log_level="warning",
    )
    svc = PlannerService(settings).run_in_thread()
    try:
        ep = svc.control_endpoint or ""
        good = load_client_keys(cli_sec, keys / "planner.key")
        with control_client(ctx, ep, curve=good) as c:
            assert c.send(STATUS_REQUEST, {"what": "status"}, timeout_ms=3000)
            got = c.recv(5000)
            assert got is not None and got.message.type == STATUS_REPLY
        bad = load_client_keys(stranger_sec, keys / "planner.key")
        with control_client(ctx, ep, curve=bad) as c:
            c.send(STATUS_REQUEST, {"what": "status"}, timeout_ms=500)
            assert c.recv(1000) is None  # refused by the allow-list: no answer
        with control_client(ctx, ep) as c:  # no CURVE at all
            c.send(STATUS_REQUEST, {"what": "status"}, timeout_ms=500)
            assert c.recv(1000) is None
    finally:
        svc.stop()


def test_settings_rules(tmp_path: Path) -> None:
    from eplbd.controller import check_planner_settings, snapshot_endpoint_for
    from eplbd.ops import ConfigError, load

    with pytest.raises(ConfigError) as e:
        check_planner_settings(PlannerSettings(listen="tcp://10.1.2.3:7050"))
    assert e.value.field == "listen"
    check_planner_settings(PlannerSettings(listen="tcp://10.1.2.3:7050", insecure=True))
    with pytest.raises(ConfigError) as e:
        check_planner_settings(PlannerSettings(curve_keys=tmp_path))
    assert e.value.field == "curve_secret"
    assert snapshot_endpoint_for("tcp://127.0.0.1:7050") == "tcp://127.0.0.1:7051"
    assert snapshot_endpoint_for("ipc:///run/eplbd/planner.sock") == (
        "ipc:///run/eplbd/planner-snapshots.sock"
    )
    s = PlannerSettings(staging_bytes=10_000, expert_bytes=3_000, max_moves_per_rank=5)
    assert s.core_config().policy.max_moves_per_rank == 3  # what fits in staging memory
    # the recording schedule is the agents' setting: one place decides it
    cfg_file = tmp_path / "eplbd.toml"
    for text in ("[planner]\nwindow_steps = 8\n", "record_steps = 4\n"):
        cfg_file.write_text(text)
        with pytest.raises(ConfigError, match="unknown setting"):
            load(PlannerSettings, {"config": str(cfg_file)}, environ={})
    cfg_file.write_text("min_gain = 0.2\n[planner]\ncooldown_s = 5.0\n[agent]\nx = 1\n")

    s = load(
        PlannerSettings,
        {"config": str(cfg_file), "window_s": "2.5"},
        environ={"EPLBD_PLANNER_COOLDOWN_S": "7"},
    )
    assert (s.min_gain, s.cooldown_s, s.window_s) == (0.2, 7.0, 2.5)
    # the forecast: one of two, its threshold above the noise it is a multiple of
    for env in ({"EPLBD_PLANNER_FORECAST": "median"}, {"EPLBD_PLANNER_CHANGE_THRESHOLD": "1"}):
        with pytest.raises(ConfigError) as e:
            load(PlannerSettings, {}, environ=env)
        assert e.value.field in ("forecast", "change_threshold")
    s = load(PlannerSettings, {}, environ={"EPLBD_PLANNER_FORECAST": "regime"})
    assert s.core_config().forecast == "regime"


def test_settings_refuse_min_windows_above_windows() -> None:
    """The sliding window never holds more than `windows`: automatic rebalancing would never
    start."""
    from eplbd.controller import check_planner_settings
    from eplbd.ops import ConfigError

    with pytest.raises(ConfigError) as e:
        check_planner_settings(PlannerSettings(windows=2, min_windows=3))
    assert e.value.field == "min_windows" and "windows (2)" in e.value.message
    check_planner_settings(PlannerSettings(windows=3, min_windows=3))


def test_settings_refuse_half_a_curve_configuration(tmp_path: Path) -> None:
    """curve_secret or curve_allow_dir alone (no curve_keys) would serve without CURVE."""
    from eplbd.controller import check_planner_settings
    from eplbd.ops import ConfigError

    secret, allow = tmp_path / "planner.key_secret", tmp_path / "allowed"
    secret.write_text("x")
    allow.mkdir()
    with pytest.raises(ConfigError) as e:
        check_planner_settings(PlannerSettings(curve_secret=secret))
    assert e.value.field == "curve_allow_dir"
    with pytest.raises(ConfigError) as e:
        check_planner_settings(PlannerSettings(curve_allow_dir=allow))
    assert e.value.field == "curve_secret"
    s = PlannerSettings(curve_secret=secret, curve_allow_dir=allow)
    check_planner_settings(s)
    assert s.curve_paths == (secret, allow)
    s = PlannerSettings(curve_keys=tmp_path, curve_secret=secret)  # the other from curve_keys
    check_planner_settings(s)
    assert s.curve_paths == (secret, allow)


def test_settings_refuse_a_staging_budget_below_one_expert() -> None:
    """Not one expert fits: the budget is refused, not raised to one move per rank."""
    from eplbd.controller import check_planner_settings
    from eplbd.ops import ConfigError

    with pytest.raises(ConfigError) as e:
        check_planner_settings(
            PlannerSettings(staging_bytes=1000, expert_bytes=4000, max_moves_per_rank=3)
        )
    assert e.value.field == "staging_bytes" and "expert_bytes (4000)" in e.value.message
    s = PlannerSettings(staging_bytes=4000, expert_bytes=4000, max_moves_per_rank=3)
    check_planner_settings(s)
    assert s.core_config().policy.max_moves_per_rank == 1
    check_planner_settings(PlannerSettings(staging_bytes=1000))  # no expert size: no cap


def test_settings_refuse_a_listen_without_a_default_snapshot_endpoint() -> None:
    """The snapshot endpoint derived from listen must be bindable: port + 1 <= 65535, and an
    ipc path short enough."""
    from eplbd.controller import check_planner_settings
    from eplbd.ops import ConfigError

    with pytest.raises(ConfigError) as e:
        check_planner_settings(PlannerSettings(listen="tcp://127.0.0.1:65535"))
    assert e.value.field == "listen" and "above 65535" in e.value.message
    assert "snapshot_listen" in e.value.message
    check_planner_settings(
        PlannerSettings(listen="tcp://127.0.0.1:65535", snapshot_listen="tcp://127.0.0.1:65534")
    )
    check_planner_settings(PlannerSettings(listen="tcp://127.0.0.1:65534"))
    deep = "/" + "d" * 90  # p.sock fits in 107 bytes, planner-snapshots.sock does not
    with pytest.raises(ConfigError) as e:
        check_planner_settings(PlannerSettings(listen=f"ipc://{deep}/p.sock"))
    assert e.value.field == "listen" and "planner-snapshots.sock" in e.value.message


def _dry_run(ctx: Any, control: str) -> dict[str, Any]:
    rep = cli_request(ctx, control, COMMAND, {"op": "rebalance", "group": "g", "dry_run": True})
    assert rep.type == COMMAND_REPLY, rep.body
    d = rep.body["data"]["decision"]
    return {k: d[k] for k in ("balance_now", "balance_planned", "moves", "changed_layers")} | {
        "layers": [(x["balance_now"], x["moves"], x["why"]) for x in d["layers"]],
        "ok": rep.body["ok"],
    }


@pytest.mark.timeout(240)
@pytest.mark.parametrize("forecast", ["ewma", "regime"])
def test_a_killed_planner_restores_its_load_windows_and_decides_the_same(
    tmp_path: Path, ctx: Any, forecast: str
) -> None:
    """Real planner processes: windows and forecast (either kind) are saved as windows close;
    after SIGKILL and a restart the restored forecast drives the same plan, and status says
    how old it is."""
    sock_dir = tmp_path / "s"
    sock_dir.mkdir()
    control, snaps = f"ipc://{sock_dir}/p.sock", f"ipc://{sock_dir}/planner-snapshots.sock"
    # no automatic rebalance (unreachable gain): only the dry runs look at the forecast
    extra = ["--window-save-s", "0", "--min-gain", "1000", "--windows", "4"]
    extra += ["--forecast", forecast]
    procs = [_start_planner(tmp_path, sock_dir, "planner1.log", *extra)]
    agent = FakeAgent(ctx, control, snaps)
    default = Layout.default(L, E, P)
    saved = tmp_path / "state" / "windows" / "g.npz"
    try:
        agent.register(timeout_s=120)  # a planner process starting on a loaded machine
        sent = 0

        def windows() -> int:
            return int(status(ctx, control)["groups"][0]["data"]["windows"])

        def in_mean() -> int:  # a regime mean longer than the ring: not re-seedable from it
            r = status(ctx, control)["groups"][0]["data"]["regime"]
            return 6 if r is None else int(r["windows_in_mean"])

        while windows() < 3 or in_mean() < 6:  # a few closed windows of skewed load
            agent.snapshot(skewed_counts(default), 0)
            agent.heartbeat()
            agent.poll(0.05)
            sent += 1
            assert sent < 4000, "the planner never closed enough windows"
        # the last bucket closes (and is saved) without new data: wait for its file
        wait_for(lambda: status(ctx, control)["groups"][0]["data"]["open_tokens"] == 0)
        n = windows()
        wait_for(lambda: saved.exists(), 10)
        before = _dry_run(ctx, control)
        assert before["ok"] and before["moves"] > 0, before
        regime = status(ctx, control)["groups"][0]["data"]["regime"]
        assert (regime is None) == (forecast == "ewma"), regime
        if regime is not None:
            assert regime["windows_in_mean"] >= 6 and regime["change_above"] is not None, regime

        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        procs.append(_start_planner(tmp_path, sock_dir, "planner2.log", *extra))
        # the agent notices the new planner and registers again; it sends no more load

        def agent_registered() -> bool:
            with control_client(ctx, control) as c:  # the new planner may not serve yet
                if not c.send(STATUS_REQUEST, {"what": "status"}, timeout_ms=500):
                    return False
                got = c.recv(2000)
            return got is not None and bool(got.message.body["data"]["agents"])

        wait_for(agent_registered, 120, every=lambda: (agent.heartbeat(), agent.poll(0.05)))
        g = status(ctx, control)["groups"][0]
        assert g["data"]["windows"] == n and g["data"]["source"] == "forecast", g["data"]
        restored = g["data"]["restored"]
        assert restored["windows"] == n and restored["epoch"] == 0, restored
        assert restored["age_s"] >= 0 and restored["windows_left"] == n
        assert g["data"]["forecast"] == forecast
        if regime is not None:  # the regime's mean and learnt level, not a fresh start
            got = g["data"]["regime"]
            assert got == dict(regime, dispersion=None), (got, regime)
        wait_for(lambda: status(ctx, control)["groups"][0]["complete"], 30, every=agent.heartbeat)
        assert _dry_run(ctx, control) == before
    finally:
        agent.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.mark.timeout(240)
def test_sighup_reloads_the_curve_allow_list(tmp_path: Path, capsys: Any) -> None:
    """A real planner process and real signals: an operator key added to allowed/ works after
    SIGHUP, a broken list is refused (logged, counted) and the old one stays, a removed key is
    refused at its next connection."""
    from _cli import cli

    from eplbd.wire import generate_keypair

    keys = tmp_path / "keys"
    allowed = keys / "allowed"
    allowed.mkdir(parents=True)
    generate_keypair(keys, "planner")
    agent_pub, _ = generate_keypair(tmp_path / "a", "agent")
    shutil.copy(agent_pub, allowed / "agent.key")
    ops_pub, ops_sec = generate_keypair(tmp_path / "o", "ops")
    port = free_port_pair()
    log = tmp_path / "planner.log"
    argv = [
        sys.executable, "-m", "eplbd", "planner", "--listen", f"tcp://127.0.0.1:{port}",
        "--state-dir", str(tmp_path / "state"), "--curve-keys", str(keys),
        "--metrics", "127.0.0.1:0", "--log-format", "json",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    out = open(log, "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    ask = ["status", "--json", "--planner", f"tcp://127.0.0.1:{port}", "--timeout", "3"]
    ask += ["--curve-secret-key", str(ops_sec), "--curve-server-key", str(keys / "planner.key")]

    def events() -> list[dict[str, Any]]:
        lines = log.read_text().splitlines()
        return [json.loads(x) for x in lines if x.startswith("{")]

    def hup_and_wait(event: str, n: int) -> dict[str, Any]:
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: sum(e.get("event") == event for e in events()) >= n, 30)
        return [e for e in events() if e.get("event") == event][-1]

    try:
        wait_for(lambda: any(e.get("event") == "planner serving" for e in events()), 120)
        assert cli(capsys, *ask)[0] == 69  # the operator's key is not allowed yet
        shutil.copy(ops_pub, allowed / "ops.key")
        done = hup_and_wait("allow-list reloaded", 1)
        assert (done["keys"], done["added"], done["removed"]) == (2, 1, 0)
        rc, text, err = cli(capsys, *ask)
        assert rc == 0, err
        metrics_url = json.loads(text)["planner"]["endpoints"]["metrics"]
        # a broken list is refused whole; the list in force stays
        (allowed / "torn.key").write_text('curve\n    public-key = "short"\n')
        refused = hup_and_wait("allow-list reload refused; the previous list stays", 1)
        assert "torn.key" in refused["error"]
        assert cli(capsys, *ask)[0] == 0
        m = scrape(metrics_url)
        assert m['eplbd_planner_curve_reloads_total{outcome="ok"}'] == 1
        assert m['eplbd_planner_curve_reloads_total{outcome="refused"}'] == 1
        assert m["eplbd_planner_curve_allowed_keys"] == 2
        # the operator's key removed: refused at the next connection
        (allowed / "torn.key").unlink()
        (allowed / "ops.key").unlink()
        done = hup_and_wait("allow-list reloaded", 2)
        assert (done["keys"], done["removed"]) == (1, 1)
        rc, _, err = cli(capsys, *ask)
        assert rc == 69 and "authentication refused" in err
        assert proc.poll() is None  # SIGHUP never stops it
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        out.close()


def test_a_broken_allow_list_stops_the_start_an_empty_one_does_not(tmp_path: Path) -> None:
    from eplbd.wire import generate_keypair

    keys = tmp_path / "keys"
    (keys / "allowed").mkdir(parents=True)
    generate_keypair(keys, "planner")

    def service() -> PlannerService:
        settings = PlannerSettings(
            listen="tcp://127.0.0.1:0", state_dir=tmp_path / "state", curve_keys=keys,
            metrics=None, log_level="error",
        )  # fmt: skip
        return PlannerService(settings)

    svc = service().run_in_thread()  # no key yet: it starts, refusing everyone until a reload
    try:
        assert svc.metrics.curve_allowed.value() == 0
    finally:
        svc.stop()
    (keys / "allowed" / "torn.key").write_text("not a certificate")
    with pytest.raises(ValueError, match="torn.key"):  # eplbd planner: exit 78, file named
        service().run_in_thread()


def test_time_objective_settings(tmp_path: Path) -> None:
    """objective = "time" needs a cost model (expert_shape or a cost_model file); a bad
    value fails at start naming its setting (exit 78), and a good one reaches the core."""
    from eplbd.controller import check_planner_settings
    from eplbd.ops import ConfigError, load
    from eplbd.planner import default_cost_model

    def field(**kw: Any) -> str:
        with pytest.raises(ConfigError) as e:
            check_planner_settings(load(PlannerSettings, kw, environ={}))
        return e.value.field

    assert field(objective="time") == "objective"
    assert field(objective="speed") == "objective"
    assert field(objective="time", expert_shape="7168") == "expert_shape"
    assert field(expert_shape="7168,-2") == "expert_shape"
    assert field(expert_shape="7168,2048", expert_dtype="int4") == "expert_dtype"
    assert field(cost_model=str(tmp_path / "missing.json")) == "cost_model"
    torn = tmp_path / "torn.json"
    torn.write_text("{torn")
    assert field(objective="time", cost_model=str(torn)) == "cost_model"
    calib = tmp_path / "h100.json"
    calib.write_text(default_cost_model(2048, 1408).to_json())
    assert field(objective="time", cost_model=str(calib), expert_shape="7168,2048") == (
        "expert_shape"
    )
    s = load(PlannerSettings, {"objective": "time", "cost_model": str(calib)}, environ={})
    check_planner_settings(s)
    core = s.core_config()
    assert core.objective == "time" and core.cost_model == default_cost_model(2048, 1408)
    s = load(PlannerSettings, {"expert_shape": "7168,2048"}, environ={})
    assert s.core_config().objective == "tokens"  # the model only adds the time metrics
    assert s.core_config().cost_model == default_cost_model(7168, 2048)
    env = dict(os.environ, EPLBD_PLANNER_OBJECTIVE="time")
    p = subprocess.run(
        [sys.executable, "-m", "eplbd", "planner", "--state-dir", str(tmp_path)],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 78 and b"objective" in p.stderr and b"expert_shape" in p.stderr
