"""Application-level liveness of peers, driven by an injectable clock.

ZMTP heartbeats (socket options) drop dead TCP connections; this tracker answers the
question above that: is the peer still *producing*? Any message from a peer refreshes it.
A peer is "stale" after ``stale_after`` missed intervals (3 by default) and "dead" after
``dead_after`` (5). Each process start has its own incarnation id, so a peer that comes back
with a new id is reported as "restarted" and its old state (sequence numbers, staged data) can
be discarded by the daemon.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALIVE",
    "DEAD",
    "STALE",
    "LivenessTracker",
    "PeerInfo",
    "new_incarnation",
    "process_incarnation",
]

ALIVE = "alive"
STALE = "stale"
DEAD = "dead"

_INCARNATION: tuple[int, str] | None = None


def new_incarnation() -> str:
    """A fresh incarnation id: ``<pid hex>-<12 random hex>``, e.g. ``"1f3a-9c0e4b7d2a11"``."""
    return f"{os.getpid():x}-{uuid.uuid4().hex[:12]}"


def process_incarnation() -> str:
    """This process's incarnation id: made once per process (a new one after fork)."""
    global _INCARNATION
    pid = os.getpid()
    if _INCARNATION is None or _INCARNATION[0] != pid:
        _INCARNATION = (pid, new_incarnation())
    return _INCARNATION[1]


@dataclass
class PeerInfo:
    """What the tracker knows of one peer (times in the tracker's clock, seconds)."""

    peer: str
    incarnation: str | None
    first_seen: float
    last_seen: float
    state: str = ALIVE
    restarts: int = 0


class LivenessTracker:
    """Peers by name; ``seen`` on every message, ``sweep`` on a timer.

    ``clock`` returns monotonic seconds (a callable, or an object with ``.monotonic()`` such
    as ``eplbd.ops.clock.FakeClock``). ``interval_s`` is the
    heartbeat interval the peers use.
    """

    def __init__(
        self,
        interval_s: float,
        *,
        stale_after: float = 3.0,
        dead_after: float = 5.0,
        clock: Callable[[], float] | Any = time.monotonic,
    ) -> None:
        if interval_s <= 0 or not 0 < stale_after <= dead_after:
            raise ValueError("need interval_s > 0 and 0 < stale_after <= dead_after")
        self.interval_s = interval_s
        self.stale_s = stale_after * interval_s
        self.dead_s = dead_after * interval_s
        # a callable, or an object with .monotonic() (eplbd.ops.clock.Clock)
        self._clock: Callable[[], float] = getattr(clock, "monotonic", clock)
        self._peers: dict[str, PeerInfo] = {}

    def seen(self, peer: str, incarnation: str | None = None) -> str:
        """Refresh ``peer``. Returns "new", "restarted" (new incarnation), "recovered" (it was
        stale or dead, same incarnation) or "alive"."""
        now = self._clock()
        info = self._peers.get(peer)
        if info is None:
            self._peers[peer] = PeerInfo(peer, incarnation, now, now)
            return "new"
        was = info.state if info.state != ALIVE else self._state_at(info, now)
        info.last_seen = now
        if incarnation is not None and incarnation != info.incarnation:
            restarted = info.incarnation is not None
            info.incarnation = incarnation
            info.state = ALIVE
            if restarted:
                info.restarts += 1
                info.first_seen = now
                return "restarted"
            return "alive"
        if was != ALIVE:
            info.state = ALIVE
            return "recovered"
        return "alive"

    def state(self, peer: str) -> str | None:
        """ "alive", "stale" or "dead" as of now, or None for an unknown peer."""
        info = self._peers.get(peer)
        if info is None:
            return None
        return self._state_at(info, self._clock())

    def sweep(self) -> list[tuple[str, str]]:
        """Update every peer's state; return the (peer, new state) pairs that changed."""
        now = self._clock()
        changed = []
        for info in self._peers.values():
            st = self._state_at(info, now)
            if st != info.state:
                info.state = st
                changed.append((info.peer, st))
        return changed

    def excuse(self, seconds: float) -> None:
        """The tracker's owner did not run for ``seconds`` (it was stopped, starved, paused
        by a long GC): its peers' messages of that time may be lost or not read yet, so that
        time does not count as their silence. Peers already dead stay dead."""
        now = self._clock()
        for info in self._peers.values():
            if info.state != DEAD:
                info.last_seen = min(now, info.last_seen + max(0.0, seconds))

    def incarnation(self, peer: str) -> str | None:
        info = self._peers.get(peer)
        return info.incarnation if info is not None else None

    def peers(self) -> dict[str, PeerInfo]:
        """A snapshot of every known peer (states as of the last sweep)."""
        return dict(self._peers)

    def forget(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def _state_at(self, info: PeerInfo, now: float) -> str:
        age = now - info.last_seen
        if age >= self.dead_s:
            return DEAD
        if age >= self.stale_s:
            return STALE
        return ALIVE
