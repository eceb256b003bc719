"""CPU cost of EplbClient.step() when no window closes and nothing is pending (target <= 10 us).

DeepSeek-V3 shape (58 layers, 256 experts, 288 slots), one rank, no agent. Cases:

- idle: no schedule (what a client without an agent does every step);
- recording: a window is open and does not close during the measurement;
- window close (for information): the step that ships a snapshot, on this device;
- commit stall: the step that applies a new layout minus a normal step, against the time of
  the same in-place copies of the changed slots' weights alone (target on a GPU: <= that copy
  + 1 ms); on the CPU with a small model, for information only;
- two ranks on gloo (for information): a step with nothing to do and a consensus step (the
  all-reduce every ``sync_interval`` steps), each step timed on its own.

Method: after a warm-up, batches of calls timed with perf_counter_ns and process_time_ns;
the figure is the median over batches of (batch time / calls). Run:
``python3 -m benchmarks.bench_client_step``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from eplbd_client import EplbClient

from benchmarks._report import machine_line, write_section
from eplbd.ops.procs import exit_now

L, E, P = 58, 256, 288
TARGET_US = 10.0


def _per_call(fn: Callable[[], None], calls: int, batches: int) -> tuple[float, float]:
    """Median over batches of wall and CPU microseconds per call."""
    wall, cpu = [], []
    for _ in range(batches):
        t0, c0 = time.perf_counter_ns(), time.process_time_ns()
        for _ in range(calls):
            fn()
        t1, c1 = time.perf_counter_ns(), time.process_time_ns()
        wall.append((t1 - t0) / calls / 1e3)
        cpu.append((c1 - c0) / calls / 1e3)
    return statistics.median(wall), statistics.median(cpu)


def _client(device: str) -> EplbClient:
    return EplbClient(L, E, P, device=device, require_weights=False)


def measure(device: str) -> list[tuple[str, float, float]]:
    rows = []
    idle = _client(device)
    _per_call(idle.step, 10_000, 5)  # warm-up
    rows.append(("idle (no agent, no schedule)", *_per_call(idle.step, 10_000, 41)))
    rec = _client(device)
    # windows start at multiples of window_steps: step to the first one, then stay inside it
    rec.set_schedule(window_steps=2**20, record_steps=2**20 - 1)
    while rec.step_count < 2**20:
        rec.step()
    assert int(rec.layer_state(0).should_record) == 1
    _per_call(rec.step, 10_000, 5)
    rows.append(("recording, window open", *_per_call(rec.step, 10_000, 41)))
    close = _client(device)
    close.set_schedule(window_steps=1, record_steps=1)  # every step closes a window
    close.step()

    def close_step() -> None:
        close.step()
        while not close.outbox.empty():
            close.outbox.get_nowait()

    _per_call(close_step, 20, 3)
    rows.append(("window closes every step (info)", *_per_call(close_step, 20, 21)))
    for c in (idle, rec, close):
        c.close()
    return rows


def measure_commit_stall(
    device: str, L: int, E: int, P: int, H: int, F: int, dtype: torch.dtype, reps: int = 5
) -> tuple[float, float, float, int]:
    """Medians in ms: (normal step, commit step, in-place copy of the changed slots), and the
    bytes copied per commit. One rank; every layout change moves most slots."""
    from eplbd.testing import random_layout

    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    client = EplbClient(L, E, P, device=device)
    weights = []
    for layer in range(L):
        ws = [
            torch.randn(P, 2 * F, H, device=device).to(dtype),
            torch.randn(P, H, F, device=device).to(dtype),
        ]
        client.register_expert_weights(layer, ws)
        weights.append(ws)
    g = torch.Generator().manual_seed(0)
    normal, commit, copy = [], [], []
    nbytes = 0
    for rep in range(reps + 1):
        old = client.layout.phy2log
        new = random_layout(L, E, P, generator=g)
        sync()
        t0 = time.perf_counter()
        client.step()
        sync()
        t1 = time.perf_counter()
        client.prepare(new, rep + 1)
        deadline = time.monotonic() + 120
        while client.staged_epoch != rep + 1:
            if time.monotonic() > deadline:
                raise RuntimeError("staging did not finish")
            time.sleep(0.001)
        sync()
        t2 = time.perf_counter()
        client.step()  # applies
        sync()
        t3 = time.perf_counter()
        assert client.epoch == rep + 1
        # The same in-place copies alone, from buffers of the same sizes.
        idx = [(old[layer] != new[layer]).nonzero().flatten().to(device) for layer in range(L)]
        bufs = [[w[: len(i)].clone() for w in ws] for i, ws in zip(idx, weights, strict=True)]
        sync()
        t4 = time.perf_counter()
        for i, ws, bs in zip(idx, weights, bufs, strict=True):
            for w, b in zip(ws, bs, strict=True):
                w.index_copy_(0, i, b)
        sync()
        t5 = time.perf_counter()
        del bufs
        if rep == 0:
            continue  # warm-up
        normal.append((t1 - t0) * 1e3)
        commit.append((t3 - t2) * 1e3)
        copy.append((t5 - t4) * 1e3)
        nbytes = sum(
            len(i) * sum(w[0].numel() * w.element_size() for w in ws)
            for i, ws in zip(idx, weights, strict=True)
        )
    client.close()
    return statistics.median(normal), statistics.median(commit), statistics.median(copy), nbytes


def _two_rank_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    c = EplbClient(
        L,
        E,
        P,
        ep_rank=rank,
        ep_size=2,
        group=dist.group.WORLD,
        sync_interval=16,
        require_weights=False,
    )
    plain: list[float] = []
    rounds: list[float] = []
    for i in range(16 * 150):
        dist.barrier()  # ranks enter step() together, as an engine's all-to-all keeps them
        t0 = time.perf_counter_ns()
        c.step()
        dt = (time.perf_counter_ns() - t0) / 1e3
        if i >= 16 * 10:
            (rounds if c.step_count % 16 == 0 else plain).append(dt)
    if rank == 0:
        torch.save((statistics.median(plain), statistics.median(rounds)), out)
    c.close()
    dist.destroy_process_group()
    del c
    exit_now(0)  # no interpreter finalization with gloo's threads about


def measure_two_ranks() -> tuple[float, float]:
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        store, out = os.path.join(d, "store"), os.path.join(d, "out.pt")
        mp.spawn(_two_rank_worker, args=(store, out), nprocs=2, join=True)
        plain, rnd = torch.load(out)
    return float(plain), float(rnd)


def main() -> None:
    torch.set_num_threads(1)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    import os

    load1 = os.getloadavg()[0]
    lines = [
        f"Machine: {machine_line()} (load average {load1:.1f} at start: a shared machine)",
        "",
        f"`EplbClient.step()`, shape L={L}, E={E}, P={P}, one rank, no agent. Median over 41 "
        "batches of 10,000 calls after warm-up (20-call batches for the window-close row); "
        f"target: <= {TARGET_US:g} us of CPU time when no window closes and nothing is pending.",
        "",
        "| routing state on | case | wall us/call | CPU us/call | target |",
        "|---|---|---:|---:|---|",
    ]
    print(f"{'device':6} {'case':34} {'wall us':>9} {'cpu us':>9}")
    for dev in devices:
        for name, wall, cpu in measure(dev):
            info = "info" in name
            verdict = "-" if info else ("met" if cpu <= TARGET_US else "MISSED")
            print(f"{dev:6} {name:34} {wall:9.3f} {cpu:9.3f} {verdict}")
            lines.append(f"| {dev} | {name} | {wall:.3f} | {cpu:.3f} | {verdict} |")
    lines += [
        "",
        "Commit stall: the step that applies a layout (in-place copies of the changed slots' "
        "weights, then the maps) minus a normal step, against the same weight copies alone "
        "(medians of 5 commits, device synchronised around each; target on a GPU: "
        "stall <= copy + 1 ms).",
        "",
        "| device | model | bytes copied | normal step ms | commit step ms | stall ms "
        "| copy alone ms | target |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    stall_cases = [("cpu", 2, 16, 24, 256, 128, torch.float32, "info")]
    if torch.cuda.is_available():
        stall_cases.append(("cuda", 4, 256, 288, 2048, 512, torch.bfloat16, ""))
    for dev, sL, sE, sP, sH, sF, dt, note in stall_cases:
        n_ms, c_ms, copy_ms, nb = measure_commit_stall(dev, sL, sE, sP, sH, sF, dt)
        stall = c_ms - n_ms
        verdict = note or ("met" if stall <= copy_ms + 1.0 else "MISSED")
        model = f"L={sL} E={sE} P={sP} H={sH} F={sF} {str(dt).removeprefix('torch.')}"
        print(
            f"commit stall {dev}: {model} {nb / 1e6:.1f} MB: normal {n_ms:.3f} ms, "
            f"commit {c_ms:.3f} ms, stall {stall:.3f} ms, copy {copy_ms:.3f} ms {verdict}"
        )
        lines.append(
            f"| {dev} | {model} | {nb / 1e6:.1f} MB | {n_ms:.3f} | {c_ms:.3f} | {stall:.3f} "
            f"| {copy_ms:.3f} | {verdict} |"
        )
    plain, rnd = measure_two_ranks()
    print(f"2 ranks, gloo: plain step {plain:.3f} us, consensus step {rnd:.1f} us (wall)")
    lines += [
        "",
        "Two ranks on gloo, `sync_interval=16`, each step timed alone after a barrier (wall, "
        "median, rank 0, includes ~0.1 us of timer overhead; for information): "
        f"a step with nothing to do {plain:.3f} us, a consensus step {rnd:.1f} us "
        f"(one all-reduce of 7 int64 on the CPU group, i.e. {rnd / 16:.1f} us per step "
        "amortised).",
    ]
    write_section("client-step", "\n".join(lines))


if __name__ == "__main__":
    main()
