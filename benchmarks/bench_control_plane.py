"""The control plane at production scale: one real planner, N real agents, simulated ranks.

    python3 -m benchmarks.bench_control_plane [--scenario ep32,ep144,ep320,multi]
        [--faults agent_kill,agent_stop,planner_restart,slow_rank,partition | none]
        [--steps-per-s 20] [--staging-s 0.5] [--stop-s 25] [--steady-s 40]
        [--label NAME] [--record FILE.jsonl] [--legacy-windows] [--int64-layouts]
    python3 -m benchmarks.bench_control_plane --render benchmarks/results/control_plane.jsonl

What runs (all on this machine, loopback TCP and ipc):

- ``python3 -m eplbd planner`` (one process) and ``python3 -m eplbd agent`` (one process per
  node, 8 ranks per node), started as an operator would, with JSON logs in a temporary dir;
- the ranks: :mod:`benchmarks._cp_sim`, one thread of this process, speaking the worker side
  of docs/protocol.md through each agent's real ipc sockets. **The consensus among the ranks
  of a group is emulated in-process** (see that module): a rank applies an epoch only if
  every rank of its group staged it, at the same step, every ``sync_interval`` steps;
  staging takes ``staging_s``. DeepSeek-V3 shapes: 58 layers, 256 experts, top-8, P = G x S
  slots with S = 256 // G + 1 (EP 32: 288, EP 144: 288, EP 320: 320); a 4-of-16-step
  recording schedule; skewed load that drifts every 3 s; each rank's link starts at a random
  time within the first 2 s while its group already steps (so welcomes come at different
  steps);
- commits are started with the operator's ``rebalance`` command on the control socket
  (force: any gain), every ``commit_every_s`` during the steady phase and once per fault.

Faults (each during a commit unless said otherwise), each followed by a wait until the
planner's status is right for every rank (state alive, the epoch the rank serves, the
group's epoch, nothing pending), polled every 0.25 s:

- ``agent_kill``: an agent SIGKILLed after its ranks received the PREPARE, restarted 3 s
  later (the fault ends when it serves again);
- ``agent_stop``: an agent SIGSTOPped after its ranks received the PREPARE, SIGCONT after
  ``stop_s``;
- ``planner_restart``: the planner SIGKILLed after every rank received the PREPARE and
  restarted 1 s later (the reconnect storm; the fault ends when it serves again);
- ``slow_rank``: one rank stages for longer than the prepare deadline (the fault ends at the
  planner's deadline);
- ``partition``: one node's traffic to the planner dropped for ``drop_s`` by a TCP relay of
  this benchmark (``benchmarks/_cp_proxy.py``: bytes read and discarded both ways, then the
  connections closed) after its ranks received the PREPARE.

Figures per scenario: planner CPU (% of one core over the steady phase) and peak RSS, agent
RSS, snapshots/s ingested and the drain lag (the ranks stop stepping: time until the last
snapshot is ingested), merged snapshots complete/partial (agents' /metrics), plan time
(round trip of the ``rebalance`` command: plan, persist, PREPARE sent), PREPARE-to-COMMITTED
(p50/p99) split into staging, the consensus pace and the rest, messages and bytes per
commit, status response time, time to settle after each fault and whether status was right
for every rank within 5 s of the fault's end. Run time is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq

from benchmarks._cp_sim import SimConfig, SimGroup, Simulator
from eplbd.ops.procs import child_env, die_with_parent, stop_process
from eplbd.wire import (
    COMMAND,
    COMMAND_REPLY,
    STATUS_REPLY,
    STATUS_REQUEST,
    WireSocket,
    control_client,
)

__all__ = ["SCENARIOS", "Scenario", "main", "run_scenario"]

SECTION = "control-plane"
FAULTS = ("agent_kill", "agent_stop", "planner_restart", "slow_rank", "partition")
RESULTS = Path(__file__).resolve().parent / "results" / "control_plane.jsonl"


@dataclass(frozen=True)
class Scenario:
    """Groups as (name, ep_size); every node runs ``ranks_per_node`` ranks of one group."""

    name: str
    groups: tuple[tuple[str, int], ...]
    ranks_per_node: int = 8
    num_layers: int = 58
    num_experts: int = 256

    @property
    def ranks(self) -> int:
        return sum(g for _, g in self.groups)

    @property
    def nodes(self) -> int:
        return self.ranks // self.ranks_per_node


SCENARIOS: dict[str, Scenario] = {
    "ep32": Scenario("ep32", (("g0", 32),)),
    "ep144": Scenario("ep144", (("g0", 144),)),
    "ep320": Scenario("ep320", (("g0", 320),)),
    "multi": Scenario("multi", (("g0", 144), ("g1", 144))),
    # the CPU smoke test (tests/test_bench_control_plane.py): seconds, not minutes
    "smoke": Scenario("smoke", (("g0", 4),), ranks_per_node=2, num_layers=4, num_experts=16),
}


@dataclass
class Timing:
    """The daemons' and the benchmark's time constants (seconds)."""

    steps_per_s: float = 20.0
    staging_s: float = 0.5
    sync_interval: int = 16
    window_steps: int = 16
    record_steps: int = 4
    heartbeat_s: float = 1.0  # agents and planner; the ranks' link heartbeats at 1 s
    dead_timeout_s: float = 5.0  # agent: a silent worker or planner is gone
    merge_timeout_s: float = 2.0
    prepare_timeout_s: float = 10.0
    commit_timeout_s: float = 30.0
    window_s: float = 2.0  # planner load buckets
    steady_s: float = 40.0
    commit_every_s: float = 3.0
    stop_s: float = 25.0
    kill_down_s: float = 3.0
    drop_s: float = 10.0
    settle_limit_s: float = 60.0
    rank_heartbeat_s: float = 1.0
    drift_every_s: float = 3.0  # the load changes, so every forced rebalance has a gain
    link_stagger_s: float = 2.0  # the ranks' links start within 2 s while the groups step


# --- processes -------------------------------------------------------------------------------


def _flags(settings: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in settings.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


class Proc:
    """A child process, its log, and /proc readings."""

    def __init__(self, name: str, argv: list[str], log: Path, ready: str) -> None:
        self.name, self.argv, self.base_log, self.ready_event = name, argv, log, ready
        self.log = log
        self.starts = 0
        self.serving: dict[str, Any] | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        self.start()

    def start(self) -> None:
        """Spawn (again); each start logs to its own file."""
        self.starts += 1
        self.serving = None
        if self.starts > 1:
            self.log = self.base_log.with_suffix(f".{self.starts}.log")
        env = child_env({"OMP_NUM_THREADS": "1"})
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log, "wb") as fh:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=die_with_parent,
            )
        self.spawned_at = time.time()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def events(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.log.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        return out

    def wait_serving(self, timeout_s: float = 900.0) -> dict[str, Any]:
        """The daemon's "... serving" log event (it has bound its sockets)."""
        deadline = time.monotonic() + timeout_s
        while self.serving is None:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n" + self.log.read_text()[-2000:])
            self.serving = next(
                (e for e in self.events() if e.get("event") == self.ready_event), None
            )
            if self.serving is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start in {timeout_s} s")
                time.sleep(0.05)
        return self.serving

    def restart(self) -> None:
        self.start()

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.popen is not None
        self.popen.wait(120)  # a heavily loaded host takes its time

    def stop(self) -> None:
        if self.popen is not None:
            self.signal(signal.SIGCONT)
            stop_process(self.popen, 5.0)

    def cpu_s(self) -> float:
        """user + system CPU seconds of the process (and its threads)."""
        with open(f"/proc/{self.pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")

    def mem_kb(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0])
        return out

    def maps_torch(self) -> bool:
        """Whether libtorch is mapped into the process."""
        with open(f"/proc/{self.pid}/maps") as f:
            return "libtorch" in f.read()


