"""The systemd notify protocol in pure Python: readiness, status, stopping and the watchdog.

systemd passes ``$NOTIFY_SOCKET`` to a ``Type=notify`` service; the service sends one
datagram of newline-separated ``KEY=VALUE`` lines to that ``AF_UNIX`` socket. A leading
``@`` names a socket in the abstract namespace. Without the variable (not under systemd, or
in tests) every call is a no-op that returns False, so daemons call these unconditionally.

The watchdog (``WatchdogSec=`` in the unit) arrives as ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``, the process it is meant for). :class:`Watchdog` pings at half that
interval, and only if the main loop called :meth:`Watchdog.progress` since the last ping:
a daemon whose loop is stuck (but whose threads are alive) stops pinging and systemd
restarts it, which is the point of a watchdog.

Typical main loop::

    wd = Watchdog()
    sdnotify.ready("serving 3 groups")
    while running:
        handle_events(timeout=wd.poll_interval(1.0))
        wd.progress()
        wd.maybe_ping()
    sdnotify.stopping()
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

from eplbd.ops.clock import SYSTEM_CLOCK, Clock

__all__ = [
    "Watchdog",
    "extend_timeout",
    "notify",
    "notify_socket_address",
    "ready",
    "status",
    "stopping",
]


def notify_socket_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """The address to send to (``bytes`` for the abstract namespace), or None if unusable."""
    env = os.environ if environ is None else environ
    raw = env.get("NOTIFY_SOCKET", "")
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # unset, empty, or a form we do not speak (e.g. vsock:)


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) as one datagram. True if it was sent."""
    address = notify_socket_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            # Never block the main loop on a receiver that stopped reading (its datagram
            # queue is short): a full queue drops this notification instead.
            sock.send(state.encode("utf-8"), socket.MSG_DONTWAIT)
    except OSError:  # BlockingIOError included
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status_text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """READY=1 (and optionally a STATUS line): the daemon is serving."""
    state = "READY=1"
    if status_text is not None:
        state += "\nSTATUS=" + _one_line(status_text)
    return notify(state, environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """STATUS=<one line>, shown by ``systemctl status``."""
    return notify("STATUS=" + _one_line(text), environ=environ)


def stopping(status_text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: clean shutdown has begun."""
    state = "STOPPING=1"
    if status_text is not None:
        state += "\nSTATUS=" + _one_line(status_text)
    return notify(state, environ=environ)


def extend_timeout(seconds: float, *, environ: Mapping[str, str] | None = None) -> bool:
    """EXTEND_TIMEOUT_USEC: ask for more start-up (or stop) time, e.g. while restoring state."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1e6))}", environ=environ)


class Watchdog:
    """Feeds systemd's watchdog at half its interval, only while the main loop progresses.

    ``interval_s`` is None (and every method a no-op) when ``$WATCHDOG_USEC`` is unset or
    invalid, or when ``$WATCHDOG_PID`` names another process.
    """

    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        environ: Mapping[str, str] | None = None,
        send: Callable[[str], bool] | None = None,
    ) -> None:
        env = dict(os.environ if environ is None else environ)
        self._clock = clock
        self._send: Callable[[str], bool] = send or (lambda s: notify(s, environ=env))
        self.interval_s: float | None = self._interval(env)
        self._last_ping = clock.monotonic()
        self._progressed = False
        self.pings = 0

    @staticmethod
    def _interval(env: Mapping[str, str]) -> float | None:
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        pid = env.get("WATCHDOG_PID")
        if pid is not None:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 1e6

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None

    def progress(self) -> None:
        """The main loop completed an iteration: the next due ping may go out."""
        self._progressed = True

    def due(self, now: float | None = None) -> bool:
        """Whether half the interval has passed since the last ping."""
        if self.interval_s is None:
            return False
        now = self._clock.monotonic() if now is None else now
        return now - self._last_ping >= self.interval_s / 2

    def maybe_ping(self, now: float | None = None) -> bool:
        """Send WATCHDOG=1 if due and progress happened since the last ping. True if sent."""
        if not self._progressed or not self.due(now):
            return False
        now = self._clock.monotonic() if now is None else now
        sent = self._send("WATCHDOG=1")
        if sent:
            self._last_ping = now
            self._progressed = False
            self.pings += 1
        return sent

    def poll_interval(self, default: float) -> float:
        """A main-loop wait that never sleeps through a due ping: min(default, interval / 4)."""
        if self.interval_s is None:
            return default
        return min(default, self.interval_s / 4)
