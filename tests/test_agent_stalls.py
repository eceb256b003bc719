"""A real ``eplbd agent`` process: its footprint, and what it does after its own stall.

The agent runs as a subprocess between the daemon tests' fake planner (loopback TCP) and fake
workers (its ipc sockets); SIGSTOP / SIGCONT stall it. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from test_agent_daemon import (  # the fake planner and workers of the daemon tests
    FakePlanner,
    FakeWorker,
    _agent_cmd,
    p2l,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

DEAD = 3.0  # the agent's dead timeout here: its workers' connections come back well within it


class AgentProcess:
    """``eplbd agent`` (node n0) connected to ``fp``, JSON log in the runtime dir."""

    def __init__(self, rundir: Path, fp: FakePlanner, *extra: str) -> None:
        ctl, snap = fp.endpoints
        self.log = rundir / "agent.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [
                    *_agent_cmd(rundir, "--planner", ctl, "--planner-snapshots", snap),
                    "--dead-timeout-s",
                    str(DEAD),
                    *extra,
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.rundir = rundir

    def serving(self) -> dict[str, Any]:
        def event() -> dict[str, Any] | None:
            for line in self.log.read_text(errors="replace").splitlines():
                if line.startswith("{") and '"agent serving"' in line:
                    return dict(json.loads(line))
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            return None

        return wait_for(event, 30, "the agent to serve")  # type: ignore[no-any-return]

    def metrics(self) -> dict[str, float]:
        from _e2e import scrape

        return scrape(str(self.serving()["metrics"]))

    def worker(self, ctx: zmq.Context[Any], name: str, rank: int) -> FakeWorker:
        ep = f"ipc://{self.rundir}/agent.sock"
        return FakeWorker(ctx, ep, f"ipc://{self.rundir}/snapshots.sock", name, rank, ep_size=2)

    def stall(self, fp: FakePlanner, seconds: float) -> None:
        """SIGSTOP for ``seconds`` while the fake planner keeps pumping, then SIGCONT."""
        self.proc.send_signal(signal.SIGSTOP)
        end = time.monotonic() + seconds
        try:
            fp.pump(lambda p: time.monotonic() >= end, timeout=seconds + 5)
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@dataclass
class Node:
    """The agent process, the fake planner, and two registered fake workers (ranks 0, 1)."""

    fp: FakePlanner
    agent: AgentProcess
    workers: list[FakeWorker]


@pytest.fixture
def node(ctx: zmq.Context[Any], rundir: Path) -> Iterator[Node]:
    fp = FakePlanner(ctx)
    agent = AgentProcess(rundir, fp)
    workers: list[FakeWorker] = []
    try:
        fp.pump(lambda p: p.agent, timeout=30)
        workers = [agent.worker(ctx, f"w{r}", r) for r in range(2)]
        for w in workers:
            w.say_hello()
        fp.pump(lambda p: {"w0", "w1"} <= set(p.told()), timeout=30)
        yield Node(fp, agent, workers)
    finally:
        for w in workers:
            w.close()
        agent.close()
        fp.close()


def test_the_agent_runs_without_torch_in_under_100_mb(node: Node) -> None:
    """Relaying a layout and merging snapshots (tensor frames both ways) loads no torch."""
    fp, agent, workers = node.fp, node.agent, node.workers
    fp.keepalive = workers
    fp.send("prepare", {"group": "g0", "epoch": 1, "timeout_s": 30.0}, {"phy2log": p2l(1)})
    for w in workers:
        assert np.array_equal(w.expect("prepare", 30).tensors["phy2log"], p2l(1))
        w.snapshot(np.ones((2, 8), dtype=np.int32))
    merged = fp.pump(lambda p: p.snapshots, timeout=30)[0]
    assert merged.body["ep_ranks"] == [0, 1] and int(merged.tensors["counts"][0, 0]) == 2
    maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps
    rss = _rss_mb(agent.proc.pid)
    print(f"agent RSS after relaying and merging: {rss:.1f} MB")
    assert rss < 100.0


def test_a_resumed_agent_gives_its_workers_time_instead_of_declaring_them_left(
    node: Node,
) -> None:
    """SIGSTOP longer than the dead timeout while the workers say nothing (their link holds
    its messages, as a real one does once the agent is silent): after SIGCONT the agent must
    not count its own stall as its workers' silence."""
    fp, agent = node.fp, node.agent
    fp.keepalive = []
    agent.stall(fp, 2 * DEAD)
    fp.keepalive = node.workers  # they talk again once the agent runs
    resumed = time.monotonic()
    fp.pump(lambda p: time.monotonic() > resumed + 2 * DEAD, timeout=4 * DEAD)
    m = agent.metrics()
    assert m.get('eplbd_agent_events_total{event="worker_left_timeout"}', 0) == 0
    assert m["eplbd_agent_workers"] == 2
    assert m.get('eplbd_agent_events_total{event="stalled"}', 0) >= 1
    assert not fp.of("worker_left")
    hellos = fp.of("agent_hello")
    assert {w["worker"] for w in hellos[-1].body["workers"]} == {"w0", "w1"}


def test_what_ranks_serve_reaches_the_planner_after_the_agent_stalls(node: Node) -> None:
    """The ranks flip to epoch 1 while their agent is stopped and its ``committed`` reports
    never arrive (lost with the connection): once the agent runs again, the planner must be
    told what each rank serves (from the workers' heartbeats), not keep epoch 0 until the
    next commit."""
    fp, agent, workers = node.fp, node.agent, node.workers
    fp.keepalive = workers
    fp.send("prepare", {"group": "g0", "epoch": 1, "timeout_s": 30.0}, {"phy2log": p2l(1)})
    for w in workers:
        w.expect("prepare", 30)
        w.answer("staged", 1, ok=True, reason="", staged_bytes=0)
    fp.pump(lambda p: len(p.of("staged")) == 2, timeout=30)
    fp.keepalive = []
    agent.stall(fp, 2 * DEAD)
    for w in workers:  # they serve epoch 1 now, and say so in every heartbeat
        w.hello["epoch"] = 1
    fp.keepalive = workers

    def told_epochs(p: FakePlanner) -> dict[str, int]:
        seen: dict[str, int] = {}
        for m in p.control:
            b = m.body
            if m.type == "agent_hello":
                seen.update({w["worker"]: w["epoch"] for w in b["workers"]})
            elif m.type == "worker_joined":
                seen[b["worker"]] = b["hello"]["epoch"]
            elif m.type == "committed":
                seen[b["worker"]] = b["epoch"]
        return seen

    fp.pump(lambda p: told_epochs(p) == {"w0": 1, "w1": 1}, timeout=30)
