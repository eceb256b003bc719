"""Forecasts of the next window's load from the windows seen so far.

Small, pure state holders over float64 tensors ``[L, E]``: the daemon pushes each closed
window's logical load and plans from :attr:`Ewma.value` or :attr:`RegimeMean.value` (the mean
since the traffic last changed); :class:`SlidingWindow` keeps the last few. No clock, no I/O.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch


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
    (``history``, oldest first) and the ``changes`` detected."""

    mean: torch.Tensor | None
    steps: int
    history: list[float]
    changes: int

    def check(self) -> None:
        """Raises ValueError when the state cannot be taken back."""
        if self.steps < 0 or self.changes < 0 or (self.mean is None) != (self.steps == 0):
            raise ValueError(f"steps {self.steps} and changes {self.changes} do not fit")
        if not all(math.isfinite(d) and d >= 0 for d in self.history):
            raise ValueError("dispersions must be finite and >= 0")
        if self.mean is not None:
            _as_load(self.mean, None)


class RegimeMean:
    """Mean load since the last detected change of regime, [L, E] float64.

    Serving traffic holds a mix (a tenant's, a task's) for a while and then switches. An
    EWMA short enough to follow a switch also follows every window's sampling noise, and a
    planner that follows the noise moves weights for nothing. This forecast averages every
    window since the traffic last changed, so it converges on the regime's mean, and
    restarts from the new window when a change is detected. Past ``memory`` windows it
    becomes an EWMA of weight 1 / ``memory`` (a slow drift is still followed).

    The test of a change: Pearson's dispersion of the new window against the mean,
    ``d = sum((x - e)^2 / e) / (L (E - 1))`` with ``e`` the mean scaled to the window's
    total per layer, divided by ``1 + 1/n`` (``n`` windows in the mean: the mean's own
    noise). Token counts drawn independently give ``d`` near 1; a prompt's tokens are
    correlated (prefill), so its ``d`` is larger. The level is learnt: a change is a ``d``
    above ``threshold`` times the median of the last ``calibration`` values of ``d`` (all of
    them, so traffic that changes at every window stops counting as a change and is
    averaged). No test until ``min_history`` values are seen.
    """

    def __init__(
        self,
        *,
        threshold: float = 10.0,
        memory: int = 360,
        calibration: int = 64,
        min_history: int = 4,
    ) -> None:
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not (1 < threshold < math.inf)
        ):
            raise ValueError(f"threshold must be a number > 1, got {threshold!r}")
        for name, v, low in (("memory", memory, 2), ("calibration", calibration, 1),
                             ("min_history", min_history, 1)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        self.threshold = float(threshold)
        self.memory = memory
        self.calibration = calibration
        self.min_history = min_history
        self._mean: torch.Tensor | None = None
        self._n = 0
        self._history: list[float] = []
        self.changes = 0  # changes detected since start
        self.last_dispersion: float | None = None

    @property
    def steps(self) -> int:
        """Windows in the mean (since the last change, at most ``memory``)."""
        return self._n

    @property
    def value(self) -> torch.Tensor | None:
        """The mean [L, E] float64, or None before the first update."""
        return None if self._mean is None else self._mean.clone()

    def change_level(self) -> float | None:
        """The dispersion above which the next window starts a new regime (None: no test
        yet)."""
        if len(self._history) < self.min_history:
            return None
        return self.threshold * max(statistics.median(self._history), 1e-12)

    def dispersion(self, load: Any) -> float | None:
        """``d`` of ``load`` [L, E] against the mean (None while the mean is empty)."""
        if self._mean is None:
            return None
        return self._dispersion(_as_load(load, tuple(self._mean.shape)))

    def _dispersion(self, x: torch.Tensor) -> float:
        """``d`` of a validated load ``x`` against the (non-empty) mean."""
        assert self._mean is not None
        m = self._mean
        e = m * (x.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1e-12))
        # an expert the mean never saw: expected half a count (one seen is then 2 x 0.5)
        stat = ((x - e) ** 2 / e.clamp_min(0.5)).sum()
        dof = max(x.shape[0] * (x.shape[1] - 1), 1)
        return float(stat) / dof / (1.0 + 1.0 / self._n)

    def update(self, load: Any) -> bool:
        """Fold in one window's load [L, E]. Returns True when it starts a new regime (the
        mean then restarts from it)."""
        x = _as_load(load, None if self._mean is None else tuple(self._mean.shape))
        d = None if self._mean is None else self._dispersion(x)
        self.last_dispersion = d
        level = self.change_level()
        changed = d is not None and level is not None and d > level
        if d is not None:
            self._history.append(d)
            del self._history[: -self.calibration]
        if changed or self._mean is None:
            self._mean = x.clone()
            self._n = 1
            self.changes += int(changed)
            return changed
        self._n = min(self._n + 1, self.memory)
        self._mean.add_(x - self._mean, alpha=1.0 / self._n)
        return False

    def state(self) -> RegimeState:
        return RegimeState(self.value, self._n, list(self._history), self.changes)

    def restore(self, state: RegimeState) -> None:
        """Take over ``state``. Raises ValueError if it is not a valid one."""
        state.check()
        self._mean = None if state.mean is None else _as_load(state.mean, None).clone()
        self._n = min(state.steps, self.memory)
        self._history = list(state.history[-self.calibration :])
        self.changes = state.changes
        self.last_dispersion = None

    def reset(self) -> None:
        self._mean = None
        self._n = 0
        self._history = []
        self.last_dispersion = None
