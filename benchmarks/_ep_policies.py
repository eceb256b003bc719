"""The balancing policies of the one-GPU EP emulation, replayed online over a routing stream.

Every policy serves a layout at every step; what it may look at is the load of the steps
before (except the two "perfect knowledge" references, which plan on the step itself):

- ``none``: slot p holds expert p mod E (the engines' default), never changed;
- ``deepseek-once``: DeepSeek's EPLB on the warm-up steps' load, never changed;
- ``deepseek-every-N``: DeepSeek's EPLB recomputed every N steps from the last N steps'
  load (vLLM's and SGLang's schedule: a window of steps, a fixed interval);
  ``deepseek-every-step``: the same with N = 1 (the issue's measurement: replanned every
  step from the step before); ``deepseek-every-<n>`` and ``deepseek-every-<n>-window-<w>``:
  every n steps from the last w (default n) steps, n and w given in the name;
- ``eplbd-tokens``: ``eplbd.planner.plan`` from the layout it serves, every ``cadence``
  steps, on an EWMA forecast of the per-step load (half-life in tokens: a step of many
  tokens is a better estimate than one of few), token objective;
- ``eplbd-time``: the same, time objective with the calibrated cost model (its layouts may
  leave replicas idle: a weighted split through the dispatch table);
- ``eplbd-regime``: ``eplbd-time`` on :class:`eplbd.planner.RegimeMean` instead of the EWMA:
  the mean of the steps since the last detected change of traffic, a switch or a drift
  (threshold ``change_threshold``, drift scales ``drift_scales``), the recent steps' mean
  for ``drift_follow`` steps after a drift;
- ``perfect-deepseek`` / ``perfect-eplbd``: DeepSeek's EPLB / eplbd's time objective (from
  scratch, exact counts) planned on each step's own load: what perfect knowledge reaches.
- ``oracle-regime`` (a :class:`RegimeSource` only): from each regime's first step, the layout
  planned on the regime's own mean load (its whole pool, scaled to a step), per layer the
  better in expected modelled time of DeepSeek's and eplbd's time objective. While the
  traffic drifts (``blend_steps``) each step's layout is planned on that step's expected
  load instead: the two regimes' means in the step's mix. A step is an independent draw
  from that mix, so a policy that sees only past steps should not expect to beat it (both
  planners are heuristics: an online plan may, by a little): what *perfect* gains beyond it
  is each step's draw, which no forecast can know.
- ``oracle-regime-incremental``: the same knowledge, planned the way eplbd plans: at each
  regime's first step (while drifting, at every step), eplbd's time objective on the
  step's expected load from the layout it serves (min_gain and move_cost of the
  schedule): how few moves reaching the regime's layout takes when only what pays moves.

Each step's rows per slot come from the step's token ids through the dispatch table of
the policy's layout (``_ep_trace.dispatch_counts``, the kernel's semantics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from benchmarks._ep_trace import RegimeSource, Stream, dispatch_counts, expert_load, step_ids
from eplbd.layout import Layout
from eplbd.planner import CostModel, Ewma, RegimeMean, plan_with_report, rebalance_experts
from eplbd.planner._metrics import slot_rows_np

__all__ = ["POLICIES", "Replay", "Schedule", "deepseek_interval", "replay"]

POLICIES = (
    "none",
    "deepseek-once",
    "deepseek-every-step",
    "deepseek-every-N",
    "eplbd-tokens",
    "eplbd-time",
    "perfect-deepseek",
    "perfect-eplbd",
)


@dataclass(frozen=True)
class Schedule:
    """warmup: steps before the timed ones (the first forecasts); steps: timed steps;
    every: DeepSeek's interval and window N; cadence: eplbd plans every this many steps;
    half_life_tokens: the EWMA's half-life in tokens of the group; min_gain, move_cost:
    eplbd's decision. Defaults chosen on intent and law (``bench_ep_emulation --tune``)."""

    warmup: int = 8
    steps: int = 32
    every: int = 8
    cadence: int = 1
    half_life_tokens: float = 512.0
    min_gain: float = 0.005
    move_cost: float = 0.35
    # An experiment (benchmarks only, not in the planner): keep a layer of eplbd's plan only
    # where it also beats the served layer, by min_gain plus its move price, on a slower
    # EWMA of this half-life; None: off. A plan that only fits the fast forecast's noise fails.
    confirm_half_life_tokens: float | None = None
    # eplbd-regime: RegimeMean's threshold (a change: dispersion above this x its median)
    change_threshold: float = 10.0
    # eplbd-regime: RegimeMean's drift scales (windows; (): no drift test), threshold and
    # follow (None: its defaults)
    drift_scales: tuple[int, ...] | None = None
    drift_threshold: float | None = None
    drift_follow: int | None = None

    def alpha(self, step_tokens: int, half_life: float | None = None) -> float:
        """EWMA weight of one step of ``step_tokens`` tokens."""
        return 1.0 - 0.5 ** (step_tokens / (half_life or self.half_life_tokens))


