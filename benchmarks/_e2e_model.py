"""The MoE layer stack of the end-to-end benchmark: weights, inputs, and one EP rank's forward.

**Deterministic on every device.** Weights, router and inputs come from an integer hash of
(what, layer, expert, index), computed with exact int64 tensor ops and scaled by powers of
two, so every value is exactly representable in bf16 and identical on the CPU and on any GPU:
every rank can build any expert, a run can rebuild its weights from scratch, and the CPU
smoke test runs the very same code as the GPU job.

**One EP rank's forward** (:class:`EPStack`), per layer: RMS norm, router softmax at the
trace's expert ids (renormalised: the weights still depend on the tokens), ``map_and_record``
through the eplbd client (logical -> physical slot), dispatch of each (token, k) pair to the
rank owning its slot with ``all_to_all_single``, the slots' expert FFNs on the received rows
grouped by slot (gate/up GEMM, SiLU, down GEMM: one ``torch._grouped_mm`` per GEMM, or one
pair of GEMMs per slot), the results sent back, combined in k order weighted by the router, a
residual add. The combine order does not depend on the layout, so outputs equal the
no-balancing run's up to the GEMMs' summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from eplbd_client import EplbClient

__all__ = [
    "Dims",
    "EPStack",
    "OutputCheck",
    "compare_outputs",
    "expert_weights",
    "fingerprint_vector",
    "hash_values",
    "pick_gemm",
    "step_inputs",
]

_M32 = 0xFFFFFFFF
_W13, _W2, _ROUTER, _INPUT, _FP = 1, 2, 3, 4, 5


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2^32) (exact: products stay < 2^59)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def _key(*parts: int) -> int:
    k = 0x9E3779B9
    for p in parts:
        k = ((k ^ (p & _M32)) * 0x01000193 + 0x7F4A7C15) & _M32
    return k


def hash_values(n: int, device: torch.device | str, *key: int) -> torch.Tensor:
    """n int64 values in [-128, 127], a function of (key, index) only. [n]"""
    idx = torch.arange(n, device=device, dtype=torch.int64)
    x = _mix(_mix(idx) ^ _key(*key))
    return ((x >> 8) & 255) - 128


def _scaled(
    n: int, fan_in: int, device: torch.device | str, dtype: torch.dtype, *key: int
) -> torch.Tensor:
    # uniform over 256 levels has std ~73.9; a power-of-two scale keeps every value exact
    shift = round(math.log2(73.9 * math.sqrt(fan_in)))
    return (hash_values(n, device, *key).to(torch.float32) * 2.0**-shift).to(dtype)


@dataclass(frozen=True)
class Dims:
    """hidden H, ffn F (expert intermediate), experts E, top_k K, the trace layers served."""

    hidden: int
    ffn: int
    experts: int
    top_k: int
    layers: tuple[int, ...]
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights in one layer (w13 and w2)."""
        return 3 * self.hidden * self.ffn * torch.empty((), dtype=self.dtype).element_size()


