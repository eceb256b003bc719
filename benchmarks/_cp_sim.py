"""Simulated EP ranks for the control-plane benchmark (``bench_control_plane``).

A :class:`SimRank` is the worker side of docs/protocol.md with no model and no torch: a
DEALER (identity = its worker id) to its agent's real ``agent.sock`` and a PUSH to its
``snapshots.sock``, speaking the real messages (``hello``, ``heartbeat``, ``snapshot``,
``staged``, ``aborted``, ``committed`` up; ``welcome``, ``schedule``, ``prepare``, ``abort``,
``heartbeat``, ``error`` down, decoded and validated by ``eplbd.wire``). It does what
``eplbd_client`` does, rule for rule (``AgentLink`` and ``EplbClient``):

- link: ``hello`` at start and whenever the agent may have forgotten the worker (``error``
  ``hello_required``, a ``heartbeat`` or ``welcome`` with a new agent incarnation, the agent
  silent for 5 heartbeats, a control send that finds the agent gone), retried 0.1 s doubling
  to 2 s until ``welcome``; ``heartbeat`` every ``heartbeat_s`` while welcomed; the answers
  (``staged``/``aborted``/``committed``) held (256 at most) while not welcomed, sent after
  the ``welcome``; snapshots dropped and counted when the PUSH cannot take them;
- recording: one snapshot per window of the schedule (:func:`window_at`, the client's rule);
  a commit closes the open window and reopens it at the same step;
- the two-phase commit: a ``prepare`` (or a ``welcome`` with a newer layout) is checked for
  epoch order like ``EplbClient._stale``; staging takes ``staging_s`` (plus ``slow_s`` for a
  rank told to be slow) from receipt, then the rank answers ``staged``; ``abort`` marks the
  epoch failed.

**The consensus is emulated, not run.** The ranks of a group live in this one process and
step in lockstep (one step counter per group, ``steps_per_s``); every ``sync_interval``
steps :meth:`SimGroup.consensus` takes the MIN/MAX of every rank's validated epoch, staged
epoch, failed epoch and layout digest from a shared in-process structure (what the
all-reduce of ``EplbClient._consensus`` returns) and applies the client's decision to every
rank at that step: drop an epoch at or below the highest failed one, fail an epoch whose
layouts differ, apply an epoch every rank staged. A rank therefore applies an epoch only if
every rank of the group staged it, and all apply it at the same step. The pace of the
consensus is ``sync_interval / steps_per_s`` seconds. The weight source is the host-pool
kind (staging starts on receipt, not collectively).

Load: each group's logical load is a Zipf(1) share over experts mixed half and half with a
uniform one (so a top-8 token never needs an expert twice), a permutation per layer that
drifts (:class:`LoadModel`); a rank's counts for a window are that load split over the
replicas of the layout it serves, times its tokens, times a fixed per-rank noise.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from eplbd.wire import (
    ABORT,
    ABORTED,
    COMMITTED,
    ERROR,
    HEARTBEAT,
    HELLO,
    PHY2LOG_DTYPES,
    PHY2LOG_FIELD,
    PREPARE,
    PROTOCOL_ID,
    PROTOCOL_VERSION,
    SCHEDULE,
    SNAPSHOT,
    STAGED,
    WELCOME,
    ModelShape,
    SocketOptions,
    WireCounters,
    WireError,
    WireSocket,
    control_client,
    decode,
    encode,
    snapshot_sender,
    validate,
)

__all__ = [
    "LoadModel",
    "SimConfig",
    "SimGroup",
    "SimRank",
    "Simulator",
    "window_at",
]

# The client link's socket options (eplbd_client._agent_link), repeated here so that this
# module imports neither torch nor eplbd_client.
_CONTROL_OPTIONS = SocketOptions(sndhwm=1000, rcvhwm=1000, reconnect_ivl_max_ms=1000)
_SNAPSHOT_OPTIONS = SocketOptions(sndhwm=4, rcvhwm=4, reconnect_ivl_max_ms=1000, heartbeat_ivl_ms=0)
_HELLO_BACKOFF = (0.1, 2.0)
_DEAD_HEARTBEATS = 5.0
_PENDING_MAX = 256
_NOISE_VARIANTS = 8
_CLIENT_PREPARE_TIMEOUT_S = 300.0  # EplbClient's default, used for a welcome's layout


def window_at(step: int, window_steps: int, record_steps: int) -> tuple[int, int, int]:
    """The recording window that contains ``step``: (start, record_end, window_end).

    The client's rule (``eplbd_client._recorder``): windows are aligned on multiples of
    ``window_steps`` of the group's step counter, so every rank of a group records the same
    step ranges whenever it joined; forwards ``start .. record_end - 1`` are recorded.
    """
    start = step - step % window_steps
    return start, start + record_steps, start + window_steps


@dataclass(frozen=True)
class SimConfig:
    """What every simulated rank shares. DeepSeek-V3 by default: 58 layers, 256 experts,
    top-8; ``tokens_per_step`` per rank; ``steps_per_s`` the forward rate; ``sync_interval``
    the consensus period in steps; ``staging_s`` the time to stage a layout.

    ``legacy_windows``: the client's window rule before issue 14 (a window opens at the step
    the schedule arrives, so ranks welcomed at different steps record different windows);
    used to measure the code as it was. ``link_stagger_s``: each rank's link starts at a
    random time within this many seconds while its group already steps (engines start
    serving before every worker's agent link is welcomed). ``int64_layouts``: the ranks'
    hello declares no ``phy2log_dtypes``, as before issue 14 phase 2, so their agent sends
    every layout as int64 (148 KB a rank at EP 320) instead of int16.
    """

    num_layers: int = 58
    num_experts: int = 256
    top_k: int = 8
    tokens_per_step: int = 64
    steps_per_s: float = 20.0
    sync_interval: int = 16
    staging_s: float = 0.5
    heartbeat_s: float = 1.0
    drift_every_s: float = 10.0
    seed: int = 0
    legacy_windows: bool = False
    link_stagger_s: float = 0.0  # ranks connect at random times in [0, this) while stepping
    int64_layouts: bool = False


class LoadModel:
    """A skewed, drifting logical load [L, E] (shares summing to 1 per layer)."""

    def __init__(self, num_layers: int, num_experts: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.L, self.E = num_layers, num_experts
        zipf = 1.0 / np.arange(1, num_experts + 1)
        self.base = 0.5 * zipf / zipf.sum() + 0.5 / num_experts
        self.perm = np.stack([self.rng.permutation(num_experts) for _ in range(num_layers)])
        self.phase = 0
        self._shares = self._compute()

    def _compute(self) -> np.ndarray:
        out = np.empty((self.L, self.E))
        np.put_along_axis(out, self.perm, np.broadcast_to(self.base, self.perm.shape), axis=1)
        return out

    def shares(self) -> np.ndarray:
        return self._shares

    def drift(self, fraction: float = 0.1) -> None:
        """Swap ``fraction`` of the experts' places in every layer's popularity order."""
        n = max(1, min(self.E // 2, int(self.E * fraction)))
        for row in self.perm:
            idx = self.rng.choice(self.E, size=2 * n, replace=False)  # n disjoint pairs
            a, b = idx[:n], idx[n:]
            row[a], row[b] = row[b].copy(), row[a].copy()
        self.phase += 1
        self._shares = self._compute()


def slot_shares(shares: np.ndarray, phy2log: np.ndarray) -> np.ndarray:
    """Per physical slot, the share of a layer's routed tokens it receives [L, P]: an
    expert's share split evenly over its replicas."""
    L, E = shares.shape
    offs = (np.arange(L) * E)[:, None]
    cnt = np.bincount((phy2log + offs).ravel(), minlength=L * E).reshape(L, E)
    rows = np.arange(L)[:, None]
    return shares[rows, phy2log] / cnt[rows, phy2log]


def default_phy2log(num_layers: int, num_experts: int, num_slots: int) -> np.ndarray:
    """Epoch 0: slot p holds expert p mod E."""
    return np.tile(np.arange(num_slots, dtype=np.int64) % num_experts, (num_layers, 1))


def digest(phy2log: np.ndarray) -> int:
    """EplbClient's layout digest (CRC32 of the int64 phy2log, 31 bits)."""
    return zlib.crc32(np.ascontiguousarray(phy2log, dtype=np.int64).tobytes()) & 0x7FFFFFFF


@dataclass
class _Pending:
    epoch: int
    phy2log: np.ndarray
    digest: int
    deadline: float
    staged_at: float  # when staging completes (monotonic)
    staged: bool = False
    fail_reason: str = ""


@dataclass
class Stats:
    """Messages and bytes the simulated ranks sent (up) and received (down), by type."""

    msgs: dict[str, int] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int) -> None:
        self.msgs[key] = self.msgs.get(key, 0) + 1
        self.nbytes[key] = self.nbytes.get(key, 0) + n


