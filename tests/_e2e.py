"""End-to-end harness: the real planner and agent processes, and worker processes that embed
the real client and serve the reference MoE engine, all on loopback and ipc sockets.

- :class:`Stack` starts ``python3 -m eplbd planner`` and ``python3 -m eplbd agent`` as
  subprocesses (their JSON logs in the stack's directory, which is short: ipc paths must stay
  under 107 bytes) and worker processes from a forkserver that imported torch once;
- :func:`worker_main` is what a worker runs: one EP rank of :class:`~eplbd.testing.MoEModel`
  served by :class:`~eplbd.testing.EPMoEEngine` through ``EplbClient(agent=ipc://...)``, the
  ranks of a group joined by torch.distributed on gloo. Per step it writes one JSON line:
  the epoch it served, its pending epoch, the error against the no-EPLB reference, the wall
  time of the forward and of ``client.step()``, and the tokens it sent to each GPU per layer;
- the planner is asked through its control socket (a DEALER speaking ``eplbd.wire``), the
  agent through its Prometheus endpoint.

Every wait has a deadline; :meth:`Stack.close` kills whatever is left.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq
from _net import free_port_pair
from _scrape import scrape
from eplbd_client import FetchRequest, PeerWeightSource

from eplbd.ops.procs import exit_now
from eplbd.wire import COMMAND, COMMAND_REPLY, STATUS_REPLY, STATUS_REQUEST, Message, control_client

__all__ = [
    "AGENT_FAST",
    "PLANNER_FAST",
    "Agent",
    "Daemon",
    "HeldPeerSource",
    "Planner",
    "Stack",
    "WorkerSpec",
    "balance",
    "epoch_switches",
    "free_port_pair",
    "read_records",
    "scrape",
    "worker_main",
]

#: Planner settings for a run of seconds: short windows and heartbeats, no automatic
#: rebalance (min_tokens out of reach; min_windows may not exceed windows) unless a test
#: asks for one.
PLANNER_FAST: dict[str, Any] = {
    "window_s": 0.5,
    "windows": 4,
    "min_tokens": 10**15,
    "ewma_alpha": 0.5,
    "cooldown_s": 600.0,
    "min_gain": 0.05,
    "heartbeat_s": 0.5,  # an agent is stale after 1.5 s of silence, dead after 2.5 s
    "tick_s": 0.05,
    "prepare_timeout_s": 30.0,
    "commit_timeout_s": 30.0,
}

#: Agent settings: every step recorded, a snapshot every 8 steps. The workers' link
#: heartbeats every second (not configurable), so a worker is declared dead after 3 s.
AGENT_FAST: dict[str, Any] = {
    "window_steps": 8,
    "record_steps": 8,
    "heartbeat_s": 0.2,
    "dead_timeout_s": 3.0,
    "merge_timeout_s": 0.5,
}

_START_S = 60.0


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()  # loaded here: a forked child must not dlopen


def _pdeathsig() -> None:
    """Linux: die (SIGKILL) when the parent dies, so an interrupted test leaves nothing
    behind. Runs in the child between fork and exec."""
    if _LIBC is not None:
        _LIBC.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _flags(settings: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in settings.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


# --- workers -----------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    """One worker process: rank ``rank`` of EP group ``group`` (``world`` ranks, gloo when
    more than one), connected to the agent at ``agent`` (None: no controller).

    The model: ``layers`` MoE layers of ``experts`` experts, top-``top_k``, ``physical``
    slots in the group, a fixed hot spot (``drift`` 0) of strength ``skew``; ``tokens`` per
    rank and step. ``pace_s``: sleep after each step (leaves CPU to the daemons).
    ``hold_file``: while that file exists, staging a layout waits (a slow weight transfer).
    """

    name: str
    rank: int
    world: int
    group: str
    node: str
    agent: str | None
    run_dir: str
    layers: int = 2
    experts: int = 8
    physical: int = 12
    top_k: int = 2
    hidden: int = 16
    ffn: int = 32
    skew: float = 2.0
    drift: float = 0.0
    seed: int = 0
    tokens: int = 32
    sync_interval: int = 8
    pace_s: float = 0.01
    prepare_timeout_s: float = 30.0
    hold_file: str | None = None
    max_wall_s: float = 150.0

    @property
    def records(self) -> Path:
        return Path(self.run_dir) / f"{self.name}.jsonl"


class HeldPeerSource(PeerWeightSource):
    """The real peer-to-peer source, after waiting while ``hold`` exists (at most 60 s):
    a weight transfer that takes as long as the test wants."""

    def __init__(self, hold: Path) -> None:
        super().__init__()
        self.hold = hold

    def fetch(self, request: FetchRequest) -> None:
        deadline = time.monotonic() + 60.0
        while self.hold.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        super().fetch(request)


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process (see the module docstring)."""
    base = Path(spec.run_dir) / spec.name
    with open(f"{base}.log", "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    _pdeathsig()
    try:
        _serve(spec)
    except BaseException:
        Path(f"{base}.err").write_text(traceback.format_exc())
        os._exit(1)
    exit_now(0)  # no interpreter finalization with gloo's threads about


def _serve(spec: WorkerSpec) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from eplbd_client import EplbClient

    from eplbd.testing import EPMoEEngine, MoEConfig, MoEModel

    torch.set_num_threads(1)
    run = Path(spec.run_dir)
    G, P = spec.world, spec.physical
    S = P // G
    group = None
    if G > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{run}/rdv-{spec.group}",
            rank=spec.rank,
            world_size=G,
            timeout=timedelta(seconds=60),
        )
        group = dist.group.WORLD
    cfg = MoEConfig(
        num_layers=spec.layers,
        num_experts=spec.experts,
        top_k=spec.top_k,
        hidden=spec.hidden,
        ffn=spec.ffn,
        seed=spec.seed,
        skew=spec.skew,
        drift=spec.drift,
    )
    model = MoEModel(cfg)
    client = EplbClient(
        spec.layers,
        spec.experts,
        P,
        ep_rank=spec.rank,
        ep_size=G,
        agent=spec.agent,
        group=group,
        sync_interval=spec.sync_interval,
        weight_source=HeldPeerSource(Path(spec.hold_file)) if spec.hold_file else None,
        top_k=spec.top_k,
        group_name=spec.group,
        worker=spec.name,
        node=spec.node,
        prepare_timeout_s=spec.prepare_timeout_s,
    )
    engine = EPMoEEngine(model, client, group)
    stop_file = run / f"stop-{spec.group}"
    end = time.monotonic() + spec.max_wall_s
    flag = torch.zeros(1, dtype=torch.int64)
    with open(spec.records, "w", buffering=1) as rec:
        meta = {"t": "ready", "inc": client.incarnation, "worker": client.worker}
        rec.write(json.dumps(meta) + "\n")
        step = 0
        while True:
            epoch, pending = client.epoch, client.pending_epoch
            x = model.tokens(step, spec.rank, spec.tokens)
            t0 = time.perf_counter()
            y = engine.forward(x, step)
            t1 = time.perf_counter()
            client.step()
            t2 = time.perf_counter()
            err = float((y - model.reference_forward(x, step)).abs().max()) if y.numel() else 0.0
            if not math.isfinite(err):
                err = 1e300
            gpus = [
                torch.bincount(
                    torch.div(p.reshape(-1), S, rounding_mode="floor"), minlength=G
                ).tolist()
                for p in engine.last_phys
            ]
            line = {
                "s": step,
                "t": t0,
                "e": epoch,
                "p": -1 if pending is None else pending,
                "err": err,
                "fwd": t1 - t0,
                "st": t2 - t1,
                "g": gpus,
            }
            rec.write(json.dumps(line) + "\n")
            step += 1
            stop = stop_file.exists() or time.monotonic() > end
            if G > 1:  # every rank stops after the same step
                flag.fill_(int(stop))
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
                stop = bool(flag.item())
            if stop:
                break
            if spec.pace_s:
                time.sleep(spec.pace_s)
        done = {"t": "done", "steps": step, "epoch": client.epoch, "stats": client.stats}
        rec.write(json.dumps(done) + "\n")
    client.close()


