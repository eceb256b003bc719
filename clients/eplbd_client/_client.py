"""EplbClient: the per-rank half of eplbd that lives inside an inference engine."""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import queue
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from eplbd.kernels import map_and_record as _map_and_record
from eplbd.layout import Layout, LayoutError
from eplbd_client._messages import (
    PHY2LOG_DTYPES,
    PROTOCOL_VERSION,
    AbortMsg,
    BadMessage,
    PrepareMsg,
    Schedule,
    WelcomeMsg,
    is_int_in,
    is_positive_finite,
    parse_incoming,
)
from eplbd_client._plan import LayerStage, local_stage_plan
from eplbd_client._recorder import Recorder
from eplbd_client._sources import FetchRequest, PeerWeightSource, WeightSource

__all__ = ["EplbClient", "LayerState", "PrepareError"]

_log = logging.getLogger("eplbd_client")

_VALIDATED, _STAGING, _STAGED = "validated", "staging", "staged"
_INBOX_MAX = 1024


class PrepareError(ValueError):
    """A layout was refused (bad layout, stale epoch, over budget); nothing was staged.

    ``epoch`` is the refused epoch, ``reason`` the message reported to the planner."""

    def __init__(self, epoch: int, reason: str) -> None:
        super().__init__(f"epoch {epoch} refused: {reason}")
        self.epoch = epoch
        self.reason = reason


class LayerState(NamedTuple):
    """The four routing tensors of one MoE layer, at fixed addresses (vLLM's
    ``set_layer_state`` shape). Views into the client's [L, ...] tensors on its device.

    logical_to_physical_map: [E, R] int64, the dispatch table (:meth:`Layout.dispatch`):
        the slots of each expert ascending, each listed as often as its share (once with
        the equal split), padded with -1;
    logical_replica_count: [E] int64, the entries of each expert's row (its replica count
        with the equal split);
    expert_load: [P] int32, tokens per physical slot while recording;
    should_record: [1] int32, shared by all layers (non-zero: count).
    """

    logical_to_physical_map: torch.Tensor
    logical_replica_count: torch.Tensor
    expert_load: torch.Tensor
    should_record: torch.Tensor


@dataclass(eq=False)
class _Pending:
    """A validated layout waiting to be staged / applied. Guarded by the client's lock."""

    epoch: int
    layout: Layout
    base: Layout
    digest: int
    deadline: float | None
    plan: dict[int, LayerStage]
    staged_bytes: int
    state: str = _VALIDATED
    cancelled: bool = False
    fail_reason: str = ""
    buffers: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    slot_index: dict[int, torch.Tensor] = field(default_factory=dict)
    maps: tuple[torch.Tensor, torch.Tensor] | None = None
    event: Any = None


def _digest(layout: Layout) -> int:
    """31 bits of CRC32 over phy2log, then the shares when the split is weighted (an
    equal-split layout keeps the digest of a client that knows no shares)."""
    crc = zlib.crc32(layout.phy2log.contiguous().numpy().tobytes())
    if layout.share is not None:
        crc = zlib.crc32(layout.share.contiguous().numpy().tobytes(), crc)
    return crc & 0x7FFFFFFF


