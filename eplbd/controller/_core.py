"""The planner's brain: every EP group's state and every rule, without sockets or threads.

:class:`PlannerCore` takes raw frames (or decoded messages) from the control socket and the
snapshot socket, and a ``tick()`` from its owner, and returns the messages to send as
:class:`Outbound` items (a ROUTER identity plus type, body, tensors). The socket runner
(:mod:`eplbd.controller._service`) only moves frames; tests drive the core directly with a
fake clock, which is the in-process transport of CONVENTIONS.md's "seams for tests".

Per group it keeps: the registered ranks (from ``agent_hello`` / ``worker_joined`` /
``worker_left``) and their liveness (their agent's), the model shape, the committed epoch
and layout plus the last few (to convert snapshots recorded under them, and to roll back),
a :class:`LoadWindow`, the trigger's last decisions, and at most one two-phase commit in
flight (:class:`Attempt`). What must survive a restart is written through the
:class:`StateStore` *before* anything is sent that depends on it: an epoch is persisted
before its ``prepare`` leaves, so a restarted planner never reuses one.

Restart reconciliation: the ``agent_hello`` after a restart lists each worker's current
epoch. If a rank serves the pending epoch, the attempt committed (the ranks' consensus is
collective: one rank serving it means all do); if the group is complete and every rank still
serves an older epoch, the attempt is aborted (an ``abort`` goes out, harmless if the flip
raced it: a later ``committed`` report still wins).

Thread-safety: none; one thread (the socket thread) owns a core.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eplbd import __version__
from eplbd.controller._commit import Attempt, Effect
from eplbd.controller._figures import (
    balance,
    gpu_loads,
    lower_bound_balance,
    total_balance,
)
from eplbd.controller._store import GroupRecord, StateStore
from eplbd.controller._trigger import (
    Decision,
    PlanFn,
    TriggerPolicy,
    decide,
    rollback_decision,
)
from eplbd.controller._window import LoadWindow
from eplbd.layout import Layout, LayoutError
from eplbd.ops.clock import SYSTEM_CLOCK, Clock
from eplbd.ops.logging import get_logger
from eplbd.wire import (
    ABORT,
    ABORTED,
    AGENT_HELLO,
    COMMAND,
    COMMAND_REPLY,
    COMMITTED,
    DEAD,
    ERROR,
    HEARTBEAT,
    HELLO,
    LAYOUT,
    PREPARE,
    SNAPSHOT,
    STAGED,
    STALE,
    STATUS_REPLY,
    STATUS_REQUEST,
    STATUS_WHATS,
    WELCOME,
    WORKER_JOINED,
    WORKER_LEFT,
    LivenessTracker,
    Message,
    ModelShape,
    SequenceTracker,
    WireCounters,
    WireError,
    decode,
    error_body,
    new_incarnation,
    validate,
    validate_body,
)

__all__ = ["CoreConfig", "GroupState", "Outbound", "PlannerCore", "STATUS_SCHEMA_VERSION"]

log = get_logger("eplbd.controller")

#: Version of the ``data`` maps of status_reply / command_reply (docs/daemons.md).
STATUS_SCHEMA_VERSION = 1

_CONTROL_FROM_AGENT = frozenset(
    {AGENT_HELLO, WORKER_JOINED, WORKER_LEFT, STAGED, COMMITTED, ABORTED, LAYOUT}
)


@dataclass(frozen=True)
class Outbound:
    """One message to send on the control ROUTER socket to ``identity``."""

    identity: bytes
    type: str
    body: dict[str, Any]
    tensors: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class CoreConfig:
    """The core's rules (the planner settings fill it; tests build one directly).

    window_s / num_windows / ewma_alpha: load windows and forecast (see LoadWindow);
    policy: the trigger (see TriggerPolicy); prepare_timeout_s: time for every rank to stage;
    commit_timeout_s: time for the flip to be reported once all staged (and for the last
    reports after the first); heartbeat_s: the agents' heartbeat interval (stale after 3,
    dead after 5 missed) and the planner's own heartbeat to agents; schedule: the recording
    schedule sent in ``welcome``; hot_experts: experts per layer listed by ``top``;
    decisions_kept: decisions remembered per group (in memory); max_bytes: message limit.
    """

    window_s: float = 10.0
    num_windows: int = 6
    ewma_alpha: float = 0.3
    policy: TriggerPolicy = field(default_factory=TriggerPolicy)
    prepare_timeout_s: float = 60.0
    commit_timeout_s: float = 60.0
    heartbeat_s: float = 1.0
    window_steps: int = 256
    record_steps: int = 256
    recording_enabled: bool = True
    hot_experts: int = 5
    decisions_kept: int = 64
    max_bytes: int = 16 * 1024 * 1024


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


@dataclass
class AgentInfo:
    agent: str
    identity: bytes
    incarnation: str
    node: str
    software_version: str
    ranks: set[tuple[str, int]] = field(default_factory=set)


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
    _default: Layout | None = None

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


def _round(x: float | None, nd: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


class PlannerCore:
    """The planner's state machine (see the module docstring).

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
        self.store_errors = 0
        self.notes: list[str] = []

    # --- setup -----------------------------------------------------------------------------

    @property
    def plan_fn(self) -> PlanFn:
        if self._plan_fn is None:
            from eplbd.planner import plan

            self._plan_fn = plan
        return self._plan_fn

    def restore(self, *, reset_corrupt: bool = False) -> list[str]:
        """Load every group from the store. Raises StoreCorrupt unless ``reset_corrupt``.

        Returns notes (files moved aside) for the start-up log.
        """
        if self.store is None:
            return []
        records, notes = self.store.load(now=self.clock.monotonic(), reset_corrupt=reset_corrupt)
        for name, rec in records.items():
            g = self._new_group(name, rec)
            if rec.shape is not None:
                self._set_shape(
                    g,
                    ModelShape(
                        rec.shape["num_layers"],
                        rec.shape["num_logical_experts"],
                        rec.shape["num_physical_experts"],
                    ),
                    rec.shape.get("ep_size"),
                )
            if rec.pending is not None:
                g.attempt = rec.pending
                g.recent[rec.pending.epoch] = rec.pending
            if rec.last_rebalance_wall is not None:
                # the cooldown survives a restart: carry the wall-clock age over
                age = self.clock.time() - rec.last_rebalance_wall
                if age >= 0:
                    g.last_rebalance_mono = self.clock.monotonic() - age
            log.info(
                "group restored",
                group=name,
                epoch=rec.epoch,
                max_epoch=rec.max_epoch,
                pending=None if rec.pending is None else rec.pending.epoch,
                history=len(rec.history),
            )
        self.notes = notes
        return notes

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
        )
        g.record.shape = {
            "num_layers": shape.num_layers,
            "num_logical_experts": shape.num_logical_experts,
            "num_physical_experts": shape.num_physical_experts,
            "ep_size": int(ep_size or 0),
        }

    def _persist(self, g: GroupState) -> bool:
        if self.store is None:
            return True
        try:
            self.store.save(g.record)
            return True
        except OSError as e:
            self.store_errors += 1
            log.error("state write failed", group=g.name, error=str(e))
            return False

    # --- inbound: frames -------------------------------------------------------------------

    def on_control_frames(self, identity: bytes, frames: Sequence[Any]) -> list[Outbound]:
        """Frames from the ROUTER (identity stripped). Bad ones: counted, ``error`` answered."""
        sender = self._sender_name(identity)
        try:
            msg = decode(frames, max_bytes=self.config.max_bytes)
        except WireError as e:
            self.counters.bad_message(e, sender)
            self._metric_drop(e.reason)
            return [Outbound(identity, ERROR, error_body(e))]
        return self.on_control(identity, msg)

    def on_snapshot_frames(self, frames: Sequence[Any]) -> None:
        """Frames from the PULL socket. Bad ones are counted and dropped (nobody to answer)."""
        try:
            msg = decode(frames, max_bytes=self.config.max_bytes)
        except WireError as e:
            self.counters.bad_message(e, "(snapshots)")
            self._metric_drop(e.reason)
            return
        self.on_snapshot(msg)

    def _sender_name(self, identity: bytes) -> str:
        agent = self._identity_agent.get(identity)
        return agent if agent is not None else "peer:" + identity.hex()[:16]

    def _bad(self, e: WireError, sender: str, msg_type: str) -> None:
        self.counters.bad_message(e, sender, msg_type)
        self._metric_drop(e.reason)

    def _metric_drop(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped(reason)

    # --- inbound: control messages ---------------------------------------------------------

    def on_control(self, identity: bytes, msg: Message) -> list[Outbound]:
        """One decoded control message; returns what to send."""
        sender = self._sender_name(identity)
        gname = msg.body.get("group")
        group = self.groups.get(gname) if isinstance(gname, str) else None
        model = group.shape if group is not None and msg.type == LAYOUT else None
        try:
            msg = validate(msg, model=model)
        except WireError as e:
            self._bad(e, sender, msg.type)
            return [Outbound(identity, ERROR, error_body(e, msg.type))]
        self.counters.received[msg.type] += 1
        b = msg.body
        if msg.type == ERROR:  # never answer an error with an error
            log.warning("error from peer", peer=sender, code=b["code"], message=b["message"])
            return []
        from_agent = msg.type in _CONTROL_FROM_AGENT and msg.type != AGENT_HELLO
        if (from_agent or msg.type == HEARTBEAT) and self._known_agent(
            identity, b, msg.type
        ) is None:
            return [
                Outbound(
                    identity,
                    ERROR,
                    {
                        "code": "hello_required",
                        "message": f"{msg.type} from an unregistered agent (or one that "
                        "restarted): send agent_hello",
                        "in_reply_to": msg.type,
                    },
                )
            ]
        try:
            if msg.type == AGENT_HELLO:
                return self._on_agent_hello(identity, b)
            if msg.type == HEARTBEAT:
                return []
            if msg.type == WORKER_JOINED:
                return self._on_worker_joined(identity, b)
            if msg.type == WORKER_LEFT:
                return self._on_worker_left(b)
            if msg.type == STAGED:
                return self._on_staged(b)
            if msg.type == COMMITTED:
                return self._on_committed(b)
            if msg.type == ABORTED:
                return self._on_aborted(b)
            if msg.type == LAYOUT:
                return self._on_layout(identity, b, msg.tensors)
            if msg.type == STATUS_REQUEST:
                return self._on_status_request(identity, b)
            if msg.type == COMMAND:
                return self._on_command(identity, b)
        except WireError as e:
            self._bad(e, sender, msg.type)
            return [Outbound(identity, ERROR, error_body(e, msg.type))]
        err = WireError("unknown_type", f"the planner does not take {msg.type!r} messages")
        self._bad(err, sender, msg.type)
        return [Outbound(identity, ERROR, error_body(err, msg.type))]

    def _known_agent(self, identity: bytes, b: dict[str, Any], msg_type: str) -> str | None:
        """The registered agent that sent this, refreshing its liveness; None if unknown.

        Agents are named by the body's ``agent`` (``sender`` for heartbeats) or, for relayed
        worker answers, by the ROUTER identity they registered from. A heartbeat with another
        incarnation than the registered one means the agent restarted without a new hello.
        """
        name = b.get("sender") if msg_type == HEARTBEAT else b.get("agent")
        if not isinstance(name, str) or name not in self.agents:
            name = self._identity_agent.get(identity)
        if name is None or name not in self.agents:
            return None
        info = self.agents[name]
        if msg_type == HEARTBEAT and b.get("incarnation") != info.incarnation:
            return None
        if info.identity != identity:
            self._identity_agent.pop(info.identity, None)
            info.identity = identity
            self._identity_agent[identity] = name
        self.liveness.seen(name)
        return name

    # --- registration ----------------------------------------------------------------------

    def _on_agent_hello(self, identity: bytes, b: dict[str, Any]) -> list[Outbound]:
        name = b["agent"]
        old = self.agents.get(name)
        if old is not None and old.identity != identity:
            self._identity_agent.pop(old.identity, None)
        info = AgentInfo(
            agent=name,
            identity=identity,
            incarnation=b["incarnation"],
            node=b["node"],
            software_version=b["software_version"],
        )
        self.agents[name] = info
        self._identity_agent[identity] = name
        verdict = self.liveness.seen(name, b["incarnation"])
        out: list[Outbound] = []
        previous = old.ranks if old is not None else set()
        touched: set[str] = set()
        for w in b["workers"]:
            key = self._register_rank(name, w, out, identity)
            if key is not None:
                info.ranks.add(key)
                touched.add(key[0])
        for gname, r in previous - info.ranks:
            g = self.groups.get(gname)
            if g is not None and r in g.ranks and g.ranks[r].agent == name:
                out += self._rank_gone(g, r, "no longer listed by its agent")
                touched.add(gname)
        log.info(
            "agent registered",
            agent=name,
            node=info.node,
            incarnation=info.incarnation,
            workers=len(b["workers"]),
            liveness=verdict,
        )
        out.append(
            Outbound(
                identity,
                WELCOME,
                {"incarnation": self.incarnation, "epoch": 0, "schedule": self._schedule()},
            )
        )
        for gname in sorted(touched):
            g = self.groups[gname]
            out += self._layout_to(g, [identity])
            out += self._reconcile(g)
        return out

    def _schedule(self) -> dict[str, Any]:
        c = self.config
        return {
            "window_steps": c.window_steps,
            "record_steps": min(c.record_steps, c.window_steps),
            "enabled": c.recording_enabled,
        }

    def _register_rank(
        self, agent: str, hello: dict[str, Any], out: list[Outbound], identity: bytes
    ) -> tuple[str, int] | None:
        gname = hello["group"]
        shape = ModelShape.from_hello(hello)
        g = self.groups.get(gname)
        if g is None:
            g = self._new_group(gname)
        if g.shape is None:
            self._set_shape(g, shape, hello["ep_size"])
            self._persist(g)
        elif g.shape != shape or (g.ep_size and g.ep_size != hello["ep_size"]):
            e = WireError(
                "model_mismatch",
                f"worker {hello['worker']} declares L={shape.num_layers} "
                f"E={shape.num_logical_experts} P={shape.num_physical_experts} "
                f"ep_size={hello['ep_size']}; group {gname} has L={g.shape.num_layers} "
                f"E={g.shape.num_logical_experts} P={g.shape.num_physical_experts} "
                f"ep_size={g.ep_size}",
            )
            self._bad(e, agent, HELLO)
            g.count("model_mismatch")
            out.append(Outbound(identity, ERROR, error_body(e, AGENT_HELLO)))
            return None
        if not g.ep_size:
            g.ep_size = hello["ep_size"]
            assert g.record.shape is not None
            g.record.shape["ep_size"] = int(hello["ep_size"])
        r = hello["ep_rank"]
        prev = g.ranks.get(r)
        if prev is not None and prev.present and prev.incarnation != hello["incarnation"]:
            out += self._rank_gone(g, r, f"restarted (incarnation {hello['incarnation']})")
        g.ranks[r] = RankInfo(
            ep_rank=r,
            worker=hello["worker"],
            incarnation=hello["incarnation"],
            agent=agent,
            node=hello["node"],
            epoch=hello["epoch"],
        )
        return (gname, r)

    def _on_worker_joined(self, identity: bytes, b: dict[str, Any]) -> list[Outbound]:
        agent = b["agent"]
        hello = b.get("hello")
        if isinstance(hello, dict):
            hello = validate_body(HELLO, hello)
        else:
            g = self.groups.get(b["group"])
            if g is None or g.shape is None or not g.ep_size:
                raise WireError(
                    "missing_field",
                    f"worker_joined for group {b['group']!r} that has no registered model: "
                    "send the worker's hello body under 'hello' (or agent_hello)",
                )
            s = g.shape
            hello = {
                "worker": b["worker"],
                "incarnation": b["incarnation"],
                "group": b["group"],
                "ep_rank": b["ep_rank"],
                "ep_size": g.ep_size,
                "node": b.get("node")
                if isinstance(b.get("node"), str)
                else self.agents[agent].node,
                "num_layers": s.num_layers,
                "num_logical_experts": s.num_logical_experts,
                "num_physical_experts": s.num_physical_experts,
                "epoch": b["epoch"] if isinstance(b.get("epoch"), int) else 0,
                "software_version": "",
                "protocol_version": 1,
            }
            hello = validate_body(HELLO, hello)
        out: list[Outbound] = []
        key = self._register_rank(agent, hello, out, identity)
        if key is None:
            return out
        self.agents[agent].ranks.add(key)
        g = self.groups[key[0]]
        log.info("worker joined", group=g.name, ep_rank=key[1], worker=hello["worker"])
        out += self._layout_to(g, [identity])
        out += self._reconcile(g)
        return out

    def _on_worker_left(self, b: dict[str, Any]) -> list[Outbound]:
        g = self.groups.get(b["group"])
        r = b["ep_rank"]
        if g is None or r not in g.ranks:
            return []
        rank = g.ranks[r]
        if rank.incarnation != b["incarnation"]:
            return []  # an older incarnation left; the new one is registered
        log.warning("worker left", group=g.name, ep_rank=r, reason=b["reason"])
        return self._rank_gone(g, r, f"left: {b['reason'] or 'no reason given'}")

    def _rank_gone(self, g: GroupState, r: int, why: str) -> list[Outbound]:
        rank = g.ranks.get(r)
        if rank is not None:
            rank.present = False
            rank.left_reason = why
        a = g.attempt
        if a is None:
            return []
        return self._effects(
            g, a, a.on_rank_lost(r, why, self.clock.monotonic(), self.clock.time())
        )

    def rank_state(self, g: GroupState, r: int) -> str:
        """alive | stale | dead | left | missing."""
        rank = g.ranks.get(r)
        if rank is None:
            return "missing"
        if not rank.present:
            return "left"
        st = self.liveness.state(rank.agent)
        return st if st is not None else DEAD

    def complete(self, g: GroupState) -> bool:
        """Every rank registered, present, and its agent not dead."""
        if not g.ep_size or g.shape is None:
            return False
        return all(self.rank_state(g, r) in ("alive", STALE) for r in range(g.ep_size))

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
        p2l = rec.layouts[rec.epoch].phy2log
        return [
            Outbound(i, LAYOUT, {"group": g.name, "epoch": rec.epoch}, {"phy2log": p2l})
            for i in identities
        ]

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

    # --- reconciliation --------------------------------------------------------------------

    def _reconcile(self, g: GroupState) -> list[Outbound]:
        """Align the group with what its ranks report serving (after restarts on either side)."""
        out: list[Outbound] = []
        rec = g.record
        present = [rk for rk in g.ranks.values() if rk.present]
        if not present:
            return out
        now, wall = self.clock.monotonic(), self.clock.time()
        top = max(rk.epoch for rk in present)
        a = g.attempt
        if a is not None and not a.finished:
            serving = [rk.ep_rank for rk in present if rk.epoch >= a.epoch]
            if serving:
                for r in serving:
                    if a.restored:
                        a.flags.append(f"rank {r} reported epoch {a.epoch} at registration")
                    out += self._effects(g, a, a.on_committed(r, 0, now, wall))
            elif a.restored and a.in_flight and self.complete(g):
                out += self._effects(
                    g,
                    a,
                    a.abort(
                        f"planner restarted during the commit; every rank still serves epoch {top}",
                        wall,
                    ),
                )
        if top > rec.epoch:
            lay = g.layout_of(top)
            if lay is not None:
                self._adopt(g, top, lay, wall, "ranks report it")
            else:
                if top > rec.max_epoch:
                    rec.max_epoch = top
                if not g.layout_unknown:
                    log.warning(
                        "ranks serve an epoch whose layout is unknown",
                        group=g.name,
                        epoch=top,
                        known=rec.epoch,
                    )
                g.layout_unknown = True
                self._persist(g)
        elif g.layout_unknown and all(rk.epoch <= rec.epoch for rk in present):
            g.layout_unknown = False
        return out

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

    def _on_layout(
        self, identity: bytes, b: dict[str, Any], tensors: dict[str, Any]
    ) -> list[Outbound]:
        """An agent tells us a committed layout (protocol addition: agent -> planner)."""
        g = self.groups.get(b["group"])
        if g is None or g.shape is None:
            raise WireError("bad_field", f"layout for unknown group {b['group']!r}")
        epoch = b["epoch"]
        if epoch in g.record.layouts or epoch == 0:
            return []
        try:
            lay = Layout.from_phy2log(
                tensors["phy2log"],
                g.shape.num_logical_experts,
                num_gpus=g.ep_size or None,
                num_layers=g.shape.num_layers,
                num_physical_experts=g.shape.num_physical_experts,
            )
        except LayoutError as e:
            raise WireError("bad_layout", str(e)) from None
        a = g.recent.get(epoch)
        if a is not None and not torch.equal(a.layout.phy2log, lay.phy2log):
            raise WireError("bad_layout", f"layout of epoch {epoch} differs from the one prepared")
        wall = self.clock.time()
        top = max((rk.epoch for rk in g.ranks.values() if rk.present), default=0)
        if a is None and epoch > top:
            # no rank says it serves this epoch and we never prepared it: do not believe it
            g.count("layout_not_served")
            return []
        if epoch > g.record.epoch:
            self._adopt(g, epoch, lay, wall, "an agent reported it")
        else:
            g.record.layouts[epoch] = lay
            self._prune_layouts(g)
            self._persist(g)
        return []

    # --- two-phase commit ------------------------------------------------------------------

    def _attempt_for(self, b: dict[str, Any]) -> tuple[GroupState, Attempt] | None:
        g = self.groups.get(b["group"])
        if g is None:
            return None
        a = g.recent.get(b["epoch"])
        if a is None:
            g.count("unknown_attempt")
            return None
        rank = g.ranks.get(b["ep_rank"])
        if rank is not None and rank.worker != b["worker"]:
            g.count("wrong_worker")
            return None
        return g, a

    def _on_staged(self, b: dict[str, Any]) -> list[Outbound]:
        found = self._attempt_for(b)
        if found is None:
            return []
        g, a = found
        now, wall = self.clock.monotonic(), self.clock.time()
        return self._effects(
            g, a, a.on_staged(b["ep_rank"], b["ok"], b["reason"], b["staged_bytes"], now, wall)
        )

    def _on_committed(self, b: dict[str, Any]) -> list[Outbound]:
        g = self.groups.get(b["group"])
        if g is not None and b["ep_rank"] in g.ranks:
            rk = g.ranks[b["ep_rank"]]
            if rk.worker == b["worker"]:
                rk.epoch = max(rk.epoch, b["epoch"])
        found = self._attempt_for(b)
        if found is None:
            return []
        g, a = found
        now, wall = self.clock.monotonic(), self.clock.time()
        return self._effects(g, a, a.on_committed(b["ep_rank"], b["step"], now, wall))

    def _on_aborted(self, b: dict[str, Any]) -> list[Outbound]:
        found = self._attempt_for(b)
        if found is None:
            return []
        g, a = found
        now, wall = self.clock.monotonic(), self.clock.time()
        return self._effects(g, a, a.on_aborted(b["ep_rank"], b["reason"], now, wall))

    def _effects(self, g: GroupState, a: Attempt, effects: list[Effect]) -> list[Outbound]:
        out: list[Outbound] = []
        now, wall = self.clock.monotonic(), self.clock.time()
        for eff in effects:
            if eff.kind == "send_abort":
                body = {"group": g.name, "epoch": a.epoch, "reason": eff.detail[:4000]}
                out += [Outbound(i, ABORT, dict(body)) for i in self._agents_of(g)]
                log.warning("commit aborted", group=g.name, epoch=a.epoch, reason=eff.detail)
            elif eff.kind == "applied":
                if a.epoch > g.record.epoch:
                    self._adopt(g, a.epoch, a.layout, wall, "committed")
                g.record.last_rebalance_wall = wall
                g.last_rebalance_mono = now
                if g.record.pending is a and a.finished:
                    g.record.pending = None
                self._persist(g)
                out += self._layout_to(g, self._agents_of(g))
                log.info(
                    "commit applied",
                    group=g.name,
                    epoch=a.epoch,
                    latency_s=_round(a.commit_latency_s, 4),
                )
                if self.metrics is not None:
                    self.metrics.commit(g.name, a.commit_latency_s, int(a.decision.get("moves", 0)))
            elif eff.kind == "finished":
                g.last_rebalance_mono = now
                g.record.last_rebalance_wall = wall
                if g.record.pending is a:
                    g.record.pending = None
                entry = a.to_dict(with_layout=False)
                g.record.history = [h for h in g.record.history if h.get("epoch") != a.epoch] + [
                    entry
                ]
                keep = self.store.keep_history if self.store is not None else 256
                del g.record.history[:-keep]
                self._persist(g)
                log.info(
                    "commit finished",
                    group=g.name,
                    epoch=a.epoch,
                    outcome=a.state,
                    reason=a.reason,
                    flags=a.flags,
                )
                if self.metrics is not None:
                    self.metrics.outcome(g.name, a.state)
        return out

    def _start_attempt(self, g: GroupState, d: Decision) -> tuple[list[Outbound], str | None]:
        """Persist the attempt, then prepare it on every agent of the group."""
        assert d.layout is not None and g.ep_size
        rec = g.record
        now, wall = self.clock.monotonic(), self.clock.time()
        reported = max((rk.epoch for rk in g.ranks.values()), default=0)
        epoch = max(rec.max_epoch, rec.epoch, reported) + 1
        a = Attempt(
            group=g.name,
            epoch=epoch,
            previous_epoch=rec.epoch,
            ranks=tuple(range(g.ep_size)),
            layout=d.layout,
            trigger=d.trigger,
            started_at=now,
            started_wall=wall,
            timeout_s=self.config.prepare_timeout_s,
            commit_timeout_s=self.config.commit_timeout_s,
        )
        d.epoch = epoch
        a.decision = d.to_dict(with_layers=True)
        prev_max, prev_pending = rec.max_epoch, rec.pending
        rec.max_epoch = epoch
        rec.pending = a
        if not self._persist(g):
            rec.max_epoch, rec.pending = prev_max, prev_pending
            return [], "the state directory cannot be written; nothing was prepared"
        g.attempt = a
        g.recent[epoch] = a
        for e in sorted(g.recent)[:-8]:
            g.recent.pop(e, None)
        body = {"group": g.name, "epoch": epoch, "timeout_s": float(self.config.prepare_timeout_s)}
        out = [
            Outbound(i, PREPARE, dict(body), {"phy2log": d.layout.phy2log})
            for i in self._agents_of(g)
        ]
        log.info(
            "prepare",
            group=g.name,
            epoch=epoch,
            trigger=d.trigger,
            layers=d.changed_layers,
            moves=d.moves,
            balance_now=_round(d.balance_now, 4),
            balance_after=_round(d.balance_after, 4),
        )
        if self.metrics is not None:
            self.metrics.prepared(g.name)
        return out, None

    # --- snapshots -------------------------------------------------------------------------

    def on_snapshot(self, msg: Message) -> None:
        """One decoded snapshot: validated, converted with its epoch's layout, windowed."""
        body = msg.body
        gname = body.get("group")
        g = self.groups.get(gname) if isinstance(gname, str) else None
        sender = str(body.get("agent") or body.get("worker") or "(snapshots)")[:64]
        if msg.type != SNAPSHOT:
            self._bad(
                WireError("unknown_type", f"{msg.type} on the snapshot socket"), sender, msg.type
            )
            return
        try:
            msg = validate(msg, model=g.shape if g is not None else None)
        except WireError as e:
            self._bad(e, sender, msg.type)
            if g is not None:
                g.count(e.reason)
            return
        b = msg.body
        if g is None or g.shape is None or g.window is None:
            self._bad(
                WireError("bad_field", f"snapshot for unknown group {gname!r}"), sender, SNAPSHOT
            )
            return
        refused = self._snapshot_sender_refused(g, b)
        if refused is not None:
            self._bad(refused, sender, SNAPSHOT)
            g.count(refused.reason)
            return
        try:
            self.seq.check(f"{sender}/{g.name}", b["incarnation"], b["seq"])
        except WireError as e:
            self._bad(e, sender, SNAPSHOT)
            g.count(e.reason)
            return
        lay = g.layout_of(b["epoch"])
        if lay is None:
            g.count("unknown_epoch")
            if self.metrics is not None:
                self.metrics.dropped("unknown_epoch")
            return
        if b["agent"] is not None and b["agent"] in self.agents:
            self.liveness.seen(b["agent"])
        now = self.clock.monotonic()
        counts = torch.as_tensor(msg.tensors["counts"])  # the codec decodes to numpy
        g.window.add_counts(b["epoch"], lay.phy2log, counts, b["tokens"], now)
        g.snapshots += 1
        g.last_snapshot_mono = now
        self.counters.received[SNAPSHOT] += 1
        if self.metrics is not None:
            self.metrics.snapshot(g.name)

    def _snapshot_sender_refused(self, g: GroupState, b: dict[str, Any]) -> WireError | None:
        """Load only counts from a registered agent, in its registered incarnation, for ranks
        of this group that it serves: anything else on the (unauthenticated without CURVE)
        snapshot socket could skew the forecast."""
        name = b.get("agent")
        info = self.agents.get(name) if isinstance(name, str) else None
        if info is None:
            return WireError("bad_field", f"snapshot from unregistered agent {name!r}")
        if b.get("incarnation") != info.incarnation:
            return WireError("stale_incarnation", f"snapshot from an old incarnation of {name}")
        for r in b.get("ep_ranks") or []:
            rank = g.ranks.get(r)
            if rank is None or rank.agent != name:
                return WireError("bad_field", f"{name} does not serve rank {r} of {g.name}")
        return None

    # --- the clock -------------------------------------------------------------------------

    def tick(self) -> list[Outbound]:
        """Liveness, deadlines, windows and the trigger; heartbeats to agents. Call often."""
        now, wall = self.clock.monotonic(), self.clock.time()
        out: list[Outbound] = []
        for agent, state in self.liveness.sweep():
            info = self.agents.get(agent)
            if info is None:
                continue
            log.warning("agent liveness", agent=agent, state=state)
            if state == DEAD:
                for gname, r in sorted(info.ranks):
                    g = self.groups.get(gname)
                    if g is not None and g.attempt is not None and r in g.ranks:
                        a = g.attempt
                        out += self._effects(
                            g, a, a.on_rank_lost(r, f"agent {agent} is dead", now, wall)
                        )
        for g in list(self.groups.values()):
            if g.attempt is not None and not g.attempt.finished:
                out += self._effects(g, g.attempt, g.attempt.tick(now, wall))
            if g.window is not None and g.window.roll(now):
                out += self.evaluate(g)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_s
            body = {"sender": "planner", "incarnation": self.incarnation}
            out += [
                Outbound(a.identity, HEARTBEAT, dict(body))
                for a in self.agents.values()
                if self.liveness.state(a.agent) != DEAD
            ]
        if self.metrics is not None:
            self.metrics.peers(self)
        return out

    def next_deadline(self) -> float | None:
        """The earliest monotonic time at which tick() has something to do (for poll timeouts)."""
        times = [self._next_heartbeat]
        for g in self.groups.values():
            if g.attempt is not None and not g.attempt.finished:
                times.append(g.attempt.deadline)
            if g.window is not None and (t := g.window.next_close()) is not None:
                times.append(t)
        return min(times)

    # --- the trigger -----------------------------------------------------------------------

    def _blocked(self, g: GroupState) -> str | None:
        if g.attempt is not None and not g.attempt.finished:
            return "pending_commit"
        if not self.complete(g):
            return "group_incomplete"
        if g.layout_unknown or g.current_layout is None:
            return "layout_unknown"
        return None

    def decide(
        self,
        g: GroupState,
        *,
        force: bool = False,
        layers: Iterable[int] | None = None,
        dry_run: bool = False,
    ) -> Decision:
        """Run the trigger on ``g`` now (does not act on it)."""
        now, wall = self.clock.monotonic(), self.clock.time()
        cur = g.current_layout
        if cur is None or g.window is None or not g.ep_size:
            d = Decision(
                group=g.name,
                at=wall,
                trigger="force" if force else "auto",
                action="none",
                reason=self._blocked(g) or "layout_unknown",
                message="the group has no known layout or shape yet",
            )
            return d
        forecast = g.window.forecast() if not force else g.window.best_estimate()
        return decide(
            group=g.name,
            now=now,
            wall=wall,
            policy=self.config.policy,
            plan_fn=self.plan_fn,
            current=cur,
            forecast=forecast,
            windows=g.window.windows,
            tokens=g.window.tokens,
            num_gpus=g.ep_size,
            num_nodes=self._num_nodes(g),
            last_rebalance_at=g.last_rebalance_mono,
            frozen=g.record.frozen,
            frozen_layers=g.record.frozen_layers,
            blocked=self._blocked(g),
            force=force,
            layers=layers,
            dry_run=dry_run,
        )

    def _record_decision(self, g: GroupState, d: Decision) -> None:
        g.last_decision = d
        entry = d.to_dict(with_layers=True)
        last = g.decisions[-1] if g.decisions else None
        if (
            last is not None
            and d.action == "none"
            and last["action"] == "none"
            and last["reason"] == d.reason
            and last["trigger"] == d.trigger
        ):
            entry["repeats"] = int(last.get("repeats", 1)) + 1
            entry["first_at"] = last.get("first_at", last["at"])
            g.decisions[-1] = entry
        else:
            entry["repeats"] = 1
            entry["first_at"] = d.at
            g.decisions.append(entry)
        if self.metrics is not None:
            self.metrics.decision(g.name, d)

    def evaluate(self, g: GroupState) -> list[Outbound]:
        """The automatic trigger, run when a window closes."""
        try:
            d = self.decide(g)
        except Exception as e:  # a planner bug must not take the daemon down
            log.exception("trigger failed", group=g.name, error=str(e))
            g.count("trigger_error")
            return []
        self._record_decision(g, d)
        if d.action != "prepare":
            log.debug("no rebalance", group=g.name, reason=d.reason, message=d.message)
            return []
        out, err = self._start_attempt(g, d)
        if err is not None:
            d.action, d.reason, d.message = "none", "store_error", err
        return out

    # --- operator commands -----------------------------------------------------------------

    def _group_or_error(self, name: str | None) -> GroupState:
        if name is None:
            if len(self.groups) == 1:
                return next(iter(self.groups.values()))
            raise KeyError("name a group (--group): " + ", ".join(sorted(self.groups)) or "none")
        g = self.groups.get(name)
        if g is None:
            raise KeyError(
                f"unknown group {name!r} (known: {', '.join(sorted(self.groups)) or 'none'})"
            )
        return g

    def command(self, body: dict[str, Any]) -> tuple[bool, str, dict[str, Any], list[Outbound]]:
        """Run an operator command (a validated ``command`` body).

        Returns (ok, message, data, outbound). ``data`` holds ``decision`` for rebalance and
        rollback, ``frozen`` / ``frozen_layers`` for freeze and unfreeze.
        """
        op = body["op"]
        try:
            g = self._group_or_error(body.get("group"))
        except KeyError as e:
            return False, str(e.args[0]), {}, []
        layers = body.get("layers")
        if layers is not None and g.shape is not None:
            bad = [x for x in layers if x >= g.shape.num_layers]
            if bad:
                return (
                    False,
                    f"layers {bad} do not exist (the model has {g.shape.num_layers})",
                    {},
                    [],
                )
        dry = bool(body.get("dry_run"))
        data: dict[str, Any] = {"schema_version": STATUS_SCHEMA_VERSION, "group": g.name}
        if op in ("freeze", "unfreeze"):
            rec = g.record
            if op == "freeze":
                if layers:
                    rec.frozen_layers = sorted(set(rec.frozen_layers) | set(layers))
                else:
                    rec.frozen = True
            elif layers:
                rec.frozen_layers = sorted(set(rec.frozen_layers) - set(layers))
            else:
                rec.frozen = False
                rec.frozen_layers = []
            ok = self._persist(g)
            data.update(frozen=rec.frozen, frozen_layers=list(rec.frozen_layers))
            what = f"layers {list(layers)}" if layers else "the group"
            msg = f"{op} {what} of {g.name}" + (
                "" if ok else " (not persisted: state write failed)"
            )
            log.info("operator command", op=op, group=g.name, layers=layers)
            return ok, msg, data, []
        if op == "rebalance":
            try:
                d = self.decide(g, force=True, layers=layers, dry_run=dry)
            except Exception as e:
                log.exception("forced plan failed", group=g.name)
                return False, f"planning failed: {e}", data, []
        elif op == "rollback":
            target_epoch = body.get("epoch")
            assert isinstance(target_epoch, int)
            target = g.record.layouts.get(target_epoch)
            if target is None and target_epoch == 0 and g.shape is not None:
                target = g.default_layout()
            cur = g.current_layout
            if target is None or cur is None or not g.ep_size:
                kept = sorted(g.record.layouts)
                return False, f"no layout of epoch {target_epoch} is kept (kept: {kept})", data, []
            d = rollback_decision(
                group=g.name,
                wall=self.clock.time(),
                current=cur,
                target=target,
                target_epoch=target_epoch,
                forecast=g.window.best_estimate() if g.window is not None else None,
                num_gpus=g.ep_size,
                dry_run=dry,
            )
            blocked = self._blocked(g)
            if blocked is not None and d.action == "prepare":
                d.action, d.reason = "none", blocked
                d.message = f"rollback refused: {blocked}"
        else:  # validate() allows only the four ops
            return False, f"unknown op {op!r}", data, []
        self._record_decision(g, d)
        data["decision"] = d.to_dict(with_layers=True)
        if d.action == "dry_run":
            return True, "dry run: " + d.message, data, []
        if d.action != "prepare":
            return False, f"no rebalance ({d.reason}): {d.message}", data, []
        out, err = self._start_attempt(g, d)
        if err is not None:
            return False, err, data, out
        data["decision"]["epoch"] = d.epoch
        data["epoch"] = d.epoch
        return True, f"preparing epoch {d.epoch}: {d.message}", data, out

    def _on_command(self, identity: bytes, b: dict[str, Any]) -> list[Outbound]:
        ok, message, data, out = self.command(b)
        return [
            *out,
            Outbound(identity, COMMAND_REPLY, {"ok": ok, "message": message[:4000], "data": data}),
        ]

    # --- status ----------------------------------------------------------------------------

    def _on_status_request(self, identity: bytes, b: dict[str, Any]) -> list[Outbound]:
        what = b["what"]
        if what not in STATUS_WHATS:
            e = WireError("bad_field", f"what={what!r}: one of {sorted(STATUS_WHATS)}")
            self._bad(e, self._sender_name(identity), STATUS_REQUEST)
            return [Outbound(identity, ERROR, error_body(e, STATUS_REQUEST))]
        gname = b.get("group")
        if gname is not None and gname not in self.groups:
            return [
                Outbound(
                    identity,
                    ERROR,
                    {
                        "code": "unknown_group",
                        "message": f"unknown group {gname!r} (known: {', '.join(sorted(self.groups)) or 'none'})",
                        "in_reply_to": STATUS_REQUEST,
                    },
                )
            ]
        return [Outbound(identity, STATUS_REPLY, {"data": self.status(what, gname)})]

    def status(self, what: str = "status", group: str | None = None) -> dict[str, Any]:
        """The ``data`` map of a status_reply (schemas in docs/daemons.md)."""
        groups = (
            [self.groups[group]]
            if group is not None
            else [self.groups[k] for k in sorted(self.groups)]
        )
        data: dict[str, Any] = {
            "schema_version": STATUS_SCHEMA_VERSION,
            "what": what,
            "at": self.clock.time(),
        }
        if what == "status":
            data["planner"] = self._planner_info()
            data["agents"] = self._agents_info()
            data["groups"] = [self._group_status(g) for g in groups]
        elif what == "history":
            data["groups"] = [
                {
                    "group": g.name,
                    "epoch": g.record.epoch,
                    "attempts": list(g.record.history)
                    + (
                        [g.attempt.to_dict(with_layout=False)]
                        if g.attempt is not None and not g.attempt.finished
                        else []
                    ),
                    "decisions": list(g.decisions),
                }
                for g in groups
            ]
        elif what == "top":
            data["groups"] = [self._group_top(g) for g in groups]
        elif what == "heatmap":
            data["groups"] = [self._group_heatmap(g) for g in groups]
        return data

    def _planner_info(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        return {
            "incarnation": self.incarnation,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(now - self.started_mono, 3),
            "started_at": self.started_wall,
            "state_dir": None if self.store is None else str(self.store.state_dir),
            "endpoints": dict(self.endpoints),
            "counters": {
                "bad": dict(self.counters.bad),
                "received": dict(self.counters.received),
                "missing": dict(self.counters.missing),
                "store_errors": self.store_errors,
            },
            "notes": list(self.notes),
        }

    def _agents_info(self) -> list[dict[str, Any]]:
        now = self.clock.monotonic()
        peers = self.liveness.peers()
        out = []
        for name in sorted(self.agents):
            a = self.agents[name]
            p = peers.get(name)
            out.append(
                {
                    "agent": name,
                    "node": a.node,
                    "incarnation": a.incarnation,
                    "software_version": a.software_version,
                    "state": self.liveness.state(name) or DEAD,
                    "last_seen_s": None if p is None else round(now - p.last_seen, 3),
                    "restarts": 0 if p is None else p.restarts,
                    "ranks": [{"group": gg, "ep_rank": r} for gg, r in sorted(a.ranks)],
                }
            )
        return out

    def _estimate(self, g: GroupState) -> tuple[torch.Tensor | None, str]:
        if g.window is None:
            return None, "none"
        f = g.window.forecast()
        if f is not None:
            return f, "forecast"
        f = g.window.best_estimate()
        return (f, "open_window") if f is not None else (None, "none")

    def _group_status(self, g: GroupState) -> dict[str, Any]:
        now = self.clock.monotonic()
        rec = g.record
        s = g.shape
        load, source = self._estimate(g)
        cur = g.current_layout
        bal_now = bal_window = lb = None
        if load is not None and cur is not None and g.ep_size:
            gl = gpu_loads(load, cur.phy2log, g.ep_size)
            bal_now = total_balance(gl)
            if g.window is not None and g.window.windows:
                bal_window = total_balance(gpu_loads(g.window.window_sum(), cur.phy2log, g.ep_size))
            lbv = lower_bound_balance(load, g.ep_size, cur.num_physical)
            mean = load.sum(dim=1)
            lb = float((lbv * mean).sum() / mean.sum()) if float(mean.sum()) > 0 else 1.0
        d = g.last_decision
        last = rec.history[-1] if rec.history else None
        blocked = self._blocked(g)
        nxt: dict[str, Any] = {"blocked_by": blocked, "earliest_in_s": None}
        if rec.frozen:
            nxt["blocked_by"] = nxt["blocked_by"] or "frozen"
        if g.last_rebalance_mono is not None:
            left = g.last_rebalance_mono + self.config.policy.cooldown_s - now
            nxt["earliest_in_s"] = round(max(0.0, left), 3)
        if g.window is not None and (t := g.window.next_close()) is not None:
            nxt["next_evaluation_in_s"] = round(max(0.0, t - now), 3)
        pending = None
        a = g.attempt
        if a is not None and not a.finished:
            pending = {
                "epoch": a.epoch,
                "state": a.state,
                "trigger": a.trigger,
                "started_at": a.started_wall,
                "deadline_in_s": round(a.deadline - now, 3),
                "staged": sorted(a.staged),
                "committed": sorted(a.committed),
                "waiting_for": a.waiting_for(),
                "restored": a.restored,
            }
        ranks = []
        for r in range(g.ep_size or 0):
            rk = g.ranks.get(r)
            ranks.append(
                {
                    "ep_rank": r,
                    "state": self.rank_state(g, r),
                    "worker": None if rk is None else rk.worker,
                    "incarnation": None if rk is None else rk.incarnation,
                    "agent": None if rk is None else rk.agent,
                    "node": None if rk is None else rk.node,
                    "epoch": None if rk is None else rk.epoch,
                    "left_reason": None if rk is None or rk.present else rk.left_reason,
                }
            )
        return {
            "group": g.name,
            "ep_size": g.ep_size,
            "num_layers": None if s is None else s.num_layers,
            "num_logical_experts": None if s is None else s.num_logical_experts,
            "num_physical_experts": None if s is None else s.num_physical_experts,
            "num_nodes": self._num_nodes(g),
            "complete": self.complete(g),
            "epoch": rec.epoch,
            "max_epoch": rec.max_epoch,
            "layout_known": not g.layout_unknown and cur is not None,
            "frozen": rec.frozen,
            "frozen_layers": list(rec.frozen_layers),
            "ranks": ranks,
            "data": {
                "source": source,
                "windows": 0 if g.window is None else g.window.windows,
                "tokens": 0 if g.window is None else g.window.tokens,
                "open_tokens": 0 if g.window is None else g.window.open_tokens,
                "snapshots": g.snapshots,
                "window_s": self.config.window_s,
                "last_snapshot_s": None
                if g.last_snapshot_mono is None
                else round(now - g.last_snapshot_mono, 3),
            },
            "balance_now": _round(bal_now),
            "balance_window": _round(bal_window),
            "balance_forecast": None if d is None else _round(d.balance_planned),
            "balance_planned": None if d is None else _round(d.balance_planned),
            "balance_after": None if d is None else _round(d.balance_after),
            "lower_bound": _round(lb),
            "last_rebalance": None
            if last is None
            else {
                "epoch": last.get("epoch"),
                "outcome": last.get("state"),
                "trigger": last.get("trigger"),
                "at": last.get("finished_at") or last.get("started_at"),
                "moves": (last.get("decision") or {}).get("moves"),
                "reason": last.get("reason"),
            },
            "next_rebalance": nxt,
            "pending": pending,
            "last_decision": None if d is None else d.to_dict(with_layers=False),
            "drops": dict(g.drops),
        }

    def _group_top(self, g: GroupState) -> dict[str, Any]:
        load, source = self._estimate(g)
        cur = g.current_layout
        out: dict[str, Any] = {
            "group": g.name,
            "epoch": g.record.epoch,
            "source": source,
            "balance_now": None,
            "balance_planned": None,
            "lower_bound": None,
            "layers": [],
        }
        if load is None or cur is None or not g.ep_size:
            return out
        gl = gpu_loads(load, cur.phy2log, g.ep_size)
        b = balance(gl)
        lbv = lower_bound_balance(load, g.ep_size, cur.num_physical)
        mean = load.sum(dim=1)
        out["balance_now"] = _round(total_balance(gl))
        out["lower_bound"] = (
            _round(float((lbv * mean).sum() / mean.sum())) if float(mean.sum()) > 0 else 1.0
        )
        d = g.last_decision
        planned = {f.layer: f for f in d.layers} if d is not None else {}
        if d is not None:
            out["balance_planned"] = _round(d.balance_planned)
            out["decided_at"] = d.at
        k = min(self.config.hot_experts, cur.num_logical)
        totals = load.sum(dim=1, keepdim=True).clamp(min=1e-300)
        share = load / totals
        vals, idx = torch.topk(load, k, dim=1)
        frozen = set(g.record.frozen_layers)
        for i in range(cur.num_layers):
            f = planned.get(i)
            out["layers"].append(
                {
                    "layer": i,
                    "balance_now": _round(float(b[i])),
                    "balance_planned": None if f is None else _round(f.balance_planned),
                    "lower_bound": _round(float(lbv[i])),
                    "moves": None if f is None else f.moves,
                    "why": None if f is None else f.why,
                    "frozen": i in frozen or g.record.frozen,
                    "hot": [
                        {
                            "expert": int(idx[i, j]),
                            "load": _round(float(vals[i, j]), 3),
                            "share": _round(float(share[i, idx[i, j]]), 6),
                            "replicas": int(cur.logcnt[i, idx[i, j]]),
                        }
                        for j in range(k)
                    ],
                }
            )
        return out

    def _group_heatmap(self, g: GroupState) -> dict[str, Any]:
        load, source = self._estimate(g)
        cur = g.current_layout
        out: dict[str, Any] = {
            "group": g.name,
            "epoch": g.record.epoch,
            "source": source,
            "num_gpus": g.ep_size,
            "by_gpu": None,
            "by_expert": None,
            "replicas": None,
        }
        if load is None or cur is None or not g.ep_size:
            return out
        gl = gpu_loads(load, cur.phy2log, g.ep_size)
        out["by_gpu"] = [[round(float(x), 3) for x in row] for row in gl.tolist()]
        out["by_expert"] = [[round(float(x), 3) for x in row] for row in load.tolist()]
        out["replicas"] = cur.logcnt.tolist()
        return out

    # --- embedding helpers -----------------------------------------------------------------

    def group_names(self) -> list[str]:
        return sorted(self.groups)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