def _free_ports(n: int) -> list[int]:
    import socket

    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n >= 65535:
            continue
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
        return list(range(base, base + n))
    raise RuntimeError("no free ports")


class PlannerClient:
    """Requests on the planner's control socket, as the CLI makes them."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock: WireSocket | None = None
        self.reply_bytes = 0

    def _socket(self) -> WireSocket:
        if self.sock is None:
            self.sock = control_client(self.ctx, self.endpoint)
        return self.sock

    def request(
        self, msg_type: str, body: dict[str, Any], want: str, timeout_s: float = 5.0
    ) -> tuple[dict[str, Any] | None, float]:
        """(reply body, round trip seconds); (None, t) on timeout or an error reply."""
        s = self._socket()
        t0 = time.perf_counter()
        if not s.send(msg_type, body, timeout_ms=int(timeout_s * 1000)):
            self._reset()
            return None, time.perf_counter() - t0
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._reset()
                return None, time.perf_counter() - t0
            got = s.recv(int(left * 1000) + 1)
            if got is None:
                self._reset()
                return None, time.perf_counter() - t0
            if got.message.type == want:
                return got.message.body, time.perf_counter() - t0
            if got.message.type == "error":
                return None, time.perf_counter() - t0

    def _reset(self) -> None:  # a late reply must not answer the next request
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def status(self, timeout_s: float = 5.0) -> tuple[dict[str, Any] | None, float]:
        body, rtt = self.request(STATUS_REQUEST, {"what": "status"}, STATUS_REPLY, timeout_s)
        return (None if body is None else body["data"]), rtt

    def history(self) -> dict[str, Any] | None:
        body, _ = self.request(STATUS_REQUEST, {"what": "history"}, STATUS_REPLY, 10.0)
        return None if body is None else body["data"]

    def rebalance(self, group: str) -> tuple[dict[str, Any] | None, float]:
        return self.request(COMMAND, {"op": "rebalance", "group": group}, COMMAND_REPLY, 30.0)

    def close(self) -> None:
        self._reset()
        self.ctx.destroy(linger=0)


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    i = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[i]


# --- one scenario ----------------------------------------------------------------------------


@dataclass
class FaultResult:
    name: str
    epoch: int | None = None
    outcome: str | None = None
    ended_at: float = 0.0
    settle_s: float | None = None
    correct_within_5s: bool = False
    wrong_at_5s: list[str] = field(default_factory=list)
    note: str = ""


class Bench:
    """One scenario's processes, simulator and measurements."""

    def __init__(
        self,
        sc: Scenario,
        t: Timing,
        legacy_windows: bool,
        log: Callable[[str], None],
        int64_layouts: bool = False,
    ):
        self.sc, self.t, self.log = sc, t, log
        self.dir = Path(tempfile.mkdtemp(prefix="cp", dir="/tmp"))
        ports = _free_ports(4)
        self.port = ports[0]
        self.proxy_ports = (ports[2], ports[3])
        self.planner_ep = f"tcp://127.0.0.1:{self.port}"
        self.agents: list[Proc] = []
        self.nodes: list[str] = []
        self.partition_node = sc.nodes - 1
        self.proxy: subprocess.Popen[bytes] | None = None
        self.planner: Proc | None = None
        self.sim = Simulator(
            SimConfig(
                num_layers=sc.num_layers,
                num_experts=sc.num_experts,
                steps_per_s=t.steps_per_s,
                sync_interval=t.sync_interval,
                staging_s=t.staging_s,
                heartbeat_s=t.rank_heartbeat_s,
                drift_every_s=t.drift_every_s,
                legacy_windows=legacy_windows,
                link_stagger_s=t.link_stagger_s,
                int64_layouts=int64_layouts,
            ),
            run_id=self.dir.name,
        )
        self.stop_sim = threading.Event()
        self.sim_thread: threading.Thread | None = None
        self.pc = PlannerClient(self.planner_ep)
        self.status_rtts: list[float] = []
        self.results: dict[str, Any] = {}

    # --- processes ---------------------------------------------------------------------------

    def start_planner(self) -> None:
        t = self.t
        s = {
            "listen": self.planner_ep,
            "state_dir": self.dir / "state",
            "metrics": "127.0.0.1:0",
            "log_format": "json",
            "log_level": "info",
            "window_s": t.window_s,
            "windows": 4,
            # no automatic rebalance (the benchmark starts them): load out of reach; a
            # forced rebalance skips that check (min_windows may not exceed windows)
            "min_tokens": 10**15,
            "cooldown_s": 0,
            "heartbeat_s": t.heartbeat_s,
            "prepare_timeout_s": t.prepare_timeout_s,
            "commit_timeout_s": t.commit_timeout_s,
        }
        argv = [sys.executable, "-m", "eplbd", "planner", *_flags(s)]
        self.planner = Proc("planner", argv, self.dir / "planner.log", "planner serving")

    def start_proxy(self) -> None:
        a, b = self.proxy_ports
        self.proxy = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks._cp_proxy",
                f"{a}:{self.port}",
                f"{b}:{self.port + 1}",
            ],
            stdout=subprocess.PIPE,
            env=child_env({"PYTHONPATH": str(Path(__file__).resolve().parents[1])}),
            preexec_fn=die_with_parent,
        )
        assert self.proxy.stdout is not None
        if self.proxy.stdout.readline().strip() != b"ready":
            raise RuntimeError("the proxy did not start")

    def start_agents(self) -> None:
        t = self.t
        for i in range(self.sc.nodes):
            node = f"n{i:02d}"
            rd = self.dir / node
            s: dict[str, Any] = {
                "planner": self.planner_ep,
                "runtime_dir": rd,
                "node": node,
                "window_steps": t.window_steps,
                "record_steps": t.record_steps,
                "heartbeat_s": t.heartbeat_s,
                "dead_timeout_s": t.dead_timeout_s,
                "merge_timeout_s": t.merge_timeout_s,
                "metrics": "127.0.0.1:0",
                "log_level": "info",
            }
            if i == self.partition_node:
                s["planner"] = f"tcp://127.0.0.1:{self.proxy_ports[0]}"
                s["planner_snapshots"] = f"tcp://127.0.0.1:{self.proxy_ports[1]}"
            argv = [sys.executable, "-m", "eplbd", "agent", *_flags(s)]
            self.nodes.append(node)
            self.agents.append(
                Proc(f"agent-{node}", argv, self.dir / f"{node}.log", "agent serving")
            )

    def close(self) -> None:
        self.stop_sim.set()
        if self.sim_thread is not None:
            self.sim_thread.join(10)
        self.pc.close()
        for p in [*self.agents, *([self.planner] if self.planner else [])]:
            p.stop()
        if self.proxy is not None:
            stop_process(self.proxy, 2.0)
        if not os.environ.get("CP_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        st, rtt = self.pc.status()
        if st is not None:
            self.status_rtts.append(rtt)
        return st

    def wrong_ranks(self, st: dict[str, Any] | None) -> list[str]:
        """Where the planner's status differs from what the ranks serve (empty: right)."""
        if st is None:
            return ["no status"]
        by_name = {g["group"]: g for g in st["groups"]}
        bad: list[str] = []
        for sg in self.sim.groups:
            g = by_name.get(sg.name)
            if g is None:
                bad.append(f"{sg.name}: unknown")
                continue
            served = sg.served()
            if g["pending"] is not None:
                bad.append(f"{sg.name}: pending epoch {g['pending']['epoch']}")
            if g["epoch"] != max(served):
                bad.append(f"{sg.name}: epoch {g['epoch']}, ranks serve {max(served)}")
            for rk, r in zip(g["ranks"], sg.ranks, strict=False):
                if rk["state"] != "alive" or rk["epoch"] != r.epoch or rk["worker"] != r.worker:
                    bad.append(
                        f"{sg.name} r{r.rank}: {rk['state']} epoch {rk['epoch']} "
                        f"(serves {r.epoch}){' ' + str(rk['left_reason']) if rk['left_reason'] else ''}"
                    )
        return bad

    def wait_correct(self, since: float, limit_s: float) -> tuple[float | None, list[str]]:
        """Poll status every 0.25 s until it is right for every rank: (seconds after
        ``since``, the problems seen at ``since + 5 s``)."""
        deadline = since + limit_s
        at5: list[str] | None = None
        while time.time() < deadline:
            st = self.status()
            wrong = self.wrong_ranks(st)
            now = time.time()
            if at5 is None and now >= since + 5.0:
                at5 = wrong
            if not wrong:
                return now - since, ([] if at5 is None else at5)
            time.sleep(0.25)
        return None, at5 or ["timed out"]

    # --- commits -----------------------------------------------------------------------------

    def trigger(self, group: str, attempts: int = 20) -> tuple[int | None, float]:
        """Start a commit with the operator's rebalance command: (epoch, round trip)."""
        for _ in range(attempts):
            body, rtt = self.pc.rebalance(group)
            if body is not None and body.get("ok"):
                return int(body["data"]["epoch"]), rtt
            time.sleep(0.5)
        return None, 0.0

    def wait_prepared(
        self, group: str, epoch: int, ranks: list[int], timeout_s: float = 20.0
    ) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.sim.prepare_rx.get((group, epoch), {})
            if all(r in got for r in ranks):
                return True
            time.sleep(0.01)
        return False

    def mid_commit(self, fr: FaultResult, g: SimGroup, ranks: list[int]) -> None:
        """Start a commit of ``g`` and wait until its PREPARE reached ``ranks``."""
        fr.epoch, _ = self.trigger(g.name)
        if fr.epoch is None or not self.wait_prepared(g.name, fr.epoch, ranks):
            fr.note = "no PREPARE reached the ranks of the fault"

    def node_ranks(self, group: SimGroup, node: int) -> list[int]:
        return [r.rank for r in group.ranks if r.node == self.nodes[node]]

    # --- the run -----------------------------------------------------------------------------

    def run(self, faults: tuple[str, ...]) -> dict[str, Any]:
        sc = self.sc
        res = self.results
        t_start = time.time()
        self.start_planner()
        self.start_proxy()
        assert self.planner is not None
        self.planner.wait_serving()
        self.start_agents()
        for a in self.agents:
            a.wait_serving()
        res["start_s"] = round(time.time() - t_start, 1)
        self.log(f"  {len(self.agents)} agents and the planner serve after {res['start_s']} s")
        per_node = sc.ranks_per_node
        first = 0
        for name, ep in sc.groups:
            n_nodes = ep // per_node
            dirs = [str(self.dir / self.nodes[i]) for i in range(first, first + n_nodes)]
            self.sim.add_group(
                name, ep, sc.num_experts // ep + 1, dirs, self.nodes[first : first + n_nodes]
            )
            first += n_nodes
        started = threading.Event()
        self.sim_thread = threading.Thread(
            target=self.sim.run, args=(self.stop_sim, started), name="sim", daemon=True
        )
        t_sim = time.time()
        self.sim_thread.start()
        started.wait(60)
        # registration: every rank alive at the planner
        reg = None
        while time.time() < t_sim + 120:
            st = self.status()
            if (
                st is not None
                and all(
                    g["complete"] and all(r["state"] == "alive" for r in g["ranks"])
                    for g in st["groups"]
                )
                and len(st["groups"]) == len(sc.groups)
            ):
                reg = time.time() - t_sim
                break
            time.sleep(0.1)
        res["register_s"] = None if reg is None else round(reg, 2)
        self.log(f"  every rank registered after {res['register_s']} s")
        # warm-up: load data in every group
        while time.time() < t_sim + 120:
            st = self.status()
            if st is not None and all(g["data"]["source"] != "none" for g in st["groups"]):
                break
            time.sleep(0.2)
        self.steady()
        res["faults"] = [asdict(self.fault(f)) for f in faults]
        self.drain()
        self.collect()
        res["run_s"] = round(time.time() - t_start, 1)
        ranks: dict[str, int] = {}
        for r in self.sim.ranks():
            for k, v in r.counts.items():
                ranks[k] = ranks.get(k, 0) + v
        res["rank_counters"] = ranks
        return res

    def _samples(self) -> dict[str, Any]:
        assert self.planner is not None
        st = self.status()
        for _ in range(10):
            if st is not None:
                break
            st = self.status()
        snaps = 0 if st is None else st["planner"]["counters"]["received"].get("snapshot", 0)
        return {
            "t": time.time(),
            "planner_cpu": self.planner.cpu_s(),
            "agents_cpu": sum(a.cpu_s() for a in self.agents if a.alive()),
            "snapshots": snaps,
            "received": {} if st is None else dict(st["planner"]["counters"]["received"]),
            "steps": sum(g.step for g in self.sim.groups),
            "sim": dict(self.sim.stats.msgs),
            "sim_bytes": dict(self.sim.stats.nbytes),
            "agent_metrics": self.agent_metrics(),
            "self_cpu": time.process_time(),
            "load": os.getloadavg()[0],
        }

    def agent_metrics(self) -> dict[str, float]:
        tot: dict[str, float] = {}
        for a in self.agents:
            if not a.alive() or a.serving is None:
                continue
            with contextlib.suppress(Exception):
                for k, v in _scrape(str(a.serving["metrics"])).items():
                    if k.startswith(
                        (
                            "eplbd_agent_snapshots_forwarded_total",
                            "eplbd_agent_relayed_total",
                            "eplbd_agent_events_total",
                            "eplbd_agent_dropped_total",
                        )
                    ):
                        tot[k] = tot.get(k, 0.0) + v
        return tot

    def steady(self) -> None:
        t = self.t
        self.log(f"  steady phase: {t.steady_s:g} s, a commit every {t.commit_every_s:g} s")
        a = self._samples()
        self.status_rtts.clear()
        rss_p: list[int] = []
        rss_a: list[int] = []
        plan: list[float] = []
        epochs: list[tuple[str, int]] = []
        end = time.time() + t.steady_s
        next_commit = time.time() + 1.0
        gi = 0
        while time.time() < end:
            if time.time() >= next_commit:
                g = self.sim.groups[gi % len(self.sim.groups)]
                gi += 1
                e, rtt = self.trigger(g.name, attempts=1)
                if e is not None:
                    plan.append(rtt)
                    epochs.append((g.name, e))
                next_commit = time.time() + t.commit_every_s / len(self.sim.groups)
            assert self.planner is not None
            rss_p.append(self.planner.mem_kb()["VmRSS"])
            rss_a.extend(p.mem_kb()["VmRSS"] for p in self.agents)
            self.status()
            time.sleep(1.0)
        time.sleep(3.0)  # the last commit completes
        b = self._samples()
        dt = b["t"] - a["t"]
        res = self.results
        assert self.planner is not None
        res["steady"] = {
            "seconds": round(dt, 1),
            "planner_cpu_pct": round(100 * (b["planner_cpu"] - a["planner_cpu"]) / dt, 1),
            "planner_rss_mb": round(max(rss_p) / 1024, 1),
            "planner_hwm_mb": round(self.planner.mem_kb()["VmHWM"] / 1024, 1),
            "agents_cpu_pct": round(100 * (b["agents_cpu"] - a["agents_cpu"]) / dt, 1),
            "agent_rss_mb_median": round(statistics.median(rss_a) / 1024, 1),
            "agent_rss_mb_max": round(max(rss_a) / 1024, 1),
            "agent_torch": any(p.maps_torch() for p in self.agents[:3]),
            "bench_cpu_pct": round(100 * (b["self_cpu"] - a["self_cpu"]) / dt, 1),
            "snapshots_per_s": round((b["snapshots"] - a["snapshots"]) / dt, 1),
            # one merged snapshot per agent and window, at the step rate the ranks achieved
            "snapshots_expected_per_s": round(
                self.sc.nodes
                * (b["steps"] - a["steps"])
                / dt
                / len(self.sim.groups)
                / t.window_steps,
                1,
            ),
            "status_rtt_ms_p50": round(1000 * statistics.median(self.status_rtts), 1),
            "status_rtt_ms_max": round(1000 * max(self.status_rtts), 1),
            "plan_rtt_ms_p50": None if not plan else round(1000 * statistics.median(plan), 1),
            "plan_rtt_ms_max": None if not plan else round(1000 * max(plan), 1),
            "commits_started": len(epochs),
            "steps_per_s": round((b["steps"] - a["steps"]) / dt / len(self.sim.groups), 1),
            "load_average": [round(a["load"], 1), round(b["load"], 1)],
        }
        fwd = {
            kind: b["agent_metrics"].get(
                f'eplbd_agent_snapshots_forwarded_total{{kind="{kind}"}}', 0
            )
            - a["agent_metrics"].get(f'eplbd_agent_snapshots_forwarded_total{{kind="{kind}"}}', 0)
            for kind in ("complete", "partial")
        }
        res["steady"]["merged_complete"] = int(fwd["complete"])
        res["steady"]["merged_partial"] = int(fwd["partial"])
        self.steady_epochs = epochs
        self.steady_counts = (a, b)
        self.log(f"  steady: {json.dumps(res['steady'])}")

    def fault(self, name: str) -> FaultResult:
        t = self.t
        fr = FaultResult(name)
        g = self.sim.groups[0]
        # wait until quiet (the previous fault settled)
        self.wait_correct(time.time(), t.settle_limit_s)
        self.log(f"  fault {name}")
        if name == "agent_kill":
            node = 1 % self.sc.nodes
            self.mid_commit(fr, g, self.node_ranks(g, node))
            self.agents[node].kill()
            time.sleep(t.kill_down_s)
            self.agents[node].restart()
            self.agents[node].wait_serving()
        elif name == "agent_stop":
            node = 2 % self.sc.nodes
            self.mid_commit(fr, g, self.node_ranks(g, node))
            self.agents[node].signal(signal.SIGSTOP)
            time.sleep(t.stop_s)
            self.agents[node].signal(signal.SIGCONT)
        elif name == "planner_restart":
            assert self.planner is not None
            self.mid_commit(fr, g, [r.rank for r in g.ranks])
            self.planner.kill()
            time.sleep(1.0)
            self.planner.restart()
            self.planner.wait_serving()
        elif name == "slow_rank":
            node = 3 % self.sc.nodes
            rank = g.ranks[self.node_ranks(g, node)[0]]
            rank.slow_s = t.prepare_timeout_s + 5.0
            t0 = time.time()
            fr.epoch, _ = self.trigger(g.name)
            # the fault ends at the planner's deadline for the attempt
            time.sleep(max(0.0, t0 + t.prepare_timeout_s - time.time()))
        elif name == "partition":
            self.mid_commit(fr, g, self.node_ranks(g, self.partition_node))
            assert self.proxy is not None
            self.proxy.send_signal(signal.SIGUSR1)
            time.sleep(t.drop_s)
            self.proxy.send_signal(signal.SIGUSR2)
        else:
            raise ValueError(name)
        fr.ended_at = time.time()
        settle, at5 = self.wait_correct(fr.ended_at, t.settle_limit_s)
        fr.settle_s = None if settle is None else round(settle, 2)
        fr.correct_within_5s = settle is not None and settle <= 5.0
        fr.wrong_at_5s = at5[:8] + ([f"... {len(at5) - 8} more"] if len(at5) > 8 else [])
        h = self.pc.history()
        if h is not None and fr.epoch is not None:
            for gh in h["groups"]:
                for att in gh["attempts"]:
                    if gh["group"] == g.name and att["epoch"] == fr.epoch:
                        fr.outcome = att["state"]
        self.log(f"    {json.dumps(asdict(fr))}")
        return fr

    def drain(self) -> None:
        """Stop stepping; the time until the planner stops counting new snapshots."""
        for g in self.sim.groups:
            g.paused = True
        t0 = time.time()
        last_n, last_change = -1, t0
        quiet = self.t.merge_timeout_s + 1.0  # a partial window waits merge_timeout_s
        while time.time() < min(t0 + 30.0, last_change + quiet):
            st, _ = self.pc.status()
            if st is not None:
                n = st["planner"]["counters"]["received"].get("snapshot", 0)
                if n != last_n:
                    last_n, last_change = n, time.time()
            time.sleep(0.05)
        self.results["drain_lag_s"] = round(last_change - t0, 2)

    def collect(self) -> None:
        """Commit latencies of the steady phase's attempts, and messages per commit."""
        h = self.pc.history()
        res = self.results
        t = self.t
        rows: list[dict[str, Any]] = []
        if h is not None:
            by = {(gh["group"], a["epoch"]): a for gh in h["groups"] for a in gh["attempts"]}
            for key in self.steady_epochs:
                a = by.get(key)
                if a is None or a["state"] != "committed" or a["finished_at"] is None:
                    rows.append({"epoch": key[1], "state": None if a is None else a["state"]})
                    continue
                rx = self.sim.prepare_rx.get(key, {})
                staged = self.sim.staged_at.get(key, {})
                flip = self.sim.flips.get(key)
                row = {
                    "epoch": key[1],
                    "state": "committed",
                    "total_s": a["finished_at"] - a["started_at"],
                    "first_s": a["commit_latency_s"],
                }
                if rx and staged and flip is not None:
                    row["fanout_s"] = max(rx.values()) - a["started_at"]
                    row["consensus_s"] = flip[0] - max(staged.values())
                    row["fanin_s"] = a["finished_at"] - flip[0]
                    row["beyond_s"] = row["total_s"] - t.staging_s - row["consensus_s"]
                rows.append(row)
        done = [r for r in rows if r.get("state") == "committed" and "beyond_s" in r]

        def q(key: str, p: float) -> float | None:
            v = _pct([float(r[key]) for r in done], p)
            return None if v is None else round(v, 3)

        res["commits"] = {
            "rows": [
                {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows
            ],
            "n": len(done),
            "not_committed": [r for r in rows if r.get("state") != "committed"],
            **{
                f"{k}_p{p}": q(k, p)
                for k in ("total_s", "beyond_s", "first_s", "fanout_s", "consensus_s", "fanin_s")
                for p in (50, 99)
            },
            "staging_s": t.staging_s,
            "consensus_period_s": round(t.sync_interval / t.steps_per_s, 3),
        }
        a, b = self.steady_counts
        n = max(1, len(self.steady_epochs))

        def per_commit(d0: dict[str, int], d1: dict[str, int], key: str) -> float:
            return round((d1.get(key, 0) - d0.get(key, 0)) / n, 1)

        res["per_commit"] = {
            "ranks_rx_prepare": per_commit(a["sim"], b["sim"], "down:prepare"),
            "ranks_rx_prepare_mb": round(
                per_commit(a["sim_bytes"], b["sim_bytes"], "down:prepare") / 1e6, 2
            ),
            "ranks_tx_staged": per_commit(a["sim"], b["sim"], "up:staged"),
            "ranks_tx_committed": per_commit(a["sim"], b["sim"], "up:committed"),
            "ranks_tx_aborted": per_commit(a["sim"], b["sim"], "up:aborted"),
            "planner_rx_staged": per_commit(a["received"], b["received"], "staged"),
            "planner_rx_committed": per_commit(a["received"], b["received"], "committed"),
            "planner_tx_prepare_and_layout": 2 * self.sc.nodes // len(self.sc.groups),
        }
        # the CLI, once, as an operator runs it
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "eplbd", "status", "--planner", self.planner_ep, "--json"],
            capture_output=True,
            env=child_env(),
            timeout=60,
        )
        res["cli_status_s"] = round(time.perf_counter() - t0, 2)