def _frames_len(frames: list[Any]) -> int:
    return sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames)


class SimRank:
    """One simulated worker (see the module docstring). Driven by :class:`Simulator`."""

    def __init__(self, group: SimGroup, rank: int, node: str, agent_dir: str) -> None:
        self.group = group
        self.cfg = group.cfg
        self.rank = rank
        self.node = node
        self.agent_dir = agent_dir
        self.worker = f"{group.name}-r{rank}"
        self.incarnation = f"{self.worker}-{group.sim.run_id}"
        self.dealer: WireSocket | None = None
        self.push: WireSocket | None = None
        self.wire = WireCounters()
        # link state
        self.welcomed = False
        self.agent_incarnation: str | None = None
        self.last_rx = 0.0
        self.next_hello = 0.0
        self.backoff = _HELLO_BACKOFF[0]
        self.next_hb = 0.0
        self.held: deque[tuple[str, dict[str, Any]]] = deque()
        self.counts: dict[str, int] = {}
        # client state
        self.epoch = 0
        self.phy2log = group.default_p2l
        self.pending: _Pending | None = None
        self.failed_epoch = 0
        self.slow_s = 0.0  # extra staging time for the next prepare (the slow-rank fault)
        # recording
        self.schedule: tuple[int, int, bool] | None = None
        self.recording = False
        self.win_start = self.rec_end = self.win_end = 0
        self.seq = 0

    # --- sockets -----------------------------------------------------------------------------

    def open(self, ctx: zmq.Context[Any]) -> None:
        self.dealer = control_client(
            ctx,
            f"ipc://{self.agent_dir}/agent.sock",
            identity=self.worker,
            options=_CONTROL_OPTIONS,
            counters=self.wire,
        )
        self.push = snapshot_sender(
            ctx,
            f"ipc://{self.agent_dir}/snapshots.sock",
            options=_SNAPSHOT_OPTIONS,
            counters=self.wire,
        )
        self.rehello(time.monotonic())

    def close(self) -> None:
        for s in (self.dealer, self.push):
            if s is not None:
                s.close()

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def hello_body(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "worker": self.worker,
            "incarnation": self.incarnation,
            "group": self.group.name,
            "ep_rank": self.rank,
            "ep_size": self.group.ep_size,
            "node": self.node,
            "num_layers": c.num_layers,
            "num_logical_experts": c.num_experts,
            "num_physical_experts": self.group.num_slots,
            "epoch": self.epoch,
            "software_version": "sim",
            "protocol_version": PROTOCOL_VERSION,
            **({} if c.int64_layouts else {PHY2LOG_FIELD: list(PHY2LOG_DTYPES)}),
        }

    def _send(self, msg_type: str, body: dict[str, Any]) -> bool:
        assert self.dealer is not None
        frames = encode(msg_type, body)
        ok = self.dealer.send_frames(frames)
        if ok:
            self.group.sim.stats.add(f"up:{msg_type}", _frames_len(frames))
        return ok

    # --- the link ----------------------------------------------------------------------------

    def rehello(self, now: float) -> None:
        self.welcomed = False
        self.backoff = _HELLO_BACKOFF[0]
        self.next_hello = now

    def answer(self, msg_type: str, body: dict[str, Any]) -> None:
        """staged / aborted / committed: sent now if welcomed, else held for the welcome."""
        if self.welcomed and not self.held:
            if self._send(msg_type, body):
                return
            self._count("agent_unreachable")
            self.rehello(time.monotonic())
        if len(self.held) >= _PENDING_MAX:
            self.held.popleft()
            self._count("dropped_answer")
        self.held.append((msg_type, body))

    def _flush_held(self) -> None:
        while self.held and self.welcomed:
            t, b = self.held[0]
            if not self._send(t, b):
                self._count("agent_unreachable")
                self.rehello(time.monotonic())
                return
            self.held.popleft()

    def timers(self, now: float) -> None:
        hb = self.cfg.heartbeat_s
        if self.welcomed and now - self.last_rx >= _DEAD_HEARTBEATS * hb:
            self._count("agent_silent")
            self.rehello(now)
        if not self.welcomed and now >= self.next_hello:
            self._count("hellos")
            self._send(HELLO, self.hello_body())
            self.next_hello = now + self.backoff
            self.backoff = min(self.backoff * 2, _HELLO_BACKOFF[1])
        if self.welcomed and now >= self.next_hb:
            self.next_hb = now + hb
            body = {"sender": self.worker, "incarnation": self.incarnation, "epoch": self.epoch}
            self._send(HEARTBEAT, body)
        p = self.pending
        if p is not None and not p.staged and not p.fail_reason and now >= p.staged_at:
            p.staged = True
            self.answer(
                STAGED,
                {**self._ids(p.epoch), "ok": True, "reason": "", "staged_bytes": 1 << 20},
            )
            self.group.sim.note_staged(self.group, p.epoch, self.rank)

    def on_frames(self, frames: list[Any]) -> None:
        n = _frames_len(frames)
        try:
            msg = validate(decode(frames), model=self.group.model)
        except WireError as e:
            self._count(f"bad_{e.reason}")
            return
        now = time.monotonic()
        self.last_rx = now
        self.group.sim.stats.add(f"down:{msg.type}", n)
        b = msg.body
        if msg.type == HEARTBEAT:
            if self.agent_incarnation is not None and b["incarnation"] != self.agent_incarnation:
                self._count("agent_restarts")
                self.agent_incarnation = b["incarnation"]
                self.rehello(now)
            return
        if msg.type == ERROR:
            if b.get("code") == "hello_required":
                self._count("hello_required")
                self.rehello(now)
            else:
                self._count(f"error_{b.get('code')}")
            return
        if msg.type == WELCOME:
            self.agent_incarnation = str(b["incarnation"])
            self.welcomed = True
            self._flush_held()
            self.set_schedule(b["schedule"])
            if b["epoch"] > self.epoch:
                p2l = np.array(msg.tensors["phy2log"], dtype=np.int64)
                self.prepare(b["epoch"], p2l, now + _CLIENT_PREPARE_TIMEOUT_S, now)
            return
        if msg.type == SCHEDULE:
            self.set_schedule(b)
        elif msg.type == PREPARE:
            if b["group"] != self.group.name:
                self._count("wrong_group")
                return
            self.group.sim.note_prepare(self.group, b["epoch"], self.rank, now)
            p2l = np.array(msg.tensors["phy2log"], dtype=np.int64)
            self.prepare(b["epoch"], p2l, now + float(b["timeout_s"]), now)
        elif msg.type == ABORT:
            self.abort(int(b["epoch"]), str(b["reason"]) or "aborted by the planner")
        else:
            self._count("unexpected_type")

    # --- the client's commit rules -----------------------------------------------------------

    def _ids(self, epoch: int) -> dict[str, Any]:
        return {
            "group": self.group.name,
            "epoch": epoch,
            "ep_rank": self.rank,
            "worker": self.worker,
        }

    def _refuse(self, epoch: int, reason: str) -> None:
        self._count("refused")
        self.answer(ABORTED, {**self._ids(epoch), "reason": reason})

    def prepare(self, epoch: int, p2l: np.ndarray, deadline: float, now: float) -> None:
        """``EplbClient._prepare``: epoch order, then stage (host-pool source: at once)."""
        d = digest(p2l)
        p = self.pending
        if p is not None and p.epoch == epoch:
            if p.digest == d:
                return  # the same prepare twice
            self.failed_epoch = max(self.failed_epoch, epoch)
            p.fail_reason = p.fail_reason or f"conflicting layouts received for epoch {epoch}"
            self._refuse(epoch, p.fail_reason)
            return
        if epoch <= self.epoch:
            self._refuse(epoch, f"epoch {epoch} is not newer than the served epoch {self.epoch}")
            return
        if p is not None and epoch < p.epoch:
            self._refuse(epoch, f"epoch {epoch} is older than the pending epoch {p.epoch}")
            return
        if epoch <= self.failed_epoch:
            self._refuse(epoch, f"epoch {epoch} already failed in the group")
            return
        if p is not None:
            self.failed_epoch = max(self.failed_epoch, p.epoch)
            self._drop(p, p.fail_reason or f"superseded by epoch {epoch}")
        slow, self.slow_s = self.slow_s, 0.0
        self.pending = _Pending(epoch, p2l, d, deadline, now + self.cfg.staging_s + slow)

    def abort(self, epoch: int, reason: str) -> None:
        self.failed_epoch = max(self.failed_epoch, epoch)
        p = self.pending
        if p is not None and p.epoch <= epoch and not p.fail_reason:
            p.fail_reason = reason

    def _drop(self, p: _Pending, reason: str) -> None:
        if self.pending is p:
            self.pending = None
        self._count("aborted")
        self.answer(ABORTED, {**self._ids(p.epoch), "reason": reason})

    def contribution(self, now: float) -> tuple[int, int, int, int]:
        """(V, S, F, H) for the consensus round, after the deadline check."""
        p = self.pending
        if p is None:
            return 0, 0, self.failed_epoch, 0
        if p.epoch > self.failed_epoch and now > p.deadline:
            self.failed_epoch = p.epoch
            p.fail_reason = p.fail_reason or (
                f"deadline missed while {'staged' if p.staged else 'staging'}"
            )
        if p.fail_reason:
            self.failed_epoch = max(self.failed_epoch, p.epoch)
        return p.epoch, p.epoch if p.staged else 0, self.failed_epoch, p.digest

    def decide(
        self, vmin: int, vmax: int, smin: int, smax: int, f: int, hmin: int, hmax: int
    ) -> bool:
        """The client's decision after the all-reduce; True if this rank applied its epoch."""
        self.failed_epoch = max(self.failed_epoch, f)
        p = self.pending
        if p is None:
            return False
        e = p.epoch
        if e <= self.failed_epoch:
            self._drop(p, p.fail_reason or f"epoch {e} failed on another rank of the group")
        elif vmin == vmax == e and hmin != hmax:
            self.failed_epoch = e
            self._drop(p, f"ranks hold different layouts for epoch {e}")
        elif smin == smax == e:
            self._apply(p)
            return True
        return False

    def _apply(self, p: _Pending) -> None:
        step = self.group.step
        self._close_window(step)
        self.epoch, self.phy2log = p.epoch, p.phy2log
        self.pending = None
        self._count("commits")
        self.answer(COMMITTED, {**self._ids(p.epoch), "step": step})
        self._open_window(step, after_commit=True)

    # --- recording windows -------------------------------------------------------------------

    def set_schedule(self, body: dict[str, Any]) -> None:
        sched = (int(body["window_steps"]), int(body["record_steps"]), bool(body["enabled"]))
        if sched == self.schedule and not self.cfg.legacy_windows:
            return  # the same schedule again (a re-welcome): the window goes on
        step = self.group.step
        self._close_window(step)
        self.schedule = sched
        self._open_window(step)

    def _open_window(self, step: int, after_commit: bool = False) -> None:
        s = self.schedule
        if s is None or not s[2] or s[1] == 0:
            self.recording = False
            return
        W, R = s[0], s[1]
        if self.cfg.legacy_windows:
            self.win_start, self.rec_end, self.win_end = step, step + R, step + W
            self.recording = True
            return
        start, rec_end, win_end = window_at(step, W, R)
        if step == start or (after_commit and step < rec_end):
            # at a boundary, or a commit (every rank of the group at this same step)
            self.win_start, self.rec_end, self.win_end = step, rec_end, win_end
            self.recording = True
        else:  # joined mid-window: wait for the next group-wide boundary
            self.win_start = self.rec_end = self.win_end = win_end
            self.recording = False

    def _close_window(self, step: int) -> None:
        if self.recording and step > self.win_start:
            self._snapshot(self.win_start, step)
        self.recording = False

    def tick_window(self, step: int) -> None:
        if self.schedule is None:
            return
        if self.recording and step >= self.rec_end:
            self._snapshot(self.win_start, step)
            self.recording = False
        if step >= self.win_end:
            self._open_window(step)

    def _snapshot(self, start: int, end: int) -> None:
        assert self.push is not None
        tokens = (end - start) * self.cfg.tokens_per_step
        counts = self.group.counts(self, tokens)
        body = {
            "worker": self.worker,
            "incarnation": self.incarnation,
            "group": self.group.name,
            "ep_rank": self.rank,
            "seq": self.seq,
            "epoch": self.epoch,
            "step_start": start,
            "step_end": end,
            "tokens": tokens,
            "schema": 1,
            "tensors": [{"name": "counts", "dtype": "int32", "shape": list(counts.shape)}],
        }
        self.seq += 1
        # The documented frame layout (docs/protocol.md, "Frames"), built directly: the
        # same bytes eplbd.wire.encode makes, without a copy through torch.
        frames = [
            PROTOCOL_ID,
            bytes([PROTOCOL_VERSION]),
            SNAPSHOT.encode(),
            msgpack.packb(body, use_bin_type=True),
            counts.data,
        ]
        if self.push.send_frames(frames):
            self.group.sim.stats.add("up:snapshot", _frames_len(frames[:4]) + counts.nbytes)
        else:
            self._count("dropped_snapshot")