def expert_weights(
    dims: Dims, layer: int, experts: list[int], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot-major weights of ``experts`` (one row per entry, repeats allowed) of trace layer
    ``layer``: w13 [n, 2F, H] (gate rows, then up rows), w2 [n, H, F]; contiguous."""
    H, Fd = dims.hidden, dims.ffn
    n = len(experts)
    w13 = torch.empty(n, 2 * Fd, H, dtype=dims.dtype, device=device)
    w2 = torch.empty(n, H, Fd, dtype=dims.dtype, device=device)
    for i, e in enumerate(experts):
        k = (dims.seed, layer, int(e))
        w13[i] = _scaled(2 * Fd * H, H, device, dims.dtype, _W13, *k).view(2 * Fd, H)
        w2[i] = _scaled(H * Fd, Fd, device, dims.dtype, _W2, *k).view(H, Fd)
    return w13, w2


def router_weights(dims: Dims, layer: int, device: torch.device | str) -> torch.Tensor:
    """[H, E] router of trace layer ``layer``."""
    H, E = dims.hidden, dims.experts
    return _scaled(H * E, H, device, dims.dtype, _ROUTER, dims.seed, layer).view(H, E)


def step_inputs(
    dims: Dims, step: int, rank: int, tokens: int, device: torch.device | str
) -> torch.Tensor:
    """The hidden states rank ``rank`` feeds the stack at ``step``: [tokens, H] in (-1, 1)."""
    n = tokens * dims.hidden
    v = hash_values(n, device, _INPUT, dims.seed, step, rank).to(torch.float32) * 2.0**-7
    return v.to(dims.dtype).view(tokens, dims.hidden)


def fingerprint_vector(dims: Dims, device: torch.device | str) -> torch.Tensor:
    """[H] float32 random directions: ``y.float() @ v`` is a per-token fingerprint of y."""
    v = hash_values(dims.hidden, device, _FP, dims.seed).to(torch.float32)
    return v / v.norm()


def _rms_norm(h: torch.Tensor) -> torch.Tensor:
    x = h.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    f = gu.shape[-1] // 2
    return F.silu(gu[:, :f]) * gu[:, f:]


def _experts_grouped(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    gu = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(_silu_mul(gu), w2.transpose(-2, -1), offs=offs)


def _experts_loop(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    out = torch.empty_like(x)
    a = 0
    for s, n in enumerate(counts):
        if n:
            seg = x[a : a + n]
            out[a : a + n] = _silu_mul(seg @ w13[s].t()) @ w2[s].t()
            a += n
    return out


def pick_gemm(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """("grouped" | "loop", why). "auto" takes ``torch._grouped_mm`` when it runs here and
    agrees with the per-slot loop on a small problem with an empty group."""
    if requested == "loop":
        return "loop", "requested"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=g).to(device, dtype)
    w13 = torch.randn(3, 96, 64, generator=g).div(8).to(device, dtype)
    w2 = torch.randn(3, 64, 48, generator=g).div(7).to(device, dtype)
    counts = [24, 0, 16]
    try:
        offs = torch.tensor([24, 24, 40], dtype=torch.int32, device=device)
        got = _experts_grouped(x, w13, w2, offs)
        ref = _experts_loop(x, w13, w2, counts)
        err = float((got.float() - ref.float()).abs().max())
        scale = float(ref.float().abs().max())
    except Exception as e:  # not built for this device / dtype
        if requested == "grouped":
            raise
        return "loop", f"torch._grouped_mm unavailable: {type(e).__name__}: {str(e)[:120]}"
    if not err <= 0.02 * scale:
        if requested == "grouped":
            raise RuntimeError(f"torch._grouped_mm disagrees with the loop: {err} vs {scale}")
        return "loop", f"torch._grouped_mm disagrees with the loop (max diff {err:.3g})"
    return "grouped", "torch._grouped_mm"


class EPStack:
    """The MoE layers of one EP rank, served through ``client``.

    Weights: per layer ``w13 [S, 2F, H]``, ``w2 [S, H, F]`` for the client's current layout
    (slot i of this rank holds ``client.layout.phy2log[l, rank * S + i]``), registered with
    the client, which rewrites their rows in place when a layout commits. ``group``: the EP
    process group (NCCL or gloo); None with one rank computes locally, no collectives.
    ``last_rows[l]``: rows (token, k pairs) this rank computed in layer l in the last forward;
    ``slot_rows [L, S]`` (device): the rows of each of this rank's slots in the last forward.
    With one rank and grouped GEMMs the forward never synchronises with the host (the rows
    are T x K, known in advance), so it can be captured in a CUDA graph.
    """

    def __init__(
        self, dims: Dims, client: EplbClient, group: Any, device: torch.device, gemm: str
    ) -> None:
        self.dims = dims
        self.client = client
        self.group = group
        self.device = device
        self.gemm = gemm
        self.rank, self.size = client.ep_rank, client.ep_size
        self.S = client.slots_per_rank
        p2l = client.layout.phy2log
        lo = self.rank * self.S
        self.w13: list[torch.Tensor] = []
        self.w2: list[torch.Tensor] = []
        self.router: list[torch.Tensor] = []
        for i, layer in enumerate(dims.layers):
            w13, w2 = expert_weights(dims, layer, p2l[i, lo : lo + self.S].tolist(), device)
            self.w13.append(w13)
            self.w2.append(w2)
            self.router.append(router_weights(dims, layer, device))
            client.register_expert_weights(i, [w13, w2])
        self._slot_ids = torch.arange(self.S, device=device).repeat(self.size)
        self.last_rows: list[int] = []
        self.slot_rows = torch.zeros(len(dims.layers), self.S, dtype=torch.int64, device=device)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids [T, L, K] logical expert ids (int64) -> [T, H]."""
        h = x
        self.last_rows = []
        for i in range(len(self.dims.layers)):
            hn = _rms_norm(h)
            lid = ids[:, i, :]
            probs = torch.softmax((hn @ self.router[i]).float(), dim=-1)
            w = probs.gather(1, lid)
            w = w / w.sum(dim=-1, keepdim=True)
            phys = self.client.map_and_record(i, lid)
            h = h + self._moe(i, hn, w, phys)
        return h

    def _moe(self, i: int, hn: torch.Tensor, w: torch.Tensor, phys: torch.Tensor) -> torch.Tensor:
        T, K = phys.shape
        H = hn.shape[1]
        G, S = self.size, self.S
        flat = phys.reshape(-1)
        order = torch.argsort(flat, stable=True)  # by owner rank, then by local slot
        cnt = torch.zeros(G * S, dtype=torch.int64, device=hn.device)
        cnt.index_add_(0, flat, torch.ones_like(flat))
        rows = hn.index_select(0, torch.div(order, K, rounding_mode="floor"))
        if self.group is None and self.gemm == "grouped":
            # one rank: every row stays here, T x K of them: no host synchronisation
            recv_cnt, recv = cnt, rows
            per_slot = []
            send_splits = recv_splits = [T * K]
        elif self.group is None:
            recv_cnt, host = cnt, cnt.cpu()
            send_splits = recv_splits = [int(host.sum())]
            per_slot = host.tolist()
            recv = rows
        else:
            import torch.distributed as dist

            recv_cnt = torch.empty_like(cnt)
            dist.all_to_all_single(recv_cnt, cnt, group=self.group)
            host = torch.cat([cnt, recv_cnt]).cpu()  # the one host sync of the layer
            send_splits = host[: G * S].view(G, S).sum(1).tolist()
            rc = host[G * S :].view(G, S)
            recv_splits = rc.sum(1).tolist()
            per_slot = rc.sum(0).tolist()
            recv = rows.new_empty(sum(recv_splits), H)
            dist.all_to_all_single(recv, rows, recv_splits, send_splits, group=self.group)
        M = sum(recv_splits)
        self.last_rows.append(M)
        self.slot_rows[i].copy_(recv_cnt.view(G, S).sum(0))
        out_recv = torch.empty_like(recv)
        if M:
            # received rows come source-major, slot-ascending within a source: regroup by slot
            slot_of = torch.repeat_interleave(self._slot_ids, recv_cnt, output_size=M)
            perm = torch.argsort(slot_of, stable=True)
            xs = recv.index_select(0, perm)
            if self.gemm == "grouped":
                offs = recv_cnt.view(G, S).sum(0).cumsum(0).to(torch.int32)
                ys = _experts_grouped(xs, self.w13[i], self.w2[i], offs)
            else:
                ys = _experts_loop(xs, self.w13[i], self.w2[i], per_slot)
            out_recv.index_copy_(0, perm, ys)
        if self.group is None:
            back = out_recv
        else:
            import torch.distributed as dist

            back = hn.new_empty(T * K, H)
            dist.all_to_all_single(back, out_recv, send_splits, recv_splits, group=self.group)
        res = torch.empty_like(back)
        res.index_copy_(0, order, back)
        y = (w.unsqueeze(-1) * res.view(T, K, H).float()).sum(dim=1)
        return y.to(hn.dtype)


@dataclass
class OutputCheck:
    """How a run's outputs compare with the reference run's.

    max_abs_diff / ref_max_abs: over the full outputs of the sampled steps; violations:
    elements outside ``|d| <= atol + rtol * |ref|``; fp_*: the same for the per-token
    fingerprints of every step."""

    steps_full: int = 0
    max_abs_diff: float = 0.0
    ref_max_abs: float = 0.0
    violations: int = 0
    steps_fp: int = 0
    fp_max_abs_diff: float = 0.0
    fp_violations: int = 0

    def add(self, other: OutputCheck) -> None:
        self.steps_full = max(self.steps_full, other.steps_full)
        self.steps_fp = max(self.steps_fp, other.steps_fp)
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
        self.ref_max_abs = max(self.ref_max_abs, other.ref_max_abs)
        self.fp_max_abs_diff = max(self.fp_max_abs_diff, other.fp_max_abs_diff)
        self.violations += other.violations
        self.fp_violations += other.fp_violations

    @property
    def ok(self) -> bool:
        return self.violations == 0 and self.fp_violations == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "steps_full": self.steps_full,
            "max_abs_diff": self.max_abs_diff,
            "ref_max_abs": self.ref_max_abs,
            "violations": self.violations,
            "steps_fingerprint": self.steps_fp,
            "fingerprint_max_abs_diff": self.fp_max_abs_diff,
            "fingerprint_violations": self.fp_violations,
        }


