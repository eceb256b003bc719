"""Clocks: the one seam through which daemons, liveness rules and tests see time.

Every timeout, heartbeat, backoff, staleness rule and watchdog takes a :class:`Clock` so that
tests drive time with :class:`FakeClock` instead of sleeping. ``monotonic()`` is for intervals
and deadlines; ``time()`` (seconds since the epoch) only for timestamps shown to people or
written to disk.
"""

from __future__ import annotations

import threading
import time as _time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """What code that measures time needs: two readings and a way to wait."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (intervals, deadlines)."""
        ...

    def time(self) -> float:
        """Seconds since the Unix epoch (timestamps only)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a fake clock advances instead)."""
        ...


class SystemClock:
    """The real clocks of the process."""

    def monotonic(self) -> float:
        return _time.monotonic()

    def time(self) -> float:
        return _time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            _time.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock that moves only when told: ``advance(s)``, or ``sleep(s)`` (which advances).

    Both readings move together. Thread-safe, so a test thread may advance it while daemon
    threads read it.
    """

    def __init__(self, monotonic: float = 1000.0, time: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._mono = float(monotonic)
        self._wall = float(time)

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def time(self) -> float:
        with self._lock:
            return self._wall

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.advance(seconds)

    def advance(self, seconds: float) -> None:
        """Move both readings forward by ``seconds`` (must be >= 0: monotonic never goes back)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        with self._lock:
            self._mono += seconds
            self._wall += seconds

    def __repr__(self) -> str:
        return f"FakeClock(monotonic={self._mono!r}, time={self._wall!r})"