def run_scenario(
    sc: Scenario,
    t: Timing,
    faults: tuple[str, ...],
    legacy_windows: bool = False,
    int64_layouts: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    b = Bench(sc, t, legacy_windows, log, int64_layouts)
    try:
        return {"scenario": sc.name, "ranks": sc.ranks, "nodes": sc.nodes, **b.run(faults)}
    finally:
        b.close()


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0]
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}); load average {load:.1f} at start"
    )


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


_LABELS = (
    "baseline",
    "no-torch",
    "stalls",
    "aligned",
    "int64-layouts-1",
    "int16-layouts-1",
    "int64-layouts-2",
    "int16-layouts-2",
    "phase2",
)


def render(rows: list[dict[str, Any]]) -> str:
    """The docs section: three tables (resources and ingest, commits and status, faults),
    one row per run: the latest of each (label, scenario), in the order of the fixes."""
    latest = {(r["label"], r["scenario"]): r for r in rows}
    order = list(SCENARIOS)
    rows = sorted(
        latest.values(),
        key=lambda r: (
            _LABELS.index(r["label"]) if r["label"] in _LABELS else len(_LABELS),
            order.index(r["scenario"]) if r["scenario"] in order else len(order),
        ),
    )
    out = [
        "## Control plane at scale (`bench_control_plane`)",
        "",
        "One real `eplbd planner`, one real `eplbd agent` per node (8 ranks each), the ranks "
        "**simulated** by `benchmarks/_cp_sim.py` on the agents' real ipc sockets with the real "
        "messages; **the consensus among the ranks is emulated in-process** (a rank applies an "
        "epoch only if every rank of its group staged it, at the same step, every "
        "`sync_interval` = 16 steps at 20 steps/s: a 0.8 s pace), staging 0.5 s. DeepSeek-V3 "
        "shapes (58 layers, 256 experts, top-8; P = 288, 288, 320 slots at EP 32, 144, 320), a "
        "4-of-16-step recording schedule, skewed load drifting every 3 s, a forced rebalance "
        "every 3 s. `multi` = two groups of EP 144 at once. Faults and method: the module "
        "docstring. `python3 -m benchmarks.bench_control_plane`.",
        "",
        "Labels: `baseline` = the code before issue 14 (the ranks follow the client's old "
        "window rule); `no-torch` = agent without torch; `stalls` = plus the agent's stall, "
        "lost-report and disconnect handling; `aligned` = plus the client's windows aligned on "
        "the group's step count (the ranks follow the new rule); `int64-layouts-N` / "
        "`int16-layouts-N` (issue 14 phase 2, no faults, run back to back in that order on the "
        "same code): the ranks get each layout as int64 (`--int64-layouts`, the form before) or "
        "in the compact int16 form (the planner sends the agents int16 in both); `phase2` = "
        "all of issue 14 phase 2 (compact layouts, rejoin grace, hello-storm answers, the "
        "planner's stall detection) with every fault.",
        "",
        "Machine, every row: "
        + (rows[0]["machine"].split(";")[0] if rows else "-")
        + ". **Shared with three other engineers' test runs (vLLM on CPU):** the load "
        "average during each steady phase is in the last column; figures under a load of "
        "10-60 on 2 cores are slow, not representative of a quiet host.",
        "",
        "### Resources and ingest (steady phase)",
        "",
        "CPU over the steady phase, which includes one `status` request a second (the status "
        "response time below) and a forced rebalance every 3 s; RSS: the planner's peak, the "
        "agents' over the phase; snapshots/s ingested by the planner, expected = agents x "
        "achieved steps/s / window_steps when every merge is complete (the simulator could not "
        "keep 20 steps/s on the loaded host: achieved rate in its column); merged complete / partial: the "
        "agents' forwarded snapshots; drain lag: the ranks stop stepping, time until the "
        "planner's snapshot count stops moving.",
        "",
        "| label | scenario | ranks / agents | planner CPU % of a core | planner RSS MB | agent RSS MB (median / max) | torch in agent | snapshots/s (expected) | merged complete / partial | drain lag s | steps/s achieved | load avg |",
        "|---|---|---|---:|---:|---|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        s = r["steady"]
        expected = r["nodes"] * s["steps_per_s"] / r["timing"]["window_steps"]
        out.append(
            f"| {r['label']} | {r['scenario']} | {r['ranks']} / {r['nodes']} | "
            f"{_f(s['planner_cpu_pct'])} | {_f(s['planner_hwm_mb'])} | "
            f"{_f(s['agent_rss_mb_median'])} / {_f(s['agent_rss_mb_max'])} | "
            f"{'yes' if s['agent_torch'] else 'no'} | {_f(s['snapshots_per_s'])} "
            f"({_f(expected)}) | {s['merged_complete']} / "
            f"{s['merged_partial']} | {_f(r.get('drain_lag_s'), 2)} | "
            f"{_f(s.get('steps_per_s'))} | {s['load_average'][0]}-{s['load_average'][1]} |"
        )
    out += [
        "",
        "### Commits and status (steady phase)",
        "",
        "PREPARE→COMMITTED: the planner's `started_at` to `finished_at` (every rank's "
        "`committed` recorded); *beyond* = that minus staging (0.5 s) minus the consensus "
        "wait measured by the simulator (last rank staged → the round that flipped); *first* = "
        "to the first `committed`. Plan: round trip of the `rebalance` command (plan, persist, "
        "PREPARE sent). Per commit: PREPAREs and MB received by the ranks, `committed` sent "
        "by them, `committed` received by the planner; the planner sends one PREPARE and one "
        "`layout` per agent of the group. Fan-out: from the attempt's start (the PREPAREs "
        "leave) to the PREPARE's receipt by the last rank.",
        "",
        "| label | scenario | commits | plan ms p50 / max | PREPARE→COMMITTED s p50 / p99 | beyond s p50 / p99 | first s p50 | fan-out s p50 / p99 | consensus wait s p50 | ranks: PREPAREs, MB | committed ranks→planner | status ms p50 / max | `eplbd status` CLI s |",
        "|---|---|---:|---|---|---|---:|---|---:|---|---|---|---:|",
    ]
    for r in rows:
        s, c, m = r["steady"], r["commits"], r["per_commit"]
        out.append(
            f"| {r['label']} | {r['scenario']} | {c['n']} | {_f(s['plan_rtt_ms_p50'])} / "
            f"{_f(s['plan_rtt_ms_max'])} | {_f(c['total_s_p50'], 2)} / {_f(c['total_s_p99'], 2)} | "
            f"{_f(c['beyond_s_p50'], 2)} / {_f(c['beyond_s_p99'], 2)} | {_f(c['first_s_p50'], 2)} | "
            f"{_f(c['fanout_s_p50'], 2)} / {_f(c['fanout_s_p99'], 2)} | "
            f"{_f(c['consensus_s_p50'], 2)} | {_f(m['ranks_rx_prepare'], 0)}, "
            f"{_f(m['ranks_rx_prepare_mb'])} | {_f(m['ranks_tx_committed'], 0)} → "
            f"{_f(m['planner_rx_committed'], 0)} | {_f(s['status_rtt_ms_p50'])} / "
            f"{_f(s['status_rtt_ms_max'])} | {_f(r.get('cli_status_s'), 2)} |"
        )
    out += [
        "",
        "### Faults",
        "",
        "Seconds from the fault's end to the planner's status being right for every rank "
        "(alive, the epoch it serves, the group's epoch, nothing pending), polled every "
        "0.25 s; ✓ = within 5 s; the commit's outcome in brackets. Targets at EP 320: every "
        "fault ✓, the reconnect storm (planner restart) settled within 10 s.",
        "",
        "| label | scenario | " + " | ".join(FAULTS) + " |",
        "|---|---|" + "---|" * len(FAULTS),
    ]
    for r in rows:
        by = {f["name"]: f for f in r.get("faults", [])}
        cells = []
        for name in FAULTS:
            f = by.get(name)
            if f is None:
                cells.append("-")
            elif f["settle_s"] is None:
                cells.append(f"✗ not within {r['timing']['settle_limit_s']:g} s ({f['outcome']})")
            else:
                ok = "✓" if f["correct_within_5s"] else "✗"
                cells.append(f"{ok} {f['settle_s']:.2f} ({f['outcome']})")
        out.append(f"| {r['label']} | {r['scenario']} | " + " | ".join(cells) + " |")
    runs = ", ".join(f"{r['label']}/{r['scenario']} {r['run_s']:.0f} s" for r in rows)
    out += ["", f"Run times (start to end, this machine): {runs}."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="ep32,ep144,ep320,multi")
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma list, or none")
    ap.add_argument("--label", default="current")
    ap.add_argument("--record", type=Path, default=None, help="append results (JSON lines)")
    ap.add_argument(
        "--legacy-windows", action="store_true", help="the client's window rule before issue 14"
    )
    ap.add_argument(
        "--int64-layouts",
        action="store_true",
        help="the ranks get layouts as int64, as before the compact form (issue 14 phase 2)",
    )
    ap.add_argument(
        "--render",
        type=Path,
        default=None,
        help=f"only write the docs section from these results (e.g. {RESULTS.relative_to(RESULTS.parents[2])})",
    )
    for f in Timing.__dataclass_fields__.values():
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    if args.render is not None:
        from benchmarks._report import write_section

        lines = args.render.read_text().splitlines()
        write_section(SECTION, render([json.loads(x) for x in lines if x.strip()]))
        return 0
    t = Timing(**{k: getattr(args, k) for k in Timing.__dataclass_fields__})
    faults = () if args.faults == "none" else tuple(x for x in args.faults.split(",") if x)
    machine = machine_line()
    print(f"machine: {machine}")
    for name in args.scenario.split(","):
        sc = SCENARIOS[name]
        print(f"scenario {name}: {sc.ranks} ranks on {sc.nodes} agents, groups {sc.groups}")
        r = run_scenario(sc, t, faults, args.legacy_windows, args.int64_layouts)
        r.update(
            label=args.label, machine=machine, timing=asdict(t), at=time.strftime("%Y-%m-%d %H:%M")
        )
        print(json.dumps(r, indent=1))
        if args.record is not None:
            args.record.parent.mkdir(parents=True, exist_ok=True)
            with open(args.record, "a") as fh:
                fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
