"""Checks of the messages the agent sends to a worker, and the bodies a worker sends back.

Message triples are ``(type, body, tensors)`` as in docs/protocol.md. Parsing is pure: a bad
message raises :class:`BadMessage` with a short reason, which the client counts and logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch

__all__ = [
    "AbortMsg",
    "BadMessage",
    "PrepareMsg",
    "Schedule",
    "WelcomeMsg",
    "parse_incoming",
]

PROTOCOL_VERSION = 1
#: The phy2log dtypes this client reads (eplbd.wire.PHY2LOG_DTYPES; the hello declares them
#: under ``phy2log_dtypes``); not imported from eplbd.wire, which would load pyzmq.
PHY2LOG_DTYPES = ("int16", "int32", "int64")


class BadMessage(ValueError):
    """An incoming message is malformed; ``reason`` is a short code for the counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Schedule:
    """Recording schedule: record ``record_steps`` of every ``window_steps`` forward steps and
    ship one snapshot per window, e.g. ``Schedule(64, 16, True)``."""

    window_steps: int
    record_steps: int
    enabled: bool


@dataclass(frozen=True)
class WelcomeMsg:
    epoch: int
    schedule: Schedule | None
    phy2log: torch.Tensor | None
    share: torch.Tensor | None = None


@dataclass(frozen=True)
class PrepareMsg:
    """share: the layout's weighted split [L, P], None for the equal split (an older
    planner or agent never sends one)."""

    group: str
    epoch: int
    timeout_s: float
    phy2log: torch.Tensor
    share: torch.Tensor | None = None


@dataclass(frozen=True)
class AbortMsg:
    group: str
    epoch: int
    reason: str


#: The largest epoch (or other integer) a message may carry: the group's consensus sums
#: them in int64 tensors.
MAX_INT = 2**63 - 1


def is_int_in(v: Any, lo: int) -> TypeGuard[int]:
    """``v`` is an int (not a bool) in [lo, MAX_INT]."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= MAX_INT


def is_positive_finite(v: Any) -> TypeGuard[int | float]:
    """``v`` is a finite number (not a bool) > 0: NaN would never expire as a timeout."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _int(body: dict[str, Any], key: str, lo: int = 0) -> int:
    v = body.get(key)
    if not is_int_in(v, lo):
        raise BadMessage("bad_field", f"{key}={v!r} must be an integer in [{lo}, 2**63 - 1]")
    return v


def _str(body: dict[str, Any], key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str):
        raise BadMessage("bad_field", f"{key}={v!r} must be a string")
    return v


def _layout_tensor(tensors: dict[str, Any], name: str, shape: tuple[int, int]) -> torch.Tensor:
    """An [L, P] integer tensor of a layout (``phy2log``, ``share``); its values are checked
    with the layout (:meth:`Layout.from_phy2log`)."""
    t = tensors.get(name)
    if not isinstance(t, torch.Tensor):
        raise BadMessage("missing_tensor", f"{name} tensor missing")
    if str(t.dtype).removeprefix("torch.") not in PHY2LOG_DTYPES or tuple(t.shape) != shape:
        raise BadMessage(
            "bad_tensor",
            f"{name} must be {'/'.join(PHY2LOG_DTYPES)} {list(shape)}, "
            f"got {t.dtype} {list(t.shape)}",
        )
    return t.to(torch.int64)  # the compact wire form widened: the digest is over int64


def _phy2log(tensors: dict[str, Any], shape: tuple[int, int]) -> torch.Tensor:
    return _layout_tensor(tensors, "phy2log", shape)


def _share(tensors: dict[str, Any], shape: tuple[int, int]) -> torch.Tensor | None:
    """The optional weighted split (None: the equal split)."""
    return None if tensors.get("share") is None else _layout_tensor(tensors, "share", shape)


def parse_schedule(body: Any) -> Schedule:
    if not isinstance(body, dict):
        raise BadMessage("bad_body", "schedule is not a map")
    w = _int(body, "window_steps", 1)
    r = _int(body, "record_steps", 0)
    en = body.get("enabled")
    if not isinstance(en, bool):
        raise BadMessage("bad_field", f"enabled={en!r} must be a boolean")
    if r > w:
        raise BadMessage("bad_field", f"record_steps={r} > window_steps={w}")
    return Schedule(w, r, en)


def parse_incoming(
    msg_type: Any, body: Any, tensors: Any, shape: tuple[int, int]
) -> WelcomeMsg | Schedule | PrepareMsg | AbortMsg:
    """Check one message from the agent. shape: the model's (L, P)."""
    if not isinstance(msg_type, str):
        raise BadMessage("bad_type", f"message type {msg_type!r} is not a string")
    if not isinstance(body, dict):
        raise BadMessage("bad_body", f"{msg_type} body is not a map")
    if tensors is None:
        tensors = {}
    if not isinstance(tensors, dict):
        raise BadMessage("bad_tensors", f"{msg_type} tensors are not a map")
    if msg_type == "schedule":
        return parse_schedule(body)
    if msg_type == "welcome":
        epoch = _int(body, "epoch")
        sched = body.get("schedule")
        return WelcomeMsg(
            epoch,
            parse_schedule(sched) if sched is not None else None,
            _phy2log(tensors, shape) if epoch > 0 else None,
            _share(tensors, shape) if epoch > 0 else None,
        )
    if msg_type == "prepare":
        t = body.get("timeout_s")
        if not is_positive_finite(t):
            raise BadMessage("bad_field", f"timeout_s={t!r} must be a finite number > 0")
        return PrepareMsg(
            _str(body, "group"),
            _int(body, "epoch", 1),
            float(t),
            _phy2log(tensors, shape),
            _share(tensors, shape),
        )
    if msg_type == "abort":
        return AbortMsg(_str(body, "group"), _int(body, "epoch"), str(body.get("reason", "")))
    raise BadMessage("unknown_type", f"unexpected message type {msg_type!r}")
