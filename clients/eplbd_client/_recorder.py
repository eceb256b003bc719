"""Recording windows: when ``should_record`` is on, and the snapshots of the load counters.

Serving thread only. Steps are counted as the client does: after ``step()`` number n, the
next forward is forward n. Windows are a function of that step count, the same on every rank
of the group (the consensus already relies on the ranks' step counts agreeing): window k
starts at step k * window, records forwards k*window .. k*window + record - 1 and is shipped
at step k*window + record as a snapshot ``[k*window, k*window + record)``
(:func:`window_at`). A rank that gets its schedule in the middle of a window (its welcome came
at another step than its peers') starts recording at the next window, so the agent can merge
the ranks' snapshots of one window into one. A commit, which every rank applies at the same
step s, closes the open window (``[start, s)`` under the old epoch, so a window never spans
two epochs) and records the rest of it (``[s, k*window + record)``) under the new one.
Receiving the schedule it already follows changes nothing.

The flag is only written when it changes (an in-place fill on the device), and on CUDA the
counters go to pinned host memory with an async copy, shipped by a later :meth:`poll` once
its event has completed; two copies at most are in flight, a third window close then drops
its snapshot (counted) rather than wait.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from eplbd_client._messages import Schedule

__all__ = ["Recorder", "window_at"]

Ship = Callable[[torch.Tensor, int, int, int], None]  # counts [L, P], start, end, epoch


def window_at(step: int, window_steps: int, record_steps: int) -> tuple[int, int, int]:
    """The window that contains ``step``: (start, record end, window end), e.g.
    ``window_at(37, 16, 4) == (32, 36, 48)``."""
    start = step - step % window_steps
    return start, start + record_steps, start + window_steps


@dataclass(eq=False)
class _Inflight:
    buf: torch.Tensor
    event: Any
    start: int
    end: int
    epoch: int


class Recorder:
    """Owns the shared ``should_record`` flag ([1] int32) and zeroes the ``load`` counters
    ([L, P] int32) it ships through ``ship``."""

    def __init__(
        self,
        load: torch.Tensor,
        should_record: torch.Tensor,
        ship: Ship,
        on_drop: Callable[[], None],
    ) -> None:
        self._load = load
        self._flag_t = should_record
        self._ship = ship
        self._on_drop = on_drop
        self._device = load.device
        self._cuda = load.device.type == "cuda"
        self._sched: Schedule | None = None
        self.recording = False
        self._win_start = self._rec_end = self._win_end = 0
        self._inflight: collections.deque[_Inflight] = collections.deque()
        self._free: list[torch.Tensor] = []

    @property
    def busy(self) -> bool:
        """A snapshot copy is in flight: poll at the next step."""
        return bool(self._inflight)

    def next_event(self) -> float:
        """The next step at which :meth:`tick` has something to do (inf: none)."""
        if self._sched is None:
            return math.inf
        return self._rec_end if self.recording else self._win_end

    def set_schedule(self, s: Schedule, step: int, epoch: int) -> None:
        sched = s if s.enabled and s.record_steps > 0 else None
        if sched == self._sched:
            return  # e.g. the agent welcomed us again: the window goes on
        self.close(step, epoch)
        self._sched = sched
        self.open(step)

    def open(self, step: int, *, mid_window: bool = False) -> None:
        """Record from ``step`` if it starts a window of the schedule or, with ``mid_window``
        (a commit, applied by every rank at this step), if it falls in a window's recording
        part; otherwise wait for the next window. No schedule: stop recording."""
        s = self._sched
        if s is None:
            self._set(False)
            return
        start, rec_end, win_end = window_at(step, s.window_steps, s.record_steps)
        if step == start or (mid_window and step < rec_end):
            self._win_start, self._rec_end, self._win_end = step, rec_end, win_end
            self._set(True)
        else:
            self._win_start = self._rec_end = self._win_end = win_end
            self._set(False)

    def close(self, step: int, epoch: int) -> None:
        """Ship what the open window recorded so far and stop recording."""
        if self.recording and step > self._win_start:
            self._snapshot(self._win_start, step, epoch)
        self._set(False)

    def tick(self, step: int, epoch: int) -> None:
        if self._sched is None:
            return
        if self.recording and step >= self._rec_end:
            self._snapshot(self._win_start, step, epoch)
            self._set(False)
        if step >= self._win_end:
            self.open(step)

    def poll(self) -> None:
        """Ship the snapshots whose device-to-host copy has completed."""
        while self._inflight and self._inflight[0].event.query():
            f = self._inflight.popleft()
            self._ship(f.buf.clone(), f.start, f.end, f.epoch)
            self._free.append(f.buf)

    def _set(self, on: bool) -> None:
        if on != self.recording:
            self._flag_t.fill_(1 if on else 0)
            self.recording = on

    def _snapshot(self, start: int, end: int, epoch: int) -> None:
        if not self._cuda:
            counts = self._load.clone()
            self._load.zero_()
            self._ship(counts, start, end, epoch)
            return
        if not self._free and len(self._inflight) < 2:
            self._free.append(
                torch.empty(self._load.shape, dtype=self._load.dtype, pin_memory=True)
            )
        if not self._free:
            self._load.zero_()
            self._on_drop()
            return
        buf = self._free.pop()
        buf.copy_(self._load, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self._device))
        self._load.zero_()
        self._inflight.append(_Inflight(buf, ev, start, end, epoch))
