"""Benchmark planner ingest: DeepSeek-V3-size snapshots received, decoded, validated, accumulated.

Target (TARGETS.md): >= 5,000 snapshots/s on one core, each a `snapshot` message with
counts int32 [58, 288] (58 MoE layers, 288 physical slots, 256 logical experts).

    python3 -m benchmarks.bench_ingest [--n 20000] [--repeats 3] [--transport tcp|ipc|both] [--no-write]

Method. The receiver (this process: its Python thread, libzmq's I/O thread and torch's one
intra-op thread) is pinned to one CPU; a sender process pinned to another CPU pushes
pre-encoded snapshots (a fresh msgpack body per message, so `seq` grows) as fast as the PULL
side takes them. The receiver does what the planner does per snapshot:

1. `WireSocket.recv` -> `decode` (zero-copy tensors on the zmq frames) and `validate` against
   the registered model (fields, dtype, shape [58, 288], counts in [0, tokens]);
2. `SequenceTracker.check` (gaps counted, replays refused);
3. accumulate logical load: `acc.view(-1).scatter_add_(0, phy2log_flat_index, counts.double())`
   into a [58, 256] float64 window accumulator; or (one extra row) sum the counts per epoch in
   physical space, [58, 288] int32, and convert to logical load once at the end of the run.

Throughput is given per wall second and per CPU second of the receiver process (the machine
may be shared: CPU time is what one core can do). "No socket" rows run steps 1-3 on frames
already in memory. Every figure is the median of `--repeats` runs, the runs interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import torch

from benchmarks._report import machine_line, write_section

L, E, P = 58, 256, 288
TOKENS = 16384  # tokens per window (counts are <= tokens)
SECTION = "ingest"
TARGET = 5000.0
VARIANTS = 32  # distinct count tensors cycled through


def _counts(k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(k)
    return torch.randint(0, TOKENS // 8, (L, P), generator=g, dtype=torch.int32)


def _body(seq: int) -> dict[str, Any]:
    return {
        "agent": "node0",
        "incarnation": "1f3a-9c0e4b7d2a11",
        "group": "g0",
        "ep_ranks": list(range(8)),
        "seq": seq,
        "epoch": 0,
        "step_start": seq * 100,
        "step_end": seq * 100 + 100,
        "tokens": TOKENS,
    }


class _Frames:
    """Snapshot frames for any seq: the header once, a fresh msgpack body per message."""

    def __init__(self, tensor_frames: list[Any]) -> None:
        from eplbd.wire import SNAPSHOT, encode

        self.head = encode(SNAPSHOT, _body(0), {"counts": torch.zeros(L, P, dtype=torch.int32)})
        self.spec = msgpack.unpackb(self.head[3])["tensors"]
        self.tensor_frames = tensor_frames

    def __call__(self, seq: int) -> list[Any]:
        body = msgpack.packb({**_body(seq), "schema": 1, "tensors": self.spec})
        h = self.head
        return [h[0], h[1], h[2], body, self.tensor_frames[seq % len(self.tensor_frames)]]


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


# --- sender process -------------------------------------------------------------------------


def _sender(endpoint: str, n: int, cpu: int | None) -> int:
    _pin(cpu)
    import zmq

    make = _Frames([c.numpy().tobytes() for c in map(_counts, range(VARIANTS))])
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 5000)
    s.setsockopt(zmq.SNDHWM, 64)
    s.connect(endpoint)
    for seq in range(n):
        s.send_multipart(make(seq), copy=False)
    s.close()
    ctx.term()
    return 0


# --- receiver -------------------------------------------------------------------------------


class Accumulator:
    """The planner's per-snapshot work after decode: order check, then load.

    ``physical=False``: every snapshot becomes logical load at once (scatter_add of
    counts.double() through that epoch's phy2log into [L, E] float64).
    ``physical=True``: counts are summed per epoch in physical space ([L, P] int32, flushed to
    int64 before the token total could overflow) and converted to logical load once, at
    ``finish()`` (a planner would do that once per window).
    """

    def __init__(self, physical: bool = False) -> None:
        from eplbd.wire import SequenceTracker, WireCounters

        self.counters = WireCounters()
        self.seqs = SequenceTracker(self.counters)
        phy2log = (torch.arange(P, dtype=torch.int64) % E).repeat(L, 1)  # epoch 0 layout
        self.index = {0: (phy2log + torch.arange(L).unsqueeze(1) * E).reshape(-1)}
        self.acc = torch.zeros(L, E, dtype=torch.float64)
        self.flat = self.acc.view(-1)
        self.physical = physical
        self.phys32: dict[int, torch.Tensor] = {}
        self.phys64: dict[int, torch.Tensor] = {}
        self.tokens32: dict[int, int] = {}
        self.n = 0

    def add(self, msg: Any) -> None:
        b = msg.body
        self.seqs.check(b["agent"], b["incarnation"], b["seq"])
        counts = torch.as_tensor(msg.tensors["counts"])  # the planner's conversion
        epoch = b["epoch"]
        if not self.physical:
            self.flat.scatter_add_(0, self.index[epoch], counts.view(-1).to(torch.float64))
        else:
            p32 = self.phys32.get(epoch)
            if p32 is None:
                p32 = self.phys32[epoch] = torch.zeros(L, P, dtype=torch.int32)
                self.phys64[epoch] = torch.zeros(L, P, dtype=torch.int64)
                self.tokens32[epoch] = 0
            if self.tokens32[epoch] + b["tokens"] >= 2**31:  # every count <= tokens
                self.phys64[epoch] += p32
                p32.zero_()
                self.tokens32[epoch] = 0
            p32.add_(counts)
            self.tokens32[epoch] += b["tokens"]
        self.n += 1

    def finish(self) -> None:
        for epoch, p32 in self.phys32.items():
            total = (self.phys64[epoch] + p32).view(-1).to(torch.float64)
            self.flat.scatter_add_(0, self.index[epoch], total)
            p32.zero_()
            self.phys64[epoch].zero_()


def _socket_run(
    n: int, transport: str, cpus: list[int], physical: bool = False
) -> dict[str, float]:
    import tempfile

    import zmq

    from eplbd.wire import ModelShape, snapshot_receiver

    model = ModelShape(L, E, P)
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="bi") as d:
        ep = f"ipc://{d}/snap.sock" if transport == "ipc" else "tcp://127.0.0.1:*"
        sock = snapshot_receiver(ctx, ep)
        sender_cpu = cpus[1] if len(cpus) > 1 else None
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_ingest", "--sender", sock.endpoint,
             "--n", str(n), "--cpu", str(-1 if sender_cpu is None else sender_cpu)],
        )  # fmt: skip
        try:
            acc = Accumulator(physical)
            got = sock.recv(60_000, model=model)
            assert got is not None, "sender never connected"
            t0, c0 = time.perf_counter(), time.process_time()
            acc.add(got.message)
            while acc.n < n:
                got = sock.recv(10_000, model=model)
                assert got is not None, f"stalled after {acc.n} snapshots"
                acc.add(got.message)
            acc.finish()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            proc.wait(60)
            sock.close()
            ctx.term()
    _check(acc, n)
    assert sock.counters.bad_total == 0 and acc.counters.missing == {}
    return {"wall": (n - 1) / wall, "cpu": (n - 1) / cpu}


def _check(acc: Accumulator, n: int) -> None:
    want = sum(int(_counts(k).sum()) * len(range(k, n, VARIANTS)) for k in range(VARIANTS))
    assert int(acc.acc.sum()) == want, "accumulated load differs from what was sent"


def _memory_run(n: int, as_bytes: bool) -> dict[str, float]:
    from eplbd.wire import ModelShape, decode, validate

    model = ModelShape(L, E, P)
    tensor_frames: list[Any] = [c.numpy().tobytes() for c in map(_counts, range(VARIANTS))]
    if not as_bytes:  # writable buffers, as zmq frames are: no copy at decode
        tensor_frames = [bytearray(f) for f in tensor_frames]
    make = _Frames(tensor_frames)
    msgs = [make(seq) for seq in range(n)]  # the tensor frames are shared, not copied
    acc = Accumulator()
    t0, c0 = time.perf_counter(), time.process_time()
    for frames in msgs:
        acc.add(validate(decode(frames), model=model))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    _check(acc, n)
    return {"wall": n / wall, "cpu": n / cpu}


def _stage_times(n: int) -> dict[str, float]:
    """Median microseconds per snapshot of each step alone (writable frames)."""
    from eplbd.wire import ModelShape, decode, validate

    model = ModelShape(L, E, P)
    frames = [bytearray(f) for f in _Frames([_counts(0).numpy().tobytes()])(0)]
    msg = validate(decode(frames), model=model)
    acc = Accumulator()
    idx, flat, counts = acc.index[0], acc.flat, torch.as_tensor(msg.tensors["counts"])
    phys = torch.zeros(L, P, dtype=torch.int32)

    def per(fn: Callable[[], object]) -> float:
        for _ in range(50):
            fn()
        runs = []
        for _ in range(5):
            t0 = time.process_time()
            for _ in range(n):
                fn()
            runs.append((time.process_time() - t0) / n * 1e6)
        return statistics.median(runs)

    return {
        "decode": per(lambda: decode(frames)),
        "validate": per(lambda: validate(msg, model=model)),
        "accumulate (scatter_add into [L, E] float64)": per(
            lambda: flat.scatter_add_(0, idx, counts.view(-1).to(torch.float64))
        ),
        "alternative: add into physical [L, P] int32": per(lambda: phys.add_(counts)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="snapshots per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--transport",
        choices=["tcp", "ipc", "both"],
        default="both",
        help="tcp: the agent -> planner hop; ipc: worker -> agent",
    )
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--sender", metavar="ENDPOINT", help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sender:
        return _sender(args.sender, args.n, None if args.cpu in (None, -1) else args.cpu)

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    _pin(cpus[0])  # before any zmq context: libzmq's I/O thread inherits the pinning
    torch.set_num_threads(1)
    transports = ["tcp", "ipc"] if args.transport == "both" else [args.transport]
    sock_rows = {
        (t, False): f"PUSH -> PULL over {t} loopback: recv, decode, validate, to logical load"
        for t in transports
    }
    sock_rows[(transports[0], True)] = (
        f"PUSH -> PULL over {transports[0]} loopback: recv, decode, validate, "
        "sum in physical space (to logical once per run)"
    )
    zero_copy = "no socket: decode, validate, to logical load (writable frames, zero-copy)"
    one_copy = "no socket: decode, validate, to logical load (immutable bytes, one copy)"
    rows: dict[str, list[dict[str, float]]] = {
        k: [] for k in [*sock_rows.values(), zero_copy, one_copy]
    }
    _memory_run(min(args.n, 2000), False)  # warm-up
    for _ in range(args.repeats):
        for (t, physical), name in sock_rows.items():
            rows[name].append(_socket_run(args.n, t, cpus, physical))
        rows[zero_copy].append(_memory_run(args.n, False))
        rows[one_copy].append(_memory_run(args.n, True))
    stages = _stage_times(2000)

    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("wall", "cpu")} for k, v in rows.items()
    }
    lines = [
        f"Machine: {machine_line()}; receiver pinned to CPU {cpus[0]}, torch threads 1, "
        f"load average at start {os.getloadavg()[0]:.1f}.",
        "",
        f"Snapshots of counts int32 [{L}, {P}] (E = {E}), {args.n} per run, median of "
        f"{args.repeats} runs. Target: >= {TARGET:,.0f} snapshots/s on one core.",
        "",
        "| path | snapshots/s (wall) | snapshots/s (per CPU second) | target met |",
        "| --- | ---: | ---: | --- |",
    ]
    for k, v in med.items():
        ok = "yes" if v["cpu"] >= TARGET else "no"
        lines.append(f"| {k} | {v['wall']:,.0f} | {v['cpu']:,.0f} | {ok} |")
    lines += [
        "",
        "| step alone (writable frames) | µs per snapshot (CPU, median) |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in stages.items()]
    lines += [
        "",
        "Run: `python3 -m benchmarks.bench_ingest`. The wall figure includes time the "
        "receiver was not scheduled on a shared machine; the CPU figure (receiver process, "
        "libzmq I/O thread included) is what one core sustains. Summing counts per epoch in "
        "physical space and converting to logical load once per window takes the float "
        "conversion and the scatter off the per-snapshot path.",
    ]
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        write_section(SECTION, "## Ingest (planner, one core)\n\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
