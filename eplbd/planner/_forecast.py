"""Forecasts of the next window's load from the windows seen so far.

Both are small, pure state holders over float64 tensors ``[L, E]``: the daemon pushes each
closed window's logical load and plans from :meth:`SlidingWindow.mean` or :attr:`Ewma.value`.
No clock, no I/O.
"""

from __future__ import annotations

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


class RegimeMean:
    """Mean load since the last detected change of regime, [L, E] float64.

    Serving traffic holds a mix (a tenant's, a task's) for a while and then switches. An
    EWMA short enough to follow a switch also follows every window's sampling noise, and a
    planner that follows the noise moves weights for nothing. This forecast averages every
    window since the traffic last changed (at most ``memory`` of them), so it converges on
    the regime's mean, and restarts from the new window when a change is detected.

    The test of a change: Pearson's dispersion of the new window against the mean,
    ``d = sum((x - e)^2 / e) / (L (E - 1))`` with ``e`` the mean scaled to the window's
    total per layer, divided by ``1 + 1/n`` (``n`` windows in the mean: the mean's own
    noise). Token counts drawn independently give ``d`` near 1; a prompt's tokens are
    correlated (prefill), so its ``d`` is larger. The level is learnt: a change is a ``d``
    above ``threshold`` times the median of the last ``calibration`` values of ``d`` (all of
    them, so traffic that changes every window stops counting as a change and is averaged).
    No test until ``min_history`` values are seen.
    """

    def __init__(
        self,
        *,
        threshold: float = 3.0,
        memory: int = 256,
        calibration: int = 64,
        min_history: int = 4,
    ) -> None:
        if not (isinstance(threshold, int | float) and threshold > 1):
            raise ValueError(f"threshold must be > 1, got {threshold!r}")
        for name, v in (("calibration", calibration), ("min_history", min_history)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.threshold = float(threshold)
        self._window = SlidingWindow(memory)
        self._history: list[float] = []
        self.calibration = calibration
        self.min_history = min_history
        self.changes = 0  # changes detected since start
        self.last_dispersion: float | None = None

    @property
    def steps(self) -> int:
        """Windows in the mean (since the last change, at most ``memory``)."""
        return len(self._window)

    @property
    def value(self) -> torch.Tensor | None:
        """The mean [L, E] float64, or None before the first update."""
        return self._window.mean() if len(self._window) else None

    def dispersion(self, load: Any) -> float | None:
        """``d`` of ``load`` [L, E] against the mean (None while the mean is empty)."""
        if not len(self._window):
            return None
        x = _as_load(load, self._window.shape)
        m = self._window.mean()
        tot_m = m.sum(dim=1, keepdim=True)
        e = m * (x.sum(dim=1, keepdim=True) / tot_m.clamp_min(1e-12))
        # an expert the mean never saw: expected half a count (one seen is then 2 x 0.5)
        stat = ((x - e) ** 2 / e.clamp_min(0.5)).sum()
        dof = max(x.shape[0] * (x.shape[1] - 1), 1)
        return float(stat) / dof / (1.0 + 1.0 / len(self._window))

    def update(self, load: Any) -> bool:
        """Fold in one window's load [L, E]. Returns True when it starts a new regime (the
        mean then restarts from it)."""
        d = self.dispersion(load)
        self.last_dispersion = d
        changed = False
        if d is not None:
            if len(self._history) >= self.min_history:
                ref = float(torch.tensor(self._history).median())
                changed = d > self.threshold * max(ref, 1e-12)
            self._history.append(d)
            del self._history[: -self.calibration]
        if changed:
            self._window.clear()
            self.changes += 1
        self._window.push(load)
        return changed

    def reset(self) -> None:
        self._window.clear()
        self._history.clear()
        self.last_dispersion = None
