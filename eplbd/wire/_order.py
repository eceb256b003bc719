"""Ordering rules for snapshots (sequence numbers) and layouts (epochs).

Telemetry carries state, so a gap in sequence numbers is counted, never repaired; a replayed
or older sequence number is dropped. Incarnation ids are opaque: the first message of an
unseen incarnation starts a new sequence (the sender restarted), and a late message from a
replaced incarnation is dropped. Epochs of a group only grow.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from eplbd.wire._counters import WireCounters
from eplbd.wire._errors import WireError

__all__ = ["EpochTracker", "SeqVerdict", "SequenceTracker"]

_RETIRED = 4  # replaced incarnations remembered per sender


@dataclass(frozen=True)
class SeqVerdict:
    """An accepted sequence number.

    status: "first" (sender never seen), "ok" (the next number), "gap" (``missing`` numbers
    were skipped) or "restart" (a new incarnation of a known sender; its sequence starts over).
    """

    status: str
    missing: int = 0


class SequenceTracker:
    """Per-sender (incarnation, seq) order. ``check`` accepts or raises :class:`WireError`."""

    def __init__(self, counters: WireCounters | None = None, max_senders: int = 65536) -> None:
        self._counters = counters
        self._max = max_senders
        self._last: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._retired: dict[str, list[str]] = {}

    def check(self, sender: str, incarnation: str, seq: int) -> SeqVerdict:
        """Admit ``seq`` from ``sender``; raise WireError("replay" | "stale_incarnation")."""
        prev = self._last.get(sender)
        if prev is None:
            self._store(sender, incarnation, seq)
            return SeqVerdict("first")
        inc, last = prev
        if incarnation != inc:
            retired = self._retired.setdefault(sender, [])
            if incarnation in retired:
                raise WireError(
                    "stale_incarnation", f"{sender}: incarnation {incarnation} was replaced"
                )
            retired.append(inc)
            del retired[:-_RETIRED]
            self._store(sender, incarnation, seq)
            return SeqVerdict("restart")
        if seq <= last:
            raise WireError("replay", f"{sender}: seq {seq} <= last accepted {last}")
        self._store(sender, incarnation, seq)
        if seq == last + 1:
            return SeqVerdict("ok")
        missing = seq - last - 1
        if self._counters is not None:
            self._counters.gap(sender, missing)
        return SeqVerdict("gap", missing)

    def last(self, sender: str) -> tuple[str, int] | None:
        """(incarnation, last accepted seq) of ``sender``, or None."""
        return self._last.get(sender)

    def forget(self, sender: str) -> None:
        self._last.pop(sender, None)
        self._retired.pop(sender, None)

    def _store(self, sender: str, incarnation: str, seq: int) -> None:
        self._last[sender] = (incarnation, seq)
        self._last.move_to_end(sender)
        while len(self._last) > self._max:
            old, _ = self._last.popitem(last=False)
            self._retired.pop(old, None)


class EpochTracker:
    """The last accepted epoch per group; a new layout must carry a strictly larger one.

    ``check(group, epoch)`` raises WireError("stale_epoch") for an epoch not newer than the
    last accepted one (a replayed or reordered prepare/layout); ``accept`` records it.
    """

    def __init__(self) -> None:
        self._epochs: dict[str, int] = {}

    def current(self, group: str) -> int:
        """The last accepted epoch of ``group`` (0 if none: the initial layout)."""
        return self._epochs.get(group, 0)

    def check(self, group: str, epoch: int) -> None:
        cur = self.current(group)
        if epoch <= cur:
            raise WireError("stale_epoch", f"group {group}: epoch {epoch} <= current {cur}")

    def accept(self, group: str, epoch: int) -> None:
        """Check, then record ``epoch`` as the group's current one."""
        self.check(group, epoch)
        self._epochs[group] = epoch
