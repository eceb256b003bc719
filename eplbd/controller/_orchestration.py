"""Commit orchestration: starting a two-phase commit and acting on what the ranks report.

One :class:`~eplbd.controller._commit.Attempt` per epoch holds the state machine; this part
of the core persists it before its ``prepare`` leaves (so a restarted planner never reuses an
epoch), routes ``staged`` / ``committed`` / ``aborted`` reports to it, and turns its effects
into messages (``abort`` to the group's agents, ``layout`` once committed), history entries
and metrics.
"""

from __future__ import annotations

from typing import Any

from eplbd.controller._commit import Attempt, Effect
from eplbd.controller._state import (
    CoreBase,
    GroupState,
    Outbound,
    layout_tensors,
    log,
    round_or_none,
)
from eplbd.controller._trigger import Decision
from eplbd.wire import ABORT, PREPARE

__all__ = ["CommitOrchestration"]


class CommitOrchestration(CoreBase):
    """Two-phase commits of new epochs (a part of PlannerCore)."""

    def _attempt_for(self, b: dict[str, Any]) -> tuple[GroupState, Attempt] | None:
        g = self.groups.get(b["group"])
        if g is None:
            return None
        a = g.recent.get(b["epoch"])
        if a is None:
            g.count("unknown_attempt")
            return None
        rank = g.ranks.get(b["ep_rank"])
        if rank is not None and rank.worker != b["worker"]:
            g.count("wrong_worker")
            return None
        return g, a

    def _on_staged(self, b: dict[str, Any]) -> list[Outbound]:
        found = self._attempt_for(b)
        if found is None:
            return []
        g, a = found
        now, wall = self.clock.monotonic(), self.clock.time()
        return self._effects(
            g, a, a.on_staged(b["ep_rank"], b["ok"], b["reason"], b["staged_bytes"], now, wall)
        )

    def _on_committed(self, b: dict[str, Any]) -> list[Outbound]:
        g = self.groups.get(b["group"])
        if g is not None and b["ep_rank"] in g.ranks:
            rk = g.ranks[b["ep_rank"]]
            if rk.worker == b["worker"]:
                rk.epoch = max(rk.epoch, b["epoch"])
        found = self._attempt_for(b)
        if found is None:
            return []
        g, a = found
        now, wall = self.clock.monotonic(), self.clock.time()
        return self._effects(g, a, a.on_committed(b["ep_rank"], b["step"], now, wall))

    def _on_aborted(self, b: dict[str, Any]) -> list[Outbound]:
        found = self._attempt_for(b)
        if found is None:
            return []
        g, a = found
        now, wall = self.clock.monotonic(), self.clock.time()
        return self._effects(g, a, a.on_aborted(b["ep_rank"], b["reason"], now, wall))

    def _effects(self, g: GroupState, a: Attempt, effects: list[Effect]) -> list[Outbound]:
        out: list[Outbound] = []
        now, wall = self.clock.monotonic(), self.clock.time()
        for eff in effects:
            if eff.kind == "send_abort":
                body = {"group": g.name, "epoch": a.epoch, "reason": eff.detail[:4000]}
                out += [Outbound(i, ABORT, dict(body)) for i in self._agents_of(g)]
                log.warning("commit aborted", group=g.name, epoch=a.epoch, reason=eff.detail)
            elif eff.kind == "applied":
                if a.epoch > g.record.epoch:
                    self._adopt(g, a.epoch, a.layout, wall, "committed")
                g.record.last_rebalance_wall = wall
                g.last_rebalance_mono = now
                if g.record.pending is a and a.finished:
                    g.record.pending = None
                elif not a.finished:
                    # committing, also where a late report revived an aborted attempt: on disk
                    # it is the pending one again, so a restart finishes it as committed
                    g.record.pending = a
                self._persist(g)
                out += self._layout_to(g, self._agents_of(g))
                log.info(
                    "commit applied",
                    group=g.name,
                    epoch=a.epoch,
                    latency_s=round_or_none(a.commit_latency_s, 4),
                )
                if self.metrics is not None:
                    self.metrics.commit(g.name, a.commit_latency_s, int(a.decision.get("moves", 0)))
            elif eff.kind == "finished":
                g.last_rebalance_mono = now
                g.record.last_rebalance_wall = wall
                if g.record.pending is a:
                    g.record.pending = None
                entry = a.to_dict(with_layout=False)
                g.record.history = [h for h in g.record.history if h.get("epoch") != a.epoch] + [
                    entry
                ]
                keep = self.store.keep_history if self.store is not None else 256
                del g.record.history[:-keep]
                self._persist(g)
                log.info(
                    "commit finished",
                    group=g.name,
                    epoch=a.epoch,
                    outcome=a.state,
                    reason=a.reason,
                    flags=a.flags,
                )
                if self.metrics is not None:
                    self.metrics.outcome(g.name, a.state)
        return out

    def _start_attempt(self, g: GroupState, d: Decision) -> tuple[list[Outbound], str | None]:
        """Persist the attempt, then prepare it on every agent of the group."""
        assert d.layout is not None and g.ep_size
        rec = g.record
        now, wall = self.clock.monotonic(), self.clock.time()
        reported = max((rk.epoch for rk in g.ranks.values()), default=0)
        epoch = max(rec.max_epoch, rec.epoch, reported) + 1
        a = Attempt(
            group=g.name,
            epoch=epoch,
            previous_epoch=rec.epoch,
            ranks=tuple(range(g.ep_size)),
            layout=d.layout,
            trigger=d.trigger,
            started_at=now,
            started_wall=wall,
            timeout_s=self.config.prepare_timeout_s,
            commit_timeout_s=self.config.commit_timeout_s,
        )
        d.epoch = epoch
        a.decision = d.to_dict(with_layers=True)
        prev_max, prev_pending = rec.max_epoch, rec.pending
        rec.max_epoch = epoch
        rec.pending = a
        if not self._persist(g):
            rec.max_epoch, rec.pending = prev_max, prev_pending
            return [], "the state directory cannot be written; nothing was prepared"
        g.attempt = a
        g.recent[epoch] = a
        for e in sorted(g.recent)[:-8]:
            g.recent.pop(e, None)
        body = {"group": g.name, "epoch": epoch, "timeout_s": float(self.config.prepare_timeout_s)}
        tensors = layout_tensors(d.layout)
        out = [
            Outbound(i, PREPARE, dict(body), {**tensors, "phy2log": form})
            for i, form in self._phy2log_forms(d.layout.phy2log, self._agents_of(g))
        ]
        log.info(
            "prepare",
            group=g.name,
            epoch=epoch,
            trigger=d.trigger,
            layers=d.changed_layers,
            moves=d.moves,
            balance_now=round_or_none(d.balance_now, 4),
            balance_after=round_or_none(d.balance_after, 4),
        )
        if self.metrics is not None:
            self.metrics.prepared(g.name)
        return out, None