@dataclass
class Replay:
    """rows[policy]: [steps, L, G, S] int32 rows per slot of each timed step; changes
    [policy]: (step, moves) of every layout change in the timed steps (and the one at its
    start); modelled[policy]: [steps, L] modelled max GPU time (exact counts; each GPU in
    the regime of its own rows, less the model's base)."""

    rows: dict[str, np.ndarray] = field(default_factory=dict)
    changes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    modelled: dict[str, np.ndarray] = field(default_factory=dict)
    active: dict[str, float] = field(default_factory=dict)
    plan_ms: dict[str, float] = field(default_factory=dict)


def _deepseek(load: np.ndarray, P: int, G: int, E: int) -> Layout:
    return Layout.from_phy2log(rebalance_experts(torch.from_numpy(load), P, 1, 1, G)[0], E)


def replay(
    stream: Stream | RegimeSource,
    ranks: int,
    num_physical: int,
    tokens: int,
    model: CostModel,
    sched: Schedule,
    stride: int | None = None,
    policies: tuple[str, ...] = POLICIES,
) -> Replay:
    """Serve ``sched.warmup + sched.steps`` steps of ``ranks`` x ``tokens`` tokens with every
    policy; record the timed steps. ``stride``: tokens the stream advances per step (None:
    a whole step's tokens)."""
    import time

    G, P, E, L = ranks, num_physical, stream.num_experts, stream.num_layers
    S = P // G
    total = sched.warmup + sched.steps
    step_tokens = stride if stride is not None else G * tokens
    ids_all = []
    loads = np.zeros((total, L, E))
    for s in range(total):
        ids = _ids(stream, s, step_tokens, G, tokens)
        ids_all.append(ids)
        loads[s] = expert_load(ids, E)
    out = Replay()
    default = Layout.default(L, E, P)
    cur = {p: default for p in policies}
    ewma = Ewma(sched.alpha(G * tokens))
    drift: dict[str, Any] = {"drift_scales": sched.drift_scales,
                             "drift_threshold": sched.drift_threshold,
                             "follow": sched.drift_follow}  # fmt: skip
    regime = RegimeMean(
        threshold=sched.change_threshold, **{k: v for k, v in drift.items() if v is not None}
    )
    slow = Ewma(sched.alpha(G * tokens, sched.confirm_half_life_tokens))
    spent = {p: 0.0 for p in policies}
    for p in policies:
        out.rows[p] = np.zeros((sched.steps, L, G, S), dtype=np.int32)
        out.changes[p] = []
        out.modelled[p] = np.zeros((sched.steps, L))
    act_sum = {p: 0.0 for p in policies}
    oracle: dict[tuple[int, float], Layout] = {}
    for s in range(total):
        timed = s - sched.warmup
        if s > 0:
            ewma.update(loads[s - 1])
            slow.update(loads[s - 1])
            regime.update(loads[s - 1])
        for p in policies:
            t0 = time.perf_counter()
            if p == "oracle-regime":
                new = _oracle(stream, s, oracle, step_tokens, model, G, P)
            elif p == "oracle-regime-incremental":
                new = _oracle_incremental(stream, s, cur[p], step_tokens, model, sched, G, P)
            else:
                new = _decide(p, s, timed, cur[p], loads, ewma, sched, model, G, P, E, regime)
            if new is not None and p.startswith("eplbd") and sched.confirm_half_life_tokens:
                new = _confirmed(cur[p], new, slow.value, model, sched, G)
            spent[p] += time.perf_counter() - t0
            if new is not None and timed >= 0:
                moves = int(new.moves_from(cur[p]).sum())
                if moves or not torch.equal(new.shares, cur[p].shares):
                    out.changes[p].append((timed, moves))
            if new is not None:
                cur[p] = new
            if timed < 0:
                continue
            table, count = (t.numpy() for t in cur[p].dispatch())
            for layer in range(L):
                c = dispatch_counts(ids_all[s][:, :, layer], table[layer], count[layer], P)
                out.rows[p][timed, layer] = c.reshape(G, S)
            r = out.rows[p][timed].astype(np.float64)
            # [L, G]; each GPU in the regime (tiles) of its own rows, less the model's base
            t = model.rank_time(r) - model.base_us
            out.modelled[p][timed] = t.max(axis=1)
            act_sum[p] += float((r > 0).sum()) / (L * G)
    for p in policies:
        out.active[p] = act_sum[p] / sched.steps
        out.plan_ms[p] = 1e3 * spent[p] / total
    return out


