"""Per-group load history: physical counts -> logical load, sliding windows and a forecast.

Snapshots count tokens per *physical* slot ``[L, P]`` under the layout of the epoch they were
recorded in. Logical load ``[L, E]`` does not depend on the layout, so history survives a
rebalance: each snapshot is converted with its own epoch's ``phy2log``. To keep ingest cheap
(thousands of snapshots a second), :meth:`LoadWindow.add_counts` only adds the counts into a
physical accumulator per epoch; the conversion runs once per epoch when the bucket closes.

Time is cut into buckets of ``window_s`` seconds (by the caller's clock). A bucket that closes
with data joins the sliding window (the last ``num_windows`` non-empty buckets) and updates
the exponentially weighted forecast ``f = alpha * bucket + (1 - alpha) * f``. Empty buckets
(no traffic, or no snapshot arrived) are skipped: they say nothing about the load's shape.
The average is :class:`eplbd.planner.Ewma`; this class adds the time buckets, the ring of
closed buckets and the token counts. Pure: no clock is read here, every method takes
``now``. :meth:`LoadWindow.state` and :meth:`LoadWindow.restore` carry the closed buckets and
the forecast over a planner restart (:class:`WindowState`; the store writes it to disk).

Two forecasts (``forecast``): "ewma", the exponentially weighted average above; "regime",
:class:`eplbd.planner.RegimeMean`, the mean of the buckets since the last detected change of
traffic (it converges on the traffic's mean instead of following each bucket's noise, and
restarts when the traffic changes). The sliding window and its tokens are the same in both.

Each bucket also counts the forward steps its snapshots recorded (the distinct
``[step_start, step_end)`` ranges: the agents of a group report the same windows for their
ranks), so the time objective can turn the forecast into rows per step
(:meth:`LoadWindow.steps_per_window`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from eplbd.planner import Ewma, RegimeMean, RegimeState

__all__ = ["FORECASTS", "LoadWindow", "WindowState", "logical_load"]

#: the forecasts a LoadWindow can keep (the planner's ``forecast`` setting)
FORECASTS = ("ewma", "regime")


def logical_load(counts: torch.Tensor, phy2log: torch.Tensor, num_logical: int) -> torch.Tensor:
    """Sum the counts of each expert's replicas. counts [L, P], phy2log [L, P] -> [L, E] f64."""
    if counts.shape != phy2log.shape:
        raise ValueError(
            f"counts {tuple(counts.shape)} and phy2log {tuple(phy2log.shape)} differ in shape"
        )
    out = torch.zeros(counts.shape[0], num_logical, dtype=torch.float64)
    out.scatter_add_(1, phy2log.long(), counts.to(torch.float64))
    return out


_I32_MAX = 2**31 - 1


class _PhysicalAccumulator:
    """Counts [L, P] of one epoch, summed cheaply.

    int32 snapshots add into an int32 tensor (same-dtype adds are several times faster than
    int32 into int64); before the int32 sum could overflow it is folded into the int64 one.
    Every count is <= its snapshot's ``tokens`` (validated), so the running token sum bounds
    every int32 element.
    """

    def __init__(self, phy2log: torch.Tensor) -> None:
        self.phy2log = phy2log
        self.acc64 = torch.zeros(phy2log.shape, dtype=torch.int64)
        self.acc32 = torch.zeros(phy2log.shape, dtype=torch.int32)
        self.bound32 = 0

    def add(self, counts: torch.Tensor, tokens: int) -> None:
        if counts.dtype == torch.int32 and tokens <= _I32_MAX:
            if self.bound32 + tokens > _I32_MAX:
                self.acc64 += self.acc32
                self.acc32.zero_()
                self.bound32 = 0
            self.acc32.add_(counts)
            self.bound32 += tokens
        else:
            self.acc64.add_(counts.to(torch.int64))

    def total(self) -> torch.Tensor:
        return self.acc64 + self.acc32