#: bf16 outputs equal "up to summation order": the expert GEMMs of a balanced run see other
#: batch shapes, round differently by an ulp or two, and residual layers carry that forward.
#: A wrong expert or a stale weight moves outputs by tens of percent (tests check both sides).
RTOL = 2.0**-4
ATOL_RMS = 2.0**-3


def compare_outputs(
    full: torch.Tensor, full_ref: torch.Tensor, fp: torch.Tensor, fp_ref: torch.Tensor
) -> OutputCheck:
    """full / full_ref: [n, T, H] outputs of the sampled steps; fp / fp_ref: [steps, T]
    per-token fingerprints of every step. Tolerance |d| <= ATOL_RMS * rms(ref) + RTOL * |ref|
    (for fingerprints the rms of the fingerprints)."""
    c = OutputCheck(steps_full=int(full.shape[0]), steps_fp=int(fp.shape[0]))
    if full.numel():
        r = full_ref.float()
        d = (full.float() - r).abs()
        atol = ATOL_RMS * float(r.pow(2).mean().sqrt())
        c.max_abs_diff = float(d.max())
        c.ref_max_abs = float(r.abs().max())
        c.violations = int((d > atol + RTOL * r.abs()).sum())
    if fp.numel():
        d = (fp - fp_ref).abs()
        atol = ATOL_RMS * float(fp_ref.pow(2).mean().sqrt())
        c.fp_max_abs_diff = float(d.max())
        c.fp_violations = int((d > atol + RTOL * fp_ref.abs()).sum())
    return c
