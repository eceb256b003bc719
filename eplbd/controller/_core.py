"""The planner's brain: every EP group's state and every rule, without sockets or threads.

:class:`PlannerCore` takes raw frames (or decoded messages) from the control socket and the
snapshot socket, and a ``tick()`` from its owner, and returns the messages to send as
:class:`Outbound` items (a ROUTER identity plus type, body, tensors). The socket runner
(:mod:`eplbd.controller._service`) only moves frames; tests drive the core directly with a
fake clock, which is the in-process transport of CONVENTIONS.md's "seams for tests".

Per group it keeps: the registered ranks (from ``agent_hello`` / ``worker_joined`` /
``worker_left``) and their liveness (their agent's), the model shape, the committed epoch
and layout plus the last few (to convert snapshots recorded under them, and to roll back),
a :class:`LoadWindow`, the trigger's last decisions, and at most one two-phase commit in
flight (:class:`Attempt`). What must survive a restart is written through the
:class:`StateStore` *before* anything is sent that depends on it: an epoch is persisted
before its ``prepare`` leaves, so a restarted planner never reuses one.

Restart reconciliation: the ``agent_hello`` after a restart lists each worker's current
epoch. If a rank serves the pending epoch, the attempt committed (the ranks' consensus is
collective: one rank serving it means all do); if the group is complete and every rank still
serves an older epoch, the attempt is aborted (an ``abort`` goes out, harmless if the flip
raced it: a later ``committed`` report still wins).

The core is split by what it decides: :class:`~eplbd.controller._state.CoreBase` holds the
state, :class:`~eplbd.controller._registration.Registration` the agents and ranks,
:class:`~eplbd.controller._orchestration.CommitOrchestration` the two-phase commits, and
:mod:`~eplbd.controller._views` builds the status views; this module adds the message
dispatch, the snapshots, the clock, the trigger and the operator commands.

Thread-safety: none; one thread (the socket thread) owns a core.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from eplbd.controller._orchestration import CommitOrchestration
from eplbd.controller._registration import Registration
from eplbd.controller._state import (
    STATUS_SCHEMA_VERSION,
    CoreConfig,
    GroupState,
    Outbound,
    log,
)
from eplbd.controller._store import WindowsUnreadable
from eplbd.controller._trigger import Decision, decide, rollback_decision
from eplbd.controller._views import status_data, time_figures
from eplbd.wire import (
    ABORTED,
    AGENT_HELLO,
    COMMAND,
    COMMAND_REPLY,
    COMMITTED,
    DEAD,
    ERROR,
    HEARTBEAT,
    LAYOUT,
    SNAPSHOT,
    STAGED,
    STATUS_REPLY,
    STATUS_REQUEST,
    STATUS_WHATS,
    WORKER_JOINED,
    WORKER_LEFT,
    Message,
    ModelShape,
    WireError,
    decode,
    error_body,
    validate,
)

__all__ = ["CoreConfig", "GroupState", "Outbound", "PlannerCore", "STATUS_SCHEMA_VERSION"]

_CONTROL_FROM_AGENT = frozenset(
    {AGENT_HELLO, WORKER_JOINED, WORKER_LEFT, STAGED, COMMITTED, ABORTED, LAYOUT}
)


class PlannerCore(Registration, CommitOrchestration):
    """The planner's state machine (see the module docstring).

    ``PlannerCore(config, store=..., clock=..., plan_fn=..., incarnation=..., metrics=...,
    endpoints=...)``: see :class:`~eplbd.controller._state.CoreBase`.
    """

    # --- setup -----------------------------------------------------------------------------

    def restore(self, *, reset_corrupt: bool = False) -> list[str]:
        """Load every group from the store. Raises StoreCorrupt unless ``reset_corrupt``.

        Returns notes (files moved aside) for the start-up log.
        """
        if self.store is None:
            return []
        records, notes = self.store.load(now=self.clock.monotonic(), reset_corrupt=reset_corrupt)
        for name, rec in records.items():
            g = self._new_group(name, rec)
            if rec.shape is not None:
                self._set_shape(
                    g,
                    ModelShape(
                        rec.shape["num_layers"],
                        rec.shape["num_logical_experts"],
                        rec.shape["num_physical_experts"],
                    ),
                    rec.shape.get("ep_size"),
                )
            if rec.pending is not None:
                g.attempt = rec.pending
                g.recent[rec.pending.epoch] = rec.pending
            if rec.last_rebalance_wall is not None:
                # the cooldown survives a restart: carry the wall-clock age over (a time in
                # the future, the clock stepped back: as if it were now)
                age = max(0.0, self.clock.time() - rec.last_rebalance_wall)
                g.last_rebalance_mono = self.clock.monotonic() - age
            self._restore_windows(g, notes)
            log.info(
                "group restored",
                group=name,
                epoch=rec.epoch,
                max_epoch=rec.max_epoch,
                pending=None if rec.pending is None else rec.pending.epoch,
                history=len(rec.history),
            )
        self.notes = notes
        return notes

    def _restore_windows(self, g: GroupState, notes: list[str]) -> None:
        """Take the group's saved load windows back, so the forecast and the window count the
        trigger needs survive a restart. Too old, another shape, unreadable: skipped (a note
        says why); the windows then refill from new snapshots."""
        if self.store is None or g.window is None:
            return
        try:
            saved = self.store.load_windows(g.name)
        except WindowsUnreadable as e:
            notes.append(f"load windows of {g.name} not restored: {e}")
            return
        if saved is None:
            return
        meta, state = saved
        closed_at = meta.get("closed_at")
        if not isinstance(closed_at, int | float):
            notes.append(f"load windows of {g.name} not restored: no time of the newest window")
            return
        age = self.clock.time() - float(closed_at)
        if age > self.config.window_max_age_s:
            notes.append(
                f"load windows of {g.name} not restored: the newest closed {age:.0f} s ago, "
                f"more than {self.config.window_max_age_s:g} s (an old load is not today's)"
            )
            return
        try:
            n = g.window.restore(state)
        except ValueError as e:
            notes.append(f"load windows of {g.name} not restored: {e}")
            return
        g.windows_closed = g.window.closed
        g.window_closed_wall = float(closed_at)
        g.restored = {
            "windows": n,
            "epoch": meta.get("epoch"),
            "closed_at": g.window_closed_wall,
            "saved_at": meta.get("saved_at"),
            "at_closed": g.window.closed,
        }
        log.info("load windows restored", group=g.name, windows=n, age_s=round(age, 3))

    # --- inbound: frames -------------------------------------------------------------------

    def on_control_frames(self, identity: bytes, frames: Sequence[Any]) -> list[Outbound]:
        """Frames from the ROUTER (identity stripped). Bad ones: counted, ``error`` answered."""
        sender = self._sender_name(identity)
        try:
            msg = decode(frames, max_bytes=self.config.max_bytes)
        except WireError as e:
            self.counters.bad_message(e, sender)
            self._metric_drop(e.reason)
            return [Outbound(identity, ERROR, error_body(e))]
        return self.on_control(identity, msg)

    def on_snapshot_frames(self, frames: Sequence[Any]) -> None:
        """Frames from the PULL socket. Bad ones are counted and dropped (nobody to answer)."""
        try:
            msg = decode(frames, max_bytes=self.config.max_bytes)
        except WireError as e:
            self.counters.bad_message(e, "(snapshots)")
            self._metric_drop(e.reason)
            return
        self.on_snapshot(msg)

    # --- inbound: control messages ---------------------------------------------------------

    def on_control(self, identity: bytes, msg: Message) -> list[Outbound]:
        """One decoded control message; returns what to send."""
        sender = self._sender_name(identity)
        gname = msg.body.get("group")
        group = self.groups.get(gname) if isinstance(gname, str) else None
        model = group.shape if group is not None and msg.type == LAYOUT else None
        try:
            msg = validate(msg, model=model)
        except WireError as e:
            self._bad(e, sender, msg.type)
            return [Outbound(identity, ERROR, error_body(e, msg.type))]
        self.counters.received[msg.type] += 1
        b = msg.body
        if msg.type == ERROR:  # never answer an error with an error
            log.warning("error from peer", peer=sender, code=b["code"], message=b["message"])
            return []
        from_agent = msg.type in _CONTROL_FROM_AGENT and msg.type != AGENT_HELLO
        if (from_agent or msg.type == HEARTBEAT) and self._known_agent(
            identity, b, msg.type
        ) is None:
            return [
                Outbound(
                    identity,
                    ERROR,
                    {
                        "code": "hello_required",
                        "message": f"{msg.type} from an unregistered agent (or one that "
                        "restarted): send agent_hello",
                        "in_reply_to": msg.type,
                    },
                )
            ]
        try:
            if msg.type == AGENT_HELLO:
                return self._on_agent_hello(identity, b)
            if msg.type == HEARTBEAT:
                return []
            if msg.type == WORKER_JOINED:
                return self._on_worker_joined(identity, b)
            if msg.type == WORKER_LEFT:
                return self._on_worker_left(b)
            if msg.type == STAGED:
                return self._on_staged(b)
            if msg.type == COMMITTED:
                return self._on_committed(b)
            if msg.type == ABORTED:
                return self._on_aborted(b)
            if msg.type == LAYOUT:
                return self._on_layout(identity, b, msg.tensors)
            if msg.type == STATUS_REQUEST:
                return self._on_status_request(identity, b)
            if msg.type == COMMAND:
                return self._on_command(identity, b)
        except WireError as e:
            self._bad(e, sender, msg.type)
            return [Outbound(identity, ERROR, error_body(e, msg.type))]
        err = WireError("unknown_type", f"the planner does not take {msg.type!r} messages")
        self._bad(err, sender, msg.type)
        return [Outbound(identity, ERROR, error_body(err, msg.type))]

    # --- snapshots -------------------------------------------------------------------------

    def on_snapshot(self, msg: Message) -> None:
        """One decoded snapshot: validated, converted with its epoch's layout, windowed."""
        body = msg.body
        gname = body.get("group")
        g = self.groups.get(gname) if isinstance(gname, str) else None
        sender = str(body.get("agent") or body.get("worker") or "(snapshots)")[:64]
        if msg.type != SNAPSHOT:
            self._bad(
                WireError("unknown_type", f"{msg.type} on the snapshot socket"), sender, msg.type
            )
            return
        try:
            msg = validate(msg, model=g.shape if g is not None else None)
        except WireError as e:
            self._bad(e, sender, msg.type)
            if g is not None:
                g.count(e.reason)
            return
        b = msg.body
        if g is None or g.shape is None or g.window is None:
            self._bad(
                WireError("bad_field", f"snapshot for unknown group {gname!r}"), sender, SNAPSHOT
            )
            return
        refused = self._snapshot_sender_refused(g, b)
        if refused is not None:
            self._bad(refused, sender, SNAPSHOT)
            g.count(refused.reason)
            return
        try:
            self.seq.check(f"{sender}/{g.name}", b["incarnation"], b["seq"])
        except WireError as e:
            self._bad(e, sender, SNAPSHOT)
            g.count(e.reason)
            return
        lay = g.layout_of(b["epoch"])
        if lay is None:
            g.count("unknown_epoch")
            if self.metrics is not None:
                self.metrics.dropped("unknown_epoch")
            return
        if b["agent"] is not None and b["agent"] in self.agents:
            self.liveness.seen(b["agent"])
        now = self.clock.monotonic()
        g.window.add_counts(
            b["epoch"],
            lay.phy2log,
            msg.tensors["counts"],
            b["tokens"],
            now,
            (b["step_start"], b["step_end"]),
        )
        g.snapshots += 1
        g.last_snapshot_mono = now
        self.counters.received[SNAPSHOT] += 1
        if self.metrics is not None:
            self.metrics.snapshot(g.name)

    def _snapshot_sender_refused(self, g: GroupState, b: dict[str, Any]) -> WireError | None:
        """Load only counts from a registered agent, in its registered incarnation, for ranks
        of this group that it serves: anything else on the (unauthenticated without CURVE)
        snapshot socket could skew the forecast."""
        name = b.get("agent")
        info = self.agents.get(name) if isinstance(name, str) else None
        if info is None:
            return WireError("bad_field", f"snapshot from unregistered agent {name!r}")
        if b.get("incarnation") != info.incarnation:
            return WireError("stale_incarnation", f"snapshot from an old incarnation of {name}")
        if not b.get("ep_ranks"):  # the schema refuses it; counts nobody vouches for
            return WireError("bad_field", f"snapshot from {name} names no rank")
        for r in b.get("ep_ranks") or []:
            rank = g.ranks.get(r)
            if rank is None or rank.agent != name:
                return WireError("bad_field", f"{name} does not serve rank {r} of {g.name}")
        return None

    # --- the clock -------------------------------------------------------------------------

    def loop_turn(self, waited_s: float) -> float:
        """The service loop came out of a poll that was asked to wait up to ``waited_s``:
        call it before anything is read. Time since the previous turn beyond that wait is
        time the planner did not run (SIGSTOP, a long GC pause, a starved host; its last turn
        of work included). When it reaches ``heartbeat_s`` it is the planner's own stall, not
        its peers' silence: the agents' liveness, the commit deadlines and the rejoin grace
        periods move forward by it, so nothing is aborted or declared dead for time the
        planner was not running (what the peers did meanwhile is read next; the workers keep
        their own deadlines). :meth:`tick` checks the time since the turn began the same way
        (a stall while the turn's messages were read). Returns the time excused (0.0 for
        none)."""
        return self._excuse_stall(self.clock.monotonic(), waited_s)

    def _excuse_stall(self, now: float, allowed_s: float) -> float:
        last, self._last_turn = self._last_turn, now
        if last is None:
            return 0.0
        gap = now - last - max(0.0, allowed_s)
        if gap < self.config.heartbeat_s:
            return 0.0
        self.liveness.excuse(gap)
        for g in self.groups.values():
            a = g.attempt
            if a is not None and not a.finished:
                a.deadline += gap
            for rk in g.ranks.values():
                if rk.rejoin_by is not None:
                    rk.rejoin_by += gap
        self.stalls += 1
        self.stalled_s += gap
        log.warning(
            "planner stalled: its peers' silence and the deadlines are moved by the stall",
            stalled_s=round(gap, 3),
        )
        return gap

    def tick(self) -> list[Outbound]:
        """Liveness, deadlines, windows and the trigger; heartbeats to agents. Call often."""
        now, wall = self.clock.monotonic(), self.clock.time()
        if self._last_turn is not None:  # driven by a loop that calls loop_turn()
            self._excuse_stall(now, 0.0)
        out: list[Outbound] = []
        for agent, state in self.liveness.sweep():
            info = self.agents.get(agent)
            if info is None:
                continue
            log.warning("agent liveness", agent=agent, state=state)
            if state == DEAD:
                for gname, r in sorted(info.ranks):
                    g = self.groups.get(gname)
                    if g is not None and g.attempt is not None and r in g.ranks:
                        a = g.attempt
                        out += self._effects(
                            g, a, a.on_rank_lost(r, f"agent {agent} is dead", now, wall)
                        )
        out += self._rejoin_lapsed(now)
        for g in list(self.groups.values()):
            if g.attempt is not None and not g.attempt.finished:
                out += self._effects(g, g.attempt, g.attempt.tick(now, wall))
            if g.window is not None:
                g.window.roll(now)
                # a window may also close when a snapshot arrives after its end: act on
                # every closed window once, wherever it closed
                if g.window.closed != g.windows_closed:
                    g.windows_closed = g.window.closed
                    out += self._window_closed(g, now, wall)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_s
            body = {"sender": "planner", "incarnation": self.incarnation}
            out += [
                Outbound(a.identity, HEARTBEAT, dict(body))
                for a in self.agents.values()
                if self.liveness.state(a.agent) != DEAD
            ]
        if self.metrics is not None:
            self.metrics.peers(self)
        return out

    def _window_closed(self, g: GroupState, now: float, wall: float) -> list[Outbound]:
        """A window closed: save the windows when due (at most once per window_save_s),
        then run the trigger."""
        g.window_closed_wall = wall
        g.windows_dirty = True
        if g.window is not None and g.window.traffic_changed:
            view = g.window.regime_view() or {}
            log.info("traffic changed", group=g.name, found_by=view.get("last_change"),
                     dispersion=view.get("dispersion"), changes=view.get("changes"))  # fmt: skip
            if self.metrics is not None:
                self.metrics.traffic_change(g.name)
        last = g.windows_saved_mono
        if last is None or now - last >= self.config.window_save_s:
            self._save_windows(g)
        return self.evaluate(g)

    def save_windows(self) -> None:
        """Write the load windows of every group that closed one since the last write (at a
        clean stop: nothing a restart could use is lost)."""
        for g in self.groups.values():
            if g.windows_dirty:
                self._save_windows(g)

    def next_deadline(self) -> float | None:
        """The earliest monotonic time at which tick() has something to do (for poll timeouts)."""
        times = [self._next_heartbeat]
        for g in self.groups.values():
            if g.attempt is not None and not g.attempt.finished:
                times.append(g.attempt.deadline)
            if g.window is not None and (t := g.window.next_close()) is not None:
                times.append(t)
            times += [rk.rejoin_by for rk in g.ranks.values() if rk.rejoin_by is not None]
        return min(times)

    # --- the trigger -----------------------------------------------------------------------

    def decide(
        self,
        g: GroupState,
        *,
        force: bool = False,
        layers: Iterable[int] | None = None,
        dry_run: bool = False,
    ) -> Decision:
        """Run the trigger on ``g`` now (does not act on it)."""
        now, wall = self.clock.monotonic(), self.clock.time()
        cur = g.current_layout
        if cur is None or g.window is None or not g.ep_size:
            d = Decision(
                group=g.name,
                at=wall,
                trigger="force" if force else "auto",
                action="none",
                reason=self._blocked(g) or "layout_unknown",
                message="the group has no known layout or shape yet",
                objective=self.config.objective,
            )
            return d
        forecast = g.window.forecast() if not force else g.window.best_estimate()
        time = None
        if self.config.objective == "time":
            time = self.time_model(g)
            if time is None and forecast is not None:
                return Decision(
                    group=g.name,
                    at=wall,
                    trigger="force" if force else "auto",
                    action="none",
                    reason="insufficient_data",
                    message="no closed window says how many forward steps it recorded yet "
                    "(the time objective plans rows per step)",
                    objective="time",
                )
        d = decide(
            time=time,
            group=g.name,
            now=now,
            wall=wall,
            policy=self.config.policy,
            plan_fn=self.plan_fn,
            current=cur,
            forecast=forecast,
            windows=g.window.windows,
            tokens=g.window.tokens,
            num_gpus=g.ep_size,
            num_nodes=self._num_nodes(g),
            last_rebalance_at=g.last_rebalance_mono,
            frozen=g.record.frozen,
            frozen_layers=g.record.frozen_layers,
            blocked=self._blocked(g),
            force=force,
            layers=layers,
            dry_run=dry_run,
        )
        d.objective = self.config.objective  # also where no figures were computed
        return d

    def _record_decision(self, g: GroupState, d: Decision) -> None:
        """Keep ``d`` in the group's decisions. Only the planner's own evaluations and the
        commands that started an attempt become ``last_decision``, what status and top show
        as the planner's intention: a refused command or a dry run must not replace it."""
        intention = d.trigger == "auto" or d.action == "prepare"
        if intention:
            g.last_decision = d
        entry = d.to_dict(with_layers=True)
        last = g.decisions[-1] if g.decisions else None
        if (
            last is not None
            and d.action == "none"
            and last["action"] == "none"
            and last["reason"] == d.reason
            and last["trigger"] == d.trigger
        ):
            entry["repeats"] = int(last.get("repeats", 1)) + 1
            entry["first_at"] = last.get("first_at", last["at"])
            g.decisions[-1] = entry
        else:
            entry["repeats"] = 1
            entry["first_at"] = d.at
            g.decisions.append(entry)
        if self.metrics is not None:
            self.metrics.decision(g.name, d, intention=intention)
            tf = time_figures(self, g) if intention else None
            if tf is not None:
                self.metrics.time(g.name, tf)

    def evaluate(self, g: GroupState) -> list[Outbound]:
        """The automatic trigger, run when a window closes."""
        try:
            d = self.decide(g)
        except Exception as e:  # a planner bug must not take the daemon down
            log.exception("trigger failed", group=g.name, error=str(e))
            g.count("trigger_error")
            return []
        self._record_decision(g, d)
        if d.action != "prepare":
            log.debug("no rebalance", group=g.name, reason=d.reason, message=d.message)
            return []
        out, err = self._start_attempt(g, d)
        if err is not None:
            d.action, d.reason, d.message = "none", "store_error", err
        return out

    # --- operator commands -----------------------------------------------------------------

    def _group_or_error(self, name: str | None) -> GroupState:
        if name is None:
            if len(self.groups) == 1:
                return next(iter(self.groups.values()))
            raise KeyError("name a group (--group): " + ", ".join(sorted(self.groups)) or "none")
        g = self.groups.get(name)
        if g is None:
            raise KeyError(
                f"unknown group {name!r} (known: {', '.join(sorted(self.groups)) or 'none'})"
            )
        return g

    def command(self, body: dict[str, Any]) -> tuple[bool, str, dict[str, Any], list[Outbound]]:
        """Run an operator command (a validated ``command`` body).

        Returns (ok, message, data, outbound). ``data`` holds ``decision`` for rebalance and
        rollback, ``frozen`` / ``frozen_layers`` for freeze and unfreeze.
        """
        op = body["op"]
        try:
            g = self._group_or_error(body.get("group"))
        except KeyError as e:
            return False, str(e.args[0]), {}, []
        layers = body.get("layers")
        if layers is not None and len(layers) == 0:
            # read as "no layers" it is nothing to do; as "no filter", the whole group (a
            # freeze or unfreeze of everything): neither is what an empty list was meant for
            return False, "layers is empty: name some, or leave it out for the whole group", {}, []
        if layers is not None and g.shape is not None:
            bad = [x for x in layers if x >= g.shape.num_layers]
            if bad:
                return (
                    False,
                    f"layers {bad} do not exist (the model has {g.shape.num_layers})",
                    {},
                    [],
                )
        dry = bool(body.get("dry_run"))
        data: dict[str, Any] = {"schema_version": STATUS_SCHEMA_VERSION, "group": g.name}
        if op in ("freeze", "unfreeze"):
            rec = g.record
            if op == "freeze":
                if layers:
                    rec.frozen_layers = sorted(set(rec.frozen_layers) | set(layers))
                else:
                    rec.frozen = True
            elif layers:
                rec.frozen_layers = sorted(set(rec.frozen_layers) - set(layers))
            else:
                rec.frozen = False
                rec.frozen_layers = []
            ok = self._persist(g)
            data.update(frozen=rec.frozen, frozen_layers=list(rec.frozen_layers))
            what = f"layers {list(layers)}" if layers else "the group"
            msg = f"{op} {what} of {g.name}" + (
                "" if ok else " (not persisted: state write failed)"
            )
            log.info("operator command", op=op, group=g.name, layers=layers)
            return ok, msg, data, []
        if op == "rebalance":
            try:
                d = self.decide(g, force=True, layers=layers, dry_run=dry)
            except Exception as e:
                log.exception("forced plan failed", group=g.name)
                return False, f"planning failed: {e}", data, []
        elif op == "rollback":
            target_epoch = body.get("epoch")
            assert isinstance(target_epoch, int)
            target = g.record.layouts.get(target_epoch)
            if target is None and target_epoch == 0 and g.shape is not None:
                target = g.default_layout()
            cur = g.current_layout
            if target is None or cur is None or not g.ep_size:
                kept = sorted(g.record.layouts)
                return False, f"no layout of epoch {target_epoch} is kept (kept: {kept})", data, []
            d = rollback_decision(
                group=g.name,
                wall=self.clock.time(),
                current=cur,
                target=target,
                target_epoch=target_epoch,
                forecast=g.window.best_estimate() if g.window is not None else None,
                num_gpus=g.ep_size,
                dry_run=dry,
                time=self.time_model(g) if self.config.objective == "time" else None,
            )
            blocked = self._blocked(g)
            if blocked is not None and d.action == "prepare":
                d.action, d.reason = "none", blocked
                d.message = f"rollback refused: {blocked}"
        else:  # validate() allows only the four ops
            return False, f"unknown op {op!r}", data, []
        self._record_decision(g, d)
        data["decision"] = d.to_dict(with_layers=True)
        if d.action == "dry_run":
            return True, "dry run: " + d.message, data, []
        if d.action != "prepare":
            return False, f"no rebalance ({d.reason}): {d.message}", data, []
        out, err = self._start_attempt(g, d)
        if err is not None:
            return False, err, data, out
        data["decision"]["epoch"] = d.epoch
        data["epoch"] = d.epoch
        return True, f"preparing epoch {d.epoch}: {d.message}", data, out

    def _on_command(self, identity: bytes, b: dict[str, Any]) -> list[Outbound]:
        ok, message, data, out = self.command(b)
        return [
            *out,
            Outbound(identity, COMMAND_REPLY, {"ok": ok, "message": message[:4000], "data": data}),
        ]

    # --- status ----------------------------------------------------------------------------

    def _on_status_request(self, identity: bytes, b: dict[str, Any]) -> list[Outbound]:
        what = b["what"]
        if what not in STATUS_WHATS:
            e = WireError("bad_field", f"what={what!r}: one of {sorted(STATUS_WHATS)}")
            self._bad(e, self._sender_name(identity), STATUS_REQUEST)
            return [Outbound(identity, ERROR, error_body(e, STATUS_REQUEST))]
        gname = b.get("group")
        if gname is not None and gname not in self.groups:
            return [
                Outbound(
                    identity,
                    ERROR,
                    {
                        "code": "unknown_group",
                        "message": f"unknown group {gname!r} (known: {', '.join(sorted(self.groups)) or 'none'})",
                        "in_reply_to": STATUS_REQUEST,
                    },
                )
            ]
        data = self.status(what, gname, epoch=b.get("epoch"))
        return [Outbound(identity, STATUS_REPLY, {"data": data})]

    def status(
        self, what: str = "status", group: str | None = None, *, epoch: int | None = None
    ) -> dict[str, Any]:
        """The ``data`` map of a status_reply (schemas in docs/daemons.md); ``epoch``: the
        layout asked for by ``what="layout"`` (default: the one in service)."""
        return status_data(self, what, group, epoch=epoch)

    # --- embedding helpers -----------------------------------------------------------------

    def group_names(self) -> list[str]:
        return sorted(self.groups)

    def close(self) -> None:
        """Save what a restart could use (:meth:`save_windows`), release the store."""
        if self.store is not None:
            self.save_windows()
            self.store.close()