class LoadWindow:
    """Sliding window of logical loads plus an EWMA forecast, for one EP group.

    ``num_layers`` L, ``num_logical`` E. All tensors float64 ``[L, E]``.
    """

    def __init__(
        self,
        num_layers: int,
        num_logical: int,
        *,
        window_s: float,
        num_windows: int,
        alpha: float,
        forecast: str = "ewma",
        change_threshold: float = 10.0,
        regime_windows: int = 360,
    ) -> None:
        if window_s <= 0 or num_windows < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError("window_s > 0, num_windows >= 1 and 0 < alpha <= 1 are required")
        if forecast not in FORECASTS:
            raise ValueError(f"forecast must be one of {FORECASTS}, got {forecast!r}")
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.window_s = float(window_s)
        self.alpha = float(alpha)
        self._ring: deque[torch.Tensor] = deque(maxlen=num_windows)  # closed buckets, [L, E]
        self._ewma = Ewma(alpha)
        self._regime = (
            RegimeMean(threshold=change_threshold, memory=regime_windows)
            if forecast == "regime"
            else None
        )
        self._bucket_tokens: deque[int] = deque(maxlen=num_windows)
        self._bucket_steps: deque[int] = deque(maxlen=num_windows)  # 0: unknown
        self._open_ranges: set[tuple[int, int]] = set()
        self._open = torch.zeros(num_layers, num_logical, dtype=torch.float64)
        self._open_phys: dict[int, _PhysicalAccumulator] = {}  # by epoch
        self._open_tokens = 0
        self._open_snapshots = 0
        self._open_start: float | None = None
        self.closed = 0  # non-empty buckets closed since start
        self.traffic_changed = False  # the last closed bucket started a new regime
        self.snapshots = 0

    def add(self, load: torch.Tensor, tokens: int, now: float) -> None:
        """Add one snapshot's logical load ``[L, E]`` to the open bucket."""
        if tuple(load.shape) != (self.num_layers, self.num_logical):
            raise ValueError(
                f"load shape {tuple(load.shape)} != ({self.num_layers}, {self.num_logical})"
            )
        self.roll(now)
        if self._open_start is None:
            self._open_start = now
        self._open += load.to(torch.float64)
        self._open_tokens += int(tokens)
        self._open_snapshots += 1
        self.snapshots += 1

    def add_counts(
        self,
        epoch: int,
        phy2log: torch.Tensor,
        counts: Any,
        tokens: int,
        now: float,
        steps: tuple[int, int] | None = None,
    ) -> None:
        """Add one snapshot's physical counts ``[L, P]`` (a tensor, or the numpy array the wire
        codec decodes) recorded under ``epoch`` (whose layout is ``phy2log [L, P]``) over the
        forward steps ``steps`` = (step_start, step_end) to the open bucket."""
        counts = torch.as_tensor(counts)
        if counts.shape != phy2log.shape or counts.shape[0] != self.num_layers:
            raise ValueError(
                f"counts {tuple(counts.shape)} and phy2log {tuple(phy2log.shape)} do not fit"
            )
        self.roll(now)
        if self._open_start is None:
            self._open_start = now
        entry = self._open_phys.get(epoch)
        if entry is None or entry.phy2log is not phy2log:
            if entry is not None:  # same epoch, another layout object: fold the old one in
                self._open += logical_load(entry.total(), entry.phy2log, self.num_logical)
            entry = _PhysicalAccumulator(phy2log)
            self._open_phys[epoch] = entry
        entry.add(counts, int(tokens))
        if steps is not None and steps[1] > steps[0] and len(self._open_ranges) < 65536:
            self._open_ranges.add((int(steps[0]), int(steps[1])))
        self._open_tokens += int(tokens)
        self._open_snapshots += 1
        self.snapshots += 1

    def _open_logical(self) -> torch.Tensor:
        out = self._open.clone()
        for entry in self._open_phys.values():
            out += logical_load(entry.total(), entry.phy2log, self.num_logical)
        return out

    def roll(self, now: float) -> int:
        """Close the open bucket if its period is over. Returns how many buckets closed (0/1)."""
        if self._open_start is None or now < self._open_start + self.window_s:
            return 0
        bucket = self._open_logical()
        self._open = torch.zeros_like(bucket)
        self._open_phys = {}
        tokens, self._open_tokens = self._open_tokens, 0
        steps = sum(e - s for s, e in self._open_ranges)
        self._open_ranges = set()
        self._open_snapshots = 0
        self._open_start = None
        if float(bucket.sum()) <= 0.0:
            return 0
        self._ring.append(bucket)
        self._bucket_tokens.append(tokens)
        self._bucket_steps.append(steps)
        self._ewma.update(bucket)
        self.traffic_changed = self._regime is not None and self._regime.update(bucket)
        self.closed += 1
        return 1

    @property
    def windows(self) -> int:
        """Closed non-empty buckets now in the sliding window."""
        return len(self._ring)

    @property
    def tokens(self) -> int:
        """Tokens counted in the sliding window (closed buckets)."""
        return sum(self._bucket_tokens)

    def steps_per_window(self) -> float | None:
        """Mean forward steps recorded per closed bucket (the forecast is a bucket's rows, so
        forecast / this = rows per step), None while no bucket says."""
        known = [s for s in self._bucket_steps if s > 0]
        return sum(known) / len(known) if known else None

    @property
    def open_tokens(self) -> int:
        return self._open_tokens

    def forecast(self) -> torch.Tensor | None:
        """The forecast ``[L, E]`` (EWMA or regime mean), None before the first bucket
        closes."""
        return self._ewma.value if self._regime is None else self._regime.value

    def regime_view(self) -> dict[str, Any] | None:
        """The regime forecast's figures (None with the EWMA): buckets in its mean, changes
        detected since start, how the last one was found (switch or drift; None: none since
        start), whether it follows a drift now (its recent mean), the last bucket's
        dispersion and the level a change needs."""
        r = self._regime
        if r is None:
            return None
        return {
            "windows_in_mean": r.steps,
            "changes": r.changes,
            "last_change": r.last_change,
            "following_drift": r.following,
            "dispersion": None if r.last_dispersion is None else round(r.last_dispersion, 3),
            "change_above": None if (lvl := r.change_level()) is None else round(lvl, 3),
        }

    def window_sum(self) -> torch.Tensor:
        """Sum of the closed buckets in the window ``[L, E]`` (zeros if none)."""
        if len(self._ring) == 0:
            return torch.zeros(self.num_layers, self.num_logical, dtype=torch.float64)
        return torch.stack(list(self._ring)).sum(dim=0)

    def best_estimate(self) -> torch.Tensor | None:
        """The forecast, or, before any bucket closed, the open bucket (None if empty).

        An operator's forced rebalance may act on this before the window has filled.
        """
        f = self.forecast()
        if f is not None:
            return f
        o = self._open_logical()
        return o if float(o.sum()) > 0.0 else None

    def next_close(self) -> float | None:
        """When the open bucket closes (None if it holds nothing yet)."""
        return None if self._open_start is None else self._open_start + self.window_s

    def state(self) -> WindowState:
        """What a restarted planner needs to forecast as before: the closed buckets, their
        tokens and the forecast (the open bucket is left out: it is partial)."""
        return WindowState(
            buckets=[b.clone() for b in self._ring],
            bucket_tokens=list(self._bucket_tokens),
            forecast=self._ewma.value,
            updates=self._ewma.updates,
            bucket_steps=list(self._bucket_steps),
            regime=None if self._regime is None else self._regime.state(),
        )

    def restore(self, state: WindowState) -> int:
        """Take over ``state`` (the newest buckets that fit this window). Returns how many
        buckets were restored. Raises ValueError if it does not fit this window's shape."""
        shape = (self.num_layers, self.num_logical)
        tensors = [*state.buckets, *([] if state.forecast is None else [state.forecast])]
        if state.regime is not None and state.regime.mean is not None:
            tensors += [state.regime.mean, *state.regime.recent]
        if any(tuple(t.shape) != shape for t in tensors):
            raise ValueError(f"saved load has another shape than [L, E] = {list(shape)}")
        if state.regime is not None:
            state.regime.check()  # before anything is replaced
        if len(state.bucket_tokens) != len(state.buckets):
            raise ValueError("saved buckets and their token counts differ in number")
        keep = self._ring.maxlen or 0
        self._ring.clear()
        self._bucket_tokens.clear()
        self._bucket_steps.clear()
        steps = state.bucket_steps
        if len(steps) != len(state.buckets):  # saved by a version that did not count them
            steps = [0] * len(state.buckets)
        saved = list(zip(state.buckets, state.bucket_tokens, steps, strict=True))
        for b, tokens, n in saved[-keep:]:
            self._ring.append(b.to(torch.float64).clone())
            self._bucket_tokens.append(int(tokens))
            self._bucket_steps.append(max(int(n), 0))
        self._ewma.reset()
        if state.forecast is not None:
            self._ewma.update(state.forecast)  # the first update sets the value exactly
            self._ewma.updates = state.updates
        if self._regime is not None:
            self._regime.reset()
            if state.regime is not None:
                self._regime.restore(state.regime)
            else:  # saved with the EWMA: the saved buckets, oldest first, seed the mean
                for b in self._ring:
                    self._regime.update(b)
        return len(self._ring)


@dataclass
class WindowState:
    """A :class:`LoadWindow`'s closed data: ``buckets`` [L, E] float64 each, oldest first,
    with their ``bucket_tokens``; the EWMA ``forecast`` [L, E] (None before the first bucket)
    after ``updates`` buckets; ``bucket_steps``: the forward steps each bucket recorded (0:
    unknown; empty from a file of an earlier version); ``regime``: the regime forecast's
    state (None with the EWMA, or from a file written with it)."""

    buckets: list[torch.Tensor]
    bucket_tokens: list[int]
    forecast: torch.Tensor | None
    updates: int
    bucket_steps: list[int] = field(default_factory=list)
    regime: RegimeState | None = None
