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
