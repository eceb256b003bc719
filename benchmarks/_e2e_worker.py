"""One EP rank of the end-to-end benchmark (a process started by ``bench_e2e_gpu``).

Joins the group (NCCL on CUDA, gloo on the CPU; MASTER_ADDR/PORT on loopback), then for each
mode (decode-like, prefill-like) serves the same replayed trace once per run, each time with a
fresh :class:`~eplbd_client.EplbClient` and weights rebuilt for the default layout:

1. ``none``: no balancing (slot p holds expert p mod E, ``sync_interval=0``). Its outputs are
   the reference: a fingerprint of every step, the full outputs of sampled steps;
2. ``deepseek``: DeepSeek's placement computed once from the whole trace's load
   (:func:`eplbd.planner.rebalance_experts`), installed before the timed steps with
   ``client.prepare`` on every rank (weights staged and swapped by the client);
3. ``deepseek-every-n``: DeepSeek's placement recomputed every N steps inside the serving
   loop from the last window's load (each rank counts its tokens' experts per step; the
   window is all-reduced, as vLLM does), installed at once on every rank before the step
   goes on: serving stops until every rank applied it (vLLM's synchronous EPLB; the weights
   move through the same client and weight source as the other runs);
4. ``eplbd``: the client connected to the node agent with its embedded planner, which
   records, plans and commits while the steps run.

Per step: the MoE stack's time (CUDA events around the forward; wall time on the CPU), the
time of ``client.step()``, the rows each GPU computed per layer and each slot's rows (for
the modelled time: ``cfg.load_cost_model()``, exact counts), and whether the step applied a
layout. Rank 0 gathers everything and writes ``<run_dir>/result.json``.
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from eplbd_client import (
    EplbClient,
    FetchRequest,
    HostExpertPool,
    HostPoolWeightSource,
    PeerWeightSource,
    WeightSource,
)

from benchmarks._e2e_config import E2EConfig, Mode
from benchmarks._e2e_model import (
    Dims,
    EPStack,
    OutputCheck,
    compare_outputs,
    fingerprint_vector,
    pick_gemm,
    step_inputs,
)
from eplbd.ops.procs import exit_now

__all__ = ["CountingSource", "deepseek_layout", "trace_load", "worker_entry"]


class CountingSource(WeightSource):
    """Wraps a weight source and logs, per epoch, the bytes it fetched for this rank (from
    peers or the host pool: what crossed a link, not the local copies) and how long it took."""

    def __init__(self, inner: WeightSource) -> None:
        self.inner = inner
        self.collective = inner.collective
        self.log: dict[int, tuple[int, float]] = {}

    def bind(self, *, ep_rank: int, ep_size: int, group: Any, device: torch.device) -> None:
        self.inner.bind(ep_rank=ep_rank, ep_size=ep_size, group=group, device=device)

    def fetch(self, request: FetchRequest) -> None:
        t0 = time.perf_counter()
        self.inner.fetch(request)
        n = sum(
            t.numel() * t.element_size()
            for pair in request.wanted
            for t in request.out.get(pair, ())
        )
        self.log[request.epoch] = (n, time.perf_counter() - t0)

    def close(self) -> None:
        self.inner.close()


def trace_load(ids: list[np.ndarray], num_experts: int) -> torch.Tensor:
    """Logical load [L, E] (float64) of whole trace arrays ``ids`` (each [tokens, L, K])."""
    L = ids[0].shape[1]
    load = np.zeros((L, num_experts), dtype=np.float64)
    for a in ids:
        for i in range(L):
            load[i] += np.bincount(a[:, i, :].ravel(), minlength=num_experts)[:num_experts]
    return torch.from_numpy(load)


def deepseek_layout(load: torch.Tensor, num_physical: int, num_gpus: int) -> torch.Tensor:
    """DeepSeek's EPLB on ``load`` [L, E]: phy2log [L, P] (one node, no expert groups, as
    DeepSeek-V2-Lite routes)."""
    from eplbd.planner import rebalance_experts

    return rebalance_experts(load, num_physical, 1, 1, num_gpus)[0]


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)
    except Exception:
        pass


def worker_entry(rank: int, cfg_json: str) -> None:
    """torch.multiprocessing target: rank ``rank`` of the job described by ``cfg_json``."""
    _die_with_parent()
    # a rank that dies of a signal (SIGABRT from a library's assertion, SIGSEGV) prints its
    # Python stacks to stderr first: the parent only learns the signal's name
    faulthandler.enable(all_threads=True)
    cfg = E2EConfig.from_json(cfg_json)
    w = _Worker(rank, cfg)
    try:
        w.run()
    finally:
        w.close()
    # results written: leave without finalizing the interpreter (rank 1 died of SIGABRT
    # there, after its last step, in two fresh-clone CI runs; see exit_now)
    del w
    exit_now(0)


class _Worker:
    def __init__(self, rank: int, cfg: E2EConfig) -> None:
        self.rank, self.cfg = rank, cfg
        self.G = cfg.world_size
        self.cuda = cfg.device == "cuda"
        if self.cuda:
            torch.cuda.set_device(rank)
            self.device = torch.device("cuda", rank)
        else:
            torch.set_num_threads(1)
            self.device = torch.device("cpu")
        # a file in the job's fresh directory, not a TCP port picked free and bound later:
        # another process on the host could take that port in between (one host only)
        dist.init_process_group(
            "nccl" if self.cuda else "gloo",
            init_method=f"file://{cfg.run_dir}/rendezvous",
            rank=rank,
            world_size=self.G,
            timeout=timedelta(seconds=600),
            device_id=self.device if self.cuda else None,
        )
        self.world: Any = dist.group.WORLD
        self.cpu_group: Any = dist.new_group(backend="gloo") if self.cuda else self.world
        self.peer_group: Any = None
        if self.G > 1:
            self.peer_group = dist.new_group(backend="nccl" if self.cuda else "gloo")
        self.dims = Dims(
            cfg.hidden,
            cfg.ffn,
            cfg.experts,
            cfg.top_k,
            tuple(cfg.layers),
            getattr(torch, cfg.dtype),
            cfg.seed,
        )
        self.model = cfg.load_cost_model()
        self.pool: HostExpertPool | None = None
        if cfg.weight_source == "host":
            self.pool = HostExpertPool.open(cfg.pool_dir, pin=self.cuda)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    # --- helpers ---------------------------------------------------------------------------

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.G > 1:
            dist.barrier(group=self.cpu_group)

    def gather(self, obj: Any) -> list[Any]:
        if self.G == 1:
            return [obj]
        out: list[Any] = [None] * self.G
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def source(self) -> CountingSource:
        inner: WeightSource
        if self.pool is not None:
            inner = HostPoolWeightSource(self.pool)
        else:
            inner = PeerWeightSource(group=self.peer_group, gpus_per_node=max(8, self.G))
        return CountingSource(inner)

    def client(self, kind: str, mode: Mode) -> tuple[EplbClient, CountingSource]:
        cfg = self.cfg
        src = self.source()
        c = EplbClient(
            len(cfg.layers),
            cfg.experts,
            cfg.num_physical,
            ep_rank=self.rank,
            ep_size=self.G,
            agent=cfg.agent if kind == "eplbd" else None,
            device=self.device,
            group=self.world if self.G > 1 else None,
            sync_interval=0 if kind == "none" and self.G > 1 else cfg.sync_interval,
            weight_source=src,
            cpu_group=self.cpu_group if self.G > 1 else None,
            prepare_timeout_s=cfg.tuning.prepare_timeout_s,
            top_k=cfg.top_k,
            group_name=cfg.group_name(mode.name),
            worker=f"e2e-{mode.name}-r{self.rank}",
            node="e2e",
        )
        return c, src

    # --- the job ---------------------------------------------------------------------------

    def run(self) -> None:
        from eplbd.demo._trace import load_trace

        cfg = self.cfg
        tr = load_trace(cfg.trace, list(cfg.layers))
        keep = [i for i, d in enumerate(tr.domains) if d in cfg.domains]
        if not keep:
            raise ValueError(f"none of the domains {cfg.domains} is in {cfg.trace}")
        self.domains = [tr.domains[i] for i in keep]
        host_ids = [tr.ids[i] for i in keep]
        self.ids = [torch.from_numpy(a).to(self.device) for a in host_ids]
        load = trace_load(host_ids, cfg.experts)
        self.ds_layout = deepseek_layout(load, cfg.num_physical, self.G)
        gemm, why = pick_gemm(cfg.gemm, self.device, self.dims.dtype)
        picks = self.gather(gemm)
        self.gemm = gemm if all(p == gemm for p in picks) else "loop"
        self.gemm_note = why if self.gemm == gemm else "ranks disagree: loop"
        g = cfg.graph
        self.use_graph = g == "on" or (
            g == "auto" and self.G == 1 and self.cuda and self.gemm == "grouped"
        )
        self.fp_vec = fingerprint_vector(self.dims, self.device)
        modes = []
        for mode in cfg.modes:
            modes.append(self.run_mode(mode))
        if self.rank == 0:
            from benchmarks._report import machine_line

            out = {
                "schema": 1,
                "config": json.loads(cfg.to_json()),
                "machine": machine_line(),
                "device_name": torch.cuda.get_device_name(self.device) if self.cuda else "CPU",
                "torch": torch.__version__,
                "gemm": self.gemm,
                "gemm_note": self.gemm_note,
                "graph": self.use_graph,
                "domains": self.domains,
                "domain_tokens": [int(a.shape[0]) for a in host_ids],
                "deepseek_layout": self.ds_layout.tolist(),
                "trace_load": load.tolist(),
                "expert_bytes": self.dims.expert_bytes,
                "cost_model": self.model.to_dict(),
                "modes": modes,
            }
            path = os.path.join(cfg.run_dir, "result.json")
            with open(path + ".tmp", "w") as f:
                json.dump(out, f)
            os.replace(path + ".tmp", path)
        self.barrier()

    def ids_at(self, step: int, mode: Mode) -> torch.Tensor:
        """ids [T, L, K] of this rank at ``step``: domain after domain, wrapping inside one."""
        nd = len(self.ids)
        d = min(step // mode.steps_per_domain, nd - 1)
        local = step - d * mode.steps_per_domain
        src = self.ids[d]
        start = (local * self.G + self.rank) * mode.tokens
        rows = (torch.arange(mode.tokens, device=self.device) + start) % src.shape[0]
        return src.index_select(0, rows)

    def run_mode(self, mode: Mode) -> dict[str, Any]:
        steps = mode.steps_per_domain * len(self.ids)
        ref: tuple[torch.Tensor, torch.Tensor] | None = None
        runs = []
        for kind in self.cfg.runs:
            res, outs = self.run_once(kind, mode, steps, ref)
            if ref is None:
                ref = outs
            else:
                del outs
            runs.append(res)
            if self.cuda:
                torch.cuda.empty_cache()
        del ref
        if self.cuda:
            torch.cuda.empty_cache()
        out = {"mode": mode.name, "tokens_per_rank": mode.tokens, "steps": steps, "runs": runs}
        if "deepseek-every-n" in self.cfg.runs:
            n, window = self.cfg.every_n(mode)
            out["every"] = {"n": n, "window": window}
        if self.G == 1 and self.cuda:
            out["hardware"] = self.hardware(runs[0])
        for r in runs:
            r.pop("slot_rows", None)
        return out

    def hardware(self, run: dict[str, Any]) -> dict[str, Any]:
        """One GPU: how far the MoE step is from the hardware limit. From the rows each slot
        computed in every step of ``run``: the active slots' weights read at the measured
        copy bandwidth, the GEMM FLOPs at the measured bf16 matrix rate (per layer the larger,
        summed over layers: the limit), and the grouped GEMMs of the same rows alone (timed
        by ``benchmarks/_gemm_timer.py`` on up to 24 of the steps)."""
        from benchmarks._gemm_timer import ExpertShape, GemmTimer, hardware_ceilings

        if not hasattr(self, "_ceilings"):
            self._ceilings = hardware_ceilings(self.device)
        ce = self._ceilings
        sr = np.asarray(run["slot_rows"], dtype=np.int64)  # [steps, L, S]
        steps, L, S = sr.shape
        d = self.dims
        w_ms = (sr > 0).sum(axis=2) * d.expert_bytes / ce["copy_bytes_per_s"] * 1e3
        f_ms = sr.sum(axis=2) * 6.0 * d.hidden * d.ffn / ce["bf16_flops_per_s"] * 1e3
        pick = np.unique(np.linspace(0, steps - 1, min(steps, 24)).astype(int))
        wl = [[int(x) for x in r] for r in sr[pick].reshape(-1, S)]
        shape = ExpertShape("expert", d.hidden, d.ffn, str(d.dtype).replace("torch.", ""))
        timer = GemmTimer(shape, S, max(sum(w) for w in wl), self.device)
        us = np.array(timer.time(wl, reps=3)).reshape(len(pick), L)
        del timer
        torch.cuda.empty_cache()
        return {
            "ceilings": ce,
            "weights_ms": float(np.median(w_ms.sum(axis=1))),
            "flops_ms": float(np.median(f_ms.sum(axis=1))),
            "limit_ms": float(np.median(np.maximum(w_ms, f_ms).sum(axis=1))),
            "limit_sum_ms": float(np.median((w_ms + f_ms).sum(axis=1))),
            "gemm_ms": float(np.median(us.sum(axis=1))) / 1e3,
            "active_slots": float((sr > 0).sum(axis=2).mean()),
            "moe_ms": run["moe_ms_median"],
            "run": run["run"],
        }

    def _check_every(self, steps: int, tokens: int) -> int:
        per = tokens * self.cfg.hidden * torch.empty((), dtype=self.dims.dtype).element_size()
        budget = self.cfg.check_mb << 20
        n = max(1, min(steps, budget // max(1, per)))
        return max(1, math.ceil(steps / n))

    def run_once(
        self, kind: str, mode: Mode, steps: int, ref: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
        cfg, dev, T = self.cfg, self.device, mode.tokens
        client, src = self.client(kind, mode)
        try:
            stack = EPStack(self.dims, client, self.world if self.G > 1 else None, dev, self.gemm)
            install = None
            if kind == "deepseek":
                install = self.install(client, src, self.ds_layout, 1)
            if kind == "eplbd":
                self.wait_registered(client)
            self.barrier()
            for j in range(cfg.warmup):
                stack.forward(step_inputs(self.dims, j, self.rank, T, dev), self.ids_at(j, mode))
                client.step()
            self.sync()
            self.barrier()
            every = self._check_every(steps, T)
            fp = torch.empty(steps, T, dtype=torch.float32, device=dev)
            full = torch.empty(
                len(range(0, steps, every)), T, cfg.hidden, dtype=self.dims.dtype, device=dev
            )
            timing = self.timed(client, src, stack, mode, steps, fp, full, every, kind)
            check = None
            if ref is not None:
                check = compare_outputs(full, ref[1], fp, ref[0])
            stats = client.stats
            epoch = client.epoch
        finally:
            client.close()
        del stack
        rows = self.gather(timing.pop("rows"))
        slot_rows = timing.pop("slot_rows")
        # modelled GPU time of each step and layer on this rank (us), exact counts
        timing["model_us"] = (
            self.model.rank_time(np.asarray(slot_rows)) - self.model.base_us
        ).tolist()
        per_rank = self.gather(
            {
                **timing,
                "check": None if check is None else check.as_dict(),
                "install": install,
                "epoch": epoch,
            }
        )
        res = _merge(kind, per_rank, rows, self.G, stats, cfg.sync_interval)
        res["slot_rows"] = slot_rows if self.G == 1 else None
        return res, (fp, full)

    def wait_registered(self, client: EplbClient, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while client.stats.get("received_welcome", 0) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {self.rank}: no welcome from the agent in {timeout_s} s")
            time.sleep(0.02)

    def install(
        self, client: EplbClient, src: CountingSource, phy2log: torch.Tensor, epoch: int
    ) -> dict[str, Any]:
        """client.prepare on this rank, then steps (no forward) until the group flips."""
        from eplbd.layout import moves_between

        old = client.layout.phy2log.clone()
        self.barrier()
        self.sync()
        t0 = time.perf_counter()
        client.prepare(phy2log, epoch, timeout_s=self.cfg.install_timeout_s)
        times: list[tuple[float, bool]] = []
        while client.epoch != epoch:
            if time.perf_counter() - t0 > self.cfg.install_timeout_s:
                raise RuntimeError(f"rank {self.rank}: epoch {epoch} not applied in time")
            self.sync()
            ts = time.perf_counter()
            client.step()
            self.sync()
            dt = time.perf_counter() - ts
            times.append((dt, self._consensus_step(client)))
            if client.epoch != epoch:
                time.sleep(0.002)
        total = time.perf_counter() - t0
        apply_s = times[-1][0]
        same = [t for t, c in times[:-1] if c == times[-1][1]] or [t for t, _ in times[:-1]]
        nbytes, fetch_s = src.log.get(epoch, (0, 0.0))
        moves = int(moves_between(old, phy2log).sum())
        return {
            "epoch": epoch,
            "commit_s": total,
            "apply_step_ms": apply_s * 1e3,
            "stall_ms": (apply_s - statistics.median(same)) * 1e3 if same else apply_s * 1e3,
            "fetched_bytes": nbytes,
            "fetch_s": fetch_s,
            "moves": moves,
            "local_moves": int((old[:, self._slots()] != phy2log[:, self._slots()]).sum()),
        }

    def _slots(self) -> slice:
        S = self.cfg.slots_per_gpu
        return slice(self.rank * S, (self.rank + 1) * S)

    def _consensus_step(self, client: EplbClient) -> bool:
        return self.G > 1 and client.step_count % self.cfg.sync_interval == 0

    def rebalance(
        self, client: EplbClient, src: CountingSource, window: torch.Tensor, step: int
    ) -> dict[str, Any]:
        """DeepSeek-every-N at ``step``: serving stops on every rank while the window's
        load is all-reduced, DeepSeek's placement computed and installed. The stall is all
        of it (this rank's wall time, device work included)."""
        self.sync()
        t0 = time.perf_counter()
        load = window.sum(0, dtype=torch.int64)
        if self.G > 1:
            dist.all_reduce(load, group=self.world)
        L, E = self.cfg.num_layers, self.cfg.experts
        host = load.view(L, E).double().cpu()
        t1 = time.perf_counter()
        new = deepseek_layout(host, self.cfg.num_physical, self.G)
        plan_ms = (time.perf_counter() - t1) * 1e3
        rec: dict[str, Any] = {"step": step, "plan_ms": plan_ms, "moves": 0, "fetched_bytes": 0}
        if torch.equal(new, client.layout.phy2log.cpu()):
            rec.update(epoch=client.epoch, fetch_s=0.0, commit_s=0.0)
        else:
            rec.update(self.install(client, src, new, client.epoch + 1))
        self.sync()
        rec["stall_ms"] = (time.perf_counter() - t0) * 1e3
        return rec

    def timed(
        self,
        client: EplbClient,
        src: CountingSource,
        stack: EPStack,
        mode: Mode,
        steps: int,
        fp: torch.Tensor,
        full: torch.Tensor,
        every: int,
        kind: str,
    ) -> dict[str, Any]:
        from eplbd.layout import moves_between

        dev, T = self.device, mode.tokens
        clock: Callable[[], Any]
        forward = self._graphed(stack, mode) if self.use_graph else stack.forward
        slot_rows = torch.zeros(steps, *stack.slot_rows.shape, dtype=torch.int64, device=dev)
        events: list[tuple[Any, Any, Any]] = []
        if self.cuda:
            events = [
                (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                for _ in range(steps)
            ]
        wall: list[tuple[float, float]] = []
        host_step: list[float] = []
        consensus: list[bool] = []
        rows: list[list[int]] = []
        commits: list[dict[str, Any]] = []
        seen: dict[int, tuple[int, float]] = {}
        clock = time.perf_counter
        epoch_start = client.epoch
        rebalances: list[dict[str, Any]] = []
        L, E = self.cfg.num_layers, self.cfg.experts
        n_every, n_window = self.cfg.every_n(mode)
        # DeepSeek-every-N: this rank's logical load of the last n_window steps, a ring
        ring = None
        if kind == "deepseek-every-n":
            ring = torch.zeros(n_window, L * E, dtype=torch.int32, device=dev)
            offs = (torch.arange(L, device=dev) * E).view(1, L, 1)
        for s in range(steps):
            if ring is not None and s > 0 and s % n_every == 0:
                rebalances.append(self.rebalance(client, src, ring, s))
            x = step_inputs(self.dims, s, self.rank, T, dev)
            ids = self.ids_at(s, mode)
            ep = client.epoch
            pe = client.pending_epoch
            if pe is not None and pe not in seen:
                seen[pe] = (s, clock())
            old_layout = client.layout
            old = old_layout.phy2log
            if self.cuda:
                e0, e1, e2 = events[s]
                e0.record()
                y = forward(x, ids)
                e1.record()
                t0 = clock()
                client.step()
                t1 = clock()
                e2.record()
            else:
                ta = clock()
                y = stack.forward(x, ids)
                t0 = clock()
                client.step()
                t1 = clock()
                wall.append((t0 - ta, t1 - t0))
            host_step.append(t1 - t0)
            if ring is not None:
                ring[s % n_window] = torch.bincount((ids + offs).view(-1), minlength=L * E)
            consensus.append(self._consensus_step(client))
            rows.append(list(stack.last_rows))
            slot_rows[s].copy_(stack.slot_rows)
            fp[s] = y.float() @ self.fp_vec
            if s % every == 0:
                full[s // every].copy_(y)
            if client.epoch != ep:
                first = seen.get(client.epoch)
                new = client.layout.phy2log
                nbytes, fetch_s = src.log.get(client.epoch, (0, 0.0))
                commits.append(
                    {
                        "epoch": client.epoch,
                        "step": s + 1,
                        "pending_step": None if first is None else first[0],
                        "commit_s": None if first is None else clock() - first[1],
                        "fetched_bytes": nbytes,
                        "fetch_s": fetch_s,
                        "moves": int(moves_between(old, new).sum()),
                        # the time objective may change only how rows split over replicas
                        "split_changed": not torch.equal(client.layout.shares, old_layout.shares),
                    }
                )
        self.sync()
        if self.cuda:
            fwd = [a.elapsed_time(b) for a, b, _ in events]
            stp = [b.elapsed_time(c) for _, b, c in events]
        else:
            fwd = [a * 1e3 for a, _ in wall]
            stp = [b * 1e3 for _, b in wall]
        return {
            "moe_ms": fwd,
            "step_ms": stp,
            "host_step_ms": [t * 1e3 for t in host_step],
            "consensus": consensus,
            "rows": rows,
            "commits": commits,
            "rebalances": rebalances,
            "epoch_start": epoch_start,
            "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if self.cuda else None,
            "slot_rows": slot_rows.cpu().tolist(),
        }

    def _graphed(
        self, stack: EPStack, mode: Mode
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The stack's forward captured in a CUDA graph (after the warm-up steps): inputs
        copied into static buffers, the graph replayed, its static output returned."""
        T = mode.tokens
        x0 = step_inputs(self.dims, 0, self.rank, T, self.device)
        ids0 = self.ids_at(0, mode)
        sx, sids = x0.clone(), ids0.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            stack.forward(sx, sids)  # allocations of the capture's shapes, off the graph
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sy = stack.forward(sx, sids)

        def run(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            sx.copy_(x)
            sids.copy_(ids)
            graph.replay()
            return sy

        return run


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _merge(
    kind: str,
    per_rank: list[dict[str, Any]],
    rows: list[list[list[int]]],
    G: int,
    stats: dict[str, int],
    sync_interval: int,
) -> dict[str, Any]:
    """Rank 0's summary of one run from every rank's measurements."""
    steps = len(per_rank[0]["moe_ms"])
    moe = [max(r["moe_ms"][s] for r in per_rank) for s in range(steps)]
    stp = [max(r["step_ms"][s] for r in per_rank) for s in range(steps)]
    host = [max(r["host_step_ms"][s] for r in per_rank) for s in range(steps)]
    cons = per_rank[0]["consensus"]
    L = len(rows[0][0]) if steps else 0
    # rows[g][s][l]: rows GPU g computed in layer l at step s
    sum_max = sum_mean = 0.0
    per_step_balance = []
    for s in range(steps):
        smax = smean = 0.0
        for layer in range(L):
            v = [rows[g][s][layer] for g in range(G)]
            smax += max(v)
            smean += sum(v) / G
        sum_max += smax
        sum_mean += smean
        per_step_balance.append(smax / smean if smean else 1.0)
    check: OutputCheck | None = None
    for r in per_rank:
        if r["check"] is not None:
            c = OutputCheck(
                steps_full=r["check"]["steps_full"],
                max_abs_diff=r["check"]["max_abs_diff"],
                ref_max_abs=r["check"]["ref_max_abs"],
                violations=r["check"]["violations"],
                steps_fp=r["check"]["steps_fingerprint"],
                fp_max_abs_diff=r["check"]["fingerprint_max_abs_diff"],
                fp_violations=r["check"]["fingerprint_violations"],
            )
            check = c if check is None else _added(check, c)
    commit_lists = [[(c["epoch"], c["step"]) for c in r["commits"]] for r in per_rank]
    commits = []
    for i, c0 in enumerate(per_rank[0]["commits"]):
        cs = [r["commits"][i] for r in per_rank if i < len(r["commits"])]
        step = c0["step"] - 1
        # stall: the step() that applied, minus the median step() of the same kind
        same = [
            stp[s]
            for s in range(steps)
            if cons[s] == cons[step] and s != step and all(s != c["step"] - 1 for c in cs)
        ]
        base = statistics.median(same) if same else 0.0
        times = [c["commit_s"] for c in cs if c["commit_s"] is not None]
        commits.append(
            {
                "epoch": c0["epoch"],
                "step": c0["step"],
                "commit_s": max(times) if times else None,
                "step_ms": stp[step],
                "stall_ms": stp[step] - base,
                "fetched_bytes": sum(c["fetched_bytes"] for c in cs),
                "fetch_s": max(c["fetch_s"] for c in cs),
                "moves": c0["moves"],
                "split_changed": c0["split_changed"],
            }
        )
    # modelled GPU time: Σ over steps and layers of the slowest GPU / Σ of the mean GPU
    mt = np.asarray([r["model_us"] for r in per_rank], dtype=np.float64).reshape(G, steps, -1)
    t_mean = float(mt.mean(axis=0).sum())
    time_balance = float(mt.max(axis=0).sum()) / t_mean if t_mean > 0 else None
    rebalances = []
    for i, b0 in enumerate(per_rank[0]["rebalances"]):
        bs = [r["rebalances"][i] for r in per_rank]
        rebalances.append(
            {
                "epoch": b0["epoch"],
                "step": b0["step"],
                "plan_ms": max(b["plan_ms"] for b in bs),
                "commit_s": max(b["commit_s"] for b in bs),
                "stall_ms": max(b["stall_ms"] for b in bs),
                "fetched_bytes": sum(b["fetched_bytes"] for b in bs),
                "fetch_s": max(b["fetch_s"] for b in bs),
                "moves": b0["moves"],
            }
        )
    stalls = sum(b["stall_ms"] for b in rebalances)
    install = None
    if per_rank[0]["install"] is not None:
        ins = [r["install"] for r in per_rank]
        install = {
            "epoch": ins[0]["epoch"],
            "commit_s": max(i["commit_s"] for i in ins),
            "apply_step_ms": max(i["apply_step_ms"] for i in ins),
            "stall_ms": max(i["stall_ms"] for i in ins),
            "fetched_bytes": sum(i["fetched_bytes"] for i in ins),
            "fetch_s": max(i["fetch_s"] for i in ins),
            "moves": ins[0]["moves"],
        }
    normal = [host[s] for s in range(steps) if not cons[s]] or host
    return {
        "run": kind,
        "steps": steps,
        "moe_ms_median": statistics.median(moe) if moe else None,
        "moe_ms_p99": _pct(moe, 0.99),
        "moe_ms_mean": statistics.fmean(moe) if moe else None,
        "step_ms_median": statistics.median(stp) if stp else None,
        "host_step_ms_median": statistics.median(normal) if normal else None,
        "host_step_ms_consensus_median": statistics.median(
            [host[s] for s in range(steps) if cons[s]]
        )
        if any(cons)
        else None,
        "balance": sum_max / sum_mean if sum_mean else None,
        "balance_per_step": per_step_balance,
        "time_balance": time_balance,
        "modelled_ms_median": float(np.median(mt.max(axis=0).sum(axis=1))) / 1e3 if steps else None,
        "serve_ms_mean": (sum(moe) + sum(stp) + stalls) / steps if steps else None,
        "rebalances": rebalances,
        "moe_ms": moe,
        "rows_per_gpu": [sum(sum(st) for st in rows[g]) for g in range(G)],
        "commits": commits,
        "commits_agree": all(cl == commit_lists[0] for cl in commit_lists),
        "install": install,
        "epoch_start": per_rank[0]["epoch_start"],
        "epoch_final": per_rank[0]["epoch"],
        "check": None if check is None else check.as_dict(),
        "peak_mem_gb": max((r["peak_mem_gb"] or 0.0) for r in per_rank) or None,
        "client_stats": stats,
        "sync_interval": 0 if kind == "none" and G > 1 else sync_interval,
    }


def _added(a: OutputCheck, b: OutputCheck) -> OutputCheck:
    c = replace(a)
    c.add(b)
    return c