def read_records(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(ready line, step lines, done line or {}) of a worker's records, complete lines only."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, [], {}
    ready: dict[str, Any] = {}
    done: dict[str, Any] = {}
    steps: list[dict[str, Any]] = []
    for line in text.split("\n")[:-1]:
        d = json.loads(line)
        if "s" in d:
            steps.append(d)
        elif d.get("t") == "ready":
            ready = d
        elif d.get("t") == "done":
            done = d
    return ready, steps, done


# --- figures -----------------------------------------------------------------------------


def balance(per_rank: Iterable[list[dict[str, Any]]], steps: Iterable[int]) -> float:
    """Measured balance over ``steps``: per step and layer the tokens each GPU computed
    (summed over the ranks that sent them), then Σ max / Σ mean over steps and layers."""
    ranks = [{r["s"]: r for r in recs} for recs in per_rank]
    tot_max = tot_mean = 0.0
    for s in steps:
        layers = [rk[s]["g"] for rk in ranks]
        for layer in range(len(layers[0])):
            gpu = [sum(col) for col in zip(*(lay[layer] for lay in layers), strict=True)]
            tot_max += max(gpu)
            tot_mean += sum(gpu) / len(gpu)
    return tot_max / tot_mean


def epoch_switches(recs: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """[(first step served with an epoch, that epoch)] for each change of epoch."""
    return [(b["s"], b["e"]) for a, b in zip(recs, recs[1:], strict=False) if b["e"] != a["e"]]


# --- processes ---------------------------------------------------------------------------


def threads_of(pid: int) -> dict[str, str]:
    """Each thread's name, state (R, S, D: uninterruptible, Z...) and kernel wait channel."""
    out: dict[str, str] = {}
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return {"-": "gone"}
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
        except OSError:
            continue
        end = stat.rfind(")")
        out[tid] = f"{stat[stat.find('(') + 1 : end]} {stat[end + 2]} {wchan or '-'}"
    return out


@dataclass
class Daemon:
    """One ``eplbd planner`` / ``eplbd agent`` process and its JSON log."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ready_event: str
    expect_dead: bool = False
    serving: dict[str, Any] | None = None

    def wait_serving(self, timeout_s: float = _START_S) -> dict[str, Any]:
        """The daemon's "... serving" log event, once it is there (it has bound its
        sockets); AssertionError if it exits first or takes longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.serving is None:
            if self.popen.poll() is not None:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-12:])
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")
            self.serving = self.event(self.ready_event)
            if self.serving is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} did not start within {timeout_s} s")
                time.sleep(0.05)
        return self.serving

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events() if e.get("event") == name), None)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, then wait for the exit: a deadline, not a speed limit (beside vLLM and two
        busy loops on 2 cores a killed agent once took over 10 s to be reaped). A slow death
        is printed with what its threads were doing, to find out why."""
        self.expect_dead = True
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            seen = threads_of(self.popen.pid)
            print(f"{self.name} not reaped 10 s after SIGKILL; threads: {seen}", flush=True)
            try:
                self.popen.wait(110)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"{self.name} not reaped 120 s after SIGKILL; threads then: {seen}, now: "
                    f"{threads_of(self.popen.pid)}"
                ) from None

    def stop(self) -> int | None:
        """SIGCONT + SIGTERM, then SIGKILL after 5 s; the exit code."""
        if self.popen.poll() is None:
            self.expect_dead = True
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5)
        return self.popen.returncode


@dataclass
class Planner:
    """Where the planner answers: a standalone ``eplbd planner`` (``daemon``) on tcp, or the
    one embedded in an agent on ipc (``daemon`` is then the agent's)."""

    daemon: Daemon
    control: str
    snapshots: str
    port: int | None = None

    @property
    def metrics_url(self) -> str:
        return str(self.daemon.wait_serving()["metrics"])

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_url)


