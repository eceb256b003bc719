"""What the planner core holds: its messages out, its rules, and per EP group and agent state.

:class:`CoreBase` is the state every part of :class:`~eplbd.controller._core.PlannerCore`
shares (groups, agents, liveness, the store, the clock) plus the small helpers they all use:
persisting a group, counting a bad message, adopting a committed layout, and addressing a
group's agents. The rules live in the mixins that build on it: registration
(``_registration``), commit orchestration (``_orchestration``); the status views
(``_views``) only read it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eplbd.controller._commit import Attempt, Effect
from eplbd.controller._figures import TimeModel
from eplbd.controller._store import GroupRecord, StateStore
from eplbd.controller._trigger import Decision, PlanFn, TriggerPolicy
from eplbd.controller._window import LoadWindow
from eplbd.layout import Layout
from eplbd.ops.clock import SYSTEM_CLOCK, Clock
from eplbd.ops.logging import get_logger
from eplbd.planner import CostModel
from eplbd.wire import (
    DEAD,
    LAYOUT,
    STALE,
    LivenessTracker,
    ModelShape,
    SequenceTracker,
    WireCounters,
    WireError,
    layout_digest,
    narrow_phy2log_each,
    new_incarnation,
)

__all__ = [
    "STATUS_SCHEMA_VERSION",
    "AgentInfo",
    "CoreBase",
    "CoreConfig",
    "GroupState",
    "Outbound",
    "RankInfo",
    "layout_tensors",
    "round_or_none",
]

log = get_logger("eplbd.controller")

#: Version of the ``data`` maps of status_reply / command_reply (docs/daemons.md).
STATUS_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Outbound:
    """One message to send on the control ROUTER socket to ``identity``."""

    identity: bytes
    type: str
    body: dict[str, Any]
    tensors: dict[str, torch.Tensor | np.ndarray] | None = None


@dataclass(frozen=True)
class CoreConfig:
    """The core's rules (the planner settings fill it; tests build one directly).

    window_s / num_windows / ewma_alpha / forecast / change_threshold / regime_windows: load
    windows and forecast (see LoadWindow);
    window_save_s: at most one write of a group's windows per this many seconds (0: at every
    closed window); window_max_age_s: saved windows older than this are not restored;
    policy: the trigger (see TriggerPolicy); prepare_timeout_s: time for every rank to stage;
    commit_timeout_s: time for the flip to be reported once all staged (and for the last
    reports after the first); heartbeat_s: the agents' heartbeat interval (stale after 3,
    dead after 5 missed) and the planner's own heartbeat to agents; rejoin_grace_s: how long
    the ranks of a restarted agent that its first ``agent_hello`` does not list yet may take
    to re-register before a commit in flight counts them lost (0: at once); expert_bytes: one
    expert's weights in one layer (0: unknown; shown by ``eplbd layout diff``); hot_experts:
    experts per layer listed by ``top``; decisions_kept: decisions remembered per group (in
    memory); max_bytes: message limit; objective: "tokens" or "time" (what the trigger
    and the planner balance); cost_model: the modelled GPU time (needed for "time"; with
    "tokens" it only adds the time figures to status and metrics).
    """

    window_s: float = 10.0
    num_windows: int = 6
    ewma_alpha: float = 0.3
    forecast: str = "ewma"
    change_threshold: float = 10.0
    regime_windows: int = 360
    window_save_s: float = 60.0
    window_max_age_s: float = 3600.0
    policy: TriggerPolicy = field(default_factory=TriggerPolicy)
    prepare_timeout_s: float = 60.0
    commit_timeout_s: float = 60.0
    heartbeat_s: float = 1.0
    expert_bytes: int = 0
    rejoin_grace_s: float = 10.0
    hot_experts: int = 5
    decisions_kept: int = 64
    max_bytes: int = 16 * 1024 * 1024
    objective: str = "tokens"
    cost_model: CostModel | None = None

    def __post_init__(self) -> None:
        if self.objective not in ("tokens", "time"):
            raise ValueError(f"objective must be tokens or time, got {self.objective!r}")
        if self.objective == "time" and self.cost_model is None:
            raise ValueError("the time objective needs a cost_model")
        if self.forecast not in ("ewma", "regime"):
            raise ValueError(f"forecast must be ewma or regime, got {self.forecast!r}")


@dataclass
class RankInfo:
    """A registered EP rank (one worker process)."""

    ep_rank: int
    worker: str
    incarnation: str
    agent: str
    node: str
    epoch: int
    present: bool = True
    left_reason: str = ""
    #: its agent restarted and has not listed it yet: it counts as lost only after this
    #: (monotonic) time, if it has not re-registered by then (``rejoin_grace_s``)
    rejoin_by: float | None = None


@dataclass
class AgentInfo:
    agent: str
    identity: bytes
    incarnation: str
    node: str
    software_version: str
    ranks: set[tuple[str, int]] = field(default_factory=set)
    #: the phy2log dtypes it accepts (int64 only: an agent before the compact form)
    phy2log_dtypes: tuple[str, ...] = ("int64",)
    #: group -> (epoch, monotonic time) of the last layout sent in answer to its agent_hello
    layouts_sent: dict[str, tuple[int, float]] = field(default_factory=dict)


@dataclass
class GroupState:
    """Everything the planner holds about one EP group (``record`` is what persists)."""

    name: str
    record: GroupRecord
    ep_size: int | None = None
    shape: ModelShape | None = None
    ranks: dict[int, RankInfo] = field(default_factory=dict)
    window: LoadWindow | None = None
    attempt: Attempt | None = None  # the newest attempt (finished or not)
    recent: dict[int, Attempt] = field(default_factory=dict)  # epoch -> attempt, last few
    last_rebalance_mono: float | None = None
    last_decision: Decision | None = None
    decisions: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=64))
    layout_unknown: bool = False
    drops: dict[str, int] = field(default_factory=dict)
    snapshots: int = 0
    last_snapshot_mono: float | None = None
    windows_closed: int = 0  # window.closed when the core last acted on a closed window
    window_closed_wall: float | None = None  # when the newest window closed (Unix time)
    windows_saved_mono: float | None = None
    windows_dirty: bool = False  # windows closed since the last save
    restored: dict[str, Any] | None = None  # windows restored at start (see views)
    _default: Layout | None = None
    _digests: dict[int, int] = field(default_factory=dict)  # epoch -> layout_digest

    def digest_of(self, epoch: int) -> int | None:
        """layout_digest of a committed epoch's layout (computed once), None if unknown."""
        lay = self.record.layouts.get(epoch)
        if lay is None:
            return None
        if epoch not in self._digests:
            if len(self._digests) > 64:
                self._digests.clear()
            self._digests[epoch] = layout_digest(lay.phy2log.numpy())
        return self._digests[epoch]

    @property
    def current_layout(self) -> Layout | None:
        rec = self.record
        if rec.epoch in rec.layouts:
            return rec.layouts[rec.epoch]
        if rec.epoch == 0 and self.shape is not None:
            return self.default_layout()
        return None

    def default_layout(self) -> Layout:
        """Epoch 0's layout (slot p holds expert p mod E), built once."""
        assert self.shape is not None
        s = self.shape
        if self._default is None or self._default.num_layers != s.num_layers:
            self._default = Layout.default(
                s.num_layers, s.num_logical_experts, s.num_physical_experts
            )
        return self._default

    def layout_of(self, epoch: int) -> Layout | None:
        """The layout ranks served (or stage) at ``epoch``: committed, epoch 0, or in flight."""
        if epoch in self.record.layouts:
            return self.record.layouts[epoch]
        if epoch == 0 and self.shape is not None:
            return self.default_layout()
        a = self.recent.get(epoch)
        return None if a is None else a.layout

    def count(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


def layout_tensors(layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors of a ``prepare`` or ``layout`` message: phy2log, and ``share`` when the
    layout splits rows unequally (docs/protocol.md)."""
    t = {"phy2log": layout.phy2log}
    if layout.share is not None:
        t["share"] = layout.share
    return t


def round_or_none(x: float | None, nd: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


class CoreBase:
    """The state the planner core's parts share (see the module docstring).

    ``store`` persists groups (None: memory only, e.g. for a dry test); ``plan_fn`` defaults
    to :func:`eplbd.planner.plan`; ``metrics`` (optional) is told about aggregates;
    ``endpoints`` is shown by the status API.
    """

    def __init__(
        self,
        config: CoreConfig | None = None,
        *,
        store: StateStore | None = None,
        clock: Clock = SYSTEM_CLOCK,
        plan_fn: PlanFn | None = None,
        incarnation: str | None = None,
        metrics: Any = None,
        endpoints: dict[str, str] | None = None,
    ) -> None:
        self.config = config or CoreConfig()
        self.store = store
        self.clock = clock
        self._plan_fn = plan_fn
        self.incarnation = incarnation or new_incarnation()
        self.metrics = metrics
        self.endpoints = dict(endpoints or {})
        self.counters = WireCounters()
        self.liveness = LivenessTracker(self.config.heartbeat_s, clock=clock.monotonic)
        self.seq = SequenceTracker(self.counters)
        self.groups: dict[str, GroupState] = {}
        self.agents: dict[str, AgentInfo] = {}
        self._identity_agent: dict[bytes, str] = {}
        self.started_mono = clock.monotonic()
        self.started_wall = clock.time()
        self._next_heartbeat = self.started_mono
        self._last_turn: float | None = None  # when the service loop last came out of its poll
        self.stalls = 0  # turns of the loop after which the planner excused its own stall
        self.stalled_s = 0.0  # the time excused, in all
        self.store_errors = 0
        self.store_writable = True  # False from a failed write to the next good one
        self.store_last_error: str | None = None
        self.store_last_error_wall: float | None = None
        self.notes: list[str] = []

    @property
    def plan_fn(self) -> PlanFn:
        if self._plan_fn is None:
            from eplbd.planner import plan

            self._plan_fn = plan
        return self._plan_fn

    def _new_group(self, name: str, rec: GroupRecord | None = None) -> GroupState:
        g = GroupState(name=name, record=rec or GroupRecord(group=name))
        g.decisions = deque(maxlen=self.config.decisions_kept)
        self.groups[name] = g
        return g

    def _set_shape(self, g: GroupState, shape: ModelShape, ep_size: int | None) -> None:
        g.shape = shape
        g.ep_size = ep_size
        c = self.config
        g.window = LoadWindow(
            shape.num_layers,
            shape.num_logical_experts,
            window_s=c.window_s,
            num_windows=c.num_windows,
            alpha=c.ewma_alpha,
            forecast=c.forecast,
            change_threshold=c.change_threshold,
            regime_windows=c.regime_windows,
        )
        g.record.shape = {
            "num_layers": shape.num_layers,
            "num_logical_experts": shape.num_logical_experts,
            "num_physical_experts": shape.num_physical_experts,
            "ep_size": int(ep_size or 0),
        }

    def _persist(self, g: GroupState) -> bool:
        """Write the group's record; on failure count it, keep it visible (status, metrics)
        until a write succeeds again, and return False."""
        if self.store is None:
            return True
        try:
            self.store.save(g.record)
        except OSError as e:
            self._store_failed(g, "state", e)
            return False
        self._store_worked(g)
        return True

    def _save_windows(self, g: GroupState) -> None:
        """Write the group's load windows (the caller decides when: bounded write cost)."""
        if self.store is None or g.window is None:
            return
        meta = {
            "group": g.name,
            "epoch": g.record.epoch,
            "closed_at": g.window_closed_wall,
            "saved_at": self.clock.time(),
            "window_s": self.config.window_s,
            "ewma_alpha": self.config.ewma_alpha,
        }
        g.windows_saved_mono = self.clock.monotonic()
        g.windows_dirty = False
        try:
            self.store.save_windows(g.name, meta, g.window.state())
        except OSError as e:
            self._store_failed(g, "windows", e)
            return
        self._store_worked(g)

    def _store_failed(self, g: GroupState, what: str, e: OSError) -> None:
        self.store_errors += 1
        self.store_writable = False
        self.store_last_error = f"{g.name}: {e}"
        self.store_last_error_wall = self.clock.time()
        log.error(f"{what} write failed", group=g.name, error=str(e))
        if self.metrics is not None:
            self.metrics.store_write(False)

    def _store_worked(self, g: GroupState) -> None:
        if not self.store_writable:
            self.store_writable = True
            log.info("state writes work again", group=g.name)
        if self.metrics is not None:
            self.metrics.store_write(True)

    def _sender_name(self, identity: bytes) -> str:
        agent = self._identity_agent.get(identity)
        return agent if agent is not None else "peer:" + identity.hex()[:16]

    def _bad(self, e: WireError, sender: str, msg_type: str) -> None:
        self.counters.bad_message(e, sender, msg_type)
        self._metric_drop(e.reason)

    def _metric_drop(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped(reason)

    def _agents_of(self, g: GroupState) -> list[bytes]:
        ids: list[bytes] = []
        for rank in g.ranks.values():
            info = self.agents.get(rank.agent)
            if info is not None and rank.present and info.identity not in ids:
                ids.append(info.identity)
        return ids

    def _layout_to(self, g: GroupState, identities: Iterable[bytes]) -> list[Outbound]:
        rec = g.record
        if rec.epoch <= 0 or rec.epoch not in rec.layouts:
            return []
        tensors = layout_tensors(rec.layouts[rec.epoch])
        return [
            Outbound(i, LAYOUT, {"group": g.name, "epoch": rec.epoch}, {**tensors, "phy2log": form})
            for i, form in self._phy2log_forms(tensors["phy2log"], identities)
        ]

    def _phy2log_forms(
        self, phy2log: torch.Tensor, identities: Iterable[bytes]
    ) -> list[tuple[bytes, np.ndarray]]:
        """``phy2log`` in the wire form each agent accepts (one narrowed copy per form)."""
        ids = list(identities)
        accepts = []
        for i in ids:
            name = self._identity_agent.get(i)
            info = self.agents.get(name) if name is not None else None
            accepts.append(info.phy2log_dtypes if info is not None else ("int64",))
        return list(zip(ids, narrow_phy2log_each(phy2log.numpy(), accepts), strict=True))

    def _adopt(self, g: GroupState, epoch: int, layout: Layout, wall: float, why: str) -> None:
        rec = g.record
        rec.layouts[epoch] = layout
        rec.layout_times.setdefault(epoch, wall)
        rec.epoch = epoch
        rec.max_epoch = max(rec.max_epoch, epoch)
        g.layout_unknown = False
        self._prune_layouts(g)
        self._persist(g)
        log.info("epoch adopted", group=g.name, epoch=epoch, why=why)
        if self.metrics is not None:
            self.metrics.epoch(g.name, epoch)

    def _prune_layouts(self, g: GroupState) -> None:
        keep = self.store.keep_layouts if self.store is not None else 16
        rec = g.record
        for e in sorted(rec.layouts)[:-keep]:
            if e != rec.epoch:
                rec.layouts.pop(e, None)
                rec.layout_times.pop(e, None)

    # --- what the state says ------------------------------------------------------------

    def time_model(self, g: GroupState) -> TimeModel | None:
        """The cost model and the steps per window of ``g``'s forecast (None: no cost model,
        or no window that counted its steps yet)."""
        cm = self.config.cost_model
        steps = g.window.steps_per_window() if g.window is not None else None
        if cm is None or steps is None:
            return None
        return TimeModel(cm, steps)

    def rank_state(self, g: GroupState, r: int) -> str:
        """alive | stale | dead | left | rejoining | missing."""
        rank = g.ranks.get(r)
        if rank is None:
            return "missing"
        if not rank.present:
            return "left"
        if rank.rejoin_by is not None:
            return "rejoining"
        st = self.liveness.state(rank.agent)
        return st if st is not None else DEAD

    def complete(self, g: GroupState) -> bool:
        """Every rank registered, present, and its agent not dead."""
        if not g.ep_size or g.shape is None:
            return False
        return all(self.rank_state(g, r) in ("alive", STALE) for r in range(g.ep_size))

    def _num_nodes(self, g: GroupState) -> int:
        """Nodes of the group, when ranks are split evenly and contiguously over them."""
        if not g.ep_size or len(g.ranks) < g.ep_size:
            return 1
        nodes = [g.ranks[r].node for r in range(g.ep_size)]
        n = len(set(nodes))
        if n <= 1 or g.ep_size % n:
            return 1
        per = g.ep_size // n
        for i in range(0, g.ep_size, per):
            if len(set(nodes[i : i + per])) != 1:
                return 1
        return n

    def _blocked(self, g: GroupState) -> str | None:
        if g.attempt is not None and not g.attempt.finished:
            return "pending_commit"
        if not self.complete(g):
            return "group_incomplete"
        if g.layout_unknown or g.current_layout is None:
            return "layout_unknown"
        return None

    def _effects(self, g: GroupState, a: Attempt, effects: list[Effect]) -> list[Outbound]:
        """Act on what an attempt says happened (commit orchestration implements it)."""
        raise NotImplementedError
