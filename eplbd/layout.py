"""The placement of expert replicas in physical slots, shared by the planner and the client.

A layout is defined by ``phy2log[L, P]``: the logical expert held by each physical slot of
each MoE layer. Everything else follows from it:

- ``logcnt[L, E]``: replicas per logical expert (>= 1 for a valid layout);
- ``log2phy[L, E, R]``: the slots of each expert in ascending slot order, padded with -1,
  where ``R`` is the largest replica count of the layout (not a fixed 1024, so the map stays
  small and the kernel reads one short row per token).

Optionally a layout also says how each expert's rows are split over its replicas:
``share[L, P]``, a small integer per slot (0: the replica is idle, kept warm but sent no
rows). Without it every replica gets an equal share (vLLM's contract). The split reaches the
kernel as a **dispatch table** (:meth:`Layout.dispatch`: a table [L, E, D] and counts
[L, E]): each expert's slots listed as many times as their share, so the unchanged ``map_and_record``
(equal split over ``count`` entries by the Knuth hash) sends each slot rows in proportion
to its share. An engine that calls vLLM's own kernel gets the weighted split the same way.

Slot ``p`` lives on EP rank ``p // S`` with ``S = P // G`` slots per GPU.

The module is pure: tensors in, tensors out. Validation raises :class:`LayoutError` with a
message that names what is wrong, so a bad layout can be refused before anything is staged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "LAYOUT_SCHEMA_VERSION",
    "Layout",
    "LayoutError",
    "default_phy2log",
    "dispatch_table",
    "log2phy_from_phy2log",
    "logcnt_from_phy2log",
    "moves_between",
]

#: Newest JSON schema: 2 adds the optional ``share``. A layout without shares is still
#: written as schema 1, so that readers that know only schema 1 read it.
LAYOUT_SCHEMA_VERSION = 2
_SCHEMAS = (1, 2)


class LayoutError(ValueError):
    """A layout (or the input to build one) is malformed; the message says how."""


def default_phy2log(num_layers: int, num_logical: int, num_physical: int) -> torch.Tensor:
    """The layout engines start with: slot ``p`` holds expert ``p mod E``. [L, P] int64."""
    if num_physical < num_logical:
        raise LayoutError(
            f"num_physical_experts ({num_physical}) < num_logical_experts ({num_logical})"
        )
    row = torch.arange(num_physical, dtype=torch.int64) % num_logical
    return row.unsqueeze(0).repeat(num_layers, 1)


def logcnt_from_phy2log(phy2log: torch.Tensor, num_logical: int) -> torch.Tensor:
    """Replica count per logical expert. phy2log [L, P] -> logcnt [L, E] int64."""
    L = phy2log.shape[0]
    cnt = torch.zeros(L, num_logical, dtype=torch.int64, device=phy2log.device)
    cnt.scatter_add_(1, phy2log.long(), torch.ones_like(phy2log, dtype=torch.int64))
    return cnt


def log2phy_from_phy2log(
    phy2log: torch.Tensor, num_logical: int, num_replicas: int | None = None
) -> torch.Tensor:
    """Slots of each expert, ascending, padded with -1. phy2log [L, P] -> [L, E, R] int64.

    ``num_replicas`` (R) defaults to the largest replica count in the layout; a larger R pads
    more (engines that size their map once pass their own R).
    """
    L, P = phy2log.shape
    p2l = phy2log.long()
    cnt = logcnt_from_phy2log(p2l, num_logical)
    R = int(cnt.max().item()) if cnt.numel() else 0
    if num_replicas is not None:
        if num_replicas < R:
            raise LayoutError(f"num_replicas={num_replicas} < largest replica count {R}")
        R = num_replicas
    R = max(R, 1)
    # Rank of each slot among the slots of its expert: a stable sort by expert id keeps slots
    # ascending, and the position inside the run is the replica index.
    order = torch.sort(p2l, dim=1, stable=True).indices  # [L, P] slot ids grouped by expert
    sorted_e = torch.gather(p2l, 1, order)
    starts = torch.cumsum(cnt, dim=1) - cnt  # first position of each expert's run
    rank = torch.arange(P, device=p2l.device).unsqueeze(0) - torch.gather(starts, 1, sorted_e)
    out = torch.full((L, num_logical, R), -1, dtype=torch.int64, device=p2l.device)
    lidx = torch.arange(L, device=p2l.device).unsqueeze(1).expand(L, P)
    out[lidx, sorted_e, rank] = order
    return out


def dispatch_table(
    phy2log: torch.Tensor, share: torch.Tensor, num_logical: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's slots, ascending, each listed ``share`` times, padded with -1.

    phy2log, share [L, P] -> (table [L, E, D] int64, count [L, E] int64), D = the largest
    count (or ``width``). ``map_and_record(ids, table[l], count[l], ...)`` then sends slot p
    a fraction share[p] / count[e] of its expert's rows (the Knuth hash splits evenly over
    the count entries).
    """
    L, P = phy2log.shape
    p2l = phy2log.long()
    sh = share.long()
    count = torch.zeros(L, num_logical, dtype=torch.int64)
    count.scatter_add_(1, p2l, sh)
    D = max(int(count.max().item()) if count.numel() else 0, 1)
    if width is not None:
        if width < D:
            raise LayoutError(f"dispatch width {width} < largest dispatch count {D}")
        D = width
    # Entries in slot order: slot p of expert e fills positions [start, start + share[p])
    # of e's row, start = shares of e's lower slots.
    order = torch.sort(p2l, dim=1, stable=True).indices
    e_sorted = torch.gather(p2l, 1, order)
    s_sorted = torch.gather(sh, 1, order)
    within = torch.cumsum(s_sorted, dim=1) - s_sorted  # shares before, over all experts
    first = torch.cumsum(count, dim=1) - count
    start = within - torch.gather(first, 1, e_sorted)
    reps = s_sorted.reshape(-1)
    layer = torch.arange(L).unsqueeze(1).expand(L, P).reshape(-1)
    lrep = torch.repeat_interleave(layer, reps)
    erep = torch.repeat_interleave(e_sorted.reshape(-1), reps)
    srep = torch.repeat_interleave(order.reshape(-1), reps)
    base = torch.repeat_interleave(start.reshape(-1), reps)
    run_start = torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps)
    pos = base + torch.arange(int(reps.sum().item())) - run_start
    table = torch.full((L, num_logical, D), -1, dtype=torch.int64)
    table[lrep, erep, pos] = srep
    return table, count


