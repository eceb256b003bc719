"""Triton kernels for map_and_record: the fast kernel, a per-element-atomic baseline, launch.

Why two counting strategies: with skewed routing every element of a hot expert adds 1 to the
same few counters, and one global atomic per element serialises on them. The fast kernel
either (``atomic``) does one relaxed atomic per element, which is cheapest when there are few
elements, or (``histogram``) builds a block-local histogram of the physical ids with
``tl.histogram`` (elements that must not count go to a dump bin) and adds each non-zero bin
once per program; with a grid capped at a few programs per SM (persistent programs) the
number of global atomics stays bounded by ``grid x P`` whatever the batch size.

The kernel bodies are plain functions wrapped with ``triton.jit`` on first use, once per
flavour: triton decides at ``triton.jit`` time whether a kernel is compiled or interpreted
(``TRITON_INTERPRET``), so building both flavours lazily lets the dispatch follow the
variable as it is when ``map_and_record`` runs, not as it was at import. For that the kernel
bodies call only triton builtins: ``tl.cdiv``, ``tl.zeros``, ``tl.sum`` and the like are
themselves jit functions, wrapped once when triton is imported, and an interpreted kernel
cannot call a compiled one.

No launch reads a device value on the host, and the launch configuration depends only on
shapes, dtypes and the device, so every launch can be captured in a CUDA graph and
``should_record`` / ``num_valid_tokens`` can change between replays.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

# Flat offsets are int32 inside the kernels.
MAX_ELEMENTS = 2**31 - 2**20
# Largest histogram the fast kernel builds (P + 1 dump bin, rounded up to a power of two).
# Triton 3.6 lowers tl.histogram with warp ballots and NBINS / 32 counters per thread, so the
# cost grows with the bins; measured only at P = 288 (512 bins), the cap is a guard.
MAX_HISTOGRAM_BINS = 2048


def _map_record_fast(
    ids_ptr,
    out_ptr,
    l2p_ptr,
    cnt_ptr,
    load_ptr,
    rec_ptr,
    nvalid_ptr,
    n_elem,
    stride_t,
    stride_k,
    num_experts,
    num_replicas,
    num_slots,
    l2p_s0,
    l2p_s1,
    cnt_s0,
    load_s0,
    TOP_K: tl.constexpr,
    CONTIG: tl.constexpr,
    HAS_NVALID: tl.constexpr,
    HISTOGRAM: tl.constexpr,
    NBINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    # Flags are loaded as vectors: the triton interpreter rejects atomic masks built from a
    # scalar load.
    if HISTOGRAM:
        hist = tl.full([NBINS], 0, tl.int32)
    else:
        rec = tl.load(rec_ptr + lanes * 0) != 0
    if HAS_NVALID:
        nvalid = tl.load(nvalid_ptr + lanes * 0)
    num_tiles = (n_elem + BLOCK - 1) // BLOCK
    tile = pid
    # a while loop, not range(): triton 3.6's interpreter cannot take tensor range bounds
    # under numpy >= 2.4
    while tile < num_tiles:
        offs = tile * BLOCK + lanes
        inb = offs < n_elem
        tok = offs // TOP_K
        if CONTIG:
            src = offs
        else:
            src = tok.to(tl.int64) * stride_t + (offs - tok * TOP_K).to(tl.int64) * stride_k
        ids = tl.load(ids_ptr + src, mask=inb, other=-1)
        valid = inb & (ids >= 0) & (ids < num_experts)
        e = tl.where(valid, ids, 0).to(tl.int32)
        cnt = tl.load(cnt_ptr + e * cnt_s0, mask=valid, other=1)
        cnt = tl.minimum(tl.maximum(cnt, 1), 2147483647).to(tl.uint32)
        h = tok.to(tl.uint32) * 2654435769
        j = tl.minimum((h % cnt).to(tl.int32), num_replicas - 1)
        phys = tl.load(l2p_ptr + e * l2p_s0 + j * l2p_s1, mask=valid, other=-1)
        tl.store(out_ptr + offs, phys, mask=inb)
        ok = valid & (phys >= 0) & (phys < num_slots)
        if HAS_NVALID:
            ok = ok & (tok < nvalid)
        if HISTOGRAM:
            hist += tl.histogram(tl.where(ok, phys, num_slots).to(tl.int32), NBINS)
        else:
            tl.atomic_add(load_ptr + phys * load_s0, 1, mask=ok & rec, sem="relaxed")
        tile += nprog
    if HISTOGRAM:
        bins = tl.arange(0, NBINS)
        rec_b = tl.load(rec_ptr + bins * 0) != 0
        tl.atomic_add(
            load_ptr + bins * load_s0,
            hist,
            mask=(bins < num_slots) & (hist > 0) & rec_b,
            sem="relaxed",
        )


def _map_record_baseline(
    ids_ptr,
    out_ptr,
    l2p_ptr,
    cnt_ptr,
    load_ptr,
    rec_ptr,
    nvalid_ptr,
    n_elem,
    num_experts,
    num_replicas,
    num_slots,
    TOP_K: tl.constexpr,
    HAS_NVALID: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elem
    tok = offs // TOP_K
    ids = tl.load(ids_ptr + offs, mask=inb, other=-1)
    valid = inb & (ids >= 0) & (ids < num_experts)
    e = tl.where(valid, ids, 0).to(tl.int32)
    cnt = tl.load(cnt_ptr + e, mask=valid, other=1)
    cnt = tl.minimum(tl.maximum(cnt, 1), 2147483647).to(tl.uint32)
    h = tok.to(tl.uint32) * 2654435769
    j = tl.minimum((h % cnt).to(tl.int32), num_replicas - 1)
    phys = tl.load(l2p_ptr + e * num_replicas + j, mask=valid, other=-1)
    tl.store(out_ptr + offs, phys, mask=inb)
    ok = valid & (phys >= 0) & (phys < num_slots) & (tl.load(rec_ptr + offs * 0) != 0)
    if HAS_NVALID:
        ok = ok & (tok < tl.load(nvalid_ptr + offs * 0))
    tl.atomic_add(load_ptr + phys, 1, mask=ok)


def interpreting() -> bool:
    """True when triton would interpret a kernel jitted now (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # pragma: no cover - triton < 3.4


@functools.cache
def _jitted(name: str, interpret: bool) -> Any:
    del interpret  # part of the cache key: triton.jit reads the flag when it wraps
    return triton.jit(globals()[name])


def _kernel(name: str) -> Any:
    return _jitted(name, interpreting())


@dataclass(frozen=True)
class Config:
    """A launch of the fast kernel: counting strategy, tile, warps, programs per SM (0: no cap)."""

    histogram: bool
    block: int
    num_warps: int
    programs_per_sm: int = 0


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 2  # interpreter: few programs, so small inputs still run the persistent loop


def num_bins(num_slots: int) -> int:
    """Histogram bins for P slots: P + 1 (a dump bin), a power of two, at least a warp."""
    return max(32, triton.next_power_of_2(num_slots + 1))


@functools.lru_cache(maxsize=256)
def select_config(n_elem: int, num_slots: int) -> Config:
    """The fast kernel's launch for a flat size and P, from a sweep on an H100 (triton 3.6,
    top-8, P = 288; ``python3 -m benchmarks.bench_kernel --sweep-only``).

    Up to 16k elements the per-element atomics are cheapest: few elements, little
    contention, one short dependent chain. Above, the block histogram wins; with many
    elements, 16-warp programs capped at 2 per SM keep the flush atomics (one per non-zero
    bin per program, all on the same P counters) few while keeping the SMs busy. Under
    triton 3.6 the histogram itself (warp ballots, about NBINS / 32 popcounts per element)
    is most of the fast kernel's time at 64k tokens; newer triton lowers it to shared-memory
    atomics, which should only make the histogram strategy cheaper.
    """
    if n_elem <= 16384 or num_bins(num_slots) > MAX_HISTOGRAM_BINS:
        return Config(histogram=False, block=128, num_warps=4)
    if n_elem <= 65536:
        return Config(histogram=True, block=1024, num_warps=8, programs_per_sm=2)
    return Config(histogram=True, block=2048, num_warps=16, programs_per_sm=2)


def _flag(t: torch.Tensor) -> torch.Tensor:
    """A 1-element device flag as the kernels read it (element 0; bool as uint8), no copy."""
    if t.dim() != 1:
        t = t.reshape(-1)
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def launch_fast(
    topk_ids: torch.Tensor,
    l2p: torch.Tensor,
    cnt: torch.Tensor,
    load: torch.Tensor,
    should_record: torch.Tensor,
    num_valid_tokens: torch.Tensor | None,
    config: Config | None = None,
) -> torch.Tensor:
    """Run the fast kernel; arguments as map_and_record (validated by the caller)."""
    n = topk_ids.numel()
    if n == 0:
        return topk_ids
    if n > MAX_ELEMENTS:
        raise ValueError(f"map_and_record: {n} elements exceed the kernel's {MAX_ELEMENTS}")
    top_k = topk_ids.shape[-1] if topk_ids.dim() > 0 else 1
    ids = topk_ids
    contig = ids.is_contiguous()
    stride_t = stride_k = 0
    if not contig:
        try:
            ids = ids.view(-1, top_k)
        except RuntimeError:
            ids = ids.reshape(-1, top_k).contiguous()
        contig = ids.is_contiguous()
        if not contig:
            stride_t, stride_k = ids.stride()
    out = torch.empty(topk_ids.shape, dtype=topk_ids.dtype, device=topk_ids.device)
    num_slots = load.shape[0]
    cfg = config or select_config(n, num_slots)
    num_experts = l2p.shape[0] if l2p.shape[1] > 0 else 0
    tiles = triton.cdiv(n, cfg.block)
    grid = tiles
    if cfg.programs_per_sm > 0:
        grid = min(tiles, _sm_count(topk_ids.device) * cfg.programs_per_sm)
    rec = _flag(should_record)
    nvalid = rec if num_valid_tokens is None else _flag(num_valid_tokens)
    _kernel("_map_record_fast")[(grid,)](
        ids,
        out,
        l2p,
        cnt,
        load,
        rec,
        nvalid,
        n,
        stride_t,
        stride_k,
        num_experts,
        l2p.shape[1],
        num_slots,
        l2p.stride(0),
        l2p.stride(1),
        cnt.stride(0),
        load.stride(0),
        TOP_K=top_k,
        CONTIG=contig,
        HAS_NVALID=num_valid_tokens is not None,
        HISTOGRAM=cfg.histogram,
        NBINS=num_bins(num_slots) if cfg.histogram else 32,
        BLOCK=cfg.block,
        num_warps=cfg.num_warps,
    )
    return out


def launch_baseline(
    topk_ids: torch.Tensor,
    l2p: torch.Tensor,
    cnt: torch.Tensor,
    load: torch.Tensor,
    should_record: torch.Tensor,
    num_valid_tokens: torch.Tensor | None,
    block: int = 1024,
) -> torch.Tensor:
    """One atomic add per element (vLLM's scheme): the reference the fast kernel must beat."""
    n = topk_ids.numel()
    if n == 0:
        return topk_ids
    if n > MAX_ELEMENTS:
        raise ValueError(f"map_and_record: {n} elements exceed the kernel's {MAX_ELEMENTS}")
    if not (l2p.is_contiguous() and cnt.is_contiguous() and load.is_contiguous()):
        raise ValueError("the baseline kernel takes contiguous maps and counters")
    top_k = topk_ids.shape[-1] if topk_ids.dim() > 0 else 1
    ids = topk_ids.contiguous()
    out = torch.empty(topk_ids.shape, dtype=topk_ids.dtype, device=topk_ids.device)
    rec = _flag(should_record)
    nvalid = rec if num_valid_tokens is None else _flag(num_valid_tokens)
    _kernel("_map_record_baseline")[(triton.cdiv(n, block),)](
        ids,
        out,
        l2p,
        cnt,
        load,
        rec,
        nvalid,
        n,
        l2p.shape[0] if l2p.shape[1] > 0 else 0,
        l2p.shape[1],
        load.shape[0],
        TOP_K=top_k,
        HAS_NVALID=num_valid_tokens is not None,
        BLOCK=block,
        num_warps=4,
    )
    return out
