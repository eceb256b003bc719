"""The node agent's logic without sockets: messages in, messages to send out.

:class:`AgentCore` is what ``eplbd agent`` does, as a state machine fed by the socket loop
(:mod:`eplbd.agent._daemon`) and by tests with a :class:`~eplbd.ops.FakeClock`:

- ``on_worker(identity, frames)``: a message on the workers' ROUTER (``hello``,
  ``heartbeat``, ``staged``, ``aborted``, ``committed``);
- ``on_snapshot(frames)``: a message on the workers' PULL (``snapshot``);
- ``on_planner(frames)``: a message on the planner DEALER (``welcome``, ``heartbeat``,
  ``layout``, ``prepare``, ``abort``, ``schedule``, ``error``);
- ``tick()``: timers (heartbeats both ways, dead workers, the planner's liveness and the
  agent_hello retry with backoff, merge timeouts).

Each returns a list of :class:`Send` for the loop to put on a socket without blocking.
Nothing here waits: a worker is never held up by the planner, and the planner being away
only means snapshots are held (bounded) and control messages for it are dropped (the
planner resynchronises from the next ``agent_hello``, which lists every worker and its
current epoch).

Why the agent keeps layouts: a worker that starts (or restarts) after a commit must serve
the group's current epoch before it takes part in the next consensus; the agent hands it
the last committed ``phy2log`` in its ``welcome``. The agent learns it from the planner's
``layout`` messages and from a completed commit (the first ``committed`` of an epoch it
relayed a ``prepare`` for: the consensus flips every rank at the same step, so one report
is enough).

Every incoming message is decoded and validated (against the group's model once the group
is known); a bad one is counted per reason and per sender (:class:`~eplbd.wire.WireCounters`),
logged, answered with ``error`` on the workers' control socket, and dropped.

Why the agent watches its own pace: ``tick`` runs at least every ``min(heartbeat_s,
merge_timeout_s) / 2``; a gap of ``stall_s`` (by default ``dead_s / 2``, at least four of the
loop's longest polls) or more between two ticks means the agent itself did not run
(SIGSTOP, a starved host, a clock jump), not that its workers went quiet. It then gives
every worker a fresh ``dead_s`` to be heard from (their connections need a moment to
come back) and starts its planner session over, so the ``agent_hello`` tells the planner what
every rank serves now. What each rank serves also arrives with every worker heartbeat
(``epoch``) and hello: when it is newer than the agent knew (a ``committed`` lost on the way),
the planner is told with a ``worker_joined``. A control message the loop could not hand to
the planner socket is reported back (:meth:`AgentCore.planner_send_failed`), and so is a
dropped connection to it (:meth:`AgentCore.planner_link_lost`): the workers' answers are kept
for the next session and the session starts over, instead of being lost while the agent
still believes the planner connected.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eplbd import __version__
from eplbd.agent._merge import Merged, SnapshotMerger
from eplbd.ops.clock import SYSTEM_CLOCK, Clock
from eplbd.ops.logging import get_logger
from eplbd.wire import (
    ABORT,
    ABORTED,
    AGENT_HELLO,
    COMMITTED,
    DEFAULT_MAX_BYTES,
    ERROR,
    HEARTBEAT,
    HELLO,
    LAYOUT,
    PHY2LOG_DTYPES,
    PHY2LOG_FIELD,
    PREPARE,
    PROTOCOL_VERSION,
    SCHEDULE,
    SNAPSHOT,
    STAGED,
    WELCOME,
    WORKER_JOINED,
    WORKER_LEFT,
    Message,
    ModelShape,
    WireError,
    accepted_phy2log_dtypes,
    decode,
    error_body,
    layout_digest,
    narrow_phy2log,
    narrow_phy2log_each,
    validate,
)
from eplbd.wire._counters import WireCounters
from eplbd.wire._schema import SCHEMAS

__all__ = [
    "AgentCore",
    "CoreConfig",
    "HELLO_REQUIRED",
    "PLANNER",
    "PLANNER_SNAPSHOTS",
    "Schedule",
    "Send",
    "WORKER",
]

log = get_logger("eplbd.agent")

WORKER = "worker"
PLANNER = "planner"
PLANNER_SNAPSHOTS = "planner_snapshots"

#: ``error`` code for "who are you?": a worker's control message before its ``hello`` (the
#: agent restarted, or declared the worker dead) gets it from the agent, and an agent's
#: message the planner cannot place gets it from the planner; the answer is a new hello.
HELLO_REQUIRED = "hello_required"
_RESYNC_CODES = frozenset({HELLO_REQUIRED, "unknown_agent"})

_MAX_WORKERS = 4096
_MAX_GROUPS = 1024
_MAX_PENDING = 4  # prepared epochs remembered per group
_MAX_PENDING_UP = 256  # workers' answers held while the planner is away
_MAX_REPLACED = _MAX_WORKERS  # replaced worker incarnations remembered (refused if back)
#: The hello fields the agent keeps and relays (agent_hello, worker_joined): the schema's and
#: PHY2LOG_FIELD. Any other field a worker adds stays out: relayed, a big one pushed the
#: agent_hello past the size limit and this node's planner session never came up.
_HELLO_FIELDS = frozenset(SCHEMAS[HELLO].required) | frozenset(SCHEMAS[HELLO].optional)


@dataclass(frozen=True)
class Send:
    """One message for the loop to send (NOBLOCK; a full queue is a counted drop).

    ``to``: :data:`WORKER` (``identity`` is the worker's ROUTER identity), :data:`PLANNER`
    (control DEALER) or :data:`PLANNER_SNAPSHOTS` (PUSH).
    """

    to: str
    msg_type: str
    body: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    identity: bytes = b""


@dataclass(frozen=True)
class Schedule:
    """The recording schedule: record ``record_steps`` of every ``window_steps`` steps."""

    window_steps: int = 256
    record_steps: int = 64
    enabled: bool = True

    def check(self) -> None:
        """Raises ValueError unless 0 <= record_steps <= window_steps and window_steps >= 1."""
        w, r = self.window_steps, self.record_steps
        if not (isinstance(w, int) and isinstance(r, int) and 0 <= r <= w and w >= 1):
            raise ValueError(f"bad schedule {self}: need 0 <= record_steps <= window_steps")

    def body(self) -> dict[str, Any]:
        return {
            "window_steps": self.window_steps,
            "record_steps": self.record_steps,
            "enabled": self.enabled,
        }


@dataclass(frozen=True)
class CoreConfig:
    """The agent's tunables (seconds on the core's clock).

    ``dead_s``: a worker (or the planner) silent this long is gone; ``heartbeat_s``: how often
    the agent heartbeats its peers; ``merge_timeout_s``: how long a window waits for the
    other local ranks; ``held_per_group``: merged snapshots kept per group while the planner
    is away; ``hello_backoff_s``/``hello_backoff_max_s``: agent_hello retry, doubling.
    """

    agent_id: str
    node: str
    schedule: Schedule = Schedule()
    heartbeat_s: float = 1.0
    dead_s: float = 5.0
    merge_timeout_s: float = 2.0
    max_open_windows: int = 8
    held_per_group: int = 16
    hello_backoff_s: float = 0.1
    hello_backoff_max_s: float = 5.0
    max_bytes: int = DEFAULT_MAX_BYTES
    has_planner: bool = True
    stall_s: float | None = None  # a gap between ticks this long is our own stall (see below)
    poll_s: float = 0.05  # the loop's longest wait between ticks (the daemon's poll)

    @property
    def stall_after_s(self) -> float:
        if self.stall_s is not None:
            return self.stall_s
        # An idle turn already takes a poll (plus the work of the turn): with a small
        # dead_s, dead_s / 2 alone would call every idle turn a stall and never sync.
        return max(self.dead_s / 2, 4 * self.poll_s)


@dataclass
class _Worker:
    identity: bytes
    hello: dict[str, Any]
    last_seen: float
    epoch: int
    last_seq: int = -1
    claimed: int = 0  # the newest epoch its heartbeats say it serves, and since when
    claimed_at: float = 0.0

    @property
    def worker(self) -> str:
        return str(self.hello["worker"])

    @property
    def incarnation(self) -> str:
        return str(self.hello["incarnation"])

    @property
    def group(self) -> str:
        return str(self.hello["group"])

    @property
    def ep_rank(self) -> int:
        return int(self.hello["ep_rank"])

    @property
    def phy2log_dtypes(self) -> tuple[str, ...]:
        return accepted_phy2log_dtypes(self.hello)


@dataclass
class _Group:
    model: ModelShape | None = None
    ep_size: int = 0
    epoch: int = 0  # last committed epoch known (0: the initial layout)
    phy2log: np.ndarray | None = None  # its layout [L, P] int64, None for epoch 0
    share: np.ndarray | None = None  # its weighted split [L, P] int64, None: equal split
    pending: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = field(
        default_factory=OrderedDict
    )
    held: deque[Merged] = field(default_factory=deque)


class AgentCore:
    """The agent's state: workers, groups and their layouts, the planner session, merging.

    Not thread-safe: one thread (the socket loop) calls every method. ``status()`` returns
    a fresh JSON-able dict that other threads may read.
    """

    def __init__(
        self, config: CoreConfig, *, incarnation: str, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.cfg = config
        self.incarnation = incarnation
        self.clock = clock
        self.schedule = config.schedule
        self.workers: dict[str, _Worker] = {}  # worker id -> record
        self.by_identity: dict[bytes, str] = {}  # ROUTER identity -> worker id
        self.groups: dict[str, _Group] = {}
        self.merger = SnapshotMerger(
            timeout_s=config.merge_timeout_s, max_open_per_group=config.max_open_windows
        )
        self.worker_counters = WireCounters()  # both worker sockets
        self.planner_counters = WireCounters()
        self.relayed: dict[str, int] = {}  # "<type>:<up|down>" -> count
        self.dropped: dict[str, int] = {}  # reason -> count (held snapshots evicted, ...)
        self.events: dict[str, int] = {}  # workers joined/left/replaced, planner restarts...
        self.forwarded = {"complete": 0, "partial": 0}
        self._seq: dict[str, int] = {}  # group -> last snapshot seq sent (numbered per group)
        now = clock.monotonic()
        # planner session
        self.planner_incarnation: str | None = None
        self.planner_last_seen: float | None = None
        self.synced = False  # welcome received since the last agent_hello
        # workers our agent_hello listed, with the epoch it said each serves
        self._hello_members: dict[tuple[str, str], int] = {}
        self._gone: dict[tuple[str, str], dict[str, Any]] = {}  # recent worker_left bodies
        # (worker, incarnation) that left as restarted/replaced: a newer process took over
        self._replaced: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._pending_up: deque[Send] = deque()  # answers for a planner that is away
        self._unsent: deque[Send] = deque()  # snapshots the planner's socket could not take yet
        self._backoff = config.hello_backoff_s
        self._next_hello = now
        self._next_planner_hb = now
        self._next_worker_hb = now
        self._last_tick: float | None = None  # the loop's previous turn (None: not yet)

    # --- helpers ------------------------------------------------------------------------

    def _bump(self, table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n

    def _now(self) -> float:
        return self.clock.monotonic()

    def _group(self, name: str) -> _Group | None:
        g = self.groups.get(name)
        if g is None:
            if len(self.groups) >= _MAX_GROUPS:
                self._forget_idle_groups()
                if len(self.groups) >= _MAX_GROUPS:
                    return None
            g = self.groups[name] = _Group()
        return g

    def _forget_idle_groups(self) -> None:
        busy = {w.group for w in self.workers.values()}
        for name in [n for n in self.groups if n not in busy]:
            del self.groups[name]

    def local_ranks(self, group: str) -> set[int]:
        """The ranks of ``group`` registered on this node now."""
        return {w.ep_rank for w in self.workers.values() if w.group == group}

    def _workers_of(self, group: str) -> list[_Worker]:
        return [w for w in self.workers.values() if w.group == group]

    def _hb_body(self) -> dict[str, Any]:
        return {"sender": self.cfg.agent_id, "incarnation": self.incarnation}

    def _bad(self, counters: WireCounters, err: WireError, sender: str, msg_type: str = "") -> None:
        counters.bad_message(err, sender, msg_type)

    def _worker_error(self, identity: bytes, err: WireError, in_reply_to: str) -> Send:
        return Send(WORKER, ERROR, error_body(err, in_reply_to), identity=identity)

    def _to_planner(self, msg_type: str, body: dict[str, Any]) -> list[Send]:
        """A control message for the planner. While no session is up, membership changes
        are dropped (the next agent_hello carries them) and the workers' answers (staged,
        aborted, committed) wait in a bounded buffer, sent once the planner welcomes us."""
        if not self.cfg.has_planner:
            return []
        if self.synced:
            return [Send(PLANNER, msg_type, body)]
        if msg_type in (STAGED, ABORTED, COMMITTED):
            self._hold_up(Send(PLANNER, msg_type, body))
        return []  # membership: the next agent_hello carries it

    def snapshot_unsent(self, s: Send) -> None:
        """The loop could not queue snapshot ``s`` for the planner (its snapshot connection
        not up yet, as right after a planner restart when the control connection came back
        first, or its queue full): keep it, in order, for :meth:`take_unsent_snapshots`.
        Bounded like the held snapshots; the oldest goes first."""
        if len(self._unsent) >= self.cfg.held_per_group * max(1, len(self.groups)):
            self._unsent.popleft()
            self._bump(self.dropped, "snapshot:held_evicted")
        self._unsent.append(s)

    @property
    def has_unsent_snapshots(self) -> bool:
        return bool(self._unsent)

    def take_unsent_snapshots(self) -> list[Send]:
        """The kept snapshots, oldest first (each keeps its seq: resent, they stay in order)."""
        out, self._unsent = list(self._unsent), deque()
        return out

    def _hold_up(self, s: Send) -> None:
        if len(self._pending_up) >= _MAX_PENDING_UP:
            old = self._pending_up.popleft()
            self._bump(self.dropped, f"{old.msg_type}:planner_away")
        self._pending_up.append(s)

    # --- workers' control socket --------------------------------------------------------

    def on_worker(self, identity: bytes, frames: Sequence[Any]) -> list[Send]:
        """A message from a worker's DEALER (ROUTER identity already split off)."""
        sender = self.by_identity.get(identity) or f"id:{identity.hex()[:16]}"
        try:
            msg = decode(frames, max_bytes=self.cfg.max_bytes)
        except WireError as e:
            self._bad(self.worker_counters, e, sender)
            return [self._worker_error(identity, e, "")]
        self.worker_counters.received[msg.type] += 1
        if msg.type == HELLO:
            return self._on_hello(identity, msg)
        wid = self.by_identity.get(identity)
        rec = self.workers.get(wid) if wid is not None else None
        if msg.type == ERROR:  # logged, never answered (no error loops)
            log.info(
                "worker error",
                worker=sender,
                code=msg.body.get("code"),
                message=msg.body.get("message"),
            )
            return []
        if rec is None:
            # The agent restarted or the worker was declared dead: it must say hello again.
            return [
                Send(
                    WORKER,
                    ERROR,
                    {
                        "code": HELLO_REQUIRED,
                        "message": "send hello first",
                        "in_reply_to": msg.type,
                    },
                    identity=identity,
                )
            ]
        if msg.type == HEARTBEAT:
            try:
                body = validate(msg).body
                # another process on this identity (a replaced one, its last heartbeats on
                # the way): neither its liveness nor its epoch is the registered worker's
                if body["incarnation"] != rec.incarnation:
                    raise WireError(
                        "stale_incarnation",
                        f"{rec.worker}: heartbeat of incarnation {body['incarnation']!r:.60}, "
                        f"registered {rec.incarnation!r}",
                    )
                if body["sender"] != rec.worker:
                    raise WireError(
                        "bad_field",
                        f"heartbeat.sender={body['sender']!r:.60} but this is {rec.worker!r}",
                    )
            except WireError as e:
                self._bad(self.worker_counters, e, rec.worker, msg.type)
                return []
            rec.last_seen = self._now()
            epoch = body.get("epoch")  # extra: the epoch the worker serves
            if type(epoch) is int and rec.epoch < epoch < 2**63 and epoch != rec.claimed:
                # its committed may still be on the way: tick() waits a heartbeat for it
                rec.claimed, rec.claimed_at = epoch, rec.last_seen
            return []
        rec.last_seen = self._now()
        if msg.type in (STAGED, ABORTED, COMMITTED):
            return self._on_outcome(rec, msg)
        err = WireError("bad_field", f"{msg.type} is not a worker-to-agent control message")
        self._bad(self.worker_counters, err, sender, msg.type)
        return [self._worker_error(identity, err, msg.type)]

    def _on_hello(self, identity: bytes, msg: Message) -> list[Send]:
        sender = f"id:{identity.hex()[:16]}"
        try:
            body = _kept_hello(validate(msg).body)
            group_name = str(body["group"])
            g = self.groups.get(group_name)
            live = self._workers_of(group_name)
            # Replacing a rank's own previous incarnation does not count as "another worker".
            others = [
                w for w in live if w.worker != body["worker"] and w.ep_rank != body["ep_rank"]
            ]
            model = ModelShape.from_hello(body)
            key = (str(body["worker"]), str(body["incarnation"]))
            if key in self._replaced:
                # a late hello of a process already replaced must not push out the newer one
                raise WireError("stale_incarnation", f"{key[0]}: incarnation {key[1]} was replaced")
            old = self.workers.get(key[0])
            if old is not None and old.incarnation == key[1]:
                # one incarnation is one rank of one group and model: changing them takes a
                # new process (incarnation), never a silent move of a registered worker
                was = ModelShape.from_hello(old.hello), old.hello["ep_size"]
                if (model, body["ep_size"]) != was:
                    raise WireError(
                        "model_mismatch", f"{key[0]}: incarnation {key[1]} declared another model"
                    )
                if (group_name, body["ep_rank"]) != (old.group, old.ep_rank):
                    raise WireError(
                        "bad_field",
                        f"{key[0]}: incarnation {key[1]} is rank {old.ep_rank} of {old.group}",
                    )
            if g is not None and g.model is not None and others:
                if model != g.model:
                    validate(msg, model=g.model)  # raises model_mismatch with the details
                if body["ep_size"] != g.ep_size:
                    raise WireError(
                        "model_mismatch",
                        f"ep_size {body['ep_size']} differs from the group's {g.ep_size}",
                    )
            if body["protocol_version"] != PROTOCOL_VERSION:
                raise WireError(
                    "bad_version", f"protocol_version {body['protocol_version']} not supported"
                )
        except WireError as e:
            self._bad(self.worker_counters, e, str(msg.body.get("worker", sender)), HELLO)
            return [self._worker_error(identity, e, HELLO)]
        if len(self.workers) >= _MAX_WORKERS and body["worker"] not in self.workers:
            err = WireError("bad_field", f"this agent serves at most {_MAX_WORKERS} workers")
            self._bad(self.worker_counters, err, str(body["worker"]), HELLO)
            return [self._worker_error(identity, err, HELLO)]
        g = self._group(group_name)
        if g is None:
            err = WireError("bad_field", f"this agent serves at most {_MAX_GROUPS} groups")
            self._bad(self.worker_counters, err, str(body["worker"]), HELLO)
            return [self._worker_error(identity, err, HELLO)]
        out: list[Send] = []
        wid = str(body["worker"])
        known_again = old is not None and old.incarnation == body["incarnation"]
        if old is not None and not known_again:
            out += self._remove(old, "restarted")
        for w in live:
            if w.worker != wid and w.ep_rank == body["ep_rank"]:
                out += self._remove(w, "replaced")
        if g.model != model or not self._workers_of(group_name):
            if g.model is not None and g.model != model:
                # A redeployment with another model: the old layouts mean nothing now.
                log.warning(
                    "group model changed", group=group_name, old=str(g.model), new=str(model)
                )
                g.epoch, g.phy2log, g.share = 0, None, None
                g.pending.clear()
                self.merger.drop_groups([group_name])
            elif g.model is None and g.phy2log is not None:
                self._check_held_layout(group_name, g, model)
            g.model = model
            g.ep_size = int(body["ep_size"])
        now = self._now()
        if known_again and old is not None:
            self.by_identity.pop(old.identity, None)
            old.identity, old.hello, old.last_seen = identity, body, now
            rec = old
            out += self._serves(rec, int(body["epoch"]))
        else:
            rec = _Worker(identity, body, now, int(body["epoch"]))
            self.workers[wid] = rec
            self._bump(self.events, "worker_joined")
            log.info(
                "worker joined",
                worker=wid,
                group=group_name,
                ep_rank=rec.ep_rank,
                incarnation=rec.incarnation,
            )
            out += self._to_planner(WORKER_JOINED, self._joined_body(rec))
        self.by_identity[identity] = wid
        out.append(self._welcome(rec, g))
        return out

    def _check_held_layout(self, name: str, g: _Group, model: ModelShape) -> None:
        """The group's model is first known (its first hello): a layout the planner sent
        before could only be checked without it. One that does not fit is dropped and
        counted (welcomes carried it, and the worker refused every one of them)."""
        assert g.phy2log is not None
        held = Message(
            LAYOUT, {"group": name, "epoch": g.epoch}, _layout_tensors(g.phy2log, g.share)
        )
        try:
            validate(held, model=model)
        except WireError as e:
            self._bad(self.planner_counters, e, "planner", LAYOUT)
            g.epoch, g.phy2log, g.share = 0, None, None

    def _welcome(self, rec: _Worker, g: _Group) -> Send:
        body: dict[str, Any] = {
            "incarnation": self.incarnation,
            "epoch": 0,
            "schedule": self.schedule.body(),
            "agent": self.cfg.agent_id,
        }
        tensors: dict[str, np.ndarray] = {}
        p2l, model = g.phy2log, g.model
        if g.epoch > 0 and p2l is not None and model is not None and tuple(p2l.shape) == model.lp:
            body["epoch"] = g.epoch
            tensors.update(_layout_tensors(narrow_phy2log(p2l, rec.phy2log_dtypes), g.share))
        return Send(WORKER, WELCOME, body, tensors, identity=rec.identity)

    def _member_body(self, rec: _Worker, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "agent": self.cfg.agent_id,
            "group": rec.group,
            "ep_rank": rec.ep_rank,
            "worker": rec.worker,
            "incarnation": rec.incarnation,
        }
        if reason is not None:
            body["reason"] = reason
        return body

    def _joined_body(self, rec: _Worker) -> dict[str, Any]:
        """worker_joined with the worker's whole hello (the planner registers the group's
        model from it) and its current epoch."""
        body = self._member_body(rec)
        body.update(epoch=rec.epoch, node=str(rec.hello["node"]), hello=self._hello_of(rec))
        return body

    def _remove(self, rec: _Worker, reason: str) -> list[Send]:
        if self.workers.get(rec.worker) is rec:
            del self.workers[rec.worker]
        if self.by_identity.get(rec.identity) == rec.worker:
            del self.by_identity[rec.identity]
        self._bump(self.events, f"worker_left:{reason}")
        if reason in ("restarted", "replaced"):
            self._replaced[(rec.worker, rec.incarnation)] = None
            while len(self._replaced) > _MAX_REPLACED:
                self._replaced.popitem(last=False)
        body = self._member_body(rec, reason)
        self._gone[(rec.worker, rec.incarnation)] = body
        while len(self._gone) > 256:
            del self._gone[next(iter(self._gone))]
        log.warning(
            "worker left", worker=rec.worker, group=rec.group, ep_rank=rec.ep_rank, reason=reason
        )
        return self._to_planner(WORKER_LEFT, body)

    def _on_outcome(self, rec: _Worker, msg: Message) -> list[Send]:
        try:
            body = validate(msg).body
            for key, want in (
                ("worker", rec.worker),
                ("group", rec.group),
                ("ep_rank", rec.ep_rank),
            ):
                if body[key] != want:
                    raise WireError(
                        "bad_field", f"{msg.type}.{key}={body[key]!r} but this worker is {want!r}"
                    )
            # the planner routes by `agent`: naming another would move that agent's route here
            if body.get("agent", self.cfg.agent_id) != self.cfg.agent_id:
                raise WireError(
                    "bad_field",
                    f"{msg.type}.agent={body['agent']!r:.60} but this agent is "
                    f"{self.cfg.agent_id!r}",
                )
        except WireError as e:
            self._bad(self.worker_counters, e, rec.worker, msg.type)
            return [self._worker_error(rec.identity, e, msg.type)]
        if msg.type == COMMITTED:
            epoch = int(body["epoch"])
            rec.epoch = max(rec.epoch, epoch)
            self._committed(rec.group, epoch)
        # only the schema's fields go up (as for hellos): a big extra one could make the
        # answer too large for the planner's socket, and the planner reads no other
        kept = SCHEMAS[msg.type].required.keys() | SCHEMAS[msg.type].optional.keys()
        body = {k: v for k, v in body.items() if k in kept}
        body["agent"] = self.cfg.agent_id
        self._bump(self.relayed, f"{msg.type}:up")
        return self._to_planner(msg.type, body)

    def _serves(self, rec: _Worker, epoch: int) -> list[Send]:
        """A worker says (hello, heartbeat) it serves ``epoch``. Newer than we knew means a
        ``committed`` was lost on the way (a stall, a dropped connection): the planner is told
        with a ``worker_joined`` carrying the worker's hello, whose epoch it registers."""
        if epoch <= rec.epoch:
            return []
        rec.epoch = epoch
        self._committed(rec.group, epoch)
        self._bump(self.events, "epoch_learned")
        log.info("worker serves a newer epoch", worker=rec.worker, group=rec.group, epoch=epoch)
        return self._to_planner(WORKER_JOINED, self._joined_body(rec))

    def _committed(self, group: str, epoch: int) -> None:
        g = self.groups.get(group)
        if g is None or epoch <= g.epoch:
            return
        lay = g.pending.get(epoch)
        if lay is None:
            return  # committed an epoch we never relayed: wait for the planner's layout
        g.epoch, (g.phy2log, g.share) = epoch, lay
        for e in [e for e in g.pending if e <= epoch]:
            del g.pending[e]
        log.info("epoch committed", group=group, epoch=epoch)

    # --- workers' snapshot socket --------------------------------------------------------

    def on_snapshot(self, frames: Sequence[Any]) -> list[Send]:
        """A message on the workers' PULL: a snapshot to merge."""
        try:
            msg = decode(frames, max_bytes=self.cfg.max_bytes)
        except WireError as e:
            self._bad(self.worker_counters, e, "snapshots")
            return []
        wid = msg.body.get("worker")
        sender = wid if isinstance(wid, str) else "snapshots"
        try:
            if msg.type != SNAPSHOT:
                raise WireError("bad_field", f"{msg.type} sent to the snapshot socket")
            rec = self.workers.get(wid) if isinstance(wid, str) else None
            if rec is None:
                raise WireError("stale_incarnation", f"snapshot from unregistered worker {wid!r}")
            if msg.body.get("incarnation") != rec.incarnation:
                raise WireError("stale_incarnation", f"{wid}: incarnation was replaced")
            g = self.groups.get(rec.group)
            body = validate(msg, model=g.model if g is not None else None).body
            if body["group"] != rec.group or body["ep_rank"] != rec.ep_rank:
                raise WireError("bad_field", f"{wid} is rank {rec.ep_rank} of {rec.group}")
            if body["seq"] <= rec.last_seq:
                raise WireError("replay", f"{wid}: seq {body['seq']} <= {rec.last_seq}")
        except WireError as e:
            self._bad(self.worker_counters, e, sender, msg.type)
            return []
        self.worker_counters.received[SNAPSHOT] += 1
        now = self._now()
        if body["seq"] > rec.last_seq + 1 and rec.last_seq >= 0:
            self.worker_counters.gap(rec.worker, int(body["seq"]) - rec.last_seq - 1)
        rec.last_seq = int(body["seq"])
        rec.last_seen = now
        before = self.merger.duplicates
        ready = self.merger.add(
            rec.group,
            int(body["epoch"]),
            int(body["step_start"]),
            int(body["step_end"]),
            rec.ep_rank,
            int(body["tokens"]),
            msg.tensors["counts"],
            now=now,
            expected=self.local_ranks,
        )
        if self.merger.duplicates != before:
            self._bump(self.dropped, "snapshot:duplicate")
        return self._forward(ready)

    def _forward(self, ready: list[Merged]) -> list[Send]:
        out: list[Send] = []
        for m in ready:
            g = self.groups.get(m.group)
            if not self.synced or not self.cfg.has_planner:
                if g is None:
                    continue
                if len(g.held) >= self.cfg.held_per_group:
                    g.held.popleft()
                    self._bump(self.dropped, "snapshot:held_evicted")
                g.held.append(m)
                continue
            out.append(self._snapshot_send(m))
        return out

    def _snapshot_send(self, m: Merged) -> Send:
        seq = self._seq[m.group] = self._seq.get(m.group, 0) + 1
        self.forwarded["complete" if m.complete else "partial"] += 1
        body = {
            "agent": self.cfg.agent_id,
            "incarnation": self.incarnation,
            "node": self.cfg.node,
            "group": m.group,
            "ep_ranks": m.ep_ranks,
            "seq": seq,
            "epoch": m.epoch,
            "step_start": m.step_start,
            "step_end": m.step_end,
            "tokens": m.tokens,
        }
        return Send(PLANNER_SNAPSHOTS, SNAPSHOT, body, {"counts": m.counts})

    # --- planner ----------------------------------------------------------------------------

    def agent_hello(self) -> Send:
        """The full state the planner needs after (re)connecting: every worker, its epoch."""
        workers = [self._hello_of(w) for w in self.workers.values()]
        self._hello_members = {(w.worker, w.incarnation): w.epoch for w in self.workers.values()}
        body = {
            "agent": self.cfg.agent_id,
            "incarnation": self.incarnation,
            "node": self.cfg.node,
            "software_version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "workers": workers,
            PHY2LOG_FIELD: list(PHY2LOG_DTYPES),
            # the layouts it holds: the planner sends only those that differ (a hello storm
            # then costs welcomes, not a layout per group each time)
            "layouts": [
                {"group": n, "epoch": g.epoch, "digest": layout_digest(g.phy2log)}
                for n, g in self.groups.items()
                if g.epoch > 0 and g.phy2log is not None
            ],
        }
        return Send(PLANNER, AGENT_HELLO, body)

    @staticmethod
    def _hello_of(w: _Worker) -> dict[str, Any]:
        """The worker's hello body as the planner should see it: with its current epoch."""
        h = {k: v for k, v in w.hello.items() if k not in ("schema", "tensors")}
        h["epoch"] = w.epoch
        return h

    def _resync(self, why: str) -> list[Send]:
        """Forget the session and say agent_hello now (then with backoff until welcome)."""
        self.synced = False
        self._backoff = self.cfg.hello_backoff_s
        self._next_hello = self._now() + self._backoff
        self._bump(self.events, f"planner_resync:{why}")
        return [self.agent_hello()] if self.cfg.has_planner else []

    def planner_send_failed(self, s: Send) -> list[Send]:
        """The loop could not hand ``s`` to the planner's control socket (not connected, or
        its queue full): nothing of it reached the planner. A worker's answer is kept for the
        next session; a session we believed up is started over (its ``agent_hello`` carries
        the membership and the epochs that may have been lost with ``s``)."""
        if s.msg_type in (STAGED, ABORTED, COMMITTED):
            self._hold_up(s)
        if not self.synced or not self.cfg.has_planner:
            return []
        log.warning("send to the planner failed: resynchronising", type=s.msg_type)
        return self._resync("send_failed")

    def planner_link_lost(self) -> list[Send]:
        """The connection to the planner dropped: what was queued on it may be lost (no
        receipt), so a session we believed up starts over."""
        if not self.synced or not self.cfg.has_planner:
            return []
        log.warning("planner connection lost: resynchronising")
        return self._resync("disconnected")

    def planner_link_up(self) -> list[Send]:
        """A connection to the planner came up (its restart, the end of a partition): with no
        session, say agent_hello now rather than at the next backoff step."""
        if self.synced or not self.cfg.has_planner:
            return []
        self._next_hello = self._now() + self._backoff  # the next retry, if no welcome comes
        return [self.agent_hello()]

    def on_planner(self, frames: Sequence[Any]) -> list[Send]:
        """A message from the planner on the control DEALER."""
        try:
            msg = decode(frames, max_bytes=self.cfg.max_bytes)
            group = msg.body.get("group")
            g = self.groups.get(group) if isinstance(group, str) else None
            msg = validate(msg, model=g.model if g is not None else None)
        except WireError as e:
            self._bad(self.planner_counters, e, "planner")
            return []
        self.planner_counters.received[msg.type] += 1
        self.planner_last_seen = self._now()
        body = msg.body
        if msg.type == WELCOME:
            inc = str(body["incarnation"])
            if self.planner_incarnation is not None and inc != self.planner_incarnation:
                self._bump(self.events, "planner_restarted")
                log.warning("planner restarted", incarnation=inc)
            self.planner_incarnation = inc
            if self.synced:
                return []  # an answer to a repeated agent_hello
            self.synced = True
            self._next_planner_hb = self._now() + self.cfg.heartbeat_s
            log.info("planner session up", incarnation=inc)
            up, self._pending_up = list(self._pending_up), deque()
            return self._membership_since_hello() + self._layouts_up() + up + self._flush_held()
        if msg.type == HEARTBEAT:
            inc = str(body["incarnation"])
            if self.planner_incarnation is not None and inc != self.planner_incarnation:
                log.warning("planner restarted", incarnation=inc, seen_in="heartbeat")
                self._bump(self.events, "planner_restarted")
                self.planner_incarnation = inc
                return self._resync("restarted")
            return []
        if msg.type == ERROR:
            code = body.get("code")
            log.warning("planner error", code=code, message=body.get("message"))
            if code in _RESYNC_CODES:
                return self._resync("hello_required")
            return []
        if msg.type == LAYOUT:
            return self._on_layout(body, msg.tensors["phy2log"], msg.tensors.get("share"))
        if msg.type == PREPARE:
            return self._on_prepare(msg)
        if msg.type == ABORT:
            return self._on_abort(msg)
        if msg.type == SCHEDULE:
            return self.set_schedule(
                Schedule(int(body["window_steps"]), int(body["record_steps"]), body["enabled"])
            )
        self._bad(
            self.planner_counters,
            WireError("bad_field", f"{msg.type} is not a planner-to-agent message"),
            "planner",
            msg.type,
        )
        return []

    def _membership_since_hello(self) -> list[Send]:
        """worker_joined / worker_left for what changed between our agent_hello and its
        welcome (those messages were not sent while the session was down): new workers, and
        workers that serve another epoch than the agent_hello said."""
        out: list[Send] = []
        now = {(w.worker, w.incarnation): w for w in self.workers.values()}
        for key, w in now.items():
            if self._hello_members.get(key) != w.epoch:
                out.append(Send(PLANNER, WORKER_JOINED, self._joined_body(w)))
        for worker, inc in set(self._hello_members) - set(now):
            gone = self._gone.get((worker, inc))
            if gone is not None:
                out.append(Send(PLANNER, WORKER_LEFT, gone))
        self._hello_members = {k: w.epoch for k, w in now.items()}
        return out

    def _layouts_up(self) -> list[Send]:
        """The committed layouts this agent knows, for a planner that may have lost some
        (``layout`` agent -> planner: it adopts an epoch its ranks serve but it cannot
        restore)."""
        return [
            Send(
                PLANNER,
                LAYOUT,
                {"agent": self.cfg.agent_id, "group": n, "epoch": g.epoch},
                _layout_tensors(g.phy2log, g.share),
            )
            for n, g in self.groups.items()
            if g.epoch > 0 and g.phy2log is not None and self.local_ranks(n)
        ]

    def _flush_held(self) -> list[Send]:
        out = []
        for g in self.groups.values():
            while g.held:
                out.append(self._snapshot_send(g.held.popleft()))
        return out

    def _on_layout(
        self, body: dict[str, Any], phy2log: np.ndarray, share: np.ndarray | None
    ) -> list[Send]:
        name, epoch = str(body["group"]), int(body["epoch"])
        g = self._group(name)
        if g is None:
            return []
        if epoch > g.epoch or (epoch == g.epoch and g.phy2log is None and epoch > 0):
            g.epoch, g.phy2log = epoch, np.ascontiguousarray(phy2log, dtype=np.int64)
            g.share = None if share is None else np.ascontiguousarray(share, dtype=np.int64)
            for e in [e for e in g.pending if e <= epoch]:
                del g.pending[e]
            log.info("layout from the planner", group=name, epoch=epoch)
        elif epoch < g.epoch:  # the same epoch again is the planner's usual resend, not this
            err = WireError("stale_epoch", f"layout epoch {epoch} < held {g.epoch} of {name}")
            self._bad(self.planner_counters, err, "planner", LAYOUT)
        return []

    def _on_prepare(self, msg: Message) -> list[Send]:
        body = msg.body
        name, epoch = str(body["group"]), int(body["epoch"])
        g = self.groups.get(name)
        targets = self._workers_of(name)
        if g is None or not targets:
            self._bump(self.dropped, "prepare:no_local_workers")
            log.warning("prepare for a group without local workers", group=name, epoch=epoch)
            return []
        if epoch <= g.epoch:
            err = WireError("stale_epoch", f"prepare epoch {epoch} <= committed {g.epoch}")
            self._bad(self.planner_counters, err, "planner", PREPARE)
            return []
        p2l = np.ascontiguousarray(msg.tensors["phy2log"], dtype=np.int64)
        g.pending[epoch] = (p2l, msg.tensors.get("share"))
        while len(g.pending) > _MAX_PENDING:
            g.pending.popitem(last=False)
        out_body = {k: v for k, v in body.items() if k not in ("schema", "tensors")}
        self._bump(self.relayed, f"{PREPARE}:down", len(targets))
        # other tensors (the optional `share`, or fields of a later version) go down unchanged
        others = {k: v for k, v in msg.tensors.items() if k != "phy2log"}
        forms = narrow_phy2log_each(p2l, [w.phy2log_dtypes for w in targets])
        return [
            Send(WORKER, PREPARE, out_body, {**others, "phy2log": form}, identity=w.identity)
            for w, form in zip(targets, forms, strict=True)
        ]

    def _on_abort(self, msg: Message) -> list[Send]:
        body = msg.body
        name, epoch = str(body["group"]), int(body["epoch"])
        g = self.groups.get(name)
        if g is not None:
            g.pending.pop(epoch, None)
        targets = self._workers_of(name)
        if not targets:
            self._bump(self.dropped, "abort:no_local_workers")
            log.warning("abort for a group without local workers", group=name, epoch=epoch)
            return []
        out_body = {k: v for k, v in body.items() if k not in ("schema", "tensors")}
        self._bump(self.relayed, f"{ABORT}:down", len(targets))
        return [Send(WORKER, ABORT, out_body, identity=w.identity) for w in targets]

    def set_schedule(self, schedule: Schedule) -> list[Send]:
        """Change the recording schedule and tell every worker (``schedule`` messages)."""
        schedule.check()
        if schedule == self.schedule:
            return []
        self.schedule = schedule
        log.info("schedule", **schedule.body())
        return [
            Send(WORKER, SCHEDULE, schedule.body(), identity=w.identity)
            for w in self.workers.values()
        ]

    # --- timers -------------------------------------------------------------------------

    def tick(self) -> list[Send]:
        """Run the timers; call at least every ``min(heartbeat_s, merge_timeout_s) / 2``."""
        now = self._now()
        out: list[Send] = []
        if self._last_tick is not None and now - self._last_tick >= self.cfg.stall_after_s:
            out += self._resumed(now - self._last_tick)
        self._last_tick = now
        for w in list(self.workers.values()):
            # dead workers (any message refreshes last_seen)
            if now - w.last_seen >= self.cfg.dead_s:
                out += self._remove(w, "timeout")
            # an epoch a worker's heartbeats report and no committed brought in time
            elif w.claimed > w.epoch and now - w.claimed_at >= self.cfg.heartbeat_s:
                out += self._serves(w, w.claimed)
        # merge timeouts and windows completed by a rank leaving
        out += self._forward(self.merger.expire(now, self.local_ranks))
        # heartbeats to workers
        if now >= self._next_worker_hb:
            self._next_worker_hb = now + self.cfg.heartbeat_s
            hb = self._hb_body()
            out += [Send(WORKER, HEARTBEAT, hb, identity=w.identity) for w in self.workers.values()]
        if not self.cfg.has_planner:
            return out
        # planner session
        if self.synced:
            last = self.planner_last_seen if self.planner_last_seen is not None else now
            if now - last >= self.cfg.dead_s:
                log.warning("planner silent: resynchronising", silent_s=round(now - last, 3))
                self._bump(self.events, "planner_lost")
                out += self._resync("silent")
            elif now >= self._next_planner_hb:
                self._next_planner_hb = now + self.cfg.heartbeat_s
                out.append(Send(PLANNER, HEARTBEAT, self._hb_body()))
        elif now >= self._next_hello:
            self._backoff = min(self._backoff * 2, self.cfg.hello_backoff_max_s)
            self._next_hello = now + self._backoff
            out.append(self.agent_hello())
        return out

    def _resumed(self, gap: float) -> list[Send]:
        """The agent did not run for ``gap`` seconds: its workers' silence is its own."""
        now = self._now()
        self._bump(self.events, "stalled")
        log.warning(
            "agent stalled: workers get a fresh dead timeout; resynchronising with the planner",
            stalled_s=round(gap, 3),
            workers=len(self.workers),
        )
        for w in self.workers.values():
            w.last_seen = now
        if self.synced and self.cfg.has_planner:
            return self._resync("stalled")
        return []

    def next_deadline(self) -> float:
        """When ``tick`` next has something to do (monotonic seconds), for the poll timeout."""
        t = min(self._next_worker_hb, self._next_planner_hb if self.synced else self._next_hello)
        if self.workers:
            t = min(t, min(w.last_seen for w in self.workers.values()) + self.cfg.dead_s)
        if self.merger.open_windows():
            t = min(t, self._now() + self.cfg.merge_timeout_s / 4)
        return t

    # --- introspection ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-able picture of the agent (workers, groups, planner session, counters)."""
        now = self._now()
        return {
            "agent": self.cfg.agent_id,
            "node": self.cfg.node,
            "incarnation": self.incarnation,
            "planner": {
                "synced": self.synced,
                "incarnation": self.planner_incarnation,
                "silent_s": None
                if self.planner_last_seen is None
                else round(now - self.planner_last_seen, 3),
            },
            "schedule": self.schedule.body(),
            "workers": [
                {
                    "worker": w.worker,
                    "incarnation": w.incarnation,
                    "group": w.group,
                    "ep_rank": w.ep_rank,
                    "epoch": w.epoch,
                    "silent_s": round(now - w.last_seen, 3),
                }
                for w in self.workers.values()
            ],
            "groups": {
                n: {
                    "epoch": g.epoch,
                    "has_layout": g.phy2log is not None,
                    "pending": list(g.pending),
                    "held_snapshots": len(g.held)
                    + sum(1 for u in self._unsent if u.body.get("group") == n),
                    "local_ranks": sorted(self.local_ranks(n)),
                }
                for n, g in self.groups.items()
            },
            "open_windows": self.merger.open_windows(),
            "pending_up": len(self._pending_up),
            "forwarded": dict(self.forwarded),
            "relayed": dict(self.relayed),
            "dropped": dict(self.dropped),
            "events": dict(self.events),
            "bad_worker": dict(self.worker_counters.bad),
            "bad_planner": dict(self.planner_counters.bad),
        }


def _layout_tensors(phy2log: np.ndarray, share: np.ndarray | None) -> dict[str, np.ndarray]:
    """A layout's tensors as they travel: phy2log, plus the weighted split if it has one."""
    return {"phy2log": phy2log} if share is None else {"phy2log": phy2log, "share": share}


def _kept_hello(body: dict[str, Any]) -> dict[str, Any]:
    """A validated hello with only the fields the agent keeps and relays (``_HELLO_FIELDS``),
    its ``phy2log_dtypes`` as the dtypes this version knows (at most three names)."""
    h = {k: v for k, v in body.items() if k in _HELLO_FIELDS}
    if PHY2LOG_FIELD in body:
        h[PHY2LOG_FIELD] = list(accepted_phy2log_dtypes(body))
    return h