class SimGroup:
    """The ranks of one EP group: their shared step counter, the emulated consensus, the
    load model. ``ranks_per_node`` consecutive ranks share one agent."""

    def __init__(
        self,
        sim: Simulator,
        name: str,
        ep_size: int,
        slots_per_rank: int,
        agent_dirs: list[str],
        nodes: list[str],
        seed: int,
    ) -> None:
        self.sim = sim
        self.cfg = sim.cfg
        self.name = name
        self.ep_size = ep_size
        self.num_slots = ep_size * slots_per_rank
        c = self.cfg
        self.model = ModelShape(c.num_layers, c.num_experts, self.num_slots)
        self.default_p2l = default_phy2log(c.num_layers, c.num_experts, self.num_slots)
        self.load = LoadModel(c.num_layers, c.num_experts, seed)
        rng = np.random.default_rng(seed + 1)
        self.noise = [rng.uniform(0.8, 1.2, (c.num_layers, self.num_slots)) for _ in range(8)]
        self._shares_cache: dict[tuple[int, int], np.ndarray] = {}
        per_node = ep_size // len(agent_dirs)
        self.ranks = [
            SimRank(self, r, nodes[r // per_node], agent_dirs[r // per_node])
            for r in range(ep_size)
        ]
        self.step = 0
        self.paused = False

    def counts(self, rank: SimRank, tokens: int) -> np.ndarray:
        key = (rank.epoch, self.load.phase)
        ss = self._shares_cache.get(key)
        if ss is None:
            if len(self._shares_cache) > 16:
                self._shares_cache.clear()
            ss = slot_shares(self.load.shares(), rank.phy2log) * self.cfg.top_k
            self._shares_cache[key] = ss
        c = ss * (tokens * self.noise[rank.rank % _NOISE_VARIANTS])
        return np.minimum(c, tokens).astype(np.int32)

    def advance(self, now: float) -> None:
        """One forward step on every rank: the client's ``step()`` order (consensus round,
        then the recording window)."""
        self.step += 1
        st = self.step
        if st % self.cfg.sync_interval == 0:
            self.consensus(now)
        for r in self.ranks:
            r.tick_window(st)

    def consensus(self, now: float) -> None:
        contrib = [r.contribution(now) for r in self.ranks]
        vs = [c[0] for c in contrib]
        ss = [c[1] for c in contrib]
        hs = [c[3] for c in contrib]
        f = max(c[2] for c in contrib)
        applied = [
            r.decide(min(vs), max(vs), min(ss), max(ss), f, min(hs), max(hs)) for r in self.ranks
        ]
        if any(applied):
            self.sim.note_flip(self, self.ranks[0].epoch, self.step)

    def served(self) -> list[int]:
        return [r.epoch for r in self.ranks]


class Simulator:
    """Every simulated rank of every group, in one thread of this process.

    ``run(stop)`` opens the sockets and loops: receive what the agents sent, run the link
    timers, advance each group's step counter at ``steps_per_s``. Everything the benchmark
    reads (``stats``, ``events``, ranks' epochs) is written by that thread only.
    """

    def __init__(self, cfg: SimConfig, run_id: str) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.groups: list[SimGroup] = []
        self.stats = Stats()
        # per (group, epoch): first/last prepare receipt, staged times, the flip
        self.prepare_rx: dict[tuple[str, int], dict[int, float]] = {}
        self.staged_at: dict[tuple[str, int], dict[int, float]] = {}
        self.flips: dict[tuple[str, int], tuple[float, int]] = {}  # -> (wall, step)
        self.steps_late = 0
        self.hooks: list[Callable[[], None]] = []
        self._ctx: zmq.Context[Any] | None = None

    def add_group(
        self,
        name: str,
        ep_size: int,
        slots_per_rank: int,
        agent_dirs: list[str],
        nodes: list[str],
    ) -> SimGroup:
        g = SimGroup(
            self,
            name,
            ep_size,
            slots_per_rank,
            agent_dirs,
            nodes,
            self.cfg.seed + len(self.groups) * 101,
        )
        self.groups.append(g)
        return g

    def ranks(self) -> list[SimRank]:
        return [r for g in self.groups for r in g.ranks]

    # events (wall times, for the report)
    def note_prepare(self, g: SimGroup, epoch: int, rank: int, now: float) -> None:
        self.prepare_rx.setdefault((g.name, epoch), {}).setdefault(rank, time.time())

    def note_staged(self, g: SimGroup, epoch: int, rank: int) -> None:
        self.staged_at.setdefault((g.name, epoch), {})[rank] = time.time()

    def note_flip(self, g: SimGroup, epoch: int, step: int) -> None:
        self.flips[(g.name, epoch)] = (time.time(), step)

    def run(self, stop: Any, started: Any = None) -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        ctx.set(zmq.MAX_SOCKETS, 65536)
        self._ctx = ctx
        ranks = self.ranks()
        rng = np.random.default_rng(self.cfg.seed)
        t0 = time.monotonic()
        starts = sorted(
            ((t0 + float(rng.uniform(0, self.cfg.link_stagger_s)), i) for i in range(len(ranks))),
            reverse=True,
        )
        opened: list[SimRank] = []
        try:
            poller = zmq.Poller()
            by_sock: dict[Any, SimRank] = {}
            if started is not None:
                started.set()
            period = 1.0 / self.cfg.steps_per_s
            next_step = {g.name: t0 + period for g in self.groups}
            next_timers = t0
            next_drift = t0 + self.cfg.drift_every_s
            while not stop.is_set():
                now = time.monotonic()
                while starts and starts[-1][0] <= now:
                    r = ranks[starts.pop()[1]]
                    r.open(ctx)
                    assert r.dealer is not None
                    poller.register(r.dealer.socket, zmq.POLLIN)
                    by_sock[r.dealer.socket] = r
                    opened.append(r)
                wake = min(min(next_step.values()), next_timers)
                events = poller.poll(max(0, int((wake - now) * 1000)))
                for sock, _ in events:
                    r = by_sock[sock]
                    for _ in range(64):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        r.on_frames(frames)
                now = time.monotonic()
                if now >= next_timers:
                    next_timers = now + 0.02
                    for r in opened:
                        r.timers(now)
                    while self.hooks:
                        self.hooks.pop(0)()
                if now >= next_drift:
                    next_drift = now + self.cfg.drift_every_s
                    for g in self.groups:
                        g.load.drift()
                for g in self.groups:
                    if g.paused:
                        next_step[g.name] = now + period
                        continue
                    if now >= next_step[g.name]:
                        g.advance(now)
                        next_step[g.name] += period
                        if next_step[g.name] < now:  # behind: do not burst, note it
                            self.steps_late += 1
                            next_step[g.name] = now + period
        finally:
            for r in opened:
                r.close()
            ctx.destroy(linger=0)