def moves_between(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Slots whose logical expert changes, per layer. [L, P] x [L, P] -> [L] int64."""
    if old.shape != new.shape:
        raise LayoutError(
            f"cannot compare layouts of shapes {tuple(old.shape)} and {tuple(new.shape)}"
        )
    return (old.long() != new.long()).sum(dim=1)


@dataclass(frozen=True)
class Layout:
    """A validated placement of expert replicas.

    Fields (CPU tensors, int64):
        phy2log: [L, P], e.g. ``[[0, 1, 2, 3, 0, 1]]`` for E = 4, P = 6;
        logcnt:  [L, E], e.g. ``[[2, 2, 1, 1]]``;
        log2phy: [L, E, R], e.g. ``[[[0, 4], [1, 5], [2, -1], [3, -1]]]``.

    share: None (every replica gets an equal share of its expert's rows), or [L, P] int64
        >= 0, e.g. ``[[1, 1, 1, 1, 3, 0]]``: expert 0's rows go 1 : 3 to slots 0 and 4,
        slot 5 (expert 1) is idle and slot 1 takes all of expert 1's rows. Every expert has
        a slot with a positive share and the shares of one expert add up to at most
        P - E + 1 (so the dispatch table fits the engines' maps, which are that wide).

    Build one with :meth:`from_phy2log`, which validates; the constructor trusts its input.
    """

    phy2log: torch.Tensor
    logcnt: torch.Tensor
    log2phy: torch.Tensor
    share: torch.Tensor | None = None

    @classmethod
    def from_phy2log(
        cls,
        phy2log: Any,
        num_logical_experts: int,
        *,
        num_gpus: int | None = None,
        num_layers: int | None = None,
        num_physical_experts: int | None = None,
        share: Any = None,
    ) -> Layout:
        """Validate ``phy2log`` [L, P] (and ``share`` [L, P], if given) and derive the maps.

        Raises :class:`LayoutError` when it is not a 2-D integer tensor, an id is outside
        [0, E), an expert has no replica, a given size does not match, or the shares are
        malformed (see :class:`Layout`). Shares that are all 1 are the equal split: stored
        as None.
        """
        t = _as_index_tensor(phy2log, "phy2log")
        if t.dim() != 2:
            raise LayoutError(f"phy2log must be 2-D [layers, slots], got shape {tuple(t.shape)}")
        L, P = t.shape
        E = int(num_logical_experts)
        if E <= 0:
            raise LayoutError(f"num_logical_experts must be positive, got {E}")
        if num_layers is not None and L != num_layers:
            raise LayoutError(f"phy2log has {L} layers, model has {num_layers}")
        if num_physical_experts is not None and P != num_physical_experts:
            raise LayoutError(f"phy2log has {P} slots, model has {num_physical_experts}")
        if num_gpus is not None and (num_gpus <= 0 or P % num_gpus != 0):
            raise LayoutError(f"{P} slots cannot be split evenly over {num_gpus} GPUs")
        if P < E:
            raise LayoutError(f"{P} slots cannot hold {E} experts")
        if L == 0:
            raise LayoutError("phy2log has no layers")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= E:
            bad = lo if lo < 0 else hi
            layer, slot = (t == bad).nonzero()[0].tolist()
            raise LayoutError(f"expert id {bad} at layer {layer} slot {slot} is outside [0, {E})")
        logcnt = logcnt_from_phy2log(t, E)
        missing = (logcnt == 0).nonzero()
        if missing.numel():
            layer, expert = missing[0].tolist()
            raise LayoutError(
                f"expert {expert} of layer {layer} has no replica "
                f"({missing.shape[0]} expert(s) missing in all)"
            )
        sh = None if share is None else _check_share(share, t, E)
        return cls(t, logcnt, log2phy_from_phy2log(t, E), sh)

    def with_share(self, share: Any) -> Layout:
        """The same placement with another split (None: equal). Validates ``share``."""
        sh = None if share is None else _check_share(share, self.phy2log, self.num_logical)
        return Layout(self.phy2log, self.logcnt, self.log2phy, sh)

    @property
    def shares(self) -> torch.Tensor:
        """The share of every slot, [L, P] int64 (all 1 for the equal split)."""
        return torch.ones_like(self.phy2log) if self.share is None else self.share

    @property
    def active(self) -> torch.Tensor:
        """Slots that receive rows (share > 0). [L, P] bool"""
        return self.shares > 0

    def dispatch(self, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The maps to hand ``map_and_record``: (table [L, E, D], count [L, E]) int64.

        With the equal split they are ``log2phy`` and ``logcnt`` (padded to ``width``);
        with shares, each slot listed ``share`` times (:func:`dispatch_table`).
        """
        if self.share is None:
            if width is None or width == self.max_replicas:
                return self.log2phy, self.logcnt
            return log2phy_from_phy2log(self.phy2log, self.num_logical, width), self.logcnt
        return dispatch_table(self.phy2log, self.share, self.num_logical, width)

    @property
    def dispatch_width(self) -> int:
        """D: the largest dispatch count (the table width an engine's map needs)."""
        if self.share is None:
            return self.max_replicas
        cnt = torch.zeros(self.num_layers, self.num_logical, dtype=torch.int64)
        cnt.scatter_add_(1, self.phy2log, self.share)
        return max(int(cnt.max()), 1)

    @classmethod
    def default(cls, num_layers: int, num_logical: int, num_physical: int) -> Layout:
        """Slot p holds expert p mod E, the layout engines start with."""
        return cls.from_phy2log(default_phy2log(num_layers, num_logical, num_physical), num_logical)

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_logical(self) -> int:
        return int(self.logcnt.shape[1])

    @property
    def max_replicas(self) -> int:
        return int(self.log2phy.shape[2])

    def validate_consistent(self) -> None:
        """Check that the three maps agree (for layouts not built by :meth:`from_phy2log`)."""
        ref = Layout.from_phy2log(self.phy2log, self.num_logical)
        if not torch.equal(ref.logcnt, self.logcnt.long()):
            raise LayoutError("logcnt does not match phy2log")
        R = self.max_replicas
        if R < ref.max_replicas:
            raise LayoutError("log2phy is narrower than the largest replica count")
        want = log2phy_from_phy2log(self.phy2log, self.num_logical, R)
        if not torch.equal(want, self.log2phy.long()):
            raise LayoutError("log2phy does not match phy2log")
        if self.share is not None:
            _check_share(self.share, self.phy2log, self.num_logical)

    def moves_from(self, previous: Layout) -> torch.Tensor:
        """Slots per layer whose expert differs from ``previous``. -> [L] int64."""
        return moves_between(previous.phy2log, self.phy2log)

    def gpu_of_slot(self, num_gpus: int) -> torch.Tensor:
        """Rank owning each slot. -> [P] int64."""
        return torch.arange(self.num_physical) // (self.num_physical // num_gpus)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layout):
            return NotImplemented
        return (
            torch.equal(self.phy2log, other.phy2log)
            and self.num_logical == other.num_logical
            and torch.equal(self.shares, other.shares)
        )

    def __hash__(self) -> int:
        return hash((tuple(self.phy2log.shape), self.num_logical, self.phy2log.sum().item()))

    # --- JSON form -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: schema 1 (phy2log) for the equal split, schema 2 with ``share``."""
        d: dict[str, Any] = {
            "schema_version": 1 if self.share is None else 2,
            "num_layers": self.num_layers,
            "num_logical_experts": self.num_logical,
            "num_physical_experts": self.num_physical,
            "phy2log": self.phy2log.tolist(),
        }
        if self.share is not None:
            d["share"] = self.share.tolist()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any) -> Layout:
        if not isinstance(d, dict):
            raise LayoutError(f"layout JSON must be an object, got {type(d).__name__}")
        ver = d.get("schema_version")
        if isinstance(ver, bool) or ver not in _SCHEMAS:
            raise LayoutError(
                f"layout schema_version {ver!r} is not supported "
                f"(expected one of {', '.join(map(str, _SCHEMAS))})"
            )
        if ver == 1 and "share" in d:
            raise LayoutError("a schema 1 layout has no 'share' (schema 2 has)")
        for key in ("num_logical_experts", "phy2log"):
            if key not in d:
                raise LayoutError(f"layout JSON lacks {key!r}")
        E = d["num_logical_experts"]
        if not isinstance(E, int) or isinstance(E, bool):
            raise LayoutError("num_logical_experts must be an integer")
        return cls.from_phy2log(
            d["phy2log"],
            E,
            num_layers=d.get("num_layers"),
            num_physical_experts=d.get("num_physical_experts"),
            share=d.get("share"),
        )

    @classmethod
    def from_json(cls, text: str) -> Layout:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise LayoutError(f"layout is not valid JSON: {e}") from e
        return cls.from_dict(d)


def _check_share(share: Any, phy2log: torch.Tensor, num_logical: int) -> torch.Tensor | None:
    """Validate shares [L, P] for ``phy2log``; None when they are all 1 (the equal split)."""
    sh = _as_index_tensor(share, "share")
    if tuple(sh.shape) != tuple(phy2log.shape):
        raise LayoutError(f"share has shape {tuple(sh.shape)}, phy2log {tuple(phy2log.shape)}")
    if sh.numel() and int(sh.min()) < 0:
        layer, slot = (sh < 0).nonzero()[0].tolist()
        raise LayoutError(f"share is negative at layer {layer} slot {slot}")
    L, P = phy2log.shape
    total = torch.zeros(L, num_logical, dtype=torch.int64)
    total.scatter_add_(1, phy2log.long(), sh.clamp(max=P))
    idle = (total == 0).nonzero()
    if idle.numel():
        layer, expert = idle[0].tolist()
        raise LayoutError(f"expert {expert} of layer {layer} has no replica with a share > 0")
    width = P - num_logical + 1
    over = (total > width).nonzero()
    if over.numel():
        layer, expert = over[0].tolist()
        raise LayoutError(
            f"the shares of expert {expert} of layer {layer} add up to more than {width} "
            "(P - E + 1, the width of the engines' maps)"
        )
    return None if bool((sh == 1).all()) else sh


def _as_index_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu")
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise LayoutError(f"{name} is not a rectangular array of integers: {e}") from e
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise LayoutError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.to(torch.int64).contiguous()
