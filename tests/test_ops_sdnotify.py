from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from eplbd.ops import sdnotify
from eplbd.ops.clock import FakeClock


class Listener:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str | bytes, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)
        self.env = {"NOTIFY_SOCKET": env_value}

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        lst = Listener(path, path)
    else:
        name = f"eplbd-test-{uuid.uuid4().hex}"
        lst = Listener(b"\0" + name.encode(), "@" + name)
    try:
        yield lst
    finally:
        lst.sock.close()


def test_no_socket_is_a_noop() -> None:
    assert sdnotify.notify("READY=1", environ={}) is False
    assert sdnotify.ready(environ={"NOTIFY_SOCKET": ""}) is False
    assert sdnotify.status("x", environ={"NOTIFY_SOCKET": "vsock:2:1"}) is False


def test_unreachable_socket_returns_false(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_messages_arrive_as_one_datagram(listener: Listener) -> None:
    assert sdnotify.ready("serving 2 groups", environ=listener.env)
    assert listener.recv() == "READY=1\nSTATUS=serving 2 groups"
    assert sdnotify.status("epoch 7\ncommitting", environ=listener.env)
    assert listener.recv() == "STATUS=epoch 7 committing"
    assert sdnotify.stopping(environ=listener.env)
    assert listener.recv() == "STOPPING=1"
    assert sdnotify.extend_timeout(1.5, environ=listener.env)
    assert listener.recv() == "EXTEND_TIMEOUT_USEC=1500000"
    assert listener.nothing_pending()


def test_watchdog_pings_at_half_interval_only_after_progress(listener: Listener) -> None:
    clock = FakeClock()
    env = dict(listener.env, WATCHDOG_USEC="10000000", WATCHDOG_PID=str(os.getpid()))
    wd = sdnotify.Watchdog(clock=clock, environ=env)
    assert wd.enabled and wd.interval_s == 10.0
    assert wd.poll_interval(5.0) == 2.5

    wd.progress()
    clock.advance(4.9)
    assert not wd.maybe_ping()  # not due yet
    clock.advance(0.1)
    assert wd.maybe_ping()
    assert listener.recv() == "WATCHDOG=1"

    clock.advance(20.0)  # due, but the loop made no progress: stay silent
    assert not wd.maybe_ping()
    assert listener.nothing_pending()

    wd.progress()
    assert wd.maybe_ping(now=clock.monotonic())
    assert listener.recv() == "WATCHDOG=1"
    wd.progress()
    assert not wd.maybe_ping(now=clock.monotonic() + 4.0)
    assert wd.pings == 2


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"},
        {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"},
    ],
)
def test_watchdog_disabled(env: dict[str, str]) -> None:
    sent: list[str] = []
    clock = FakeClock()

    def send(state: str) -> bool:
        sent.append(state)
        return True

    wd = sdnotify.Watchdog(clock=clock, environ=env, send=send)
    assert not wd.enabled
    wd.progress()
    clock.advance(100)
    assert not wd.maybe_ping()
    assert wd.poll_interval(3.0) == 3.0
    assert sent == []


def test_watchdog_without_pid_and_failed_send_retries() -> None:
    results = [False, True]
    sent: list[str] = []

    def send(state: str) -> bool:
        sent.append(state)
        return results.pop(0)

    clock = FakeClock()
    wd = sdnotify.Watchdog(clock=clock, environ={"WATCHDOG_USEC": "2000000"}, send=send)
    wd.progress()
    clock.advance(1.0)
    assert not wd.maybe_ping()  # the send failed: progress is kept, try again next time
    assert wd.maybe_ping()
    assert sent == ["WATCHDOG=1", "WATCHDOG=1"]
