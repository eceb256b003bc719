"""Times one GPU's grouped expert GEMMs for many row counts, on the GPU (or the CPU, small).

A "workload" is the rows each slot of one EP rank receives in one layer and step, e.g.
``[0, 37, 5, 0, 210]``: a grouped gate/up GEMM, SiLU, and a grouped down GEMM over those
rows, exactly the expert computation of ``benchmarks/_e2e_model.py`` (``torch._grouped_mm``
with one group per slot, empty groups included). The time depends on the row counts only,
not on which experts, so every workload runs on weights drawn once (random, bf16, not
zeros), taken from a pool several times the L2 cache and rotated between calls, so that a
workload never finds the previous one's weights in the cache.

Method (../shared/design/TARGETS.md): CUDA events around each call, warm-up first, each
workload run ``reps`` times (each on other weights; each run in its own random order, so
that a drift of the GPU's clock is no offset between the callers' groups of workloads) and
the median kept; every batch of calls is queued behind a GPU sleep long enough for the
host to enqueue the whole batch, so that launch gaps never enter the events. On the CPU
(tests, tiny sizes) the same calls are timed with the wall clock.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from benchmarks._e2e_model import _experts_grouped, _experts_loop

__all__ = [
    "ExpertShape",
    "GemmTimer",
    "SHAPES",
    "TIMING_ORDERS",
    "hardware_ceilings",
    "drift_summary",
    "drift_text",
]

#: L2 cache of an H100/H200 is 50-60 MB: keep the weights of consecutive calls apart by
#: several times that.
_POOL_BYTES = 1 << 30
_BATCH = 32  # calls queued behind one GPU sleep
_SLEEP_CYCLES = 8_000_000  # about 4 ms at 2 GHz: longer than the host needs to queue a batch
TIMING_ORDERS = ("shuffled", "given")


@dataclass(frozen=True)
class ExpertShape:
    """An expert FFN: gate and up [2F, H], down [H, F]."""

    name: str
    hidden: int
    ffn: int
    dtype: str = "bfloat16"

    @property
    def bytes(self) -> int:
        return (
            3
            * self.hidden
            * self.ffn
            * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        )

    @property
    def flops_per_row(self) -> int:
        return 6 * self.hidden * self.ffn


SHAPES = {
    "v2lite": ExpertShape("DeepSeek-V2-Lite", 2048, 1408),
    "v3": ExpertShape("DeepSeek-V3", 7168, 2048),
}


class GemmTimer:
    """Grouped expert GEMMs of ``shape`` for workloads of at most ``max_slots`` slots and
    ``max_rows`` rows, on ``device``."""

    def __init__(
        self, shape: ExpertShape, max_slots: int, max_rows: int, device: str | torch.device
    ) -> None:
        self.shape = shape
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        dt = getattr(torch, shape.dtype) if self.cuda else torch.float32
        H, F = shape.hidden, shape.ffn
        self.max_slots = max_slots
        pool = (
            max(3 * max_slots, math.ceil(_POOL_BYTES / max(shape.bytes, 1)))
            if self.cuda
            else max_slots
        )
        self.pool = pool
        g = torch.Generator(device=self.device).manual_seed(0)
        self.w13 = (torch.randn(pool, 2 * F, H, device=self.device, generator=g) / math.sqrt(H)).to(
            dt
        )
        self.w2 = (torch.randn(pool, H, F, device=self.device, generator=g) / math.sqrt(F)).to(dt)
        self.x = torch.randn(max(max_rows, 1), H, device=self.device, generator=g).to(dt)
        self._next = 0
        self.grouped = True
        self.sentinel_us: list[float] = []  # see time()

    def _weights(self, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._next + S > self.pool:
            self._next = 0
        a = self._next
        self._next += S
        return self.w13[a : a + S], self.w2[a : a + S]

    def _call(self, counts: Sequence[int], offs: torch.Tensor | None) -> None:
        M = int(sum(counts))
        if M == 0:
            return
        w13, w2 = self._weights(len(counts))
        x = self.x[:M]
        if self.grouped and offs is not None:
            _experts_grouped(x, w13, w2, offs)
        else:
            _experts_loop(x, w13, w2, list(counts))

    def time(
        self,
        workloads: Sequence[Sequence[int]],
        reps: int = 3,
        warmup: int = 1,
        stat: str = "median",
        order: str = "shuffled",
        sentinel_every: int = 0,
    ) -> list[float]:
        """Time in microseconds of each workload (0 for one with no rows): the median of
        ``reps`` runs, or with ``stat="min"`` the fastest (robust to a rare interference
        spike when only two runs fit).

        order: "shuffled" (each run in its own seeded random order) or "given". A GPU's
        clock wanders by a percent or more over seconds (heat, power): timed in the given
        order, a caller's contiguous block of workloads (one policy's steps, say) shares
        one offset, and a comparison between blocks carries it. Shuffled, it falls on every
        block alike. sentinel_every > 0: one workload (of median rows) is also timed ahead of
        every ``sentinel_every``-th batch, into :attr:`sentinel_us` in timing order (the
        drift itself, for the record)."""
        if order not in TIMING_ORDERS:
            raise ValueError(f"order must be one of {TIMING_ORDERS}, got {order!r}")
        self.sentinel_us = []
        n = len(workloads)
        if n == 0:
            return []
        for w in workloads:
            if len(w) > self.max_slots or sum(w) > self.x.shape[0]:
                raise ValueError(f"workload {list(w)[:8]}... exceeds the timer's sizes")
        # every workload's cumulative offsets, copied to the device once
        lens = [len(w) for w in workloads]
        flat = [c for w in workloads for c in _cumsum(w)]
        offs_all = torch.tensor(flat or [0], dtype=torch.int32).to(self.device)
        starts = _cumsum([0, *lens[:-1]])
        views = [offs_all[s : s + k] for s, k in zip(starts, lens, strict=True)]
        out: list[list[float]] = [[] for _ in range(n)]
        busy = [i for i in range(n) if sum(workloads[i]) > 0]
        for _ in range(warmup):
            for i in busy[: min(len(busy), 8)]:
                self._call(workloads[i], views[i])
        if self.cuda:
            torch.cuda.synchronize(self.device)
        probe = sorted(busy, key=lambda i: sum(workloads[i]))[len(busy) // 2] if busy else -1
        rng = random.Random(0)
        for _ in range(reps):
            run = list(busy)
            if order == "shuffled":
                rng.shuffle(run)
            for b in range(0, len(run), _BATCH):
                # (workload, where its time goes)
                batch = [(i, out[i]) for i in run[b : b + _BATCH]]
                if sentinel_every > 0 and (b // _BATCH) % sentinel_every == 0:
                    batch.insert(0, (probe, self.sentinel_us))
                if self.cuda:
                    ev = [
                        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                        for _ in batch
                    ]
                    torch.cuda._sleep(_SLEEP_CYCLES)  # the host queues the batch meanwhile
                    for (e0, e1), (i, _) in zip(ev, batch, strict=True):
                        e0.record()
                        self._call(workloads[i], views[i])
                        e1.record()
                    torch.cuda.synchronize(self.device)
                    for (e0, e1), (_, into) in zip(ev, batch, strict=True):
                        into.append(e0.elapsed_time(e1) * 1e3)
                else:
                    for i, into in batch:
                        t0 = time.perf_counter()
                        self._call(workloads[i], views[i])
                        into.append((time.perf_counter() - t0) * 1e6)
        pick = min if stat == "min" else statistics.median
        return [pick(t) if t else 0.0 for t in out]


def drift_summary(sentinel_us: Sequence[float]) -> dict[str, float] | None:
    """The sentinel's timings (in timing order) summed up: median, 5th and 95th percentile,
    the lowest and highest mean of a tenth of the timing over the median (the clock's
    drift), and the last tenth's mean over the first's (None with fewer than 10)."""
    t = list(sentinel_us)
    if len(t) < 10:
        return None
    q = statistics.quantiles(t, n=20)
    med = statistics.median(t)
    k = len(t) // 10
    tenths = [statistics.fmean(t[i * k : (i + 1) * k]) / med for i in range(10)]
    return {
        "n": len(t), "median_us": med, "p5_us": q[0], "p95_us": q[-1],
        "tenth_min": min(tenths), "tenth_max": max(tenths),
        "last_over_first": tenths[-1] / tenths[0],
    }  # fmt: skip


def drift_text(d: dict[str, float]) -> str:
    """A :func:`drift_summary` in words, for the reports."""
    return (
        f"a sentinel workload timed {d['n']:.0f} times through the timing, median "
        f"{d['median_us']:.1f} us, p5-p95 {d['p5_us']:.1f}-{d['p95_us']:.1f}, a tenth of the "
        f"timing's mean {d['tenth_min']:.3f}-{d['tenth_max']:.3f} of the median"
    )


def _cumsum(xs: Sequence[int]) -> list[int]:
    out, s = [], 0
    for x in xs:
        s += int(x)
        out.append(s)
    return out


def hardware_ceilings(device: str | torch.device) -> dict[str, float]:
    """Measured ceilings of this GPU: a device-to-device copy (bytes read + written per
    second) and a large bf16 matrix product (FLOP/s), each the median of 10 after warm-up."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {}
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    m = 8192
    x = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=dev, dtype=torch.bfloat16)

    def copy() -> None:
        dst.copy_(src)

    def mm() -> None:
        torch.mm(x, y)

    res: dict[str, float] = {}
    for name, fn, work in (
        ("copy_bytes_per_s", copy, 2.0 * n),
        ("bf16_flops_per_s", mm, 2.0 * m**3),
    ):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(10):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize(dev)
            ts.append(e0.elapsed_time(e1) / 1e3)
        res[name] = work / statistics.median(ts)
    return res
