"""End to end on GPUs: an EP group serving DeepSeek-V2-Lite (or, ``--shape v3``, DeepSeek-V3)
MoE layers, real expert GEMMs, the ESFT routing trace replayed (or DeepSeek-V3-size synthetic
routing), with no balancing, DeepSeek's placement computed once, DeepSeek's placement
recomputed every N steps with a stop-the-world weight shuffle (vLLM's synchronous EPLB), and
eplbd online (client, agent and embedded planner in the loop), side by side in one job.

Target (../shared/design/TARGETS.md): with EP >= 2, MoE step time lower than both others;
outputs equal to the no-balancing run's up to summation order.

This process (the driver) starts ``python3 -m eplbd agent --embedded-planner`` on ipc sockets
in a temporary directory, spawns one worker per rank (``benchmarks._e2e_worker``, NCCL on
CUDA or gloo on the CPU, MASTER_ADDR/PORT on loopback; no torchrun), waits for them, asks the
planner for its history, prints a table, saves markdown and JSON under ``--out DIR`` and
writes its block of the ``e2e-gpu`` section of docs/benchmarks.md.

Run: ``python3 -m benchmarks.bench_e2e_gpu --world-size 2`` (one GPU per rank);
``--device cpu --world-size 2 --tiny`` runs the same job on the CPU with tiny dimensions;
``--render DIR/e2e.json [...]`` writes saved jobs' blocks into the docs (jobs of one group
size and shape, e.g. decode and prefill run separately, share one block).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks._e2e_config import (
    RUNS,
    SHAPES,
    E2EConfig,
    Mode,
    default_modes,
    find_calibration,
    tiny_modes,
)
from benchmarks._e2e_report import SECTION, block_key, doc_section, render_result, summarise
from eplbd.ops.procs import child_env, die_with_parent, log_tail, stop_process

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "benchmarks" / "data" / "esft_routing_ids.npz"
_START_S = 120.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.bench_e2e_gpu", description=__doc__)
    p.add_argument("--world-size", type=int, default=None, help="EP ranks (default: 2)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--tiny", action="store_true", help="tiny dimensions and short runs")
    p.add_argument(
        "--shape", choices=tuple(SHAPES), default="v2lite",
        help="expert shape preset: v2lite (2048, 1408, 64 experts, top-6, ESFT trace) or v3 "
        "(7168, 2048, 256 experts, top-8, P = E + 32, synthetic routing)",
    )  # fmt: skip
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=None, help="routed experts")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="layers served (of the trace: evenly)")
    p.add_argument("--redundant", type=int, default=None, help="redundant slots in the group")
    p.add_argument("--routing", choices=("esft", "synthetic"), default=None)
    p.add_argument("--synthetic-tokens", type=int, default=None, help="tokens per domain")
    p.add_argument(
        "--objective", choices=("tokens", "time"), default="time",
        help="what the online planner balances (time: modelled GPU time, with the calibration "
        "of this GPU and shape in benchmarks/calibration, else the planner's default model)",
    )  # fmt: skip
    p.add_argument("--cost-model", default=None, help="calibration JSON (default: found)")
    p.add_argument("--runs", default=",".join(RUNS), help="runs, none first")
    p.add_argument(
        "--every", type=int, default=0,
        help="DeepSeek-every-N's N in steps (0: a quarter of a domain's steps)",
    )  # fmt: skip
    p.add_argument(
        "--every-window", type=int, default=0,
        help="its load window in steps (0: N / 3, vLLM's window 1000 : interval 3000)",
    )  # fmt: skip
    p.add_argument("--modes", default="decode,prefill")
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--prefill-tokens", type=int, default=None)
    p.add_argument("--decode-steps", type=int, default=None, help="timed steps per domain")
    p.add_argument("--prefill-steps", type=int, default=None, help="timed steps per domain")
    p.add_argument(
        "--domains", default=None,
        help="trace domains in order (default: intent,law,summary,translation; synthetic: 4)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--sync-interval", type=int, default=None)
    p.add_argument("--window-s", type=float, default=None)
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--min-windows", type=int, default=None)
    p.add_argument("--cooldown-s", type=float, default=None)
    p.add_argument("--min-gain", type=float, default=None)
    p.add_argument("--gemm", choices=("auto", "grouped", "loop"), default="auto")
    p.add_argument("--weight-source", choices=("peer", "host"), default="peer")
    p.add_argument(
        "--graph", choices=("auto", "on", "off"), default="auto",
        help="replay the forward as a CUDA graph (auto: one rank on cuda, grouped GEMMs)",
    )  # fmt: skip
    p.add_argument("--check-mb", type=int, default=None, help="MiB per rank of full outputs")
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--out", default=None, help="directory for e2e.md and e2e.json")
    p.add_argument(
        "--doc",
        choices=("auto", "yes", "no"),
        default="auto",
        help="write docs/benchmarks.md (auto: only for a CUDA run at full size)",
    )
    p.add_argument(
        "--render", nargs="+", default=None, help="only write the docs block of saved e2e.json"
    )
    p.add_argument("--timeout-s", type=float, default=1800.0, help="whole job")
    p.add_argument("--keep-dir", action="store_true", help="keep the run directory (logs)")
    return p.parse_args(argv)


def build_config(a: argparse.Namespace) -> E2EConfig:
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    G = a.world_size or 2
    shape = SHAPES[a.shape]
    routing = a.routing or shape["routing"]
    n_layers = a.layers or shape["layers"]
    if routing == "esft":
        from eplbd.demo._trace import pick_layers

        layers = tuple(pick_layers(26, n_layers))
    else:
        layers = tuple(range(n_layers))
    base = replace(
        E2EConfig(),
        shape=a.shape,
        hidden=a.hidden or shape["hidden"],
        ffn=a.ffn or shape["ffn"],
        experts=a.experts or shape["experts"],
        top_k=a.top_k or shape["top_k"],
        layers=layers,
        routing=routing,
    )
    tuning = base.tuning
    modes = {m.name: m for m in (tiny_modes() if a.tiny else default_modes())}
    if a.tiny:
        base = replace(
            base,
            hidden=64,
            ffn=32,
            layers=layers if a.layers else (0, 25) if routing == "esft" else (0, 1),
            synthetic_tokens=4096,
            warmup=2,
            sync_interval=4,
            check_mb=16,
            tiny=True,
        )
        tuning = replace(
            tuning,
            window_s=0.2,
            windows=3,
            min_windows=1,
            cooldown_s=0.5,
            window_steps=4,
            record_steps=4,
            heartbeat_s=0.2,
        )
    tuning = replace(
        tuning,
        **{
            k: v
            for k, v in {
                "window_s": a.window_s,
                "windows": a.windows,
                "min_windows": a.min_windows,
                "cooldown_s": a.cooldown_s,
                "min_gain": a.min_gain,
            }.items()
            if v is not None
        },
    )
    for name, tok, steps in (
        ("decode", a.decode_tokens, a.decode_steps),
        ("prefill", a.prefill_tokens, a.prefill_steps),
    ):
        m = modes[name]
        modes[name] = Mode(name, tok or m.tokens, steps or m.steps_per_domain)
    wanted = [x for x in a.modes.split(",") if x]
    unknown = [x for x in wanted if x not in modes]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}: decode, prefill")
    redundant = shape["redundant"] if a.redundant is None else a.redundant
    S = -(-(base.experts + redundant) // G)
    sync = a.sync_interval or base.sync_interval
    if a.domains:
        domains = tuple(x for x in a.domains.split(",") if x)
    else:
        domains = SYNTHETIC_DOMAINS if routing == "synthetic" else base.domains
    cost_model, note = _cost_model(a, device, base)
    return replace(
        base,
        world_size=G,
        device=device,
        slots_per_gpu=S,
        modes=tuple(modes[x] for x in wanted),
        domains=domains,
        warmup=a.warmup if a.warmup is not None else base.warmup,
        sync_interval=sync,
        gemm=a.gemm,
        weight_source=a.weight_source,
        graph=a.graph,
        check_mb=a.check_mb or base.check_mb,
        trace=str(Path(a.trace).resolve()),
        tuning=replace(tuning, sync_interval=sync),
        objective=a.objective,
        cost_model=cost_model,
        cost_model_note=note,
        runs=tuple(x for x in a.runs.split(",") if x),
        every=a.every,
        every_window=a.every_window,
        synthetic_tokens=a.synthetic_tokens or base.synthetic_tokens,
    )


def _cost_model(a: argparse.Namespace, device: str, c: E2EConfig) -> tuple[str, str]:
    """(calibration path or "", what the cost model is) for the planner and the report."""
    if a.cost_model:
        path = Path(a.cost_model).resolve()
        if not path.is_file():
            raise SystemExit(f"--cost-model {a.cost_model}: no such file")
        return str(path), f"calibration {path.name} (given)"
    name = "CPU"
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
    found = find_calibration(name, c.hidden, c.ffn, c.dtype)
    if found is not None:
        return str(found), f"calibration {found.name} (measured on this GPU model)"
    return "", (
        f"the planner's default model of {c.hidden},{c.ffn} {c.dtype} (H100 memory bandwidth "
        f"and FLOP/s): no calibration for {name} in benchmarks/calibration"
    )


#: Domains of the synthetic routing: one popularity each, drifting (``_ep_trace``).
SYNTHETIC_DOMAINS = ("synthetic-1", "synthetic-2", "synthetic-3", "synthetic-4")


def write_synthetic_trace(path: Path, cfg: E2EConfig) -> None:
    """DeepSeek-V3-size routing as an ESFT-style npz: per domain ``synthetic_tokens`` tokens
    of ``benchmarks._ep_trace.synthetic_stream`` (heavy-tailed popularity drifting step to
    step, two regime switches), each domain its own seed (a fresh popularity: a traffic
    change)."""
    import numpy as np

    from benchmarks._ep_trace import synthetic_stream

    per_step = 2048
    steps = -(-cfg.synthetic_tokens // per_step)
    arrays = {}
    for i, name in enumerate(cfg.domains):
        st = synthetic_stream(
            steps, per_step, cfg.num_layers, cfg.experts, cfg.top_k, seed=1000 * cfg.seed + i + 1
        )
        ids = st.ids[: cfg.synthetic_tokens]
        arrays[f"{name}_topk_ids"] = ids.astype(np.uint8 if cfg.experts <= 256 else np.int32)
    np.savez(path, **arrays)


# --- processes ------------------------------------------------------------------------------


class Job:
    """One run of the benchmark: agent, workers, results; :meth:`close` cleans up."""

    def __init__(self, cfg: E2EConfig, keep_dir: bool = False) -> None:
        self.keep_dir = keep_dir
        tmp = "/tmp" if os.path.isdir("/tmp") else None  # ipc paths must stay short
        self.run_dir = Path(tempfile.mkdtemp(prefix="eplbd-e2e-", dir=tmp))
        (self.run_dir / "rt").mkdir()
        (self.run_dir / "state").mkdir()
        self.cfg = replace(
            cfg,
            run_dir=str(self.run_dir),
            agent=f"ipc://{self.run_dir / 'rt' / 'agent.sock'}",
            pool_dir=str(self._pool_dir()) if cfg.weight_source == "host" else "",
        )
        if cfg.routing == "synthetic":
            path = self.run_dir / "synthetic.npz"
            write_synthetic_trace(path, self.cfg)
            self.cfg = replace(self.cfg, trace=str(path))
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_log = self.run_dir / "agent.log"
        self.ctx: Any = None

    def _pool_dir(self) -> Path:
        shm = Path("/dev/shm")
        return (
            Path(tempfile.mkdtemp(prefix="eplbd-e2e-pool-", dir=shm))
            if shm.is_dir()
            else self.run_dir / "pool"
        )

    @property
    def planner_endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'rt' / 'planner.sock'}"

    def start_agent(self) -> None:
        t = self.cfg.tuning
        env = child_env(self.cfg.planner_env(), roots=(str(ROOT),))
        argv = [
            sys.executable,
            "-m",
            "eplbd",
            "agent",
            "--embedded-planner",
            "--runtime-dir",
            str(self.run_dir / "rt"),
            "--state-dir",
            str(self.run_dir / "state"),
            "--node",
            "e2e",
            *t.agent_flags(),
        ]
        with open(self.agent_log, "wb") as fh:
            self.agent = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=fh,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
        from eplbd.cli._client import CliError, PlannerClient

        deadline = time.monotonic() + _START_S
        rt = self.run_dir / "rt"
        with PlannerClient(self.planner_endpoint, timeout_s=2.0) as c:
            while True:
                self._check_agent()
                if (rt / "agent.sock").exists() and (rt / "planner.sock").exists():
                    try:
                        c.status("status")
                        return
                    except CliError:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the agent did not start in {_START_S:g} s")
                time.sleep(0.1)

    def _check_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is not None:
            raise RuntimeError(
                f"the agent exited with code {self.agent.returncode}:\n{log_tail(self.agent_log, 20)}"
            )

    def make_pool(self) -> None:
        """Every expert of every served layer in a host pool (``--weight-source host``)."""
        import torch
        from eplbd_client import HostExpertPool

        from benchmarks._e2e_model import Dims, expert_weights

        c = self.cfg
        dims = Dims(c.hidden, c.ffn, c.experts, c.top_k, c.layers, getattr(torch, c.dtype), c.seed)
        need = dims.expert_bytes * c.experts * c.num_layers
        free = shutil.disk_usage(c.pool_dir).free
        if need > 0.9 * free:
            raise RuntimeError(
                f"--weight-source host: the pool needs {need / 2**30:.1f} GiB, "
                f"{c.pool_dir} has {free / 2**30:.1f} GiB free (serve fewer --layers)"
            )
        layers = [
            list(expert_weights(dims, layer, list(range(c.experts)), "cpu")) for layer in c.layers
        ]
        HostExpertPool.create(c.pool_dir, layers)

    def run_workers(self, timeout_s: float) -> dict[str, Any]:
        import torch.multiprocessing as tmp

        from benchmarks._e2e_worker import worker_entry

        self.ctx = tmp.start_processes(
            worker_entry,
            args=(self.cfg.to_json(),),
            nprocs=self.cfg.world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not self.ctx.join(timeout=1.0):
            self._check_agent()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not finish in {timeout_s:g} s")
        with open(self.run_dir / "result.json") as f:
            result: dict[str, Any] = json.load(f)
        return result

    def history(self) -> dict[str, Any]:
        from eplbd.cli._client import CliError, PlannerClient

        out: dict[str, Any] = {}
        with PlannerClient(self.planner_endpoint, timeout_s=5.0) as c:
            for m in self.cfg.modes:
                try:
                    out[m.name] = c.status("history", self.cfg.group_name(m.name))
                except CliError as e:
                    out[m.name] = {"error": str(e)}
        return out

    def close(self) -> None:
        if self.ctx is not None:
            for p in self.ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in self.ctx.processes:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        if self.agent is not None:
            stop_process(self.agent, 10.0)
        if self.cfg.pool_dir:
            shutil.rmtree(self.cfg.pool_dir, ignore_errors=True)
        if not self.keep_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            print(f"run directory kept: {self.run_dir}", file=sys.stderr)


def run_job(cfg: E2EConfig, timeout_s: float, keep_dir: bool = False) -> dict[str, Any]:
    """Run the whole job; returns {"result", "history", "summary"}."""
    cfg.check()
    job = Job(cfg, keep_dir)
    started = time.monotonic()
    try:
        job.start_agent()
        if cfg.weight_source == "host":
            job.make_pool()
        result = job.run_workers(timeout_s)
        history = job.history()
    except BaseException:
        if job.agent is not None:
            print(f"agent log tail:\n{log_tail(job.agent_log, 20)}", file=sys.stderr)
        raise
    finally:
        job.close()
    result["duration_s"] = round(time.monotonic() - started, 1)
    return {"result": result, "history": history, "summary": summarise(result, history)}


def write_doc(key: str | None, block: str | None) -> None:
    """Replace the block ``key`` of the docs section (None: only refresh the section)."""
    from benchmarks._report import DOC, write_section

    text = DOC.read_text() if DOC.exists() else ""
    begin, end = f"<!-- BEGIN {SECTION} -->", f"<!-- END {SECTION} -->"
    existing = text.split(begin, 1)[1].split(end, 1)[0] if begin in text and end in text else None
    write_section(SECTION, doc_section(existing, key, block))


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    if a.render:
        parts: dict[str, list[str]] = {}
        for path in a.render:
            with open(path) as f:
                saved = json.load(f)
            md = render_result(saved["result"], summarise(saved["result"], saved["history"]))
            parts.setdefault(block_key(saved["result"]), []).append(md)
        for key, mds in parts.items():
            write_doc(key, "\n".join(mds))
            print("\n".join(mds))
        return 0
    cfg = build_config(a)
    out = run_job(cfg, a.timeout_s, a.keep_dir)
    result, summary = out["result"], out["summary"]
    md = render_result(result, summary)
    print(md)
    if a.out:
        d = Path(a.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "e2e.md").write_text(md)
        with open(d / "e2e.json", "w") as f:
            json.dump(out, f)
    if a.doc == "yes" or (a.doc == "auto" and cfg.device == "cuda" and not cfg.tiny):
        write_doc(block_key(result), md)
    return 0 if summary["outputs_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
