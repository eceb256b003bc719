"""Benchmark map_and_record on a GPU: the fast kernel against the per-element-atomic baseline.

Target (TARGETS.md): top-8, E = 256, P = 288, uniform and Zipf-skewed routing; >= 2x faster
than the baseline at 16k tokens, >= 4x at 64k, never slower at any size; stretch: within 2x
of a device-to-device copy of the same ids in and out at T >= 16k.

    python3 -m benchmarks.bench_kernel [--out DIR] [--sweep]   # on a GPU: measure, write docs
    python3 -m benchmarks.bench_kernel --sweep-only --out DIR   # launch configurations only
    python3 -m benchmarks.bench_kernel --render DIR/kernel.json   # write a saved run to docs

Method: GPU time per call from CUDA-graph replays, each call preceded by an L2 flush, the
flushes' own time subtracted (see ``measure`` for why not ``do_bench`` on single launches);
inputs allocated once; warm-up outside the graphs; the GPU's clocks are brought up first.
The layout is the engines' initial one (slot p holds expert p mod E, so experts 0..31 have
two replicas); Zipf routing ranks the experts in id order, so the hot experts are the
replicated ones. Each row is checked against the torch implementation before it is timed.
The sweep times every candidate launch configuration of the fast kernel with ``do_bench``
(quick, relative figures only): how ``select_config``'s thresholds were chosen.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._report import machine_line, write_section

TOKENS = (1, 64, 512, 4096, 16384, 65536)
TOP_K, E, P = 8, 256, 288
ZIPF_S = 1.2
SECTION = "kernel"


def _layout(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    phy2log = torch.arange(P) % E
    cnt = torch.bincount(phy2log, minlength=E)
    l2p = torch.full((E, int(cnt.max())), -1, dtype=torch.int64)
    fill = torch.zeros(E, dtype=torch.int64)
    for p, e in enumerate(phy2log.tolist()):
        l2p[e, fill[e]] = p
        fill[e] += 1
    return l2p.to(device), cnt.to(device)


def _routing(tokens: int, dist: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[T, 8] distinct experts per token; Zipf: P(expert of rank r) ~ r^-s."""
    g = torch.Generator(device=device).manual_seed(tokens)
    if dist == "uniform":
        w = torch.ones(E, device=device)
    else:
        w = torch.arange(1, E + 1, device=device, dtype=torch.float64).pow(-ZIPF_S).float()
    ids = torch.multinomial(w.expand(tokens, E), TOP_K, replacement=False, generator=g)
    return ids.to(dtype).contiguous()


def _bench(
    fns: dict[str, Callable[[], Any]], rounds: int = 5, quick: bool = False
) -> dict[str, float]:
    """Time in µs of each function: ``do_bench`` medians in rounds that interleave the
    functions, then the best round (see ``measure``)."""

    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_do_bench(fn, quick))
    return {k: min(v) for k, v in times.items()}


def _do_bench(fn: Callable[[], Any], quick: bool = False) -> float:
    import triton.testing

    ms = triton.testing.do_bench(
        fn, warmup=5 if quick else 20, rep=20 if quick else 50, return_mode="median"
    )
    return float(ms) * 1000.0


