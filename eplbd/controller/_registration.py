"""Registration: which agents and ranks the planner knows, their liveness, and what they serve.

Agents register with ``agent_hello`` (every worker's hello with the epoch it serves) and
keep the planner current with ``worker_joined`` / ``worker_left``; a rank whose agent dies,
or that its agent stops listing, is gone. After a restart on either side the epochs the ranks
report are reconciled with the planner's own (:meth:`Registration._reconcile`), and an agent
may hand back the layout its ranks serve (``layout`` agent -> planner).
"""

from __future__ import annotations

from typing import Any

from eplbd.controller._commit import UNKNOWN_STEP
from eplbd.controller._state import AgentInfo, CoreBase, GroupState, Outbound, RankInfo, log
from eplbd.layout import Layout, LayoutError
from eplbd.wire import (
    AGENT_HELLO,
    ERROR,
    HEARTBEAT,
    HELLO,
    WELCOME,
    ModelShape,
    WireError,
    accepted_phy2log_dtypes,
    error_body,
    held_layouts,
    validate_body,
)

__all__ = ["WELCOME_SCHEDULE", "Registration"]

#: The ``schedule`` of the planner's ``welcome``: required by protocol 1, ignored by agents.
#: The recording schedule is the agents' to decide (their window_steps / record_steps
#: settings); the planner sends the agents' defaults.
WELCOME_SCHEDULE = {"window_steps": 256, "record_steps": 64, "enabled": True}


