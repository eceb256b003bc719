"""Forecasts of the next window's load from the windows seen so far.

Small, pure state holders over float64 tensors ``[L, E]``: the daemon pushes each closed
window's logical load and plans from :attr:`Ewma.value` or :attr:`RegimeMean.value` (the mean
since the traffic last changed); :class:`SlidingWindow` keeps the last few. No clock, no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: how :class:`RegimeMean` found a change: one window far off the mean ("switch"), or a
#: recent mean that left it ("drift")
CHANGE_KINDS = ("switch", "drift")


def _int_at_least(v: Any, low: int) -> bool:
    """Whether ``v`` is an integer (not a bool) >= ``low``: the counts' and settings' test."""
    return not isinstance(v, bool) and isinstance(v, int) and v >= low


def _as_load(load: Any, shape: tuple[int, ...] | None) -> torch.Tensor:
    t = torch.as_tensor(load).detach().to("cpu", torch.float64)
    if t.dim() != 2:
        raise ValueError(f"load must be 2-D [layers, experts], got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"load has shape {tuple(t.shape)}, expected {shape}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError("load must be finite and >= 0")
    return t


class SlidingWindow:
    """The last ``capacity`` loads, [L, E] each: their sum and mean.

    A ring buffer of ``capacity`` tensors, allocated at the first push (which fixes the
    shape). ``sum()`` adds the buffer up each time (no running sum to drift).
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self._buf: torch.Tensor | None = None
        self._next = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    @property
    def full(self) -> bool:
        return self._len == self.capacity

    @property
    def shape(self) -> tuple[int, ...] | None:
        return None if self._buf is None else tuple(self._buf.shape[1:])

    def push(self, load: Any) -> None:
        """Add one window's load [L, E]; the oldest drops out once ``capacity`` are held."""
        t = _as_load(load, self.shape)
        if self._buf is None:
            self._buf = torch.zeros((self.capacity, *t.shape), dtype=torch.float64)
        self._buf[self._next] = t
        self._next = (self._next + 1) % self.capacity
        self._len = min(self._len + 1, self.capacity)

    def sum(self) -> torch.Tensor:
        """Sum of the held loads. -> [L, E] float64. Raises ValueError when empty."""
        if self._buf is None or self._len == 0:
            raise ValueError("the window is empty")
        return self._buf.sum(dim=0) if self.full else self._held().sum(dim=0)

    def mean(self) -> torch.Tensor:
        """Mean of the held loads. -> [L, E] float64. Raises ValueError when empty."""
        return self.sum() / self._len

    def _held(self) -> torch.Tensor:
        assert self._buf is not None
        return self._buf[: self._len] if not self.full else self._buf

    def clear(self) -> None:
        self._next = 0
        self._len = 0
        if self._buf is not None:
            self._buf.zero_()


class Ewma:
    """Exponentially weighted average of loads: ``v = alpha * load + (1 - alpha) * v``.

    The first update sets ``v`` to that load. ``alpha`` in (0, 1]: 1 keeps only the last
    window; smaller values remember longer and smooth sampling noise.
    """

    def __init__(self, alpha: float) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self._value: torch.Tensor | None = None
        self.updates = 0

    @property
    def value(self) -> torch.Tensor | None:
        """The current average [L, E] float64, or None before the first update."""
        return None if self._value is None else self._value.clone()

    def update(self, load: Any) -> torch.Tensor:
        """Fold in one window's load [L, E]; returns the new average."""
        t = _as_load(load, None if self._value is None else tuple(self._value.shape))
        if self._value is None:
            self._value = t.clone()
        else:
            self._value.mul_(1.0 - self.alpha).add_(t, alpha=self.alpha)
        self.updates += 1
        return self._value.clone()

    def reset(self) -> None:
        self._value = None
        self.updates = 0


@dataclass
class RegimeState:
    """What :class:`RegimeMean` needs to go on after a restart: the ``mean`` [L, E] float64
    (None before the first update) of ``steps`` windows, the recent dispersions
    (``history``, oldest first), the ``changes`` detected and the ``recent`` means of the
    drift scales ([L, E] each; empty from a file of an earlier version: then seeded from
    the mean), the windows ``since_drift`` was found (None: none since the last switch,
    or a file of an earlier version) and how the ``last_change`` was found ("switch",
    "drift"; None: none yet, or a file of an earlier version)."""

    mean: torch.Tensor | None
    steps: int
    history: list[float]
    changes: int
    recent: list[torch.Tensor] = field(default_factory=list)
    since_drift: int | None = None
    last_change: str | None = None

    def check(self) -> None:
        """Raises ValueError when the state cannot be taken back."""
        if self.steps < 0 or self.changes < 0 or (self.mean is None) != (self.steps == 0):
            raise ValueError(f"steps {self.steps} and changes {self.changes} do not fit")
        if self.since_drift is not None and not _int_at_least(self.since_drift, 0):
            raise ValueError(
                f"since_drift must be None or an integer >= 0, got {self.since_drift!r}"
            )
        if self.last_change not in (None, *CHANGE_KINDS):
            raise ValueError(
                f"last_change must be None or one of {CHANGE_KINDS}, got {self.last_change!r}"
            )
        if not all(math.isfinite(d) and d >= 0 for d in self.history):
            raise ValueError("dispersions must be finite and >= 0")
        if self.mean is None:
            if self.recent:
                raise ValueError("recent means without a mean")
            return
        shape = tuple(_as_load(self.mean, None).shape)
        for r in self.recent:
            _as_load(r, shape)


