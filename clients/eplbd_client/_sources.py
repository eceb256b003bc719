"""Where staged expert weights come from: one small interface, two implementations.

The client decides *what* a rank needs for a layout change (``_plan``), allocates the staging
rows on its device and copies the experts it already holds; a :class:`WeightSource` fills the
rest. Engines may implement their own (a checkpoint reader, a remote store) by subclassing.

- :class:`PeerWeightSource`: torch.distributed ``batch_isend_irecv`` on a dedicated group.
  It is *collective*: every rank of the EP group calls :meth:`fetch` for the same epoch (the
  client starts it at the same consensus step on every rank), and each rank derives from the
  two layouts what it sends to whom.
- :class:`HostPoolWeightSource`: copies from a node-local host pool of every expert
  (:class:`~eplbd_client.HostExpertPool`), no coordination between ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from eplbd_client._plan import chunk_rounds, transfer_plan

if TYPE_CHECKING:
    from eplbd_client._pool import HostExpertPool

__all__ = ["FetchRequest", "HostPoolWeightSource", "PeerWeightSource", "WeightSource"]


@dataclass(frozen=True)
class FetchRequest:
    """What one rank asks its source for, for one epoch.

    epoch: the layout epoch being staged, e.g. 7;
    ep_rank, ep_size: this rank and the group size;
    old_phy2log, new_phy2log: [L, P] int64 CPU, the served layout and the staged one;
    weights: layer -> this rank's live slot-major tensors ([S, ...] each), read-only here;
    wanted: (layer, expert) pairs this rank must obtain, sorted, e.g. ``[(0, 5), (3, 1)]``;
    out: (layer, expert) -> one destination tensor per weight tensor of the layer, shaped like
        one slot (``weights[layer][k][0]``), on the client's device. The source fills them;
    ready: False when this rank could not set up its staging (e.g. out of memory): a
        collective source still joins its peers, tells them, and every rank raises.
    """

    epoch: int
    ep_rank: int
    ep_size: int
    old_phy2log: torch.Tensor
    new_phy2log: torch.Tensor
    weights: Mapping[int, Sequence[torch.Tensor]]
    wanted: Sequence[tuple[int, int]]
    out: Mapping[tuple[int, int], Sequence[torch.Tensor]]
    ready: bool = True


class WeightSource(ABC):
    """Fills staging rows with expert weights. Runs on the client's staging thread (on CUDA,
    with the client's side stream current); must not touch the live weights' contents.

    ``collective = True`` means every rank must call :meth:`fetch` for the same epoch
    together; the client then starts staging only at a consensus step where every rank has
    validated that epoch.
    """

    collective: bool = False

    def bind(  # noqa: B027 - optional hook
        self, *, ep_rank: int, ep_size: int, group: Any, device: torch.device
    ) -> None:
        """Called once by the client's constructor (on every rank, in the same order)."""

    @abstractmethod
    def fetch(self, request: FetchRequest) -> None:
        """Fill ``request.out`` for every pair in ``request.wanted``; raise on failure."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`bind` acquired."""


