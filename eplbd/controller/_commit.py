"""The two-phase commit of one epoch across every rank of an EP group, as a state machine.

The planner drives it; the ranks decide the flip among themselves. ``prepare`` goes to every
rank; each stages the weights of its changed slots and answers ``staged``. There is no
commit message: once every rank has staged, the clients' consensus (an all-reduce every
``sync_interval`` steps) flips all of them at the same step, and each reports ``committed``
(epoch, step). So the planner can only *abort* (before the flip) and *observe*:

    preparing --all staged--> staged --first committed--> committing --all reported--> committed
        |                        |                              |
        +-- not ok / deadline / rank lost / aborted --> aborted  +-- report deadline --> committed
                                                                    (flag: missing reports)

A ``committed`` report is the truth whatever the state: the consensus is collective, so one
rank serving the epoch means all do. A commit reported before every ``staged`` arrived, or
after an abort was sent (the flip raced the abort), moves the attempt to committing with a
flag. The first report makes the epoch the group's layout ("applied").

Pure: every method takes ``now`` (monotonic) and ``wall`` (timestamp) and returns the
effects the driver must carry out: ``Effect("send_abort", reason)``, ``Effect("applied")``,
``Effect("finished")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eplbd.layout import Layout

__all__ = ["Attempt", "Effect", "TERMINAL_STATES"]

PREPARING = "preparing"
STAGED = "staged"
COMMITTING = "committing"
COMMITTED = "committed"
ABORTED = "aborted"
TERMINAL_STATES = frozenset({COMMITTED, ABORTED})
#: The commit step of a rank known to serve the epoch only from its registration (its own
#: ``committed`` report, with the step, never came): left out of the steps' comparison.
UNKNOWN_STEP = -1


@dataclass(frozen=True)
class Effect:
    """Something the driver must do: "send_abort" (detail: reason), "applied", "finished"."""

    kind: str
    detail: str = ""


@dataclass
class Attempt:
    """One prepared epoch of one group and everything that happened to it.

    ``ranks`` are the EP ranks that must stage (all of the group); ``staged`` maps rank to
    the bytes it staged; ``committed`` rank to the step it flipped at. ``deadline`` is
    monotonic: for staging while preparing, for the first commit report once staged, for
    the remaining reports once committing.
    """

    group: str
    epoch: int
    previous_epoch: int
    ranks: tuple[int, ...]
    layout: Layout
    trigger: str
    started_at: float
    started_wall: float
    timeout_s: float
    commit_timeout_s: float
    state: str = PREPARING
    deadline: float = 0.0
    staged: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    aborted_by: dict[int, str] = field(default_factory=dict)
    lost: dict[int, str] = field(default_factory=dict)
    reason: str = ""
    flags: list[str] = field(default_factory=list)
    finished_wall: float | None = None
    all_staged_at: float | None = None
    applied_at: float | None = None
    commit_latency_s: float | None = None
    decision: dict[str, Any] = field(default_factory=dict)
    restored: bool = False

    def __post_init__(self) -> None:
        if not self.deadline:
            self.deadline = self.started_at + self.timeout_s

    # --- queries ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def in_flight(self) -> bool:
        """Preparing or staged: the flip has not been seen yet (the group must wait)."""
        return self.state in (PREPARING, STAGED)

    def waiting_for(self) -> list[int]:
        """Ranks whose next answer the attempt waits for (staged, then committed)."""
        if self.state == PREPARING:
            return [r for r in self.ranks if r not in self.staged]
        if self.state in (STAGED, COMMITTING):
            return [r for r in self.ranks if r not in self.committed and r not in self.lost]
        return []

    # --- events ----------------------------------------------------------------------------

    def on_staged(
        self, rank: int, ok: bool, reason: str, staged_bytes: int, now: float, wall: float
    ) -> list[Effect]:
        if rank not in self.ranks or self.state != PREPARING:
            return []
        if not ok:
            self.aborted_by[rank] = reason or "staging failed"
            return self.abort(f"rank {rank} could not stage: {reason or 'no reason given'}", wall)
        self.staged[rank] = int(staged_bytes)
        if all(r in self.staged for r in self.ranks):
            self.state = STAGED
            self.all_staged_at = now
            self.deadline = now + self.commit_timeout_s
        return []

    def on_committed(self, rank: int, step: int, now: float, wall: float) -> list[Effect]:
        if rank not in self.ranks:
            return []
        effects: list[Effect] = []
        if self.state in (PREPARING, STAGED, ABORTED):
            if self.state == PREPARING and len(self.staged) < len(self.ranks):
                self._flag("committed before every staged report arrived")
            if self.state == ABORTED:
                self._flag(f"committed although aborted ({self.reason})")
                self.reason = ""
                self.finished_wall = None
            self.state = COMMITTING
            self.applied_at = now
            self.commit_latency_s = max(0.0, now - self.started_at)
            self.deadline = now + self.commit_timeout_s
            effects.append(Effect("applied"))
        elif self.state == COMMITTED:
            if rank not in self.committed:
                self.committed[rank] = int(step)
                self._check_steps()
            return []
        self.committed[rank] = int(step)
        effects += self._maybe_complete(wall)
        return effects

    def on_aborted(self, rank: int, reason: str, now: float, wall: float) -> list[Effect]:
        if rank not in self.ranks:
            return []
        self.aborted_by[rank] = reason
        if self.in_flight:
            return self.abort(f"rank {rank} aborted: {reason or 'no reason given'}", wall)
        return []

    def on_rank_lost(self, rank: int, why: str, now: float, wall: float) -> list[Effect]:
        """A rank of the group died, left or restarted (its staged data is gone)."""
        if rank not in self.ranks:
            return []
        if self.in_flight:
            self.lost[rank] = why
            return self.abort(f"rank {rank} lost: {why}", wall)
        if self.state == COMMITTING and rank not in self.committed:
            self.lost[rank] = why
            return self._maybe_complete(wall)
        return []

    def tick(self, now: float, wall: float) -> list[Effect]:
        if self.finished or now < self.deadline:
            return []
        if self.state == PREPARING:
            missing = self.waiting_for()
            return self.abort(
                f"deadline: rank(s) {missing} did not stage within {self.timeout_s:g} s", wall
            )
        if self.state == STAGED:
            return self.abort(
                f"deadline: no commit reported within {self.commit_timeout_s:g} s of staging",
                wall,
            )
        # committing: the flip happened; record it with the ranks that never reported
        self._flag(f"no commit report from rank(s) {self.waiting_for()}")
        return self._finish(COMMITTED, wall)

    def abort(self, reason: str, wall: float) -> list[Effect]:
        """Abort if the flip has not been seen; returns the effects (none if too late)."""
        if not self.in_flight:
            return []
        self.reason = reason
        return [Effect("send_abort", reason), *self._finish(ABORTED, wall)]

    # --- internals -------------------------------------------------------------------------

    def _flag(self, text: str) -> None:
        if text not in self.flags:
            self.flags.append(text)

    def _check_steps(self) -> None:
        steps = {s for s in self.committed.values() if s != UNKNOWN_STEP}
        if len(steps) > 1:
            self._flag(f"ranks report different commit steps: {sorted(steps)}")

    def _maybe_complete(self, wall: float) -> list[Effect]:
        if self.state != COMMITTING:
            return []
        if all(r in self.committed or r in self.lost for r in self.ranks):
            if self.lost:
                self._flag(f"rank(s) {sorted(self.lost)} lost before reporting the commit")
            return self._finish(COMMITTED, wall)
        return []

    def _finish(self, state: str, wall: float) -> list[Effect]:
        self.state = state
        self.finished_wall = wall
        if state == COMMITTED:
            self._check_steps()
        return [Effect("finished", state)]

    # --- persistence -----------------------------------------------------------------------

    def to_dict(self, *, with_layout: bool = True) -> dict[str, Any]:
        """JSON form for the state file and the history (monotonic times are left out)."""
        d: dict[str, Any] = {
            "group": self.group,
            "epoch": self.epoch,
            "previous_epoch": self.previous_epoch,
            "ranks": list(self.ranks),
            "trigger": self.trigger,
            "state": self.state,
            "started_at": self.started_wall,
            "finished_at": self.finished_wall,
            "timeout_s": self.timeout_s,
            "commit_timeout_s": self.commit_timeout_s,
            "staged": {str(k): v for k, v in sorted(self.staged.items())},
            "committed": {str(k): v for k, v in sorted(self.committed.items())},
            "aborted_by": {str(k): v for k, v in sorted(self.aborted_by.items())},
            "lost": {str(k): v for k, v in sorted(self.lost.items())},
            "reason": self.reason,
            "flags": list(self.flags),
            "commit_latency_s": self.commit_latency_s,
            "restored": self.restored,
            "decision": self.decision,
        }
        if with_layout:
            d["layout"] = self.layout.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, now: float) -> Attempt:
        """Rebuild a persisted attempt after a restart; an unfinished one gets a fresh deadline
        (``now + timeout_s``) so the group has time to re-register before it is aborted."""
        a = cls(
            group=str(d["group"]),
            epoch=int(d["epoch"]),
            previous_epoch=int(d["previous_epoch"]),
            ranks=tuple(int(r) for r in d["ranks"]),
            layout=Layout.from_dict(d["layout"]),
            trigger=str(d.get("trigger", "auto")),
            started_at=now,
            started_wall=float(d["started_at"]),
            timeout_s=float(d["timeout_s"]),
            commit_timeout_s=float(d["commit_timeout_s"]),
            state=str(d["state"]),
            deadline=now + float(d["timeout_s"]),
            staged={int(k): int(v) for k, v in d.get("staged", {}).items()},
            committed={int(k): int(v) for k, v in d.get("committed", {}).items()},
            aborted_by={int(k): str(v) for k, v in d.get("aborted_by", {}).items()},
            lost={int(k): str(v) for k, v in d.get("lost", {}).items()},
            reason=str(d.get("reason", "")),
            flags=[str(f) for f in d.get("flags", [])],
            finished_wall=d.get("finished_at"),
            commit_latency_s=d.get("commit_latency_s"),
            decision=dict(d.get("decision") or {}),
            restored=True,
        )
        if a.state not in (PREPARING, STAGED, COMMITTING, COMMITTED, ABORTED):
            raise ValueError(f"unknown attempt state {a.state!r}")
        return a