def _ids(
    stream: Stream | RegimeSource, s: int, step_tokens: int, G: int, tokens: int
) -> np.ndarray:
    if isinstance(stream, RegimeSource):
        return stream.ids(s, G, tokens)
    if step_tokens == G * tokens:
        return step_ids(stream, s, G, tokens)
    n = stream.ids.shape[0]
    idx = (np.arange(G * tokens) + s * step_tokens) % n
    return stream.ids[idx].reshape(G, tokens, stream.num_layers, stream.top_k)


def _step_mean(stream: RegimeSource, s: int, step_tokens: int) -> np.ndarray:
    """Step ``s``'s expected load: its regime's mean, mixed with the previous regime's while
    the traffic drifts. -> [L, E]"""
    r, old = stream.mix(s)
    mean = _regime_mean(stream, r, step_tokens)
    if old > 0:
        prev = _regime_mean(stream, (r - 1) % len(stream.regimes), step_tokens)
        mean = (1.0 - old) * mean + old * prev
    return mean


def _oracle(
    stream: Stream | RegimeSource, s: int, cache: dict[tuple[int, float], Layout],
    step_tokens: int, model: CostModel, G: int, P: int,
) -> Layout:  # fmt: skip
    """The ``oracle-regime`` layout of step ``s`` (see the module docstring); ``cache``: per
    mix of traffic (:meth:`RegimeSource.mix`), its layout."""
    if not isinstance(stream, RegimeSource):
        raise ValueError("oracle-regime needs a RegimeSource (regimes with known pools)")
    key = stream.mix(s)
    if key not in cache:
        E = stream.num_experts
        mean = _step_mean(stream, s, step_tokens)
        ds = _deepseek(mean, P, G, E)
        ep = plan_with_report(
            mean, num_gpus=G, num_physical_experts=P, cost_model=model, sampling="poisson"
        ).layout
        t_ds, t_ep = (_expected_max(lay, mean, model, G) for lay in (ds, ep))
        k = torch.from_numpy(t_ep < t_ds)[:, None]
        cache[key] = Layout.from_phy2log(
            torch.where(k, ep.phy2log, ds.phy2log), E, num_gpus=G,
            share=torch.where(k, ep.shares, ds.shares),
        )  # fmt: skip
    return cache[key]


def _regime_mean(stream: RegimeSource, r: int, step_tokens: int) -> np.ndarray:
    """Regime ``r``'s mean load of a step of ``step_tokens`` tokens. -> [L, E]"""
    pool = stream.regimes[r]
    return expert_load(pool, stream.num_experts) * (step_tokens / pool.shape[0])


