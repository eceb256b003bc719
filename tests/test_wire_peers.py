"""Liveness against real peer processes: SIGSTOP and SIGKILL detected within the timeouts.

Two layers are checked: the application tracker (any message refreshes; stale after 3 missed
heartbeat intervals, dead after 5) and the ZMTP heartbeat, which makes the ROUTER drop the
connection of a peer that no longer answers PINGs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from eplbd.wire import DEAD, STALE, LivenessTracker, SocketOptions, WireSocket, control_server

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

PEER = str(Path(__file__).resolve().parent / "wire_peers" / "heartbeat_peer.py")
INTERVAL = 0.05  # peers' heartbeat interval, seconds
OPTS = SocketOptions(heartbeat_ivl_ms=100, heartbeat_timeout_ms=300, heartbeat_ttl_ms=500)
SLACK = 1.0  # scheduling noise allowed on a loaded 2-core CI machine, seconds


class Harness:
    def __init__(self, srv: WireSocket) -> None:
        self.srv = srv
        self.live = LivenessTracker(INTERVAL)
        self.events: list[tuple[float, str, str]] = []  # (time, peer, what)
        self.mon = srv.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
        self.zmtp: list[tuple[float, int]] = []
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, name: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, PEER, self.srv.endpoint, name, str(INTERVAL)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        return p

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            got = self.srv.recv(10)
            now = time.monotonic()
            if got is not None:
                b = got.message.body
                what = self.live.seen(b["sender"], b["incarnation"])
                if what != "alive":
                    self.events.append((now, b["sender"], what))
            swept = self.live.sweep()
            # read after the sweep, whose own clock read found the peer stale or dead: a
            # time taken before it could fall short of last_seen + dead_s by a few us
            after = time.monotonic()
            for peer, st in swept:
                self.events.append((after, peer, st))
            while self.mon.poll(0):
                ev = recv_monitor_message(self.mon)
                self.zmtp.append((now, ev["event"]))

    def wait_for(self, peer: str, what: str, within: float) -> float:
        """Pump until ``peer`` reports ``what``; return when it did."""
        end = time.monotonic() + within
        while time.monotonic() < end:
            for t, p, w in self.events:
                if p == peer and w == what:
                    return t
            self.pump(0.02)
        raise AssertionError(f"{peer} never became {what!r} within {within}s: {self.events}")

    def wait_zmtp(self, event: int, after: float, within: float) -> float:
        end = time.monotonic() + within
        while time.monotonic() < end:
            for t, e in self.zmtp:
                if e == event and t >= after:
                    return t
            self.pump(0.02)
        raise AssertionError(f"no ZMTP event {event} within {within}s: {self.zmtp}")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
        self.srv.socket.disable_monitor()
        self.mon.close(linger=0)


@pytest.fixture
def harness() -> Iterator[Harness]:
    ctx = zmq.Context()
    srv = control_server(ctx, "tcp://127.0.0.1:*", options=OPTS)
    h = Harness(srv)
    try:
        yield h
    finally:
        h.close()
        srv.close()
        ctx.destroy(linger=0)


def test_sigstopped_peer_is_detected_and_recovers(harness: Harness) -> None:
    h = harness
    p = h.start("stopped")
    h.wait_for("stopped", "new", within=20)
    h.pump(0.2)  # steady heartbeats
    assert h.live.state("stopped") == "alive"
    os.kill(p.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    t_stale = h.wait_for("stopped", STALE, within=5)
    t_dead = h.wait_for("stopped", DEAD, within=5)
    last = h.live.peers()["stopped"].last_seen  # the last heartbeat before the stop
    assert t_stale - last >= h.live.stale_s and t_dead - last >= h.live.dead_s
    assert t_stale - t0 <= h.live.stale_s + SLACK
    assert t_dead - t0 <= h.live.dead_s + SLACK
    # ZMTP: no PONG from a stopped process, so the ROUTER drops the connection
    t_disc = h.wait_zmtp(zmq.EVENT_DISCONNECTED, t0, within=5)
    assert t_disc - t0 <= (OPTS.heartbeat_ivl_ms + OPTS.heartbeat_timeout_ms) / 1000 + SLACK
    os.kill(p.pid, signal.SIGCONT)
    inc = h.live.incarnation("stopped")
    h.wait_for("stopped", "recovered", within=10)  # same incarnation, reconnected
    assert h.live.peers()["stopped"].restarts == 0 and h.live.incarnation("stopped") == inc


def test_sigkilled_peer_is_detected_and_its_restart_recognised(harness: Harness) -> None:
    h = harness
    p = h.start("killed")
    first = p.stdout.readline().strip() if p.stdout else ""
    h.wait_for("killed", "new", within=20)
    h.pump(0.1)
    p.kill()
    p.wait(10)
    t0 = time.monotonic()
    t_dead = h.wait_for("killed", DEAD, within=5)
    assert h.live.dead_s <= t_dead - h.live.peers()["killed"].last_seen
    assert t_dead - t0 <= h.live.dead_s + SLACK
    h.wait_zmtp(zmq.EVENT_DISCONNECTED, t0 - 0.1, within=5)  # the kernel closed the socket
    q = h.start("killed")  # same name, new process
    second = q.stdout.readline().strip() if q.stdout else ""
    h.wait_for("killed", "restarted", within=20)
    assert first and second and first != second
    assert h.live.incarnation("killed") == second and h.live.peers()["killed"].restarts == 1
