"""Multi-process helpers for the client tests: run one function per rank under
torch.distributed (gloo on CPU, NCCL on GPUs), collect each rank's result, kill stragglers.

Children come from a forkserver that has imported torch once, so a 4-rank group starts in
about a second instead of four torch imports on two cores.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from eplbd.ops.procs import exit_now

_CTX: Any = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(
            [
                "torch",
                "torch.distributed",
                "eplbd_client",
                "eplbd.testing",
                "_mp",
                "_client_scenarios",
            ]
        )
    return _CTX


def _entry(
    fn_name: str, rank: int, world: int, tmp: str, backend: str, kwargs: dict[str, Any]
) -> None:
    out = Path(tmp) / f"rank{rank}"
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"file://{tmp}/store", rank=rank, world_size=world
        )
        import _client_scenarios

        result = getattr(_client_scenarios, fn_name)(rank, world, tmp, backend=backend, **kwargs)
        torch.save(result, str(out) + ".pt")
        dist.destroy_process_group()
    except BaseException:
        Path(str(out) + ".err").write_text(traceback.format_exc())
        os._exit(1)
    exit_now(0)  # no interpreter finalization with gloo's threads about


def run_ranks(
    fn_name: str,
    world: int,
    tmp: Path,
    *,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Run ``_client_scenarios.<fn_name>(rank, world, tmp, backend=..., **kwargs)`` in ``world``
    processes; return their results in rank order. Raises with the ranks' tracebacks on a
    failure, or after ``timeout_s``; children are always killed."""
    ctx = _context()
    tmp.mkdir(parents=True, exist_ok=True)
    procs = [
        ctx.Process(target=_entry, args=(fn_name, r, world, str(tmp), backend, kwargs))
        for r in range(world)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        errs = [
            f"rank {r}:\n{(tmp / f'rank{r}.err').read_text()}"
            for r in range(world)
            if (tmp / f"rank{r}.err").exists()
        ]
        if errs:
            raise AssertionError("\n".join(errs))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        if hung:
            raise AssertionError(f"ranks {hung} did not finish within {timeout_s} s")
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise AssertionError(f"ranks exited with codes {bad}")
        return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            if p.pid is not None:
                p.join(5)