def _oracle_incremental(
    stream: Stream | RegimeSource, s: int, cur: Layout, step_tokens: int, model: CostModel,
    sched: Schedule, G: int, P: int,
) -> Layout | None:  # fmt: skip
    """The ``oracle-regime-incremental`` layout from step ``s`` on (None: keep ``cur``)."""
    if not isinstance(stream, RegimeSource):
        raise ValueError("oracle-regime-incremental needs a RegimeSource")
    if s > 0 and stream.mix(s - 1) == stream.mix(s):
        return None
    return plan_with_report(
        _step_mean(stream, s, step_tokens), num_gpus=G, num_physical_experts=P,
        previous=cur, cost_model=model, sampling="poisson", min_gain=sched.min_gain,
        move_cost=sched.move_cost,
    ).layout  # fmt: skip


def _expected_max(lay: Layout, load: np.ndarray, model: CostModel, G: int) -> np.ndarray:
    """Per layer, the slowest GPU's expected modelled time on ``load`` [L, E]. -> [L]"""
    L, P = lay.phy2log.shape
    rows = slot_rows_np(load, lay.phy2log.numpy(), lay.shares.numpy())
    m = model.for_load(load, P)
    return m.slot_time(rows, "poisson").reshape(L, G, P // G).sum(axis=2).max(axis=1)


def deepseek_interval(policy: str, every: int) -> tuple[int, int]:
    """(interval n, window w) in steps of a ``deepseek-every-...`` policy (``every``: the
    schedule's N)."""
    spec = policy.removeprefix("deepseek-every-")
    if spec == "N":
        return every, every
    if spec == "step":
        return 1, 1
    n, _, w = spec.partition("-window-")
    return int(n), int(w or n)


def _confirmed(
    cur: Layout, new: Layout, slow: Any, model: CostModel, sched: Schedule, G: int
) -> Layout | None:
    """``new`` with each layer that does not beat ``cur``'s on the slow forecast put back."""
    w = np.asarray(slow, dtype=np.float64)
    P = cur.num_physical
    t_cur, t_new = _expected_max(cur, w, model, G), _expected_max(new, w, model, G)
    moves = new.moves_from(cur).numpy()
    keep = (t_cur - t_new) / np.maximum(
        t_cur, 1e-12
    ) >= sched.min_gain + sched.move_cost * moves / P
    if keep.all():
        return new
    if not keep.any():
        return None
    k = torch.from_numpy(keep)[:, None]
    share = None if cur.share is None and new.share is None else torch.where(
        k, new.shares, cur.shares)  # fmt: skip
    return Layout.from_phy2log(
        torch.where(k, new.phy2log, cur.phy2log), cur.num_logical, num_gpus=G, share=share
    )


def _decide(
    p: str, s: int, timed: int, cur: Layout, loads: np.ndarray, ewma: Ewma, sched: Schedule,
    model: CostModel, G: int, P: int, E: int, regime: RegimeMean | None = None,
) -> Layout | None:  # fmt: skip
    """The layout policy ``p`` serves from step ``s`` on, or None to keep ``cur``."""
    W = sched.warmup
    if p == "none":
        return None
    if p == "deepseek-once":
        return _deepseek(loads[:W].sum(axis=0), P, G, E) if s == W else None
    if p.startswith("deepseek-every-"):
        n, window = deepseek_interval(p, sched.every)
        if s >= W and (s - W) % n == 0:
            return _deepseek(loads[max(0, s - window) : s].sum(axis=0), P, G, E)
        return None
    if p in ("eplbd-tokens", "eplbd-time", "eplbd-regime"):
        holder: Ewma | RegimeMean | None = regime if p == "eplbd-regime" else ewma
        forecast = None if holder is None else holder.value
        if s < W or (s - W) % sched.cadence != 0 or forecast is None:
            return None
        kw: dict[str, Any] = {"min_gain": sched.min_gain, "move_cost": sched.move_cost}
        if p != "eplbd-tokens":
            kw.update(cost_model=model, steps=1.0, sampling="poisson")
        res = plan_with_report(forecast, num_gpus=G, num_physical_experts=P, previous=cur, **kw)
        return res.layout
    if timed < 0:
        return None
    if p == "perfect-deepseek":
        return _deepseek(loads[s], P, G, E)
    if p == "perfect-eplbd":
        return plan_with_report(
            loads[s], num_gpus=G, num_physical_experts=P, cost_model=model, sampling="exact"
        ).layout
    raise ValueError(f"unknown policy {p!r}")
