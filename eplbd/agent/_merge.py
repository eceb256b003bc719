"""Merging the snapshots of a node's workers into one message per window for the planner.

The ranks of one EP group step together, so each closes the same recording window (same
epoch, same step range) at about the same time. Summing their ``counts`` [L, P] on the node
sends the planner one message per window and node instead of one per GPU. The merge is
exact: counts are per physical slot, so the sum of the local ranks' counts is what the
planner would have computed itself, and ``tokens`` adds up in the same way.

A window is complete when every live local rank of the group has sent it; a window still
open after ``timeout_s`` (a rank that is slow, restarted or whose snapshot was dropped) goes
out with the ranks it has, listed in ``ep_ranks``. A rank's snapshot that arrives after its
window went out is forwarded on its own at once. Memory is bounded: at most
``max_open_per_group`` open windows per group (the oldest goes out early past that).

Pure: numpy arrays and a clock reading in, :class:`Merged` records out. No sockets, no torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Merged", "SnapshotMerger", "WindowKey"]

#: (group, epoch, step_start, step_end): snapshots with the same key are summed.
WindowKey = tuple[str, int, int, int]

_INT32_MAX = 2**31 - 1


@dataclass
class Merged:
    """The sum of the snapshots of one window from some local ranks.

    Fields: group, epoch, step_start, step_end; ``ep_ranks`` sorted, e.g. ``[0, 1, 2, 3]``;
    ``tokens`` the sum of the ranks' token counts; ``counts`` [L, P] int32 (int64 when a sum
    does not fit); ``complete`` whether every live local rank of the group is in it.
    """

    group: str
    epoch: int
    step_start: int
    step_end: int
    ep_ranks: list[int]
    tokens: int
    counts: np.ndarray
    complete: bool


@dataclass
class _Open:
    opened: float
    counts: np.ndarray  # int64 [L, P]
    tokens: int = 0
    ranks: set[int] = field(default_factory=set)


class SnapshotMerger:
    """Open windows keyed by (group, epoch, step_start, step_end).

    ``add`` returns the windows that became complete (or were pushed out by the bound);
    ``expire`` those whose timeout passed or that are complete now (a rank left). Both take
    ``expected(group)``: the set of live local ranks of the group.
    """

    def __init__(self, *, timeout_s: float, max_open_per_group: int = 8) -> None:
        if timeout_s <= 0 or max_open_per_group < 1:
            raise ValueError("need timeout_s > 0 and max_open_per_group >= 1")
        self.timeout_s = timeout_s
        self.max_open_per_group = max_open_per_group
        self._open: OrderedDict[WindowKey, _Open] = OrderedDict()
        self._flushed: OrderedDict[WindowKey, None] = OrderedDict()  # recently sent keys
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._open)

    def add(
        self,
        group: str,
        epoch: int,
        step_start: int,
        step_end: int,
        ep_rank: int,
        tokens: int,
        counts: np.ndarray,
        *,
        now: float,
        expected: Callable[[str], set[int]],
    ) -> list[Merged]:
        """Add one rank's snapshot (counts [L, P]); return what is ready to go out.

        A second snapshot of the same rank for an open window is a duplicate: counted in
        ``duplicates`` and ignored. Shapes must agree within a group (the caller validated
        them against the group's model).
        """
        key: WindowKey = (group, epoch, step_start, step_end)
        if key in self._flushed:
            c = counts.astype(np.int64)
            return [self._merged(key, _Open(now, c, tokens, {ep_rank}), expected)]
        win = self._open.get(key)
        out: list[Merged] = []
        if win is None:
            mine = [k for k in self._open if k[0] == group]
            if len(mine) >= self.max_open_per_group:
                out.append(self._flush(mine[0], expected))
            win = _Open(now, np.zeros(counts.shape, dtype=np.int64))
            self._open[key] = win
        if ep_rank in win.ranks:
            self.duplicates += 1
            return out
        win.counts += counts
        win.tokens += tokens
        win.ranks.add(ep_rank)
        if win.ranks >= expected(group):
            out.append(self._flush(key, expected))
        return out

    def expire(self, now: float, expected: Callable[[str], set[int]]) -> list[Merged]:
        """Windows that are complete now or older than the timeout, oldest first."""
        ready = [
            k
            for k, w in self._open.items()
            if now - w.opened >= self.timeout_s or w.ranks >= expected(k[0])
        ]
        return [self._flush(k, expected) for k in ready]

    def drop_groups(self, groups: Iterable[str]) -> None:
        """Forget the open windows of ``groups`` (e.g. a group whose model changed)."""
        gs = set(groups)
        for k in [k for k in self._open if k[0] in gs]:
            del self._open[k]

    def open_windows(self) -> int:
        return len(self._open)

    def _flush(self, key: WindowKey, expected: Callable[[str], set[int]]) -> Merged:
        win = self._open.pop(key)
        self._flushed[key] = None
        while len(self._flushed) > 16 * self.max_open_per_group:
            self._flushed.popitem(last=False)
        return self._merged(key, win, expected)

    @staticmethod
    def _merged(key: WindowKey, win: _Open, expected: Callable[[str], set[int]]) -> Merged:
        group, epoch, s0, s1 = key
        counts = win.counts
        if counts.size == 0 or int(counts.max()) <= _INT32_MAX:
            counts = counts.astype(np.int32)
        return Merged(
            group=group,
            epoch=epoch,
            step_start=s0,
            step_end=s1,
            ep_ranks=sorted(win.ranks),
            tokens=win.tokens,
            counts=counts,
            complete=win.ranks >= expected(group),
        )