class EplbClient:
    """Routing state, load recording and layout changes of one EP rank.

    **Routing state.** Per layer ``log2phy [E, R]`` (R fixed at construction: ``max_replicas``
    or P - E + 1, the most any expert can have), ``logcnt [E]``, load counters ``[P]`` and one
    shared ``should_record`` flag, all on ``device`` at addresses that never change, so engines
    may hand them to kernels and capture them in CUDA graphs.

    **step().** The engine calls it once per forward step on every rank, after the forward
    (dummy steps included). Usually it only counts: the work happens at precomputed steps
    (window edges, every ``sync_interval``-th step) or when the IO thread delivered something.
    At a window edge it flips ``should_record`` with an in-place fill on the device and ships
    the counters (async device-to-host copy into pinned memory on CUDA, shipped by a later
    step once the copy is done; counters zeroed in place).

    **Two-phase commit and consensus.** ``prepare`` (called by the engine, or on the agent's
    PREPARE) validates the layout and computes what this rank must stage; staging runs on a
    staging thread. Every ``sync_interval`` steps every rank takes part in one all-reduce
    (MAX) of ``[-V, V, -S, S, F, -H, H]`` on a CPU (gloo) group of the EP ranks: V the epoch
    this rank has validated, S the epoch it has fully staged (0 for none), F the highest
    epoch it knows to have failed, H a digest of the pending layout. Every rank then takes
    the same decision from the same numbers:

    - pending epoch <= max F (a rank missed its deadline, got ABORT, refused the layout, or
      moved on to a newer epoch): every rank drops it and keeps serving the old layout. A
      failed epoch number is never reused (the planner retries with a new epoch).
    - MIN(S) == MAX(S) == e with equal digests: every rank applies e now, before its next
      forward: in-place copies of the staged weights, then of the maps, on the compute stream.
    - collective weight source (peer-to-peer) and MIN(V) == MAX(V) == e: every rank starts
      staging e on its staging thread now. Ranks that received PREPARE at different steps thus
      enter the collective transfers together; a rank that has not validated holds everyone
      back, and nobody waits for a message that may never come.

    Contributions and decisions happen under one lock in one ``step()``, so nothing a rank
    does between rounds (a new prepare, a deadline) can split the group. The consensus group
    is ``cpu_group`` if given, else ``group`` when it is gloo, else a gloo group the
    constructor creates over the same ranks: the round never synchronises with the GPU. With
    ``ep_size == 1`` there is no round: a staged layout is applied at the next ``step()``.

    **Threads.** The serving thread (``step``, ``map_and_record``), the agent link's IO
    thread (``deliver``: parse and enqueue only; outgoing messages go to ``outbox``, a bounded
    queue filled with ``put_nowait``), and one staging thread, started on the first layout
    change. Without an agent nothing records, no thread starts and no socket opens.

    Constructing the client is collective over the EP group when it must create groups (no
    gloo ``cpu_group``, or a :class:`PeerWeightSource` without its own group): every rank of
    the group constructs it in the same order.
    """

    def __init__(
        self,
        num_layers: int,
        num_logical_experts: int,
        num_physical_experts: int,
        ep_rank: int = 0,
        ep_size: int = 1,
        agent: str | None = None,
        device: str | torch.device = "cpu",
        group: Any = None,
        *,
        initial_layout: torch.Tensor | Layout | None = None,
        initial_epoch: int = 0,
        sync_interval: int = 16,
        weight_source: WeightSource | None = None,
        cpu_group: Any = None,
        max_replicas: int | None = None,
        staging_budget_bytes: int | None = None,
        prepare_timeout_s: float = 300.0,
        require_weights: bool = True,
        top_k: int | None = None,
        group_name: str = "default",
        worker: str | None = None,
        node: str | None = None,
        outbox_size: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        L, E, P, G = num_layers, num_logical_experts, num_physical_experts, ep_size
        if min(L, E, P, G) < 1 or P < E or P % G != 0:
            raise ValueError(f"bad model/group shape L={L} E={E} P={P} ep_size={G}")
        if not 0 <= ep_rank < G:
            raise ValueError(f"ep_rank {ep_rank} outside [0, {G})")
        if sync_interval < 0:
            raise ValueError("sync_interval must be >= 0 (0 disables layout changes when G > 1)")
        R = P - E + 1 if max_replicas is None else int(max_replicas)
        if not 1 <= R <= P - E + 1:
            raise ValueError(f"max_replicas must be in [1, {P - E + 1}], got {R}")
        self.num_layers, self.num_logical_experts, self.num_physical_experts = L, E, P
        self.ep_rank, self.ep_size = ep_rank, G
        self.slots_per_rank = P // G
        self.max_replicas = R
        self.sync_interval = sync_interval
        self.group_name = group_name
        self.incarnation = uuid.uuid4().hex
        self.node = node or socket.gethostname()
        self.worker = worker or f"{self.node}:{os.getpid()}:{ep_rank}"
        self._device = torch.device(device)
        if self._device.type == "cuda" and self._device.index is None:
            # Threads (staging) must name the device: "cuda" alone means "current" only here.
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._cuda = self._device.type == "cuda"
        self._clock = clock
        self._prepare_timeout_s = float(prepare_timeout_s)
        self._budget = staging_budget_bytes
        self._require_weights = require_weights
        self._top_k = top_k
        self._group = group

        layout = self._initial_layout(initial_layout)
        self._layout = layout
        self._epoch = int(initial_epoch)
        dev = self._device
        table, count = layout.dispatch(width=R)
        self._log2phy = table.to(dev, torch.int64).clone()
        self._logcnt = count.to(dev, torch.int64).clone()
        self._load = torch.zeros(L, P, dtype=torch.int32, device=dev)
        self._should_record = torch.zeros(1, dtype=torch.int32, device=dev)
        self._states = [
            LayerState(self._log2phy[i], self._logcnt[i], self._load[i], self._should_record)
            for i in range(L)
        ]
        self._weights: dict[int, list[torch.Tensor]] = {}

        self.outbox: queue.Queue[tuple[str, dict[str, Any], dict[str, torch.Tensor]]] = queue.Queue(
            maxsize=outbox_size
        )
        self._inbox: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._stats: collections.Counter[str] = collections.Counter()
        self._stats_lock = threading.Lock()

        self._step = 0
        self._next_check = 0
        self._pending: _Pending | None = None
        self._failed_epoch = 0
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._side_stream: Any = None
        self._last_apply_event: Any = None
        self._closed = False

        self._seq = 0
        self._recorder = Recorder(
            self._load,
            self._should_record,
            self._ship,
            functools.partial(self._count, "snapshots_dropped"),
        )

        self._cgroup: Any = None
        if G > 1:
            if group is None:
                raise ValueError("ep_size > 1 needs the EP process group (group=)")
            self._check_group(group)
            if sync_interval > 0:
                self._cgroup = self._consensus_group(group, cpu_group)
        self._source = weight_source if weight_source is not None else PeerWeightSource()
        self._source.bind(ep_rank=ep_rank, ep_size=G, group=group, device=dev)
        self._collective = bool(self._source.collective) and G > 1
        self._cbuf = torch.zeros(7, dtype=torch.int64)
        self._reschedule()

        self._link: Any = None
        if agent is not None:
            from eplbd_client._agent_link import AgentLink

            self._link = AgentLink(
                agent, deliver=self.deliver, outbox=self.outbox, hello=self.hello_body
            )
            self._link.start()

    # --- construction helpers ----------------------------------------------------------------

    def _initial_layout(self, initial: torch.Tensor | Layout | None) -> Layout:
        L, E, P = self.num_layers, self.num_logical_experts, self.num_physical_experts
        layout = Layout.default(L, E, P) if initial is None else self._validate(initial)
        self._check_width(layout)
        return layout

    def _check_width(self, layout: Layout) -> None:
        """The layout's dispatch table must fit the routing maps (R entries per expert)."""
        if layout.dispatch_width > self.max_replicas:
            what = "replicas" if layout.share is None else "dispatch entries (shares)"
            raise LayoutError(
                f"an expert has {layout.dispatch_width} {what}, more than "
                f"max_replicas={self.max_replicas}"
            )

    def _check_group(self, group: Any) -> None:
        import torch.distributed as dist

        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if size != self.ep_size or rank != self.ep_rank:
            raise ValueError(
                f"group has size {size} and rank {rank}, client says ep_size={self.ep_size} "
                f"ep_rank={self.ep_rank}"
            )

    @staticmethod
    def _consensus_group(group: Any, cpu_group: Any) -> Any:
        import torch.distributed as dist

        if cpu_group is not None:
            return cpu_group
        if str(dist.get_backend(group)) == "gloo":
            return group
        ranks = dist.get_process_group_ranks(group)
        return dist.new_group(ranks, backend="gloo", use_local_synchronization=True)

    # --- what engines use on the hot path ------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The layout epoch now being served (0: the initial layout)."""
        return self._epoch

    @property
    def step_count(self) -> int:
        """Forward steps completed (calls to :meth:`step`)."""
        return self._step

    def layer_state(self, layer: int) -> LayerState:
        """The four routing tensors of ``layer`` (fixed addresses)."""
        return self._states[layer]

    def map_and_record(
        self, layer: int, topk_ids: torch.Tensor, num_valid_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Physical slot ids for routed logical ids ``topk_ids [T, K]``; counts while recording.

        Calls :func:`eplbd.kernels.map_and_record` with this layer's state. No host sync."""
        st = self._states[layer]
        if topk_ids.dim():
            self._top_k = topk_ids.shape[-1]
        return _map_and_record(
            topk_ids,
            st.logical_to_physical_map,
            st.logical_replica_count,
            st.expert_load,
            st.should_record,
            num_valid_tokens,
        )

    def step(self) -> None:
        """Call once per forward step, on every rank, after the forward (dummy steps too)."""
        self._step += 1
        if self._step < self._next_check and not self._inbox:
            return
        self._slow_step()

    # --- registration and layout changes -------------------------------------------------------

    def register_expert_weights(self, layer: int, tensors: Sequence[torch.Tensor]) -> None:
        """This rank's slot-major expert tensors of ``layer`` (each ``[S, ...]``, contiguous,
        on the client's device), e.g. ``[w13 [S, 2F, H], w2 [S, H, F]]``. A commit overwrites
        the rows of the slots that change, in place."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.num_layers})")
        ts = list(tensors)
        if not ts:
            raise ValueError("register at least one weight tensor")
        S = self.slots_per_rank
        for i, t in enumerate(ts):
            if t.dim() < 1 or t.shape[0] != S:
                raise ValueError(
                    f"tensor {i} of layer {layer} must be [S={S}, ...], got {tuple(t.shape)}"
                )
            if t.device.type != self._device.type or (
                self._device.index is not None and t.device.index != self._device.index
            ):
                raise ValueError(
                    f"tensor {i} of layer {layer} is on {t.device}, client on {self._device}"
                )
            if not t.is_contiguous():
                raise ValueError(f"tensor {i} of layer {layer} must be contiguous")
        with self._lock:
            self._weights[layer] = ts
            p = self._pending
            if p is not None and p.epoch > self._failed_epoch:
                # its buffers were (or are being) staged for the tensors registered before:
                # applying them to these could change some layers' weights and not others.
                # The epoch fails on every rank at the next consensus round; the old layout
                # stays, and the planner may prepare again.
                self._failed_epoch = p.epoch
                p.fail_reason = p.fail_reason or (
                    f"expert weights of layer {layer} registered again while epoch "
                    f"{p.epoch} was pending"
                )
        self._wake()

    def prepare(
        self,
        phy2log: torch.Tensor | Layout,
        epoch: int,
        timeout_s: float | None = None,
        *,
        share: torch.Tensor | None = None,
    ) -> None:
        """Validate the layout of ``epoch`` and start staging it (what the agent's PREPARE
        does). Call it on every rank, at any step: the consensus flips all ranks together.

        ``phy2log`` [L, P] or a :class:`Layout`; ``share`` [L, P] (or the Layout's own
        ``share``): the weighted split of each expert's rows over its replicas (None: equal).
        A layout that changes only the shares moves no weights: nothing is staged but the
        maps, and it is applied at the same step on every rank like any other.
        ``timeout_s``: from now; None means the client's ``prepare_timeout_s``. Raises
        :class:`PrepareError` if refused (bad layout or shares, epoch not newer, over the
        staging budget); the refusal is also reported (``aborted``) and nothing is staged.
        Raises ValueError for a ``timeout_s`` that is not a finite number > 0."""
        if timeout_s is not None and not is_positive_finite(timeout_s):
            # NaN would never expire, a negative one expire unseen: refused, nothing staged
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        t = self._prepare_timeout_s if timeout_s is None else float(timeout_s)
        err = self._prepare(phy2log, epoch, self._clock() + t, share)
        if err is not None:
            raise PrepareError(int(epoch) if isinstance(epoch, int) else -1, err)

    def abort(self, epoch: int, reason: str = "aborted") -> None:
        """Give up ``epoch`` (what the planner's ABORT does): its staged data is dropped at the
        next consensus round on every rank, and the old layout stays. Too late once the group
        has agreed to apply it. Raises ValueError for an epoch that is not an integer in
        [0, 2**63 - 1] (the consensus carries epochs in int64)."""
        if not is_int_in(epoch, 0):
            raise ValueError(f"epoch {epoch!r} is not an integer in [0, 2**63 - 1]")
        with self._lock:
            if epoch > self._failed_epoch:
                self._failed_epoch = epoch
            p = self._pending
            if p is not None and p.epoch <= epoch and not p.fail_reason:
                p.fail_reason = reason
        self._count("aborts_received")
        self._wake()

    def set_schedule(self, window_steps: int, record_steps: int, enabled: bool = True) -> None:
        """Record ``record_steps`` of every ``window_steps`` steps (what the agent's
        ``schedule`` does); takes effect at the next :meth:`step`. Thread-safe."""
        from eplbd_client._messages import parse_schedule

        s = parse_schedule(
            {"window_steps": window_steps, "record_steps": record_steps, "enabled": enabled}
        )
        self._inbox.append(s)

    # --- agent link side -----------------------------------------------------------------------

    def deliver(
        self, msg_type: str, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> None:
        """Hand a message from the agent to the client (any thread; never raises, never blocks).

        welcome, schedule, prepare, abort. Malformed or unexpected messages are counted
        (``stats['dropped_<reason>']``), logged and dropped."""
        try:
            msg = parse_incoming(
                msg_type, body, tensors, (self.num_layers, self.num_physical_experts)
            )
            if isinstance(msg, PrepareMsg | AbortMsg) and msg.group != self.group_name:
                raise BadMessage("wrong_group", f"group {msg.group!r} is not {self.group_name!r}")
            if len(self._inbox) >= _INBOX_MAX:
                raise BadMessage("inbox_full", f"{len(self._inbox)} messages not yet handled")
            if isinstance(msg, PrepareMsg):
                self._inbox.append((msg, self._clock() + msg.timeout_s))
            else:
                self._inbox.append(msg)
            self._count(f"received_{msg_type}")
        except BadMessage as e:
            self._count(f"dropped_{e.reason}")
            _log.warning("eplbd_client: dropped %r message from the agent: %s", msg_type, e)
        except Exception:  # never raise into the IO thread
            self._count("dropped_error")
            _log.exception("eplbd_client: failed to handle %r message", msg_type)

    def hello_body(self) -> dict[str, Any]:
        """The ``hello`` body the agent link sends on (re)connect."""
        from eplbd import __version__

        return {
            "worker": self.worker,
            "incarnation": self.incarnation,
            "group": self.group_name,
            "ep_rank": self.ep_rank,
            "ep_size": self.ep_size,
            "node": self.node,
            "num_layers": self.num_layers,
            "num_logical_experts": self.num_logical_experts,
            "num_physical_experts": self.num_physical_experts,
            "epoch": self._epoch,
            "software_version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "phy2log_dtypes": list(PHY2LOG_DTYPES),
        }

    # --- introspection -------------------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        """The layout now served (CPU tensors)."""
        return self._layout

    @property
    def pending_epoch(self) -> int | None:
        p = self._pending
        return p.epoch if p is not None else None

    @property
    def staged_epoch(self) -> int | None:
        p = self._pending
        return p.epoch if p is not None and p.state == _STAGED else None

    @property
    def staged_bytes(self) -> int:
        """Bytes of staging memory held now (0 when nothing is staged)."""
        with self._lock:
            p = self._pending
            if p is None or p.state != _STAGED:
                return 0
            return sum(b.numel() * b.element_size() for bs in p.buffers.values() for b in bs)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: commits, aborts, refusals, snapshots, drops per reason, ..."""
        with self._stats_lock:
            return dict(self._stats)

    def close(self) -> None:
        """Stop the agent link and the staging thread. The routing state stays usable."""
        if self._closed:
            return
        self._closed = True
        if self._link is not None:
            self._link.close(timeout=10.0)
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                _log.warning("eplbd: the staging thread did not stop within 30 s")
        self._source.close()

    def __enter__(self) -> EplbClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals: messages and threads -------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        # a report's counter moves after its _send: whoever sees the count sees it queued
        with self._stats_lock:
            self._stats[key] += n

    def _wake(self) -> None:
        self._inbox.append(None)

    def _send(
        self, msg_type: str, body: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        try:
            self.outbox.put_nowait((msg_type, body, tensors or {}))
        except queue.Full:
            self._count("outbox_dropped")

    def _ids(self, epoch: int) -> dict[str, Any]:
        return {
            "group": self.group_name,
            "epoch": epoch,
            "ep_rank": self.ep_rank,
            "worker": self.worker,
        }

    def _submit(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._staging_loop, name=f"eplbd-staging-r{self.ep_rank}", daemon=True
            )
            self._thread.start()
        self._jobs.put(job)

    def _staging_loop(self) -> None:
        if self._cuda:
            torch.cuda.set_device(self._device)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                self._count("staging_errors")
                _log.exception("eplbd_client: staging job failed")

    # --- internals: prepare / stage / apply ----------------------------------------------------

    def _validate(self, phy2log: torch.Tensor | Layout, share: Any = None) -> Layout:
        L, E, P = self.num_layers, self.num_logical_experts, self.num_physical_experts
        if isinstance(phy2log, Layout):
            phy2log.validate_consistent()
            t: Any = phy2log.phy2log
            if share is None:
                share = phy2log.share
        else:
            t = phy2log
        layout = Layout.from_phy2log(
            t, E, num_gpus=self.ep_size, num_layers=L, num_physical_experts=P, share=share
        )
        if isinstance(phy2log, Layout) and phy2log.logcnt.shape != layout.logcnt.shape:
            raise LayoutError("logcnt shape does not match phy2log")
        return layout

    def _prepare(
        self, phy2log: torch.Tensor | Layout, epoch: Any, deadline: float, share: Any = None
    ) -> str | None:
        """Validate and install a pending layout. Returns the refusal reason, or None."""
        if not is_int_in(epoch, 1):
            return self._refuse(
                -1, f"epoch {epoch!r} is not an integer in [1, 2**63 - 1]", poison=False
            )
        if self._closed:
            return self._refuse(epoch, "the client is closed", poison=False)
        if self.ep_size > 1 and self._cgroup is None:
            return self._refuse(epoch, "layout changes are off (sync_interval=0)", poison=False)
        try:
            layout = self._validate(phy2log, share)
            self._check_width(layout)
        except LayoutError as e:
            return self._refuse(epoch, f"invalid layout: {e}")
        digest = _digest(layout)
        while True:
            base = self._layout
            with self._lock:
                stale = self._stale(epoch, digest)
            if stale is not None:
                return stale if stale else None
            plan = local_stage_plan(base.phy2log, layout.phy2log, self.ep_rank, self.ep_size)
            problem = self._check_stageable(base, layout, plan)
            if problem is not None:
                return self._refuse(epoch, problem)
            nbytes = self._plan_bytes(plan)
            if self._budget is not None and nbytes > self._budget:
                return self._refuse(
                    epoch, f"staging needs {nbytes} bytes, budget is {self._budget}"
                )
            with self._lock:
                if self._layout is not base:
                    continue  # a commit happened meanwhile: plan again against the new layout
                stale = self._stale(epoch, digest)
                if stale is not None:
                    return stale if stale else None
                old = self._pending
                if old is not None:
                    # The group drops the older epoch at its next round (F >= old.epoch).
                    self._failed_epoch = max(self._failed_epoch, old.epoch)
                    self._drop(old, old.fail_reason or f"superseded by epoch {epoch}")
                p = _Pending(epoch, layout, base, digest, deadline, plan, nbytes)
                self._pending = p
                if not self._collective:
                    p.state = _STAGING
                    self._submit(functools.partial(self._stage, p))
            self._count("prepared")
            self._wake()
            return None

    def _stale(self, epoch: int, digest: int) -> str | None:
        """Epoch-order checks (lock held). Returns a reason, "" for a harmless duplicate,
        or None if the epoch may be installed."""
        p = self._pending
        if p is not None and p.epoch == epoch:
            if p.digest == digest:
                self._count("duplicate_prepare")
                return ""
            self._failed_epoch = max(self._failed_epoch, epoch)
            if not p.fail_reason:
                p.fail_reason = f"conflicting layouts received for epoch {epoch}"
            return self._refuse_locked(epoch, p.fail_reason)
        if epoch <= self._epoch:
            return self._refuse_locked(
                epoch, f"epoch {epoch} is not newer than the served epoch {self._epoch}"
            )
        if p is not None and epoch < p.epoch:
            return self._refuse_locked(
                epoch, f"epoch {epoch} is older than the pending epoch {p.epoch}"
            )
        if epoch <= self._failed_epoch:
            return self._refuse_locked(
                epoch,
                f"epoch {epoch} already failed in the group (failed up to {self._failed_epoch})",
            )
        return None

    def _refuse(self, epoch: int, reason: str, poison: bool = True) -> str:
        with self._lock:
            if poison and epoch > self._epoch:
                self._failed_epoch = max(self._failed_epoch, epoch)
            return self._refuse_locked(epoch, reason)

    def _refuse_locked(self, epoch: int, reason: str) -> str:
        _log.warning("eplbd_client: rank %d refused epoch %d: %s", self.ep_rank, epoch, reason)
        if epoch >= 0:
            self._send("aborted", {**self._ids(epoch), "reason": reason})
        self._count("refused")
        return reason

    def _check_stageable(
        self, base: Layout, new: Layout, plan: dict[int, LayerStage]
    ) -> str | None:
        if not self._require_weights:
            return None
        changed = (base.phy2log != new.phy2log).any(dim=1).nonzero().flatten().tolist()
        missing = [layer for layer in changed if layer not in self._weights]
        if missing:
            return (
                f"layer(s) {missing[:8]} change but have no registered expert weights "
                f"(register_expert_weights)"
            )
        return None

    def _plan_bytes(self, plan: dict[int, LayerStage]) -> int:
        n = 0
        for layer, st in plan.items():
            for w in self._weights.get(layer, ()):
                n += len(st.slots) * w[0].numel() * w.element_size()
        return n + self._log2phy.numel() * 8 + self._logcnt.numel() * 8

    def _stage(self, p: _Pending) -> None:
        """Staging thread: fill p's buffers. Collective stagings always run to the end (every
        rank is in the same transfers); the result is discarded if p was dropped meanwhile."""
        if p.cancelled and not self._collective:
            return
        try:
            if self._cuda:
                if self._side_stream is None:
                    self._side_stream = torch.cuda.Stream(self._device)
                side = self._side_stream
                if self._last_apply_event is not None:
                    side.wait_event(self._last_apply_event)
                with torch.cuda.stream(side):
                    self._fill(p)
                    ev = torch.cuda.Event()
                    ev.record(side)
                ev.synchronize()
                p.event = ev
            else:
                self._fill(p)
        except Exception as e:
            _log.exception("eplbd_client: staging epoch %d failed", p.epoch)
            with self._lock:
                if self._pending is p:
                    self._failed_epoch = max(self._failed_epoch, p.epoch)
                    p.fail_reason = p.fail_reason or f"staging failed: {e}"
            self._wake()
            return
        with self._lock:
            if self._pending is not p or p.cancelled:
                p.buffers.clear()
                return
            p.state = _STAGED
        self._send(
            "staged",
            {**self._ids(p.epoch), "ok": True, "reason": "", "staged_bytes": p.staged_bytes},
        )
        self._count("staged")
        self._wake()

    def _fill(self, p: _Pending) -> None:
        dev = self._device
        out: dict[tuple[int, int], list[torch.Tensor]] = {}
        wanted: list[tuple[int, int]] = []
        setup_error: Exception | None = None
        try:
            for layer, st in p.plan.items():
                ws = self._weights.get(layer)
                if ws is None:
                    continue
                n = len(st.slots)
                bufs = [torch.empty((n, *w.shape[1:]), dtype=w.dtype, device=dev) for w in ws]
                p.buffers[layer] = bufs
                p.slot_index[layer] = torch.tensor(st.slots, dtype=torch.int64, device=dev)
                for i, (kind, arg) in enumerate(st.sources):
                    if kind == "local":
                        for b, w in zip(bufs, ws, strict=True):
                            b[i].copy_(w[arg])
                    elif kind == "fetch":
                        wanted.append((layer, arg))
                        out[(layer, arg)] = [b[i] for b in bufs]
        except Exception as e:  # e.g. out of memory: a collective source must still show up
            if not self._collective:
                raise
            setup_error = e
            p.buffers.clear()
        req = FetchRequest(
            epoch=p.epoch,
            ep_rank=self.ep_rank,
            ep_size=self.ep_size,
            old_phy2log=p.base.phy2log,
            new_phy2log=p.layout.phy2log,
            weights=self._weights,
            wanted=wanted if setup_error is None else [],
            out=out if setup_error is None else {},
            ready=setup_error is None,
        )
        self._source.fetch(req)
        if setup_error is not None:  # pragma: no cover - the collective source raised already
            raise setup_error
        for layer, st in p.plan.items():
            if layer not in p.buffers:
                continue
            bufs = p.buffers[layer]
            for i, (kind, arg) in enumerate(st.sources):
                if kind == "dup":
                    for b in bufs:
                        b[i].copy_(b[arg])
        table, count = p.layout.dispatch(width=self._log2phy.shape[2])
        nb = self._cuda
        p.maps = (table.to(dev, non_blocking=nb), count.to(dev, non_blocking=nb))

    def _drop(self, p: _Pending, reason: str) -> None:
        """Forget p (lock held): keep serving the old layout, report why."""
        p.cancelled = True
        if self._pending is p:
            self._pending = None
        if p.state != _STAGING:
            p.buffers.clear()
        p.maps = None
        _log.info("eplbd_client: rank %d dropped epoch %d: %s", self.ep_rank, p.epoch, reason)
        self._send("aborted", {**self._ids(p.epoch), "reason": reason})
        self._count("aborted")

    def _apply(self, p: _Pending) -> None:
        """Switch to p's layout before the next forward (serving thread, lock held)."""
        self._recorder.close(self._step, self._epoch)
        cur = None
        if self._cuda:
            cur = torch.cuda.current_stream(self._device)
            if p.event is not None:
                cur.wait_event(p.event)
        for layer, bufs in p.buffers.items():
            idx = p.slot_index[layer]
            for w, b in zip(self._weights[layer], bufs, strict=True):
                w.index_copy_(0, idx, b)
        assert p.maps is not None
        self._log2phy.copy_(p.maps[0], non_blocking=True)
        self._logcnt.copy_(p.maps[1], non_blocking=True)
        if cur is not None:
            for bufs in p.buffers.values():
                for b in bufs:
                    b.record_stream(cur)
            for t in (*p.maps, *p.slot_index.values()):
                t.record_stream(cur)
            ev = torch.cuda.Event()
            ev.record(cur)
            self._last_apply_event = ev
        self._layout = p.layout
        self._epoch = p.epoch
        self._pending = None
        p.buffers = {}
        p.maps = None
        self._send("committed", {**self._ids(p.epoch), "step": self._step})
        self._count("commits")
        self._recorder.open(self._step, mid_window=True)

    # --- internals: the step slow path ---------------------------------------------------------

    def _slow_step(self) -> None:
        rec = self._recorder
        if rec.busy:
            rec.poll()
        while self._inbox:
            self._handle(self._inbox.popleft())
        st = self._step
        if self._cgroup is not None:
            if st % self.sync_interval == 0:
                self._consensus()
        elif self._pending is not None:
            self._local_decision()
        rec.tick(st, self._epoch)
        self._reschedule()

    def _handle(self, item: Any) -> None:
        if item is None:
            return
        if isinstance(item, Schedule):
            self._recorder.set_schedule(item, self._step, self._epoch)
        elif isinstance(item, tuple):
            msg, deadline = item
            self._submit(functools.partial(self._prepare_from_agent, msg, deadline))
        elif isinstance(item, WelcomeMsg):
            if item.schedule is not None:
                self._recorder.set_schedule(item.schedule, self._step, self._epoch)
            if item.epoch > self._epoch and item.phy2log is not None:
                deadline = self._clock() + self._prepare_timeout_s
                msg = PrepareMsg(
                    self.group_name, item.epoch, self._prepare_timeout_s, item.phy2log, item.share
                )
                self._submit(functools.partial(self._prepare_from_agent, msg, deadline))
        elif isinstance(item, AbortMsg):
            self.abort(item.epoch, item.reason or "aborted by the planner")

    def _prepare_from_agent(self, msg: PrepareMsg, deadline: float) -> None:
        self._prepare(msg.phy2log, msg.epoch, deadline, msg.share)

    def _consensus(self) -> None:
        with self._lock:
            p = self._pending
            self._check_deadline(p)
            v = s = h = 0
            if p is not None:
                v, h = p.epoch, p.digest
                s = v if p.state == _STAGED else 0
            b = self._cbuf
            b[0], b[1], b[2], b[3], b[4], b[5], b[6] = -v, v, -s, s, self._failed_epoch, -h, h
            import torch.distributed as dist

            dist.all_reduce(b, op=dist.ReduceOp.MAX, group=self._cgroup)
            r = b.tolist()
            self._count("consensus_rounds")
            vmin, vmax, smin, smax, f, hmin, hmax = -r[0], r[1], -r[2], r[3], r[4], -r[5], r[6]
            if f > self._failed_epoch:
                self._failed_epoch = f
            if p is None:
                return
            e = p.epoch
            if e <= self._failed_epoch:
                self._drop(p, p.fail_reason or f"epoch {e} failed on another rank of the group")
            elif vmin == vmax == e and hmin != hmax:
                self._failed_epoch = e
                self._drop(p, f"ranks hold different layouts for epoch {e}")
            elif smin == smax == e:
                self._apply(p)
            elif self._collective and p.state == _VALIDATED and vmin == vmax == e:
                p.state = _STAGING
                self._submit(functools.partial(self._stage, p))

    def _local_decision(self) -> None:
        with self._lock:
            p = self._pending
            self._check_deadline(p)
            if p is None:
                return
            if p.epoch <= self._failed_epoch:
                self._drop(p, p.fail_reason or f"epoch {p.epoch} failed")
            elif p.state == _STAGED:
                self._apply(p)

    def _check_deadline(self, p: _Pending | None) -> None:
        if p is None or p.deadline is None or p.epoch <= self._failed_epoch:
            return
        if self._clock() > p.deadline:
            self._failed_epoch = p.epoch
            p.fail_reason = p.fail_reason or f"deadline missed while {p.state}"

    def _reschedule(self) -> None:
        st = self._step
        nxt = math.inf
        if self._cgroup is not None:
            nxt = (st // self.sync_interval + 1) * self.sync_interval
        elif self._pending is not None:
            nxt = st + 1
        nxt = min(nxt, self._recorder.next_event())
        if self._recorder.busy:
            nxt = st + 1
        self._next_check = nxt  # type: ignore[assignment]

    # --- internals: snapshots ------------------------------------------------------------------

    def _ship(self, counts: torch.Tensor, start: int, end: int, epoch: int) -> None:
        total = int(counts[0].sum())
        k = self._top_k or 1
        body = {
            "worker": self.worker,
            "incarnation": self.incarnation,
            "group": self.group_name,
            "ep_rank": self.ep_rank,
            "seq": self._seq,
            "epoch": epoch,
            "step_start": start,
            "step_end": end,
            "tokens": -(-total // k),
        }
        self._seq += 1
        self._send("snapshot", body, {"counts": counts})
        self._count("snapshots")
