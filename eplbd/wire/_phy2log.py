"""The compact wire form of a layout's ``phy2log``.

A phy2log travels as a raw tensor frame. int64 (the form of every version before this one)
costs 8 bytes a slot: 148 KB for DeepSeek-V3 at P = 320, sent to every rank of the group on
each PREPARE (47.5 MB a commit at EP 320). Expert ids fit in int16 for E <= 32768, so a
sender narrows the frame to the smallest integer type the receiver declared it accepts
(``phy2log_dtypes`` in its ``hello`` / ``agent_hello``; a peer that declares nothing is of
an older version and gets int64). Receivers of this version accept int16, int32 and int64
and widen to int64 before any other use (the layout digest is over the int64 form).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "PHY2LOG_DTYPES",
    "PHY2LOG_FIELD",
    "accepted_phy2log_dtypes",
    "held_layouts",
    "layout_digest",
    "narrow_phy2log",
    "narrow_phy2log_each",
]

#: The dtypes a receiver of this version accepts for ``phy2log``, narrowest first.
PHY2LOG_DTYPES: tuple[str, ...] = ("int16", "int32", "int64")
#: The ``hello`` / ``agent_hello`` field in which a peer lists the dtypes it accepts.
PHY2LOG_FIELD = "phy2log_dtypes"
_LEGACY: tuple[str, ...] = ("int64",)


def accepted_phy2log_dtypes(hello: Mapping[str, Any]) -> tuple[str, ...]:
    """The phy2log dtypes the sender of ``hello`` accepts, narrowest first: the names of
    its ``phy2log_dtypes`` this version knows, plus int64, which every version reads.
    Anything malformed there counts as not declared (an old peer's hello has no field)."""
    declared = hello.get(PHY2LOG_FIELD)
    if not isinstance(declared, list | tuple):
        return _LEGACY
    names = {d for d in declared if isinstance(d, str)}
    return tuple(d for d in PHY2LOG_DTYPES if d in names or d == "int64")


def narrow_phy2log(phy2log: Any, accepts: Iterable[str]) -> np.ndarray:
    """``phy2log`` (numpy, or a CPU torch tensor) in the narrowest dtype of ``accepts`` that
    holds its ids (int64 when none does); C-contiguous, ready to be a frame."""
    import numpy as np  # not at import: the CLI imports eplbd.wire and needs no numpy

    a = np.asarray(phy2log)
    hi = int(a.max()) if a.size else 0
    lo = int(a.min()) if a.size else 0
    ok = set(accepts)
    for name in PHY2LOG_DTYPES:
        info = np.iinfo(name)
        if name in ok and info.min <= lo and hi <= info.max:
            return np.ascontiguousarray(a, dtype=name)
    return np.ascontiguousarray(a, dtype=np.int64)


def narrow_phy2log_each(phy2log: Any, accepts: Iterable[tuple[str, ...]]) -> list[np.ndarray]:
    """``phy2log`` narrowed for each receiver's ``accepts`` in turn (:func:`narrow_phy2log`),
    one copy per distinct list: a group's receivers mostly share one."""
    forms: dict[tuple[str, ...], np.ndarray] = {}
    out = []
    for a in accepts:
        if a not in forms:
            forms[a] = narrow_phy2log(phy2log, a)
        out.append(forms[a])
    return out


def layout_digest(phy2log: Any) -> int:
    """CRC32 (31 bits) of the int64 form of ``phy2log``: the digest an ``agent_hello`` lists
    for the layouts its agent holds (with its epoch). It equals the client's consensus
    digest for an equal-split layout; the client's also covers the shares of a weighted one."""
    import numpy as np

    return zlib.crc32(np.ascontiguousarray(np.asarray(phy2log), dtype=np.int64).tobytes()) & (
        0x7FFFFFFF
    )


def held_layouts(agent_hello: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """group -> (epoch, digest) of the committed layouts an ``agent_hello`` says its agent
    holds (``layouts``: [{group, epoch, digest}]); malformed entries are left out (the
    planner then sends that layout, as to an agent of an older version)."""
    out: dict[str, tuple[int, int]] = {}
    items = agent_hello.get("layouts")
    if not isinstance(items, list):
        return out
    for it in items[:4096]:
        if not isinstance(it, dict):
            continue
        g, e, d = it.get("group"), it.get("epoch"), it.get("digest")
        if isinstance(g, str) and type(e) is int and type(d) is int and e >= 0 and d >= 0:
            out[g] = (e, d)
    return out
