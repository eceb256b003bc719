"""One demo worker: an EP rank serving the reference MoE stack through an EplbClient.

Run by the driver as ``python3 -m eplbd.demo._worker RANK CONFIG_JSON RUN_DIR``. It joins a
gloo group of ``workers`` ranks, embeds ``EplbClient(agent=ipc://RUN_DIR/rt/agent.sock)``,
and for each step:

1. routes its tokens (the synthetic drifting router, or the trace's ids) and serves them
   through :class:`~eplbd.testing.EPMoEEngine`: ``map_and_record`` picks each token's
   physical slot, an all-to-all sends it to the GPU (rank) owning that slot, the slot's expert
   FFN runs there with the weights the client keeps in place;
2. checks the output against :meth:`~eplbd.testing.MoEModel.reference_forward` (no EPLB,
   logical weights): every step, every token, every rank;
3. measures the tokens each GPU actually computed per layer (from the physical ids), and what
   the initial layout would have given the same tokens, and the logical load per expert;
4. all-reduces those over the ranks (plus the output error and the epoch served);
5. calls ``client.step()`` (where layouts flip, on every rank at the same step).

Rank 0 prints one JSON line per step on stdout; every rank prints a final ``done`` line.
Stderr goes to the driver's log file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch

from eplbd.demo._config import TOLERANCE, DemoConfig
from eplbd.testing import EPMoEEngine, MoEConfig, MoEModel

__all__ = ["TOLERANCE", "DemoModel", "main"]


class DemoModel(MoEModel):
    """The reference model whose router can replay a trace, and which keeps the logical ids
    of the last ``route`` call per layer (``last_ids[layer]`` [T, K]) for the measurements.

    With a trace, the ids come from the trace rows of (step, rank) and the weights are the
    router's softmax at those ids, renormalised: outputs still depend on the tokens, and the
    reference forward sees exactly the same routing.
    """

    def __init__(self, cfg: MoEConfig, demo: DemoConfig, rank: int) -> None:
        super().__init__(cfg)
        self.demo = demo
        self.rank = rank
        self.last_ids: dict[int, torch.Tensor] = {}
        self.trace: Any = None
        self._step_ids: tuple[int, torch.Tensor] | None = None
        if demo.trace:
            from eplbd.demo._trace import load_trace

            self.trace = load_trace(demo.trace, list(demo.trace_layers) or None)

    def _trace_ids(self, step: int) -> torch.Tensor:
        if self._step_ids is None or self._step_ids[0] != step:
            d = self.demo
            ids = self.trace.step_ids(step, d.steps, self.rank, d.workers, d.tokens)
            self._step_ids = (step, torch.from_numpy(ids))
        return self._step_ids[1]

    def route(self, layer: int, h: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.trace is None:
            w, ids = super().route(layer, h, step)
        else:
            ids = self._trace_ids(step)[: h.shape[0], layer, :]
            probs = torch.softmax(h @ self.router[layer], dim=-1)
            w = probs.gather(1, ids)
            w = w / w.sum(dim=-1, keepdim=True)
        self.last_ids[layer] = ids
        return w, ids


def model_config(demo: DemoConfig) -> MoEConfig:
    return MoEConfig(
        num_layers=demo.layers,
        num_experts=demo.experts,
        top_k=demo.top_k,
        hidden=demo.hidden,
        ffn=demo.ffn,
        seed=demo.seed,
        skew=demo.skew,
        drift=demo.drift,
    )


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def run(rank: int, demo: DemoConfig, run_dir: str) -> None:
    import torch.distributed as dist
    from eplbd_client import EplbClient

    from eplbd.kernels import map_and_record
    from eplbd.layout import Layout

    torch.set_num_threads(1)
    G, L, E, P = demo.workers, demo.layers, demo.experts, demo.num_physical
    S = P // G
    dist.init_process_group(
        "gloo",
        init_method=f"file://{run_dir}/rendezvous",
        rank=rank,
        world_size=G,
        timeout=timedelta(seconds=120),
    )
    group = dist.group.WORLD
    model = DemoModel(model_config(demo), demo, rank)
    client = EplbClient(
        L,
        E,
        P,
        ep_rank=rank,
        ep_size=G,
        agent=f"ipc://{run_dir}/rt/agent.sock",
        group=group if G > 1 else None,
        sync_interval=demo.tuning.sync_interval,
        top_k=demo.top_k,
        group_name=demo.group,
        worker=f"demo-r{rank}",
        node="demo",
        prepare_timeout_s=demo.tuning.prepare_timeout_s,
    )
    engine = EPMoEEngine(model, client, group if G > 1 else None)
    static = Layout.default(L, E, P)
    s_l2p, s_cnt = static.log2phy, static.logcnt
    no_load = torch.zeros(P, dtype=torch.int32)
    no_record = torch.zeros(1, dtype=torch.int32)
    _emit({"t": "ready", "rank": rank, "pid": os.getpid()})

    commits: list[list[int]] = []
    max_err = 0.0
    for step in range(demo.steps):
        epoch = client.epoch
        x = model.tokens(step, rank, demo.tokens)
        t0 = time.perf_counter()
        y = engine.forward(x, step)
        fwd_s = time.perf_counter() - t0
        ids = [model.last_ids[layer].clone() for layer in range(L)]
        ref = model.reference_forward(x, step)
        err = float((y - ref).abs().max()) if y.numel() else 0.0
        if err != err:  # NaN: a mismatch, and max() would hide it
            err = float("inf")
        max_err = max(max_err, err)

        sums = torch.zeros(L, 2 * G + E, dtype=torch.int64)
        for layer in range(L):
            phys = engine.last_phys[layer].reshape(-1)
            sums[layer, :G] = torch.bincount(phys // S, minlength=G)
            sp = map_and_record(ids[layer], s_l2p[layer], s_cnt[layer], no_load, no_record)
            sums[layer, G : 2 * G] = torch.bincount(sp.reshape(-1) // S, minlength=G)
            sums[layer, 2 * G :] = torch.bincount(ids[layer].reshape(-1), minlength=E)
        flags = torch.tensor([err, float(epoch), -float(epoch), fwd_s], dtype=torch.float64)
        if G > 1:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)

        client.step()
        if client.epoch != epoch:
            commits.append([client.epoch, step + 1])
        if rank == 0:
            _emit(
                {
                    "t": "step",
                    "step": step,
                    "epoch": epoch,
                    "epoch_min": int(-flags[2]),
                    "epoch_max": int(flags[1]),
                    "err": float(flags[0]),
                    "fwd_s": round(float(flags[3]), 6),
                    "live": sums[:, :G].tolist(),
                    "static": sums[:, G : 2 * G].tolist(),
                    "experts": sums[:, 2 * G :].tolist(),
                    "domain": None
                    if model.trace is None
                    else model.trace.domains[model.trace.domain_of(step, demo.steps)],
                }
            )
    stats = client.stats
    _emit(
        {
            "t": "done",
            "rank": rank,
            "epoch": client.epoch,
            "commits": commits,
            "max_err": max_err,
            "stats": stats,
        }
    )
    if G > 1:
        dist.barrier(group=group)
    client.close()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank, demo, run_dir = int(argv[0]), DemoConfig.from_json(argv[1]), argv[2]
    _die_with_parent()
    try:
        run(rank, demo, run_dir)
    except Exception as e:
        import traceback

        traceback.print_exc()
        _emit({"t": "error", "rank": rank, "message": f"{type(e).__name__}: {e}"})
        return 1
    return 0


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the driver dies, so a killed demo leaves no worker behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)
    except Exception:
        pass


if __name__ == "__main__":
    from eplbd.ops.procs import exit_now

    exit_now(main())  # no interpreter finalization with gloo's threads about
