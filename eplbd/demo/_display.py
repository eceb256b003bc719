"""How the demo shows itself: a panel redrawn in place on a terminal, plain lines otherwise.

On a terminal the panel (progress, epoch, output check, per-layer balance with a heat row of
the GPU loads) is redrawn at most a few times a second under the lines already printed; each
rebalance prints one permanent line above it. Elsewhere (a pipe, a CI log) the same facts come
as plain lines: one per phase, one per rebalance, a progress line every tenth of the run.
"""

from __future__ import annotations

import time
from typing import Any

from eplbd.cli._output import Output
from eplbd.demo._config import TOLERANCE
from eplbd.demo._driver import AROUND, DemoRun, Rebalance
from eplbd.demo._measure import StepRecord

__all__ = ["Display", "render_summary"]

_REDRAW_S = 0.2


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


class Display:
    """``on_event`` for :class:`DemoRun`. ``live``: redraw a panel (a terminal)."""

    def __init__(self, out: Output, *, live: bool) -> None:
        self.out = out
        self.live = live
        self._panel_lines = 0
        self._last_draw = 0.0
        self._next_progress = 0

    # --- events ----------------------------------------------------------------------------

    def __call__(self, kind: str, run: DemoRun, data: Any) -> None:
        if kind == "phase":
            self._print(run, self.out.style(f"- {data}", "dim"))
        elif kind == "rebalance":
            self._print(run, self._rebalance_line(run, data))
        elif kind == "attempt":
            if data.get("state") == "aborted":
                self._print(
                    run,
                    self.out.style(
                        f"  epoch {data.get('epoch')} aborted by the planner: "
                        f"{data.get('reason') or '?'} (the old layout stays)",
                        "yellow",
                    ),
                )
        elif kind == "step":
            self._step(run, data)

    def _print(self, run: DemoRun, line: str) -> None:
        if self.live:
            self._erase()
        self.out.line(line)
        if self.live and run.records:
            self._draw(run)
        self.out.flush()

    def _step(self, run: DemoRun, r: StepRecord) -> None:
        if self.live:
            now = time.monotonic()
            if now - self._last_draw >= _REDRAW_S or r.step + 1 == run.cfg.steps:
                self._erase()
                self._draw(run)
                self.out.flush()
            return
        every = max(1, run.cfg.steps // 10)
        if r.step + 1 >= self._next_progress or r.step + 1 == run.cfg.steps:
            self._next_progress = r.step + 1 + every
            w = run.window()
            match = "yes" if all(x.err <= _tol() for x in run.records) else "NO"
            dom = f"  domain {r.domain}" if r.domain else ""
            self.out.line(
                f"  step {r.step + 1}/{run.cfg.steps}  epoch {r.epoch}{dom}  balance "
                f"(last {w.steps} steps) {_f(w.live())}, without eplbd {_f(w.static())}, "
                f"lower bound {_f(w.lower_bound())}; outputs match: {match}"
            )
            self.out.flush()

    def _rebalance_line(self, run: DemoRun, rb: Rebalance) -> str:
        o = self.out
        moves = "?" if rb.moves is None else str(rb.moves)
        lat = "?" if rb.commit_latency_s is None else f"{rb.commit_latency_s:.2f} s"
        return (
            o.style(f"  epoch {rb.epoch}", "bold")
            + f" committed on all {run.cfg.workers} ranks at step {rb.step}: {moves} slot moves, "
            + f"commit {lat}; balance {_f(rb.before.live())} -> "
            + o.style(_f(rb.after.live()), "green")
            + f" (without eplbd {_f(rb.after.static())}, lower bound {_f(rb.after.lower_bound())};"
            + f" {rb.before.steps} steps before, {rb.after.steps} after)"
        )

    # --- the live panel --------------------------------------------------------------------

    def _erase(self) -> None:
        if self._panel_lines:
            self.out.write(f"\x1b[{self._panel_lines}F\x1b[J")
            self._panel_lines = 0

    def _draw(self, run: DemoRun) -> None:
        lines = self.panel(run)
        self.out.write("\n".join(lines) + "\n")
        self._panel_lines = len(lines)
        self._last_draw = time.monotonic()

    def panel(self, run: DemoRun) -> list[str]:
        o = self.out
        c = run.cfg
        if not run.records:
            return []
        r = run.records[-1]
        n = r.step + 1
        width = 30
        done = int(width * n / c.steps)
        bar = "#" * done + "." * (width - done)
        ok = all(x.err <= _tol() for x in run.records)
        max_err = max(x.err for x in run.records)
        dom = f"  domain {r.domain}" if r.domain else ""
        lines = [
            f"step {n}/{c.steps} [{bar}]  epoch {r.epoch}{dom}",
            "outputs = no-EPLB reference: "
            + (o.style("yes", "green") if ok else o.style("NO", "red", "bold"))
            + f" (checked every step, every token, every rank; max |diff| {max_err:.1e})",
        ]
        w = run.window()
        lines.append(
            o.style(
                f"balance over the last {w.steps} steps (max/mean tokens per GPU; 1.000 is even):",
                "bold",
            )
        )
        lines.append(f"  {'layer':<6} {'live':>6} {'no eplbd':>9} {'bound':>6}  tokens per GPU")
        recent = run.records[-min(AROUND, len(run.records)) :]
        for i in range(c.layers):
            loads = [sum(x.live[i][g] for x in recent) for g in range(c.workers)]
            lines.append(
                f"  {i:<6} {_f(w.live(i)):>6} {_f(w.static(i)):>9} {_f(w.lower_bound(i)):>6}  "
                + o.heat(loads)
            )
        lines.append(
            f"  {'all':<6} "
            + o.style(f"{_f(w.live()):>6}", "bold")
            + f" {_f(w.static()):>9} {_f(w.lower_bound()):>6}"
        )
        return lines

    def close(self) -> None:
        if self.live:
            self._panel_lines = 0  # leave the last panel on screen


def _tol() -> float:
    return TOLERANCE


def render_summary(out: Output, s: dict[str, Any]) -> None:
    """The end-of-run summary as a few aligned lines."""
    o = out
    b = s["balance"]
    lat = s["commit_latency_s"]
    out.line()
    out.line(o.style("summary", "bold"))
    rows: list[tuple[str, str]] = [
        (
            "run",
            f"{s['steps']} steps, {s['workers']} workers (EP ranks on gloo), {s['layers']} layers x "
            f"{s['experts']} experts in {s['slots']} slots, top-{s['top_k']}, "
            f"{s['tokens_per_step']} tokens per step, {s['mode']} routing, {s['duration_s']:.0f} s",
        ),
        (
            "rebalances",
            f"{s['rebalances']} committed (final epoch {s['epochs']})"
            + (f", {s['aborted']} aborted" if s["aborted"] else "")
            + f", {s['moves']} slot moves; every rank flipped at the same step: "
            + ("yes" if s["committed_on_all_ranks"] else "NO"),
        ),
        (
            "commit latency",
            "-"
            if not lat["count"]
            else f"median {lat['median']:.2f} s, max {lat['max']:.2f} s "
            "(planner: prepare sent -> epoch served)",
        ),
        (
            "balance",
            f"before the first rebalance {_f(b['before'])} ({b['steps_before']} steps); after "
            f"{_f(b['after'])} ({b['steps_after']} steps; the initial layout on the same tokens "
            f"{_f(b['after_without_eplbd'])}, lower bound {_f(b['after_lower_bound'])})",
        ),
        (
            "outputs",
            (
                o.style("match", "green")
                if s["outputs_match"]
                else o.style("DO NOT MATCH", "red", "bold")
            )
            + f" the no-EPLB reference (every step, every token, every rank; max |diff| "
            f"{s['max_abs_error']:.1e}, tolerance {s['tolerance']:.0e})",
        ),
    ]
    for k, v in rows:
        out.line(f"  {k:<15} {v}")
    out.flush()