class Registration(CoreBase):
    """Agents, ranks, liveness and reconciliation (a part of PlannerCore)."""

    def _known_agent(self, identity: bytes, b: dict[str, Any], msg_type: str) -> str | None:
        """The registered agent that sent this, refreshing its liveness; None if unknown.

        Agents are named by the body's ``agent`` (``sender`` for heartbeats) or, for relayed
        worker answers, by the ROUTER identity they registered from. A heartbeat with another
        incarnation than the registered one means the agent restarted without a new hello.
        """
        name = b.get("sender") if msg_type == HEARTBEAT else b.get("agent")
        if not isinstance(name, str) or name not in self.agents:
            name = self._identity_agent.get(identity)
        if name is None or name not in self.agents:
            return None
        info = self.agents[name]
        if msg_type == HEARTBEAT and b.get("incarnation") != info.incarnation:
            return None
        if info.identity != identity:
            self._identity_agent.pop(info.identity, None)
            info.identity = identity
            self._identity_agent[identity] = name
        self.liveness.seen(name)
        return name

    def _on_agent_hello(self, identity: bytes, b: dict[str, Any]) -> list[Outbound]:
        name = b["agent"]
        old = self.agents.get(name)
        if old is not None and old.identity != identity:
            self._identity_agent.pop(old.identity, None)
        info = AgentInfo(
            agent=name,
            identity=identity,
            incarnation=b["incarnation"],
            node=b["node"],
            software_version=b["software_version"],
            phy2log_dtypes=accepted_phy2log_dtypes(b),
        )
        if old is not None and old.incarnation == info.incarnation:
            info.layouts_sent = old.layouts_sent
        self.agents[name] = info
        self._identity_agent[identity] = name
        verdict = self.liveness.seen(name, b["incarnation"])
        out: list[Outbound] = []
        previous = old.ranks if old is not None else set()
        touched: set[str] = set()
        for w in b["workers"]:
            key = self._register_rank(name, w, out, identity)
            if key is not None:
                info.ranks.add(key)
                touched.add(key[0])
        # a restarted agent lists only the workers that said hello to it so far; the others
        # are reconnecting: they get rejoin_grace_s before a commit in flight loses them
        restarted = old is not None and old.incarnation != info.incarnation
        now = self.clock.monotonic()
        for gname, r in previous - info.ranks:
            g = self.groups.get(gname)
            if g is None or r not in g.ranks or g.ranks[r].agent != name:
                continue
            rank = g.ranks[r]
            grace = self.config.rejoin_grace_s
            if rank.present and rank.rejoin_by is None and restarted and grace > 0:
                rank.rejoin_by = now + grace
            if rank.present and rank.rejoin_by is not None and now < rank.rejoin_by:
                info.ranks.add((gname, r))  # still this agent's (its death still counts)
                continue
            out += self._rank_gone(g, r, "no longer listed by its agent")
            touched.add(gname)
        log.info(
            "agent registered",
            agent=name,
            node=info.node,
            incarnation=info.incarnation,
            workers=len(b["workers"]),
            liveness=verdict,
        )
        out.append(
            Outbound(
                identity,
                WELCOME,
                {"incarnation": self.incarnation, "epoch": 0, "schedule": dict(WELCOME_SCHEDULE)},
            )
        )
        held = held_layouts(b)
        for gname in sorted(touched):
            g = self.groups[gname]
            if self._layout_wanted(g, info, held.get(gname), now):
                out += self._layout_to(g, [identity])
            out += self._reconcile(g)
        return out

    def _layout_wanted(
        self, g: GroupState, info: AgentInfo, held: tuple[int, int] | None, now: float
    ) -> bool:
        """Whether an agent_hello (or a worker_joined) is answered with the group's layout:
        not when the agent says it holds that layout already, nor when the same agent
        process was sent it less than a heartbeat interval ago (a hello storm: agents re-send
        agent_hello until the welcome arrives; the workers of a restarted agent rejoin one by
        one). A layout lost with a dropped connection goes again with the next agent_hello
        or worker_joined after that interval, or with the next commit."""
        rec = g.record
        if rec.epoch <= 0 or rec.epoch not in rec.layouts:
            return False
        if held is not None and held == (rec.epoch, g.digest_of(rec.epoch)):
            return False
        sent = info.layouts_sent.get(g.name)
        if sent is not None and sent[0] == rec.epoch and now - sent[1] < self.config.heartbeat_s:
            return False
        info.layouts_sent[g.name] = (rec.epoch, now)
        return True

    def _register_rank(
        self, agent: str, hello: dict[str, Any], out: list[Outbound], identity: bytes
    ) -> tuple[str, int] | None:
        gname = hello["group"]
        shape = ModelShape.from_hello(hello)
        g = self.groups.get(gname)
        if g is None:
            g = self._new_group(gname)
        if g.shape is None:
            self._set_shape(g, shape, hello["ep_size"])
            self._persist(g)
        elif g.shape != shape or (g.ep_size and g.ep_size != hello["ep_size"]):
            e = WireError(
                "model_mismatch",
                f"worker {hello['worker']} declares L={shape.num_layers} "
                f"E={shape.num_logical_experts} P={shape.num_physical_experts} "
                f"ep_size={hello['ep_size']}; group {gname} has L={g.shape.num_layers} "
                f"E={g.shape.num_logical_experts} P={g.shape.num_physical_experts} "
                f"ep_size={g.ep_size}",
            )
            self._bad(e, agent, HELLO)
            g.count("model_mismatch")
            out.append(Outbound(identity, ERROR, error_body(e, AGENT_HELLO)))
            return None
        if not g.ep_size:
            g.ep_size = hello["ep_size"]
            assert g.record.shape is not None
            g.record.shape["ep_size"] = int(hello["ep_size"])
        r = hello["ep_rank"]
        prev = g.ranks.get(r)
        epoch = hello["epoch"]
        if prev is not None and prev.incarnation == hello["incarnation"]:
            # the same process: what it serves only grows (a hello that was overtaken by a
            # committed report, or re-sent by an agent that did not hear of it, is older)
            epoch = max(epoch, prev.epoch)
        elif prev is not None and prev.present:
            out += self._rank_gone(g, r, f"restarted (incarnation {hello['incarnation']})")
        g.ranks[r] = RankInfo(
            ep_rank=r,
            worker=hello["worker"],
            incarnation=hello["incarnation"],
            agent=agent,
            node=hello["node"],
            epoch=epoch,
        )
        return (gname, r)

    def _on_worker_joined(self, identity: bytes, b: dict[str, Any]) -> list[Outbound]:
        agent = b["agent"]
        hello = b.get("hello")
        if isinstance(hello, dict):
            hello = validate_body(HELLO, hello)
        else:
            g = self.groups.get(b["group"])
            if g is None or g.shape is None or not g.ep_size:
                raise WireError(
                    "missing_field",
                    f"worker_joined for group {b['group']!r} that has no registered model: "
                    "send the worker's hello body under 'hello' (or agent_hello)",
                )
            s = g.shape
            hello = {
                "worker": b["worker"],
                "incarnation": b["incarnation"],
                "group": b["group"],
                "ep_rank": b["ep_rank"],
                "ep_size": g.ep_size,
                "node": b.get("node")
                if isinstance(b.get("node"), str)
                else self.agents[agent].node,
                "num_layers": s.num_layers,
                "num_logical_experts": s.num_logical_experts,
                "num_physical_experts": s.num_physical_experts,
                "epoch": b["epoch"] if isinstance(b.get("epoch"), int) else 0,
                "software_version": "",
                "protocol_version": 1,
            }
            hello = validate_body(HELLO, hello)
        out: list[Outbound] = []
        key = self._register_rank(agent, hello, out, identity)
        if key is None:
            return out
        self.agents[agent].ranks.add(key)
        g = self.groups[key[0]]
        log.info("worker joined", group=g.name, ep_rank=key[1], worker=hello["worker"])
        # the workers of a restarted agent rejoin one by one: one layout per heartbeat
        # interval to that agent process, not one per worker
        if self._layout_wanted(g, self.agents[agent], None, self.clock.monotonic()):
            out += self._layout_to(g, [identity])
        out += self._reconcile(g)
        return out

    def _on_worker_left(self, b: dict[str, Any]) -> list[Outbound]:
        g = self.groups.get(b["group"])
        r = b["ep_rank"]
        if g is None or r not in g.ranks:
            return []
        rank = g.ranks[r]
        if rank.incarnation != b["incarnation"]:
            return []  # an older incarnation left; the new one is registered
        log.warning("worker left", group=g.name, ep_rank=r, reason=b["reason"])
        return self._rank_gone(g, r, f"left: {b['reason'] or 'no reason given'}")

    def _rejoin_lapsed(self, now: float) -> list[Outbound]:
        """Ranks of a restarted agent that did not re-register within rejoin_grace_s."""
        out: list[Outbound] = []
        for g in self.groups.values():
            for r, rank in sorted(g.ranks.items()):
                if rank.present and rank.rejoin_by is not None and now >= rank.rejoin_by:
                    grace = self.config.rejoin_grace_s
                    log.warning("rank did not re-register", group=g.name, ep_rank=r, grace_s=grace)
                    out += self._rank_gone(
                        g, r, f"not re-registered within {grace:g} s of its agent's restart"
                    )
        return out

    def _rank_gone(self, g: GroupState, r: int, why: str) -> list[Outbound]:
        rank = g.ranks.get(r)
        if rank is not None:
            rank.present = False
            rank.rejoin_by = None
            rank.left_reason = why
        a = g.attempt
        if a is None:
            return []
        return self._effects(
            g, a, a.on_rank_lost(r, why, self.clock.monotonic(), self.clock.time())
        )

    def _reconcile(self, g: GroupState) -> list[Outbound]:
        """Align the group with what its ranks report serving (after restarts on either side)."""
        out: list[Outbound] = []
        rec = g.record
        present = [rk for rk in g.ranks.values() if rk.present]
        if not present:
            return out
        now, wall = self.clock.monotonic(), self.clock.time()
        top = max(rk.epoch for rk in present)
        a = g.attempt
        if a is not None and not a.finished:
            serving = [rk.ep_rank for rk in present if rk.epoch >= a.epoch]
            if serving:
                for r in serving:
                    if r in a.committed:  # its own report (with its step) came first
                        continue
                    if a.restored:
                        a.flags.append(f"rank {r} reported epoch {a.epoch} at registration")
                    out += self._effects(g, a, a.on_committed(r, UNKNOWN_STEP, now, wall))
            elif a.restored and a.in_flight and self.complete(g):
                out += self._effects(
                    g,
                    a,
                    a.abort(
                        f"planner restarted during the commit; every rank still serves epoch {top}",
                        wall,
                    ),
                )
        if top > rec.epoch:
            lay = g.layout_of(top)
            if lay is not None:
                self._adopt(g, top, lay, wall, "ranks report it")
            else:
                if top > rec.max_epoch:
                    rec.max_epoch = top
                if not g.layout_unknown:
                    log.warning(
                        "ranks serve an epoch whose layout is unknown",
                        group=g.name,
                        epoch=top,
                        known=rec.epoch,
                    )
                g.layout_unknown = True
                self._persist(g)
        elif g.layout_unknown and all(rk.epoch <= rec.epoch for rk in present):
            g.layout_unknown = False
        return out

    def _on_layout(
        self, identity: bytes, b: dict[str, Any], tensors: dict[str, Any]
    ) -> list[Outbound]:
        """An agent tells us a committed layout (protocol addition: agent -> planner)."""
        g = self.groups.get(b["group"])
        if g is None or g.shape is None:
            raise WireError("bad_field", f"layout for unknown group {b['group']!r}")
        epoch = b["epoch"]
        if epoch in g.record.layouts or epoch == 0:
            return []
        try:
            lay = Layout.from_phy2log(
                tensors["phy2log"],
                g.shape.num_logical_experts,
                num_gpus=g.ep_size or None,
                num_layers=g.shape.num_layers,
                num_physical_experts=g.shape.num_physical_experts,
                share=tensors.get("share"),
            )
        except LayoutError as e:
            raise WireError("bad_layout", str(e)) from None
        a = g.recent.get(epoch)
        if a is not None and a.layout != lay:
            raise WireError("bad_layout", f"layout of epoch {epoch} differs from the one prepared")
        wall = self.clock.time()
        served = {rk.epoch for rk in g.ranks.values() if rk.present}
        top = max(served, default=0)
        if a is None and epoch > top:
            # no rank says it serves this epoch and we never prepared it: do not believe it
            g.count("layout_not_served")
            return []
        # in service only where a rank serves it (or it is our own attempt's, none newer
        # served): an older epoch's layout is kept for the record, not adopted
        if epoch > g.record.epoch and (epoch in served or (a is not None and epoch >= top)):
            self._adopt(g, epoch, lay, wall, "an agent reported it")
        else:
            g.record.layouts[epoch] = lay
            self._prune_layouts(g)
            self._persist(g)
        return []