class RegimeMean:
    """Mean load since the last detected change of regime, [L, E] float64.

    Serving traffic holds a mix (a tenant's, a task's) for a while and then switches. An
    EWMA short enough to follow a switch also follows every window's sampling noise, and a
    planner that follows the noise moves weights for nothing. This forecast averages every
    window since the traffic last changed, so it converges on the regime's mean, and
    restarts from the new window when a change is detected. Past ``memory`` windows it
    becomes an EWMA of weight 1 / ``memory``.

    The test of a change: Pearson's dispersion of the new window against the mean,
    ``d = sum((x - e)^2 / e) / (L (E - 1))`` with ``e`` the mean scaled to the window's
    total per layer, divided by ``1 + 1/n`` (``n`` windows in the mean: the mean's own
    noise). Token counts drawn independently give ``d`` near 1; a prompt's tokens are
    correlated (prefill), so its ``d`` is larger. The level is learnt: a change is a ``d``
    above ``threshold`` times the median of the last ``calibration`` values of ``d`` (all of
    them, so traffic that changes at every window stops counting as a change and is
    averaged). No test until ``min_history`` values are seen.

    Traffic can also drift: each window then differs from the last by less than its noise,
    while the mean falls further and further behind. So the mean is also tested at slower
    scales: for each ``k`` in ``drift_scales``, an EWMA of weight 2 / (k + 1) (as noisy as a
    mean of k windows) of the windows since the last change, its dispersion divided by
    ``1/k + 1/n``. Averaged, the noise is smaller and the drift the same, so the level of a
    change there is ``drift_threshold`` times the *mean* of the same last values of ``d``
    (an average of windows has a window's expected dispersion, and with prompt-correlated
    windows the mean sits well above the median: on the ESFT prefill traces twice the median
    restarted the mean inside regimes, twice the mean did not). When the
    recent mean of a scale has left the mean, the mean restarts from it (``k`` windows), and
    so do the slower scales' (they still hold the traffic the mean left behind). A drift
    found is likely to go on: for ``follow`` windows after one, the forecast is the fastest
    scale's recent mean instead of the mean, which would fall behind again until the next
    restart (on the benchmark's drifting traffic: from up to 1.7% slower than the EWMA to
    within 0.1% of it modelled, 0.4-0.8% slower timed at decode on an H100; where the
    traffic switches, no drift is found and nothing changes).
    """

    def __init__(
        self,
        *,
        threshold: float = 10.0,
        memory: int = 360,
        calibration: int = 64,
        min_history: int = 4,
        drift_scales: tuple[int, ...] = (2, 8),
        drift_threshold: float = 2.0,
        follow: int = 16,
    ) -> None:
        for name, t in (("threshold", threshold), ("drift_threshold", drift_threshold)):
            if isinstance(t, bool) or not isinstance(t, int | float) or not (1 < t < math.inf):
                raise ValueError(f"{name} must be a number > 1, got {t!r}")
        for name, v, low in (("memory", memory, 2), ("calibration", calibration, 1),
                             ("min_history", min_history, 1), ("follow", follow, 0)):  # fmt: skip
            if not _int_at_least(v, low):
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if not isinstance(drift_scales, tuple) or not all(
            _int_at_least(k, 2) for k in drift_scales
        ):
            raise ValueError(f"drift_scales must be a tuple of integers >= 2, got {drift_scales!r}")
        self.threshold = float(threshold)
        self.drift_scales = tuple(sorted(set(drift_scales)))
        self.drift_threshold = float(drift_threshold)
        self.memory = memory
        self.calibration = calibration
        self.min_history = min_history
        self.follow = follow
        # windows since the last drift was found (None: none since the last switch)
        self._since_drift: int | None = None
        self._mean: torch.Tensor | None = None
        self._n = 0
        self._history: list[float] = []
        # per drift scale k: an EWMA of weight 2 / (k + 1) (the noise of a mean of k windows)
        # of the windows since the last change
        self._recent: list[torch.Tensor] = []
        self.changes = 0  # changes detected since start
        self.last_dispersion: float | None = None
        # how the last change was found: "switch" (one window), "drift" (a recent mean)
        self.last_change: str | None = None

    @property
    def steps(self) -> int:
        """Windows in the mean (since the last change, at most ``memory``)."""
        return self._n

    @property
    def value(self) -> torch.Tensor | None:
        """The forecast [L, E] float64, or None before the first update: the mean, or for
        ``follow`` windows after a drift was found, the fastest scale's recent mean (a drift
        under way is followed at the recent windows' pace, not the mean's)."""
        if self._mean is None:
            return None
        return (self._recent[0] if self.following else self._mean).clone()

    @property
    def following(self) -> bool:
        """Whether the forecast follows a drift now (the recent mean, not the mean)."""
        return (
            bool(self._recent)
            and self._since_drift is not None
            and (self._since_drift < self.follow)
        )

    def change_level(self) -> float | None:
        """The dispersion above which the next window starts a new regime (None: no test
        yet)."""
        return self._level(self.threshold, statistics.median)

    def _level(self, factor: float, stat: Callable[[list[float]], float]) -> float | None:
        """``factor`` times ``stat`` (median or mean) of the recent dispersions (None before
        ``min_history`` of them)."""
        if len(self._history) < self.min_history:
            return None
        return factor * max(stat(self._history), 1e-12)

    def dispersion(self, load: Any) -> float | None:
        """``d`` of ``load`` [L, E] against the mean (None while the mean is empty)."""
        if self._mean is None:
            return None
        return self._dispersion(_as_load(load, tuple(self._mean.shape)))

    def _dispersion(self, x: torch.Tensor, windows: float = 1.0) -> float:
        """``d`` of a validated load ``x`` (a mean of ``windows`` windows) against the
        (non-empty) mean."""
        assert self._mean is not None
        m = self._mean
        e = m * (x.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1e-12))
        # an expert the mean never saw: expected half a count (one seen is then 2 x 0.5)
        stat = ((x - e) ** 2 / e.clamp_min(0.5)).sum()
        dof = max(x.shape[0] * (x.shape[1] - 1), 1)
        return float(stat) / dof / (1.0 / windows + 1.0 / self._n)

    def _drift(self) -> int | None:
        """Index of the slowest drift scale whose recent mean left the mean (None: none
        did, or no test yet). A scale is tested once the mean holds k windows."""
        level = self._level(self.drift_threshold, statistics.fmean)
        if level is None:
            return None
        hit = None
        for i, k in enumerate(self.drift_scales):
            if self._n >= k and self._dispersion(self._recent[i], k) > level:
                hit = i
        return hit

    def update(self, load: Any) -> bool:
        """Fold in one window's load [L, E]. Returns True when it starts a new regime (the
        mean then restarts from it, or from the recent windows that showed a drift)."""
        x = _as_load(load, None if self._mean is None else tuple(self._mean.shape))
        d = None if self._mean is None else self._dispersion(x)
        self.last_dispersion = d
        level = self.change_level()
        changed = d is not None and level is not None and d > level
        if d is not None:
            self._history.append(d)
            del self._history[: -self.calibration]
        if self._since_drift is not None:
            self._since_drift += 1
        if changed or self._mean is None:
            self._since_drift = None
            self._mean = x.clone()
            self._n = 1
            self._recent = [x.clone() for _ in self.drift_scales]
            if changed:
                self.changes += 1
                self.last_change = "switch"
            return changed
        for k, r in zip(self.drift_scales, self._recent, strict=True):
            r.add_(x - r, alpha=2.0 / (k + 1))
        self._n = min(self._n + 1, self.memory)
        self._mean.add_(x - self._mean, alpha=1.0 / self._n)
        hit = self._drift()
        if hit is None:
            return False
        self._mean = self._recent[hit].clone()
        self._n = self.drift_scales[hit]
        for i in range(hit + 1, len(self._recent)):
            self._recent[i] = self._mean.clone()
        self.changes += 1
        self.last_change = "drift"
        self._since_drift = 0
        return True

    def state(self) -> RegimeState:
        return RegimeState(
            None if self._mean is None else self._mean.clone(), self._n,
            list(self._history), self.changes, [r.clone() for r in self._recent],
            self._since_drift, self.last_change,
        )  # fmt: skip

    def restore(self, state: RegimeState) -> None:
        """Take over ``state``. Raises ValueError if it is not a valid one."""
        state.check()
        self._mean = None if state.mean is None else _as_load(state.mean, None).clone()
        self._n = min(state.steps, self.memory)
        if self._mean is None:
            self._recent = []
        elif len(state.recent) == len(self.drift_scales):
            self._recent = [_as_load(r, None).clone() for r in state.recent]
        else:  # saved without them (or with other scales): start them at the mean
            self._recent = [self._mean.clone() for _ in self.drift_scales]
        self._history = list(state.history[-self.calibration :])
        self.changes = state.changes
        self.last_dispersion = None
        self.last_change = None if self._mean is None else state.last_change
        self._since_drift = None if self._mean is None else state.since_drift

    def reset(self) -> None:
        self._mean = None
        self._n = 0
        self._recent = []
        self._history = []
        self.last_dispersion = None
        self.last_change = None
        self._since_drift = None
