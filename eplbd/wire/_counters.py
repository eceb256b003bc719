"""Counters of bad, dropped and missing messages, readable as plain dicts for metrics.

A receiver never raises on bad input: it calls :meth:`WireCounters.bad_message`, which counts
the message per reason and per sender and writes one structured log line through
``logging.getLogger("eplbd.wire")`` (the daemons route stdlib logging through structlog; this
layer never configures logging). Log lines are thinned under a flood: the first 100 of each
reason, then every power of two, so a garbage storm cannot fill the disk.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from eplbd.wire._errors import WireError

__all__ = ["WireCounters", "logger"]

logger = logging.getLogger("eplbd.wire")

_MAX_SENDERS = 1024  # bound the per-sender tables; the rest is counted under "(other)"
_OTHER = "(other)"


def _bump(table: dict[str, dict[str, int]], key: str, reason: str) -> None:
    if key not in table and len(table) >= _MAX_SENDERS:
        key = _OTHER
    table[key][reason] += 1


class WireCounters:
    """Per-reason counts of bad and dropped messages, with the sender or peer.

    Tables (all plain dicts of ints):
        bad[reason]                   messages received and dropped (reasons: WireError.REASONS)
        bad_by_sender[sender][reason] the same, per sender
        dropped[reason]               messages we did not send ("hwm", "unroutable", "closed")
        dropped_by_peer[peer][reason] the same, per peer
        missing[sender]               sequence numbers skipped (gaps counted, not repaired)
        received[type] / sent[type]   messages that went through, per type
    """

    def __init__(self) -> None:
        self.bad: dict[str, int] = defaultdict(int)
        self.bad_by_sender: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.dropped: dict[str, int] = defaultdict(int)
        self.dropped_by_peer: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.missing: dict[str, int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)
        self.sent: dict[str, int] = defaultdict(int)

    def bad_message(self, err: WireError, sender: str, msg_type: str = "") -> None:
        """Count one dropped incoming message and log it with its sender."""
        self.bad[err.reason] += 1
        _bump(self.bad_by_sender, sender, err.reason)
        n = self.bad[err.reason]
        if n <= 100 or n & (n - 1) == 0:
            logger.warning(
                "bad message dropped: reason=%s sender=%s type=%s count=%d detail=%s",
                err.reason,
                sender,
                msg_type or "?",
                n,
                err.detail,
                extra={
                    "wire_event": "bad_message",
                    "reason": err.reason,
                    "sender": sender,
                    "msg_type": msg_type,
                    "count": n,
                    "detail": err.detail,
                },
            )

    def dropped_send(self, reason: str, peer: str, msg_type: str = "") -> None:
        """Count one message we could not send without blocking."""
        self.dropped[reason] += 1
        _bump(self.dropped_by_peer, peer, reason)
        n = self.dropped[reason]
        if n <= 10 or n & (n - 1) == 0:
            logger.info(
                "send dropped: reason=%s peer=%s type=%s count=%d",
                reason,
                peer,
                msg_type or "?",
                n,
                extra={"wire_event": "send_dropped", "reason": reason, "peer": peer},
            )

    def gap(self, sender: str, missing: int) -> None:
        """Count sequence numbers that never arrived from ``sender``."""
        if sender not in self.missing and len(self.missing) >= _MAX_SENDERS:
            sender = _OTHER
        self.missing[sender] += missing

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able copy of every table, for metrics and the status API."""
        return {
            "bad": dict(self.bad),
            "bad_by_sender": {k: dict(v) for k, v in self.bad_by_sender.items()},
            "dropped": dict(self.dropped),
            "dropped_by_peer": {k: dict(v) for k, v in self.dropped_by_peer.items()},
            "missing": dict(self.missing),
            "received": dict(self.received),
            "sent": dict(self.sent),
        }

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())