@dataclass
class Agent:
    daemon: Daemon
    node: str
    runtime_dir: Path

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.runtime_dir}/agent.sock"

    @property
    def snapshot_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir}/snapshots.sock"

    @property
    def metrics_url(self) -> str:
        return str(self.daemon.wait_serving()["metrics"])

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_url)


_FORKSERVER: Any = None


def _mp_context() -> Any:
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = mp.get_context("forkserver")
        # No effect if another test module started the forkserver first: children then
        # import what they need on their own.
        _FORKSERVER.set_forkserver_preload(
            ["torch", "torch.distributed", "eplbd_client", "eplbd.testing", "_e2e"]
        )
    return _FORKSERVER


@dataclass
class _Worker:
    spec: WorkerSpec
    proc: Any
    expect_dead: bool = False


@dataclass
class Stack:
    """Processes of one test in one short temporary directory. Use as a context manager."""

    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="e2e", dir="/tmp")))
    daemons: list[Daemon] = field(default_factory=list)
    workers: dict[str, _Worker] = field(default_factory=dict)
    planner: Planner | None = None

    def __post_init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(keep=exc[0] is not None and bool(os.environ.get("E2E_KEEP")))

    # --- daemons ---------------------------------------------------------------------------

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.pop("NOTIFY_SOCKET", None)
        env.update(extra or {})
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], ready: str) -> Daemon:
        n = sum(1 for d in self.daemons if d.name == name)
        log = self.dir / (f"{name}.log" if n == 0 else f"{name}.{n + 1}.log")
        with open(log, "wb") as fh:
            popen = subprocess.Popen(
                [sys.executable, "-m", "eplbd", *argv],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_pdeathsig,
            )
        d = Daemon(name, popen, log, ready)
        self.daemons.append(d)
        return d

    def wait_serving(self) -> None:
        """Wait until every daemon started so far serves (they start in parallel)."""
        for d in self.daemons:
            if not d.expect_dead:
                d.wait_serving()

    def start_planner(self, *, port: int | None = None, **settings: Any) -> Planner:
        """Start ``eplbd planner`` on tcp://127.0.0.1:port (snapshots on port + 1), its state
        in ``<dir>/state``. Returns at once: agents and workers connect when it is up."""
        port = port or free_port_pair()
        s = {
            "listen": f"tcp://127.0.0.1:{port}",
            "state_dir": self.dir / "state",
            "metrics": "127.0.0.1:0",
            "log_format": "json",
            "log_level": "info",
            **PLANNER_FAST,
            **settings,
        }
        d = self._spawn("planner", ["planner", *_flags(s)], self._env(), "planner serving")
        self.planner = Planner(
            d, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}", port=port
        )
        return self.planner

    def start_agent(
        self,
        node: str,
        *,
        embedded_planner: bool = False,
        planner: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Agent:
        """Start ``eplbd agent`` with its runtime dir ``<dir>/<node>``, connected to the
        stack's planner, or with ``--embedded-planner`` (state in ``<dir>/state``, planner
        settings :data:`PLANNER_FAST` updated with ``planner``, through ``EPLBD_PLANNER_*``).
        Returns at once."""
        rd = self.dir / node
        s: dict[str, Any] = {
            "runtime_dir": rd,
            "node": node,
            "metrics": "127.0.0.1:0",
            "log_level": "info",
            **AGENT_FAST,
            **settings,
        }
        env = self._env()
        if embedded_planner:
            s["state_dir"] = self.dir / "state"
            argv = ["agent", "--embedded-planner", *_flags(s)]
            ps = {**PLANNER_FAST, **(planner or {})}
            env.update({f"EPLBD_PLANNER_{k.upper()}": str(v) for k, v in ps.items()})
        else:
            assert self.planner is not None, "start the planner first"
            argv = ["agent", "--planner", self.planner.control, *_flags(s)]
        d = self._spawn(f"agent-{node}", argv, env, "agent serving")
        agent = Agent(d, node, rd)
        if embedded_planner:
            self.planner = Planner(
                d, f"ipc://{rd}/planner.sock", f"ipc://{rd}/planner-snapshots.sock"
            )
        return agent

    # --- workers ---------------------------------------------------------------------------

    def start_group(self, group: str, agents: list[Agent | None], **spec: Any) -> list[WorkerSpec]:
        """One worker per entry of ``agents`` (rank r connects to agents[r]): EP group
        ``group`` of len(agents) ranks, named ``<group>-r<rank>``."""
        ctx = _mp_context()
        specs = []
        for r, agent in enumerate(agents):
            ws = WorkerSpec(
                name=f"{group}-r{r}",
                rank=r,
                world=len(agents),
                group=group,
                node=agent.node if agent is not None else "none",
                agent=agent.endpoint if agent is not None else None,
                run_dir=str(self.dir),
                **spec,
            )
            proc = ctx.Process(target=worker_main, args=(ws,), name=ws.name, daemon=True)
            proc.start()
            self.workers[ws.name] = _Worker(ws, proc)
            specs.append(ws)
        return specs

    def records(self, name: str) -> list[dict[str, Any]]:
        return read_records(self.workers[name].spec.records)[1]

    def ready(self, name: str) -> dict[str, Any]:
        return read_records(self.workers[name].spec.records)[0]

    def done(self, name: str) -> dict[str, Any]:
        return read_records(self.workers[name].spec.records)[2]

    def last_step(self, name: str) -> int:
        recs = self.records(name)
        return recs[-1]["s"] if recs else -1

    def wait_steps(self, names: Iterable[str], n: int, timeout_s: float = 30.0) -> int:
        """Wait until every worker in ``names`` served ``n`` more steps; the lowest step."""
        names = list(names)
        start = {w: self.last_step(w) for w in names}
        self.wait_until(
            lambda: all(self.last_step(w) >= start[w] + n for w in names),
            timeout_s,
            f"{n} more steps of {names}",
        )
        return min(self.last_step(w) for w in names)

    def kill_worker(self, name: str) -> None:
        w = self.workers[name]
        w.expect_dead = True
        w.proc.kill()
        w.proc.join(10)

    def stop_group(self, group: str, timeout_s: float = 30.0) -> None:
        """Ask the workers of ``group`` to stop after the same step; wait for them."""
        (self.dir / f"stop-{group}").touch()
        members = [w for w in self.workers.values() if w.spec.group == group and not w.expect_dead]
        for w in members:
            w.expect_dead = True
        self.wait_until(
            lambda: all(not w.proc.is_alive() for w in members), timeout_s, f"{group} stopped"
        )
        for w in members:
            assert w.proc.exitcode == 0, f"{w.spec.name} exited with {w.proc.exitcode}"

    # --- the planner's control socket ---------------------------------------------------------

    def request(
        self, msg_type: str, body: dict[str, Any], timeout_s: float = 5.0
    ) -> Message | None:
        """One request to the planner's control socket; the answer, None at the deadline."""
        assert self.planner is not None, "no planner"
        self.planner.daemon.wait_serving()
        with control_client(self.ctx, self.planner.control) as c:
            if not c.send(msg_type, body, timeout_ms=int(timeout_s * 1000)):
                return None
            got = c.recv(int(timeout_s * 1000))
            return None if got is None else got.message

    def status(self, what: str = "status", group: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"what": what}
        if group is not None:
            body["group"] = group
        m = self.request(STATUS_REQUEST, body)
        assert m is not None, f"no answer to status_request {what}\n{self.diagnostics()}"
        assert m.type == STATUS_REPLY, (m.type, m.body)
        return m.body["data"]  # type: ignore[no-any-return]

    def group(self, name: str, what: str = "status") -> dict[str, Any]:
        groups = {g["group"]: g for g in self.status(what)["groups"]}
        return groups.get(name, {})

    def attempts(self, group: str) -> list[dict[str, Any]]:
        return list(self.group(group, "history").get("attempts", []))

    def command(self, op: str, group: str, **extra: Any) -> dict[str, Any]:
        m = self.request(COMMAND, {"op": op, "group": group, **extra})
        assert m is not None, f"no answer to command {op}\n{self.diagnostics()}"
        assert m.type == COMMAND_REPLY, (m.type, m.body)
        return m.body

    # --- waiting and diagnostics ------------------------------------------------------------

    def check_alive(self) -> None:
        """Fail at once (with logs) when a process that should run has exited."""
        for d in self.daemons:
            if not d.expect_dead and d.popen.poll() is not None:
                raise AssertionError(
                    f"{d.name} exited with {d.popen.returncode}\n{self.diagnostics()}"
                )
        for w in self.workers.values():
            err = Path(f"{Path(w.spec.run_dir) / w.spec.name}.err")
            if err.exists():
                raise AssertionError(f"{w.spec.name} failed:\n{err.read_text()}")
            if not w.expect_dead and not w.proc.is_alive():
                raise AssertionError(
                    f"{w.spec.name} exited with {w.proc.exitcode}\n{self.diagnostics()}"
                )

    def wait_until(
        self, pred: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.05
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s} s waiting for {what}\n{self.diagnostics()}"
                )
            time.sleep(every_s)

    @staticmethod
    def _tail(path: Path, n: int = 12) -> str:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return "    (none)"
        return "\n".join("    " + x[:400] for x in lines[-n:])

    def diagnostics(self) -> str:
        parts = []
        for d in self.daemons:
            parts.append(f"--- {d.log.name} (rc={d.popen.poll()})\n{self._tail(d.log)}")
        for w in self.workers.values():
            base = Path(w.spec.run_dir) / w.spec.name
            rec = self.records(w.spec.name)
            last = rec[-1] if rec else None
            parts.append(
                f"--- {w.spec.name} (alive={w.proc.is_alive()}, last step={last and last['s']},"
                f" epoch={last and last['e']}, pending={last and last['p']})\n"
                f"{self._tail(Path(f'{base}.log'), 6)}"
            )
        return "\n".join(parts)

    def close(self, keep: bool = False) -> None:
        for g in {w.spec.group for w in self.workers.values()}:
            (self.dir / f"stop-{g}").touch()
        deadline = time.monotonic() + 5.0
        for w in self.workers.values():
            w.proc.join(max(0.0, deadline - time.monotonic()))
        for w in self.workers.values():
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
        for d in self.daemons:
            d.stop()
        self.ctx.destroy(linger=0)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)
