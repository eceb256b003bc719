"""The demo's driver: start the daemons and the workers, watch them, report, clean up.

Processes (all children of this one, all gone when it returns, also on Ctrl-C):

- ``python3 -m eplbd agent --embedded-planner`` with a temporary runtime dir (short, for the
  ipc sockets) and state dir, settings tuned for a run of a minute (:class:`PlannerTuning`),
  its log in the run directory; it dies with us (``PR_SET_PDEATHSIG``) even if we are killed;
- ``workers`` processes of :mod:`eplbd.demo._worker` (EP ranks on gloo), each embedding
  ``EplbClient(agent=...)``.

This process reads the workers' JSON lines (rank 0: one per step, with measurements summed
over all ranks), asks the planner for its history every second (the moves and commit
latency of each epoch), and shows the run: a panel redrawn in place on a terminal, plain lines
otherwise. The balance shown is measured from the tokens each GPU computed, next to what the
initial layout would have given the same tokens and the lower bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from eplbd.demo._config import TOLERANCE, DemoConfig
from eplbd.demo._measure import Balance, StepRecord
from eplbd.ops.procs import child_env, die_with_parent, log_tail, stop_process

__all__ = ["DemoError", "DemoRun", "Rebalance"]

#: Steps on each side of a commit over which "before" and "after" are measured.
AROUND = 32
_STALL_S = 120.0
_START_S = 120.0


class DemoError(RuntimeError):
    """The demo could not run (a process failed, stalled or could not start)."""


@dataclass
class Rebalance:
    """One committed epoch as the workers served it (and the planner recorded it)."""

    epoch: int
    step: int  # the first step served with it, on every rank
    before: Balance
    after: Balance
    moves: int | None = None
    commit_latency_s: float | None = None
    trigger: str | None = None
    reported: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "trigger": self.trigger,
            "moves": self.moves,
            "commit_latency_s": None
            if self.commit_latency_s is None
            else round(self.commit_latency_s, 4),
            "balance_before": _r(self.before.live()),
            "balance_after": _r(self.after.live()),
            "after_without_eplbd": _r(self.after.static()),
            "after_lower_bound": _r(self.after.lower_bound()),
            "steps_before": self.before.steps,
            "steps_after": self.after.steps,
            "layers": [
                {
                    "layer": i,
                    "before": _r(self.before.live(i)),
                    "after": _r(self.after.live(i)),
                    "after_without_eplbd": _r(self.after.static(i)),
                }
                for i in range(self.before.num_layers)
            ],
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    buf: bytes = b""
    done: bool = False


@dataclass
class DemoRun:
    """One ``eplbd demo`` run. ``on_event(kind, run)`` is called for "step", "rebalance",
    "attempt" and "phase" so a display can follow; :meth:`run` returns the summary."""

    cfg: DemoConfig
    on_event: Callable[[str, DemoRun, Any], None] = lambda kind, run, data: None
    keep_dir: bool = False
    records: list[StepRecord] = field(default_factory=list)
    rebalances: list[Rebalance] = field(default_factory=list)
    attempts: dict[int, dict[str, Any]] = field(default_factory=dict)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    run_dir: Path | None = None
    started: float = 0.0
    phase: str = "starting"
    epoch_split: bool = False  # ranks ever served different epochs in one step
    _procs: list[_Proc] = field(default_factory=list)
    _agent: _Proc | None = None

    # --- paths -----------------------------------------------------------------------------

    @property
    def runtime_dir(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "rt"

    @property
    def planner_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir / 'planner.sock'}"

    # --- lifecycle -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Start everything, serve ``cfg.steps`` steps, return the summary; always cleans up."""
        self.cfg.check()
        self.started = time.monotonic()
        try:
            self._make_dirs()
            self._start_agent()
            self._wait_planner()
            metrics = self._metrics_url()
            self._set_phase(
                f"planner up; meanwhile try: eplbd top --runtime-dir {self.runtime_dir}"
                + (f" (metrics: {metrics})" if metrics else "")
            )
            self._start_workers()
            self._serve()
            self._poll_planner(final=True)
            return self.summary()
        finally:
            self.cleanup()

    def _make_dirs(self) -> None:
        base = None
        tmp = tempfile.gettempdir()
        if len(tmp) > 40:  # ipc paths must stay under 107 bytes
            base = "/tmp" if os.path.isdir("/tmp") else None
        self.run_dir = Path(tempfile.mkdtemp(prefix="eplbd-demo-", dir=base))
        (self.run_dir / "rt").mkdir()
        (self.run_dir / "state").mkdir()

    def _env(self) -> dict[str, str]:
        # children import the same eplbd and eplbd_client as this process (a fresh clone
        # run in place works without an install)
        env = child_env()
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], *, stdout_pipe: bool
    ) -> _Proc:
        assert self.run_dir is not None
        log = self.run_dir / f"{name}.log"
        with open(log, "wb") as fh:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else fh,
                stderr=fh,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only us; we stop them in order
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
        p = _Proc(name, popen, log)
        self._procs.append(p)
        return p

    def _start_agent(self) -> None:
        self._set_phase("starting the agent with its embedded planner")
        env = self._env()
        env.update(self.cfg.tuning.planner_env())
        assert self.run_dir is not None
        argv = [
            sys.executable,
            "-m",
            "eplbd",
            "agent",
            "--embedded-planner",
            "--runtime-dir",
            str(self.runtime_dir),
            "--state-dir",
            str(self.run_dir / "state"),
            "--node",
            "demo",
            "--log-level",
            "info",
            *self.cfg.tuning.agent_flags(),
        ]
        self._agent = self._spawn("agent", argv, env, stdout_pipe=False)

    def _wait_planner(self) -> None:
        from eplbd.cli._client import CliError, PlannerClient

        deadline = time.monotonic() + _START_S
        sock = self.runtime_dir / "agent.sock"
        with PlannerClient(self.planner_endpoint, timeout_s=2.0) as client:
            while True:
                self._check_agent()
                if sock.exists() and (self.runtime_dir / "planner.sock").exists():
                    try:
                        client.status("status")
                        return
                    except CliError:
                        pass
                if time.monotonic() > deadline:
                    raise DemoError(f"the agent did not start within {_START_S:g} s")
                time.sleep(0.1)

    def _metrics_url(self) -> str | None:
        """The agent's /metrics URL, from its "agent serving" log line (None if not found)."""
        assert self._agent is not None
        try:
            text = self._agent.log.read_text(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                rec = json.loads(line)
                url = rec.get("metrics")
                if rec.get("event") == "agent serving" and isinstance(url, str) and url:
                    return url
        return None

    def _check_agent(self) -> None:
        a = self._agent
        if a is not None and a.popen.poll() is not None:
            raise DemoError(
                f"the agent exited with code {a.popen.returncode}:\n{log_tail(a.log, indent='    ')}"
            )

    def _start_workers(self) -> None:
        self._set_phase(f"starting {self.cfg.workers} workers (EP ranks on gloo)")
        env = self._env()
        assert self.run_dir is not None
        for r in range(self.cfg.workers):
            argv = [
                sys.executable,
                "-m",
                "eplbd.demo._worker",
                str(r),
                self.cfg.to_json(),
                str(self.run_dir),
            ]
            self._spawn(f"worker{r}", argv, env, stdout_pipe=True)

    def _workers(self) -> list[_Proc]:
        return [p for p in self._procs if p.name.startswith("worker")]

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        for p in self._workers():
            assert p.popen.stdout is not None
            os.set_blocking(p.popen.stdout.fileno(), False)
            sel.register(p.popen.stdout, selectors.EVENT_READ, p)
        ready: set[int] = set()
        last_progress = time.monotonic()
        next_poll = time.monotonic() + 1.0
        try:
            while len(self.done) < self.cfg.workers:
                for key, _ in sel.select(timeout=0.2):
                    p = key.data
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        p.done = True
                        continue
                    p.buf += chunk
                    *lines, p.buf = p.buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            self._on_line(p, line, ready)
                            last_progress = time.monotonic()
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + 1.0
                    self._poll_planner()
                self._check_agent()
                for p in self._workers():
                    rc = p.popen.poll()
                    if rc not in (None, 0):
                        raise DemoError(
                            f"{p.name} exited with code {rc}:\n{log_tail(p.log, indent='    ')}"
                        )
                    if rc == 0 and p.done and int(p.name[6:]) not in self.done:
                        raise DemoError(
                            f"{p.name} exited without finishing:\n{log_tail(p.log, indent='    ')}"
                        )
                if now - last_progress > _STALL_S:
                    raise DemoError(
                        f"no progress for {_STALL_S:g} s; last step "
                        f"{self.records[-1].step if self.records else '-'}"
                    )
        finally:
            sel.close()

    def _on_line(self, p: _Proc, line: bytes, ready: set[int]) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return
        kind = msg.get("t")
        if kind == "ready":
            ready.add(int(msg["rank"]))
            if len(ready) == self.cfg.workers:
                self._set_phase("serving")
        elif kind == "step":
            self._on_step(msg)
        elif kind == "done":
            self.done[int(msg["rank"])] = msg
        elif kind == "error":
            raise DemoError(f"{p.name}: {msg.get('message')}\n{log_tail(p.log, indent='    ')}")

    def _on_step(self, msg: dict[str, Any]) -> None:
        r = StepRecord(
            step=int(msg["step"]),
            epoch=int(msg["epoch"]),
            live=msg["live"],
            static=msg["static"],
            experts=msg["experts"],
            err=float(msg["err"]),
            domain=msg.get("domain"),
        )
        if msg["epoch_min"] != msg["epoch_max"]:
            self.epoch_split = True
        prev = self.records[-1] if self.records else None
        self.records.append(r)
        if prev is not None and r.epoch != prev.epoch:
            before = self._balance()
            for q in self.records[-AROUND - 1 : -1]:
                if q.epoch == prev.epoch:
                    before.add(q)
            rb = Rebalance(epoch=r.epoch, step=r.step, before=before, after=self._balance())
            att = self.attempts.get(r.epoch)
            if att is not None:
                self._fill(rb, att)
            self.rebalances.append(rb)
        for rb in self.rebalances:
            if not rb.reported and r.step >= rb.step:
                if r.epoch == rb.epoch and rb.after.steps < AROUND:
                    rb.after.add(r)
                if rb.after.steps >= AROUND or r.epoch != rb.epoch:
                    self._report(rb)
        self.on_event("step", self, r)

    def _report(self, rb: Rebalance) -> None:
        if not rb.reported:
            rb.reported = True
            self.on_event("rebalance", self, rb)

    def _balance(self) -> Balance:
        c = self.cfg
        return Balance(c.layers, c.workers, c.num_physical)

    @staticmethod
    def _fill(rb: Rebalance, att: dict[str, Any]) -> None:
        rb.moves = (att.get("decision") or {}).get("moves")
        rb.commit_latency_s = att.get("commit_latency_s")
        rb.trigger = att.get("trigger")

    def _poll_planner(self, final: bool = False) -> None:
        from eplbd.cli._client import CliError, PlannerClient

        try:
            with PlannerClient(self.planner_endpoint, timeout_s=2.0 if final else 0.5) as c:
                data = c.status("history", self.cfg.group)
        except CliError:
            return
        for g in data.get("groups") or []:
            for att in g.get("attempts") or []:
                e = int(att.get("epoch", -1))
                old = self.attempts.get(e)
                self.attempts[e] = att
                if old is None or old.get("state") != att.get("state"):
                    self.on_event("attempt", self, att)
        for rb in self.rebalances:
            att = self.attempts.get(rb.epoch)
            if att is not None:
                self._fill(rb, att)
        if final:
            for rb in self.rebalances:
                self._report(rb)

    def _set_phase(self, text: str) -> None:
        self.phase = text
        self.on_event("phase", self, text)

    def cleanup(self) -> None:
        """Stop the workers, then the agent (SIGTERM, then SIGKILL), remove the run dir.

        A second Ctrl-C while this runs is ignored, so it always finishes."""
        old = None
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._cleanup()
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)

    def _cleanup(self) -> None:
        for p in self._workers():
            stop_process(p.popen, 3.0)
        for p in self._procs:
            if not p.name.startswith("worker"):
                stop_process(p.popen, 5.0)
        for p in self._procs:
            for s in (p.popen.stdout, p.popen.stderr):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()
        if self.run_dir is not None and not self.keep_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # --- results ---------------------------------------------------------------------------

    def window(self, last: int = AROUND) -> Balance:
        """Balance over the last ``last`` steps."""
        b = self._balance()
        for r in self.records[-last:]:
            b.add(r)
        return b

    def summary(self) -> dict[str, Any]:
        c = self.cfg
        first = self.rebalances[0].step if self.rebalances else None
        before, after = self._balance(), self._balance()
        for r in self.records:
            (before if first is None or r.step < first else after).add(r)
        committed_everywhere = self._commits_agree()
        max_err = max(
            [r.err for r in self.records]
            + [float(d.get("max_err", 0.0)) for d in self.done.values()],
            default=0.0,
        )
        outputs_match = bool(self.records) and max_err <= TOLERANCE and len(self.records) == c.steps
        lat = [rb.commit_latency_s for rb in self.rebalances if rb.commit_latency_s is not None]
        aborted = [a for a in self.attempts.values() if a.get("state") == "aborted"]
        return {
            "mode": c.mode,
            "trace": c.trace,
            "forecast": c.tuning.forecast,
            "workers": c.workers,
            "layers": c.layers,
            "experts": c.experts,
            "slots": c.num_physical,
            "top_k": c.top_k,
            "tokens_per_step": c.tokens * c.workers,
            "steps": len(self.records),
            "steps_requested": c.steps,
            "epochs": self.records[-1].epoch if self.records else 0,
            "rebalances": len(self.rebalances),
            "aborted": len(aborted),
            "committed_on_all_ranks": committed_everywhere,
            "moves": sum(rb.moves or 0 for rb in self.rebalances),
            "balance": {
                "before": _r(before.live()),
                "after": _r(after.live()),
                "after_without_eplbd": _r(after.static()),
                "after_lower_bound": _r(after.lower_bound()),
                "steps_before": before.steps,
                "steps_after": after.steps,
                "measured": "tokens computed per GPU, summed over ranks; per step and layer "
                "the max over GPUs, then sum(max) / sum(mean) over the steps",
            },
            "commit_latency_s": {
                "count": len(lat),
                "median": _r(_median(lat)),
                "max": _r(max(lat)) if lat else None,
                "values": [round(x, 4) for x in lat],
            },
            "rebalance_list": [rb.as_dict() for rb in self.rebalances],
            "outputs_match": outputs_match,
            "max_abs_error": max_err,
            "tolerance": TOLERANCE,
            "checked": "every step, every token, every rank, against the no-EPLB reference",
            "duration_s": round(time.monotonic() - self.started, 2),
        }

    def _commits_agree(self) -> bool:
        """Every rank flipped to every epoch at the same step, and served the same epochs."""
        if len(self.done) < self.cfg.workers or self.epoch_split:
            return False
        lists = [tuple(map(tuple, d.get("commits") or [])) for d in self.done.values()]
        if len(set(lists)) != 1:
            return False
        seen = tuple((rb.epoch, rb.step) for rb in self.rebalances)
        return lists[0] == seen


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def emit(stream: IO[str], text: str) -> None:
    stream.write(text)
    stream.flush()