def _graph_us(
    fns: dict[str, Callable[[], Any]], flush: torch.Tensor, calls: int = 20, reps: int = 9
) -> dict[str, float]:
    """GPU time in µs per call of each function, host out of the picture: a CUDA graph of
    ``calls`` x (L2 flush, call) is replayed, interleaved with a graph of the flushes alone,
    and the flushes' median is subtracted from the median replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and allocate outside the captures
        for fn in fns.values():
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(fn: Callable[[], Any] | None) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                flush.zero_()
                if fn is not None:
                    fn()
        return g

    graphs: dict[str, torch.cuda.CUDAGraph] = {"": capture(None)}
    failed: dict[str, float] = {}
    for k, fn in fns.items():
        try:
            graphs[k] = capture(fn)
        except RuntimeError as exc:  # a figure missing beats a run lost
            print(f"capture of {k} failed: {exc}", file=sys.stderr, flush=True)
            failed[k] = float("nan")
    times: dict[str, list[float]] = {k: [] for k in graphs}
    for _ in range(reps):
        for k, g in graphs.items():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times[k].append(start.elapsed_time(end) * 1000.0 / calls)
    base = statistics.median(times.pop(""))
    del graphs
    return {**{k: statistics.median(v) - base for k, v in times.items()}, **failed}


def _host_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Host time per call (launch path only: no synchronisation inside the loop)."""
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def _warm_gpu() -> None:
    """Bring the clocks up before the first figure (an idle GPU starts slow)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


SWEEP_TOKENS = (512, 1024, 2048, 4096, 16384, 65536)


def _candidates() -> list[Any]:
    from eplbd.kernels._triton import Config

    return [
        Config(False, 128, 4),
        Config(False, 256, 4),
        Config(True, 512, 4, 4),
        Config(True, 1024, 8, 1),
        Config(True, 1024, 8, 2),
        Config(True, 2048, 8, 2),
        Config(True, 2048, 16, 1),
        Config(True, 2048, 16, 2),
        Config(True, 4096, 16, 1),
        Config(True, 4096, 32, 1),
        Config(True, 8192, 32, 1),
    ]


def _strategy(cfg: Any) -> str:
    return (
        ("histogram" if cfg.histogram else "atomic")
        + f" b{cfg.block} w{cfg.num_warps}"
        + (f" {cfg.programs_per_sm}/SM" if cfg.programs_per_sm else "")
    )


def sweep() -> list[dict[str, Any]]:
    """Every candidate configuration of the fast kernel, int64 ids (select_config's data)."""
    from eplbd.kernels._triton import launch_fast

    dev = torch.device("cuda")
    l2p, cnt = _layout(dev)
    load = torch.zeros(P, dtype=torch.int64, device=dev)
    rec = torch.ones(1, dtype=torch.int32, device=dev)
    out: list[dict[str, Any]] = []
    cands = _candidates()
    for dist in ("uniform", "zipf"):
        for tokens in SWEEP_TOKENS:
            ids = _routing(tokens, dist, torch.int64, dev)
            o = torch.empty_like(ids)
            fns: dict[str, Callable[[], Any]] = {"copy": functools.partial(o.copy_, ids)}
            for c in cands:
                fns[_strategy(c)] = functools.partial(
                    launch_fast, ids, l2p, cnt, load, rec, None, c
                )
            t = _bench(fns, quick=True)
            best = sorted((v, k) for k, v in t.items() if k != "copy")[:3]
            print(f"sweep T={tokens} {dist}: copy {t['copy']:.2f}; best", best, flush=True)
            out += [{"tokens": tokens, "routing": dist, "config": k, "us": v} for k, v in t.items()]
    return out


def measure(with_sweep: bool) -> dict[str, Any]:
    """The table: GPU time per call from CUDA-graph replays (``_graph_us``). Timing single
    launches from Python measured the host instead: on the shared GPU machine the launch
    path of a Triton kernel took 45-65 µs, as long as the L2 flush that ``do_bench`` puts
    before each call to hide it, so figures jumped by 10-20 µs from run to run."""
    import triton

    from eplbd.kernels import map_and_record, map_and_record_torch
    from eplbd.kernels._triton import launch_baseline, select_config

    dev = torch.device("cuda")
    _warm_gpu()
    l2p, cnt = _layout(dev)
    load = torch.zeros(P, dtype=torch.int64, device=dev)
    rec = torch.ones(1, dtype=torch.int32, device=dev)
    rows: list[dict[str, Any]] = []
    fns: list[dict[str, Callable[[], Any]]] = []
    for dtype in (torch.int64, torch.int32):
        for dist in ("uniform", "zipf"):
            for tokens in TOKENS:
                ids = _routing(tokens, dist, dtype, dev)
                copy_out = torch.empty_like(ids)
                la, lb = torch.zeros_like(load), torch.zeros_like(load)
                a = map_and_record(ids, l2p, cnt, la, rec)
                b = map_and_record_torch(ids, l2p, cnt, lb, rec)
                c = launch_baseline(ids, l2p, cnt, torch.zeros_like(load), rec, None)
                if not (torch.equal(a, b) and torch.equal(la, lb) and torch.equal(a, c)):
                    raise AssertionError(f"mismatch at T={tokens} {dist} {dtype}")
                args = (ids, l2p, cnt, load, rec)
                fns.append(
                    {
                        "ours": functools.partial(map_and_record, *args),
                        "baseline": functools.partial(launch_baseline, *args, None),
                        "torch": functools.partial(map_and_record_torch, *args),
                        "copy": functools.partial(copy_out.copy_, ids),
                    }
                )
                rows.append(
                    {
                        "tokens": tokens,
                        "routing": dist,
                        "dtype": str(dtype).removeprefix("torch."),
                        "strategy": _strategy(select_config(ids.numel(), P)),
                        "hottest_slot_count": int(lb.max()),
                    }
                )
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 50 * 2**20
    flush = torch.empty(2 * l2 // 4, dtype=torch.int32, device=dev)
    for row, f in zip(rows, fns, strict=True):
        row.update({f"{k}_us": v for k, v in _graph_us(f, flush).items()})
        print(json.dumps(row), flush=True)
    big = fns[len(TOKENS) - 1]  # T = 64k, uniform, int64
    host = {k: _host_us(big[k]) for k in ("ours", "baseline", "copy")}
    print("host µs per call:", host, flush=True)
    return {
        "machine": machine_line(),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "host_us_per_call": host,
        "rows": rows,
        "sweep": sweep() if with_sweep else [],
    }


def render(res: dict[str, Any]) -> str:
    lines = [
        "## map_and_record kernel (GPU)",
        "",
        f"Machine: {res['machine']}.",
        "",
        f"top-{TOP_K}, E = {E}, P = {P} (slot p holds expert p mod E), expert_load int64, "
        f"recording on; Zipf s = {ZIPF_S} over experts in id order. Times in µs: "
        "GPU time per call: a CUDA graph of 20 x (L2 flush, call) replayed 9 times, "
        "interleaved with a graph of the flushes alone; median replay minus median flushes, "
        "over 20. *ours*: "
        "`map_and_record` (strategy picked by `select_config`); *baseline*: same semantics, "
        "one atomic add per element; *torch*: `map_and_record_torch` on the GPU; *copy*: "
        "device-to-device copy of the same ids (bytes in and out). "
        "`python3 -m benchmarks.bench_kernel`.",
        "",
        "| T | routing | ids | strategy | hottest slot | ours | baseline | torch | copy "
        "| baseline / ours | ours / copy |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['tokens']} | {r['routing']} | {r['dtype']} | {r['strategy']} "
            f"| {r['hottest_slot_count']} | {r['ours_us']:.1f} | {r['baseline_us']:.1f} "
            f"| {r['torch_us']:.1f} | {r['copy_us']:.1f} "
            f"| {r['baseline_us'] / r['ours_us']:.2f}x | {r['ours_us'] / r['copy_us']:.2f}x |"
        )
    rows = res["rows"]
    host = res.get("host_us_per_call")
    if host:
        lines += [
            "",
            "Host time per call from Python (launch path, T = 64k): "
            + ", ".join(f"{k} {v:.1f} µs" for k, v in host.items())
            + "; inside a captured CUDA graph it is zero.",
        ]

    def worst(tokens: int) -> float:
        return min(r["baseline_us"] / r["ours_us"] for r in rows if r["tokens"] == tokens)

    slowest = min(rows, key=lambda r: r["baseline_us"] / r["ours_us"])
    big = [r for r in rows if r["tokens"] >= 16384]
    copy_ratio = max(r["ours_us"] / r["copy_us"] for r in big) if big else float("nan")
    least = slowest["baseline_us"] / slowest["ours_us"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines += [
        "",
        "Targets (worst row of each group):",
        f"- 16k tokens: {worst(16384):.2f}x faster than the baseline (target >= 2x: "
        f"{verdict(worst(16384) >= 2)}).",
        f"- 64k tokens: {worst(65536):.2f}x faster than the baseline (target >= 4x: "
        f"{verdict(worst(65536) >= 4)}).",
        f"- every size: slowest ratio baseline / ours = {least:.2f}x (T = {slowest['tokens']}, "
        f"{slowest['routing']}, {slowest['dtype']}; target >= 1x: {verdict(least >= 1)}).",
        f"- T >= 16k: at most {copy_ratio:.2f}x the copy (stretch target <= 2x: "
        f"{verdict(copy_ratio <= 2)}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also save kernel.md and kernel.json in this dir")
    ap.add_argument("--sweep", action="store_true", help="time every candidate configuration")
    ap.add_argument("--sweep-only", action="store_true", help="only the sweep, docs untouched")
    ap.add_argument("--render", type=Path, help="write a saved kernel.json to the docs, no GPU")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(args.render.read_text())
    else:
        if not torch.cuda.is_available():
            print("bench_kernel: needs a CUDA GPU", file=sys.stderr)
            return 1
        if args.sweep_only:
            _warm_gpu()
            res = {"machine": machine_line(), "sweep": sweep()}
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "sweep.json").write_text(json.dumps(res, indent=1))
            return 0
        res = measure(args.sweep)
    md = render(res)
    print(md)
    write_section(SECTION, md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel.md").write_text(md)
        (args.out / "kernel.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