class PeerWeightSource(WeightSource):
    """Peer-to-peer over torch.distributed on a dedicated process group.

    Each expert is sent once per receiving rank, from a rank on the receiver's node when one
    holds it (``gpus_per_node``: node of rank r = r // gpus_per_node), in rounds where no rank
    sends or receives more than ``chunk_bytes`` (bounds what is in flight; the staging rows
    themselves are bounded by the client's ``staging_budget_bytes``).

    ``group``: the dedicated group (same ranks as the EP group, in the same order). None: the
    client's constructor creates one with ``dist.new_group(ranks,
    use_local_synchronization=True)``, so constructing the client is then collective over the
    EP group. A dedicated group lets transfers run on the staging thread while the serving
    thread uses the EP group. NCCL: set the device before constructing the client.
    """

    collective = True

    def __init__(
        self, group: Any = None, *, gpus_per_node: int = 8, chunk_bytes: int = 256 << 20
    ) -> None:
        if gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.group = group
        self.gpus_per_node = gpus_per_node
        self.chunk_bytes = chunk_bytes
        self._ranks: list[int] = []
        self._device = torch.device("cpu")
        self.rounds_last = 0
        self.bytes_received_last = 0

    def bind(self, *, ep_rank: int, ep_size: int, group: Any, device: torch.device) -> None:
        self._device = device
        if ep_size == 1:
            return
        import torch.distributed as dist

        ranks = dist.get_process_group_ranks(group)
        if self.group is None:
            self.group = dist.new_group(ranks, use_local_synchronization=True)
        self._ranks = list(dist.get_process_group_ranks(self.group))
        if self._ranks != list(ranks):
            raise ValueError(f"peer group ranks {self._ranks} differ from EP group ranks {ranks}")

    def fetch(self, request: FetchRequest) -> None:
        if request.ep_size == 1:
            if request.wanted:
                raise RuntimeError("a single rank cannot fetch experts it does not hold")
            return
        import torch.distributed as dist

        G, me = request.ep_size, request.ep_rank
        S = request.old_phy2log.shape[1] // G
        # Every rank enters here for the same epoch; this tiny collective checks it, tells
        # everyone whether every rank is ready (so that all give up together rather than wait
        # for a rank that is not coming), and initialises the communicator with every rank
        # present, as NCCL requires.
        chk = torch.tensor(
            [request.epoch, -request.epoch, 0 if request.ready else 1],
            dtype=torch.int64,
            device=self._device,
        )
        dist.all_reduce(chk, op=dist.ReduceOp.MAX, group=self.group)
        lo, hi, not_ready = -int(chk[1]), int(chk[0]), int(chk[2])
        if lo != hi:
            raise RuntimeError(f"ranks stage different epochs ({lo}..{hi}), not {request.epoch}")
        if not_ready:
            raise RuntimeError(f"a rank could not set up its staging of epoch {request.epoch}")
        # Layers without registered weights move maps only (require_weights=False); every
        # rank must register the same layers, so every rank drops the same transfers.
        transfers = [
            t
            for t in transfer_plan(request.old_phy2log, request.new_phy2log, G, self.gpus_per_node)
            if t.layer in request.weights
        ]
        layer_bytes = {
            layer: sum(w[0].numel() * w.element_size() for w in request.weights[layer])
            for layer in {t.layer for t in transfers}
        }
        rounds = chunk_rounds(transfers, layer_bytes, self.chunk_bytes, G)
        received = 0
        for rnd in rounds:
            ops: list[dist.P2POp] = []
            for t in rnd:
                if t.src == me:
                    for w in request.weights[t.layer]:
                        ops.append(
                            dist.P2POp(
                                dist.isend, w[t.src_slot - me * S], self._ranks[t.dst], self.group
                            )
                        )
                if t.dst == me:
                    for buf in request.out[(t.layer, t.expert)]:
                        ops.append(dist.P2POp(dist.irecv, buf, self._ranks[t.src], self.group))
                        received += buf.numel() * buf.element_size()
            if ops:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
        self.rounds_last = len(rounds)
        self.bytes_received_last = received
        # Checked after the transfers, so that a disagreement never leaves peers waiting.
        if {(t.layer, t.expert) for t in transfers if t.dst == me} != set(request.wanted):
            raise RuntimeError("peer transfer plan disagrees with the client's staging plan")


class HostPoolWeightSource(WeightSource):
    """Copies from a node-local host pool that holds every expert of every layer.

    On CUDA the pool is pinned, so the copies run asynchronously on the client's side stream;
    no rank waits for another.
    """

    def __init__(self, pool: HostExpertPool) -> None:
        self.pool = pool

    def fetch(self, request: FetchRequest) -> None:
        self._check(request)
        for layer, expert in request.wanted:
            src = self.pool.layer(layer)
            dst = request.out[(layer, expert)]
            if len(src) != len(dst):
                raise RuntimeError(
                    f"pool layer {layer} has {len(src)} tensors, the engine registered {len(dst)}"
                )
            for k, (s, d) in enumerate(zip(src, dst, strict=True)):
                if s.shape[1:] != d.shape or s.dtype != d.dtype:
                    raise RuntimeError(
                        f"pool layer {layer} tensor {k} holds {s.dtype} {tuple(s.shape[1:])} "
                        f"per expert, the staging row is {d.dtype} {tuple(d.shape)}"
                    )
                d.copy_(s[expert], non_blocking=True)

    def _check(self, request: FetchRequest) -> None:
        """The pool must be this model's: ``copy_`` would broadcast a wrong shape and convert
        a wrong dtype without error. Checked on every fetch (metadata only, a few per layer),
        also when nothing is wanted, so that a wrong pool fails the first staging."""
        pool = self.pool
        L = int(request.new_phy2log.shape[0])
        if pool.num_layers != L:
            raise RuntimeError(f"the pool has {pool.num_layers} layers, the model has {L}")
        # The request carries no expert count: a valid layout names every expert of the
        # model, so the pool must hold at least each one named (a larger pool passes).
        top = max(int(request.old_phy2log.max()), int(request.new_phy2log.max()))
        if top >= pool.num_experts:
            raise RuntimeError(
                f"the pool has {pool.num_experts} experts, the layouts name expert {top}"
            )
        for layer, ws in request.weights.items():
            src = pool.layer(layer)
            if len(src) != len(ws):
                raise RuntimeError(
                    f"pool layer {layer} has {len(src)} tensors, the engine registered {len(ws)}"
                )
            for k, (s, w) in enumerate(zip(src, ws, strict=True)):
                if s.shape[1:] != w.shape[1:] or s.dtype != w.dtype:
                    raise RuntimeError(
                        f"pool layer {layer} tensor {k} holds {s.dtype} {tuple(s.shape[1:])} "
                        f"per expert, the engine registered {w.dtype} {tuple(w.shape[1:])} "
                        f"per slot"
                    )
