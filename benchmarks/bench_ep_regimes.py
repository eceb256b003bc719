"""Long runs of the EP emulation, scored with the cost model: eplbd online against DeepSeek
recomputed every N steps, for the N of vLLM and SGLang scaled to the run.

**An emulation, scored by the cost model** (no GPU unless ``--replays-out`` hands the
steps to ``bench_ep_emulation --replays``): each step's rows per slot come from the step's
token ids through the policy's dispatch table (the kernel's semantics); a step's MoE
compute time is, per layer, the slowest rank's modelled time (the calibrated cost model of
the expert shape, GEMMs only, exact counts: fixed cost per active slot, per tile), summed
over the layers. No dispatch, no combine, no network.

Routing (``benchmarks/_ep_trace.RegimeSource``): a run of ``--regimes`` x ``--regime-steps``
steps through a few regimes of traffic, each step drawn afresh from the regime it falls in
(decode-like: each rank's tokens drawn at random from the regime's pool; prefill-like: a
contiguous chunk). ESFT (EP 8, P = 72; EP 16, P = 80; DeepSeek-V2-Lite routing, 64
experts, top-6, layers 3, 9, 15, 21): one regime per domain; ``--domains tune`` uses
intent and law only (what the online settings were chosen on), ``report`` summary and
translation (never looked at while tuning), ``all`` the four. Synthetic (EP 32, P = 288;
EP 64, P = 320): DeepSeek-V3-size routing (256 experts, top-8, two layers), lognormal
popularities calibrated on the ESFT traces, one independent popularity per regime.

How the engines' N is scaled: vLLM replans every 3000 steps from a window of the last
1000, SGLang every 1000 from the last 1000. A run of R emulated steps per regime stands for
a regime of ``--regime-engine-steps`` engine steps (10 000 by default: about 8 minutes of
decode at 20 steps a second, an assumption, not a measurement), so vLLM's schedule is
every 0.3 R steps from the last 0.1 R, SGLang's every 0.1 R from the last 0.1 R. Also
shown: every step from the last (the issue's DeepSeek-every-step) and every R steps
(once per regime).

Reference: **perfect**, per step and layer, the better of DeepSeek's and eplbd's time objective
planned on the step's own counts (perfect knowledge, all moves free). *gap closed* vs a
DeepSeek schedule: (DS - eplbd) / (DS - perfect) in mean MoE time per step. A second
reference, **regime oracle**: from each regime's first step, the layout planned on the
regime's own mean load (``oracle-regime`` in ``_ep_policies``; while the traffic drifts,
each step's on its expected load, the two regimes' means in its mix): a step is an
independent draw from its regime, so this is about the best a policy that sees only past
steps can expect (both planners are heuristics, so an online plan may beat it by a
little); *of the reachable gap*: (DS - eplbd) / (DS - regime oracle). *moves ratio*:
eplbd's slots rewritten over the run / that schedule's (*steady*: without the first
placement from the default layout, which every policy makes at the run's first step).

    python3 -m benchmarks.bench_ep_regimes [--domains tune|report|all] [--tiny]
    python3 -m benchmarks.bench_ep_regimes --tune      # the online settings, intent + law
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from benchmarks._ep_policies import Replay, Schedule, replay
from benchmarks._ep_trace import ESFT_DOMAINS, RegimeSource, esft_regimes, synthetic_regimes
from benchmarks._gemm_timer import SHAPES, drift_text
from benchmarks._report import machine_line, write_section
from benchmarks.bench_cost_model import CALIBRATION, device_slug
from benchmarks.bench_ep_emulation import ESFT_LAYERS, Case, _pc, _r
from eplbd.planner import CostModel

SECTION = "ep-regimes"
CALIBRATED_ON = "nvidia-h200"  # the card whose calibration plans and scores by default
DOMAINS = {
    "tune": ("intent", "law"),
    "report": ("summary", "translation"),
    "all": ESFT_DOMAINS,
}
#: the engines' defaults, in engine steps: (interval, window)
ENGINES = {"vLLM": (3000, 1000), "SGLang": (1000, 1000)}
#: the online settings eplbd runs with here (``--tune`` chose them on intent and law)
ONLINE = {"cadence": 1, "half_life_tokens": 512.0, "move_cost": 0.35, "min_gain": 0.005}
WARMUP = 8
SYNTH_REGIMES = 4


def deepseek_schedules(R: int, engine_steps: int) -> dict[str, str]:
    """Label -> policy name of each DeepSeek schedule, for R emulated steps per regime."""
    out = {"every step": "deepseek-every-1"}
    for name, (n, w) in ENGINES.items():
        ns = max(1, round(R * n / engine_steps))
        ws = max(1, round(R * w / engine_steps))
        out[f"{name} (every {ns}, window {ws})"] = f"deepseek-every-{ns}-window-{ws}"
    out[f"once a regime (every {R})"] = f"deepseek-every-{R}"
    return out


def cases(domains: str, tiny: bool, R: int) -> list[Case]:
    """The groups, each run for R steps a regime after 8 warm-up steps (ESFT: one regime
    per domain; synthetic: 4)."""
    n = {"esft": len(DOMAINS[domains]), "synthetic": SYNTH_REGIMES}
    if tiny:
        groups = [("esft", 8, 72, 16, "v2lite"), ("synthetic", 16, 288, 8, "v3")]
    else:
        groups = [
            (routing, G, P, tokens, shape)
            for routing, G, P in (
                ("esft", 8, 72),
                ("esft", 16, 80),
                ("synthetic", 32, 288),
                ("synthetic", 64, 320),
            )  # fmt: skip
            if not (routing == "synthetic" and domains == "tune")  # tuned on intent, law only
            for shape in ("v2lite", "v3")
            for tokens in (64, 2048)
        ]
    return [Case(r, G, P, t, sh, n[r] * R, WARMUP) for r, G, P, t, sh in groups]


def calibrated_cards() -> list[str]:
    """The cards (slugs) with a calibration stored in benchmarks/calibration."""
    return sorted({f.name.split("-deepseek")[0] for f in CALIBRATION.glob("*.json")})


def stored_models(device: str = CALIBRATED_ON) -> dict[str, CostModel]:
    """The cost models calibrated on ``device`` (a slug, e.g. nvidia-h200) and stored in
    benchmarks/calibration, per shape. One card for every shape, named in the docs: the
    CPU sections stay reproducible when another card's calibration is added."""
    out = {}
    for key, sh in SHAPES.items():
        path = CALIBRATION / f"{device}-{device_slug(sh.name)}-{sh.dtype}.json"
        if path.exists():
            out[key] = CostModel.from_json(path.read_text())
    if not out:
        raise SystemExit(
            f"no calibration for {device!r} in {CALIBRATION}; stored: {calibrated_cards()}"
        )
    return out


def source(
    case: Case, domains: str, R: int, warmup: int, pool_tokens: int, blend: float = 0.0
) -> RegimeSource:
    if case.routing == "esft":
        regimes = esft_regimes(ESFT_LAYERS, DOMAINS[domains])
        E = 64
    else:
        regimes = synthetic_regimes(SYNTH_REGIMES, pool_tokens, seed=case.G)
        E = 256
    return RegimeSource(
        name=f"{case.routing}-{domains}", regimes=regimes, num_experts=E, regime_steps=R,
        warmup=warmup, contiguous=case.regime == "prefill", seed=case.G,
        blend_steps=round(blend * R),
    )  # fmt: skip


def run_case(
    args: tuple[Case, str, int, int, dict[str, Any], dict[str, Any], int, float],
) -> dict:
    case, domains, R, engine_steps, model_d, online, pool, blend = args
    torch.set_num_threads(1)
    model = CostModel.from_dict(model_d).without_dispatch()
    src = source(case, domains, R, case.warmup, pool, blend)
    sched = Schedule(warmup=case.warmup, steps=case.steps, **online)
    ds = deepseek_schedules(R, engine_steps)
    pols = ("none", *ds.values(), "eplbd-tokens", "eplbd-time", "perfect-deepseek",
            "perfect-eplbd", "oracle-regime", "oracle-regime-incremental",
            "eplbd-regime")  # fmt: skip
    t0 = time.perf_counter()
    rep = replay(src, case.G, case.P, case.tokens, model, sched, policies=pols)
    # modelled: every rank's time from the cost model, its fixed base included
    slowest = {p: m + model.base_us for p, m in rep.modelled.items()}
    return {
        "case": case,
        "summary": summarise(rep, ds, slowest, R),
        "sim_s": time.perf_counter() - t0,
        "replay": rep,
        "schedules": ds,
        "R": R,
    }


def measure(
    res: list[dict[str, Any]], reps: int, tiny: bool, order: str = "shuffled",
    drift: dict[str, Any] | None = None, timings: dict[str, Any] | None = None,
) -> float:  # fmt: skip
    """Every rank's GEMMs of every step timed on this machine's GPU (``bench_ep_emulation``'s
    timer, in ``order``; on the CPU with tiny shapes): the summaries replaced by measured
    ones. ``drift``, ``timings``: the GPU clock's sentinel and every distinct workload's
    time, per shape (:func:`time_shape`). -> s"""
    from benchmarks.bench_ep_emulation import time_shape

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    for shape in sorted({r["case"].shape for r in res}):
        meas = time_shape(
            res, shape, device, reps, tiny or device == "cpu", "min", order, drift, timings
        )
        for i, m in meas.items():
            slowest = {p: a.max(axis=2) for p, a in m.items()}  # [steps, L]
            res[i]["summary"] = summarise(
                res[i]["replay"], res[i]["schedules"], slowest, res[i]["R"]
            )
    return time.perf_counter() - t0


def timings_arrays(res: list[dict[str, Any]], timings: dict[str, Any]) -> dict[str, Any]:
    """``--save-timings``' arrays: per expert shape (its name) ``SHAPE/workloads`` [n, S]
    int32 (-1 past a workload's slots) and ``SHAPE/us`` [n]; per case (``EP16-v3-64``:
    EP size, shape key, tokens per rank) ``CASE/shape`` (the shape's name) and, per policy,
    ``CASE/POLICY`` [steps, L, G] int32, the row of each rank's workload: so that another
    model of the GEMMs can score every policy's steps without a GPU."""
    out: dict[str, Any] = {}
    for name, (w, us, where) in timings.items():
        out[f"{name}/workloads"], out[f"{name}/us"] = w, us
        for i, pol in where.items():
            c = res[i]["case"]
            key = f"EP{c.G}-{c.shape}-{c.tokens}"
            out[f"{key}/shape"] = np.array(SHAPES[c.shape].name)
            for p, rows in pol.items():
                out[f"{key}/{p}"] = rows
    return out


#: the online policies compared with each DeepSeek schedule (and the incremental oracle)
ONLINE_POLICIES = ("eplbd-time", "eplbd-tokens", "eplbd-regime", "oracle-regime-incremental")


def summarise(
    rep: Replay, ds: dict[str, str], slowest: dict[str, np.ndarray], R: int | None = None
) -> dict[str, Any]:
    """From ``slowest`` [steps, L] (per policy, the slowest rank's time per layer, us):
    the mean MoE time per step, moves over the run, and eplbd's gap closed and moves
    ratio against each DeepSeek schedule."""
    t = {p: float(m.sum(axis=1).mean()) for p, m in slowest.items()}
    per_step = np.minimum(slowest["perfect-deepseek"], slowest["perfect-eplbd"])
    perfect = float(per_step.sum(axis=1).mean())
    moves = {p: sum(m for _, m in c) for p, c in rep.changes.items()}
    # without the first placement (every policy's rebalance at the run's first step,
    # from the default layout: a deployment pays it once)
    steady = {p: sum(m for st, m in c if st > 0) for p, c in rep.changes.items()}
    # from the second regime on (R steps a regime): the moves a change of traffic costs once
    # the opening placements (the warm-up regime's, then the first regime's) are behind
    settled = {p: sum(m for st, m in c if R and st >= R) for p, c in rep.changes.items()}
    out: dict[str, Any] = {"time_us": t, "perfect_us": perfect, "moves": moves,
                           "steady_moves": steady, "vs": {}, "schedules": ds}  # fmt: skip
    oracle = t.get("oracle-regime")
    for label, p in ds.items():
        out["vs"][label] = {
            p2: {
                "closed": (t[p] - t[p2]) / (t[p] - perfect) if t[p] > perfect else None,
                "closed_reachable": (t[p] - t[p2]) / (t[p] - oracle)
                if oracle is not None and t[p] > oracle
                else None,
                "moves_ratio": moves[p2] / moves[p] if moves[p] else None,
                "steady_moves_ratio": steady[p2] / steady[p] if steady[p] else None,
                "settled_moves_ratio": settled[p2] / settled[p] if settled[p] else None,
            }
            for p2 in ONLINE_POLICIES
            if p2 in t
        }
    out["plan_ms"] = dict(rep.plan_ms)
    out["active"] = dict(rep.active)
    return out


def run(domains: str, R: int, engine_steps: int, online: dict[str, Any], tiny: bool,
        workers: int, pool: int, only: dict[str, set[Any]] | None = None,
        calibration: str = CALIBRATED_ON, blend: float = 0.0) -> list[dict[str, Any]]:  # fmt: skip
    """``only``: Case field -> the values to keep (not with ``tiny``); ``blend``: the share
    of each regime spent drifting from the previous one (0: switches)."""
    models = stored_models(calibration)
    cs = [
        c for c in cases(domains, tiny, R)
        if tiny or not only or all(getattr(c, k) in v for k, v in only.items())
    ]  # fmt: skip
    jobs = [
        (c, domains, R, engine_steps, models[c.shape].to_dict(), online, pool, blend) for c in cs
    ]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            return list(ex.map(run_case, jobs))
    return [run_case(j) for j in jobs]


def render(res: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    labels = list(res[0]["summary"]["vs"])
    vll = next(k for k in labels if k.startswith("vLLM"))
    sgl = next(k for k in labels if k.startswith("SGLang"))
    lines = [
        f"## EP emulation, long runs, {meta['scored']} ({meta['domains']}"
        f"{', drifting traffic' if meta.get('blend') else ''}) — an emulation: "
        "no all-to-all, no network",
        "",
        f"Machine: {meta['machine']} (emulation, {meta['scored']}). Command: "
        f"`{meta['command']}` ({meta['duration_s']:.0f} s). Planning and scoring cost models: "
        f"the {meta.get('calibration', CALIBRATED_ON)} calibrations stored in "
        "benchmarks/calibration, GEMMs only; "
        f"{meta['how']}. Run: {meta['R']} steps per regime after 8 "
        f"warm-up steps{_drift(meta)}; ESFT (EP 8, 16): one regime per domain, "
        f"{', '.join(meta['domain_names'])}; synthetic (EP 32, 64): 4 regimes; a "
        f"regime stands for {meta['engine_steps']} engine steps (an assumption), so vLLM's "
        f"schedule is {vll.split(' ', 1)[1]}, SGLang's {sgl.split(' ', 1)[1]}. eplbd online: "
        f"plans every {meta['online']['cadence']} step(s) from an EWMA (half-life "
        f"{meta['online']['half_life_tokens']:g} tokens), move_cost "
        f"{meta['online']['move_cost']}, min_gain {meta['online']['min_gain']}. *perfect*: "
        "per step and layer the better of DeepSeek and eplbd (time) planned on the step itself. "
        "Times: mean MoE compute per step (the slowest rank per layer, summed), us.",
        "",
        "| case | none us | perfect us | DS every step us | DS vLLM us | DS SGLang us "
        "| eplbd time us | eplbd tokens us | time / none | gap closed vs vLLM | vs SGLang "
        "| vs every step | moves eplbd time | moves DS vLLM | DS SGLang | DS every step "
        "| ratio vs vLLM | vs SGLang | steady ratio vs vLLM | vs SGLang "
        "| regime oracle us | of the reachable gap vs vLLM | vs SGLang |",
        "|---|" + "---:|" * 22,
    ]
    for r in res:
        c, s = r["case"], r["summary"]
        t, mv, vs = s["time_us"], s["moves"], s["vs"]
        ds = s["schedules"]
        lines.append(
            f"| {c.label} | {t['none']:.0f} | {s['perfect_us']:.0f} "
            f"| {t[ds['every step']]:.0f} | {t[ds[vll]]:.0f} | {t[ds[sgl]]:.0f} "
            f"| {t['eplbd-time']:.0f} | {t['eplbd-tokens']:.0f} "
            f"| {t['eplbd-time'] / t['none']:.3f} "
            f"| {_pc(vs[vll]['eplbd-time']['closed'])} | {_pc(vs[sgl]['eplbd-time']['closed'])} "
            f"| {_pc(vs['every step']['eplbd-time']['closed'])} "
            f"| {mv['eplbd-time']} | {mv[ds[vll]]} | {mv[ds[sgl]]} | {mv[ds['every step']]} "
            f"| {_r(vs[vll]['eplbd-time']['moves_ratio'])} "
            f"| {_r(vs[sgl]['eplbd-time']['moves_ratio'])} "
            f"| {_r(vs[vll]['eplbd-time']['steady_moves_ratio'])} "
            f"| {_r(vs[sgl]['eplbd-time']['steady_moves_ratio'])} "
            f"| {_us(t.get('oracle-regime'))} "
            f"| {_pc(vs[vll]['eplbd-time'].get('closed_reachable'))} "
            f"| {_pc(vs[sgl]['eplbd-time'].get('closed_reachable'))} |"
        )
    lines += ["", *verdict(res, vll, sgl), *render_regime(res, vll, sgl)]
    return "\n".join(lines)


def _ceiling(big: list[dict[str, Any]], lab: str) -> str:
    """What the regime oracle itself closes of the issue's gap against schedule ``lab``: about
    the most a policy that sees only past steps can expect to close."""
    c = []
    for r in big:
        s = r["summary"]
        t, perfect = s["time_us"], s["perfect_us"]
        ds, oracle = t[s["schedules"][lab]], t.get("oracle-regime")
        if oracle is not None and ds > perfect:
            c.append((ds - oracle) / (ds - perfect))
    if not c:
        return ""
    return (
        f"; the regime oracle itself closes median {_pc(statistics.median(c))} of the gap "
        f"(worst {_pc(min(c))})"
    )


def _incremental(big: list[dict[str, Any]], lab: str) -> str:
    """The regime oracle planned incrementally: what it closes of the reachable gap and its
    moves ratio, the worst over the cases (a reference for the moves target)."""
    vs = [r["summary"]["vs"][lab].get("oracle-regime-incremental") for r in big]
    cl = [v["closed_reachable"] for v in vs if v and v["closed_reachable"] is not None]
    mr = [v["moves_ratio"] for v in vs if v and v["moves_ratio"] is not None]
    if not cl or not mr:
        return ""
    return (
        f"; the regime oracle planned incrementally: of the reachable gap worst {_pc(min(cl))}, "
        f"moves ratio max {_r(max(mr))}"
    )


def _drift(meta: dict[str, Any]) -> str:
    b = meta.get("blend", 0.0)
    if not b:
        return ""
    return (
        f", each change a drift over the regime's first {round(b * meta['R'])} steps "
        f"(`--blend {b:g}`: a token still comes from the previous regime with a probability "
        "falling linearly to 0; the regime oracle plans each step on its expected load, the "
        "two regimes' means in that step's mix)"
    )


def _us(x: float | None) -> str:
    return "" if x is None else f"{x:.0f}"


def verdict(res: list[dict[str, Any]], vll: str, sgl: str, pol: str = "eplbd-time") -> list[str]:
    """The issue's targets for policy ``pol``, at EP >= 16, against each engine's schedule."""
    out = []
    big = [r for r in res if r["case"].G >= 16]
    for lab in (vll, sgl):
        vs = [r["summary"]["vs"][lab][pol] for r in big]
        c = [v["closed"] for v in vs if v["closed"] is not None]
        m = [v["moves_ratio"] for v in vs if v["moves_ratio"] is not None]
        st = [v["steady_moves_ratio"] for v in vs if v["steady_moves_ratio"] is not None]
        se = [v.get("settled_moves_ratio") for v in vs]
        se = [x for x in se if x is not None]
        cr = [v.get("closed_reachable") for v in vs]
        cr = [x for x in cr if x is not None]
        if c:
            out.append(
                f"- {pol}, EP >= 16, against DeepSeek {lab}: gap closed median "
                f"{_pc(statistics.median(c))} (worst {_pc(min(c))}; target >= 50%: "
                f"{'met' if statistics.median(c) >= 0.5 else 'not met'}); moves ratio max "
                f"{_r(max(m) if m else None)} (target <= 0.10: "
                f"{'met' if m and max(m) <= 0.10 else 'not met'}); without the first "
                f"placement max {_r(max(st) if st else None)}"
                + (f"; from the second regime on max {_r(max(se))}" if se else "")
                + (f"; of the gap to the regime oracle (reachable online) median "
                   f"{_pc(statistics.median(cr))} (worst {_pc(min(cr))})" if cr else "")
                + (_ceiling(big, lab) + _incremental(big, lab) if pol == "eplbd-time" else "")
            )  # fmt: skip
    worst = max(r["summary"]["time_us"][pol] / r["summary"]["time_us"]["none"] for r in res)
    out.append(
        f"- {pol}: never slower than no balancing: worst / none {worst:.3f} "
        f"({'met' if worst <= 1.0 else 'not met'})"
    )
    return out


def render_regime(res: list[dict[str, Any]], vll: str, sgl: str) -> list[str]:
    """The regime forecast beside the EWMA (the same steps, the same settings)."""
    if "eplbd-regime" not in res[0]["summary"]["time_us"]:
        return []
    lines = [
        "",
        "eplbd (time) on the regime forecast (`RegimeMean`: the mean since the last detected "
        "change of traffic) beside the EWMA's, on the same steps; *from the 2nd regime*: "
        "moves ratio over the steps from the second regime on (the opening placements "
        "behind).",
        "",
        "| case | EWMA us | regime us | regime / none | gap closed vs vLLM EWMA | regime "
        "| vs SGLang EWMA | regime | moves EWMA | regime | ratio vs vLLM EWMA | regime "
        "| from the 2nd regime EWMA | regime | incremental oracle |",
        "|---|" + "---:|" * 14,
    ]
    for r in res:
        c, s = r["case"], r["summary"]
        t, mv = s["time_us"], s["moves"]
        v, w = s["vs"][vll], s["vs"][sgl]
        ew, rg = v["eplbd-time"], v["eplbd-regime"]
        orc = v.get("oracle-regime-incremental") or {}
        lines.append(
            f"| {c.label} | {t['eplbd-time']:.0f} | {t['eplbd-regime']:.0f} "
            f"| {t['eplbd-regime'] / t['none']:.3f} | {_pc(ew['closed'])} | {_pc(rg['closed'])} "
            f"| {_pc(w['eplbd-time']['closed'])} | {_pc(w['eplbd-regime']['closed'])} "
            f"| {mv['eplbd-time']} | {mv['eplbd-regime']} "
            f"| {_r(ew['moves_ratio'])} | {_r(rg['moves_ratio'])} "
            f"| {_r(ew.get('settled_moves_ratio'))} | {_r(rg.get('settled_moves_ratio'))} "
            f"| {_r(orc.get('settled_moves_ratio'))} |"
        )
    return [*lines, "", *verdict(res, vll, sgl, "eplbd-regime")]


def tune(R: int, engine_steps: int, workers: int, pool: int) -> str:
    """The online settings on intent and law only: mean gap closed and worst moves ratio
    against vLLM's and SGLang's schedules, and the worst time against none, per setting."""
    grid = [
        {**ONLINE, "half_life_tokens": h, "move_cost": mc}
        for h in (512.0, 4096.0)
        for mc in (0.35, 1.0, 3.0)
        if (h, mc) != (4096.0, 0.35)
    ]
    rows = []
    for g in grid:
        res = run("tune", R, engine_steps, g, False, workers, pool)
        cells = []
        labels = list(res[0]["summary"]["vs"])
        for lab in labels[1:3]:
            cl = [r["summary"]["vs"][lab]["eplbd-time"]["closed"] for r in res]
            mr = [r["summary"]["vs"][lab]["eplbd-time"]["moves_ratio"] for r in res]
            cells += [
                _pc(statistics.mean(x for x in cl if x is not None)),
                _r(max((x for x in mr if x is not None), default=None)),
            ]
        worst = max(r["summary"]["time_us"]["eplbd-time"] / r["summary"]["time_us"]["none"]
                    for r in res)  # fmt: skip
        rows.append(
            f"| {g['half_life_tokens']:g} | {g['move_cost']} | "
            + " | ".join(cells)
            + f" | {worst:.3f} |"
        )
        print(rows[-1], flush=True)
    return "\n".join([
        "## EP emulation, long runs: tuning eplbd's online settings (intent and law only)",
        "",
        f"Machine: {machine_line()} (emulation, cost model, CPU). `python3 -m "
        f"benchmarks.bench_ep_regimes --tune`: the long runs of the section below on the ESFT "
        f"intent and law domains only (EP 8 and 16, both shapes, decode 64 and prefill 2048 "
        f"tokens per rank, {R} steps a regime), plan every step, min_gain 0.005. Columns: "
        "mean gap closed and worst moves ratio against DeepSeek on vLLM's and SGLang's "
        "scaled schedules; worst eplbd (time) / none.",
        "",
        "| half-life (tokens) | move_cost | gap closed vs vLLM | worst moves ratio "
        "| gap closed vs SGLang | worst moves ratio | worst vs none |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.bench_ep_regimes", description=__doc__)
    ap.add_argument("--domains", choices=tuple(DOMAINS), default="all")
    ap.add_argument("--regime-steps", type=int, default=64, help="emulated steps per regime (R)")
    ap.add_argument("--regime-engine-steps", type=int, default=10_000)
    ap.add_argument("--pool", type=int, default=16384, help="synthetic tokens per regime")
    ap.add_argument("--move-cost", type=float, default=ONLINE["move_cost"])
    ap.add_argument("--half-life", type=float, default=ONLINE["half_life_tokens"])
    ap.add_argument("--min-gain", type=float, default=ONLINE["min_gain"])
    ap.add_argument("--confirm-half-life", type=float, default=None,
                    help="an experiment: keep only the layers of eplbd's plans that also win "
                         "on an EWMA of this half-life (tokens)")  # fmt: skip
    ap.add_argument("--blend", type=float, default=0.0,
                    help="share of each regime spent drifting from the previous one, in [0, 1] "
                         "(0: the traffic switches; 1: it never stops drifting)")  # fmt: skip
    ap.add_argument("--drift-scales", default=None,
                    help="eplbd-regime: RegimeMean's drift scales in windows, e.g. 2,8 "
                         "(default: RegimeMean's; 'none': no drift test)")  # fmt: skip
    ap.add_argument("--drift-threshold", type=float, default=None,
                    help="eplbd-regime: RegimeMean's drift threshold (default: its own)")  # fmt: skip
    ap.add_argument("--drift-follow", type=int, default=None,
                    help="eplbd-regime: RegimeMean's follow, windows after a drift spent "
                         "forecasting the recent mean (default: its own; 0: off)")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU smoke test)")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--doc", choices=("yes", "no"), default="no")
    ap.add_argument("--json", default=None, help="write the summaries to FILE")
    ap.add_argument("--measure", action="store_true",
                    help="time every rank's GEMMs on the GPU (CPU: tiny shapes)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=2, help="GPU runs of each workload (min kept)")
    ap.add_argument("--timing-order", choices=("shuffled", "policy"), default="shuffled",
                    help="--measure: time the workloads in a random order (default), or policy "
                         "after policy as before (each policy's steps then share one stretch "
                         "of the GPU's clock)")  # fmt: skip
    ap.add_argument("--save-timings", default=None, metavar="FILE",
                    help="--measure: also save every distinct workload and its time, and "
                         "which workload each policy's rank ran at each step and layer "
                         "(FILE.npz, see timings_arrays), to fit or test other models of the "
                         "GEMMs on the planners' own workloads")  # fmt: skip
    ap.add_argument("--ep", default=None, help="only these EP sizes, e.g. 16,32")
    ap.add_argument("--shapes", default=None, help="only these expert shapes, e.g. v3")
    ap.add_argument("--tokens", default=None, help="only these tokens per rank, e.g. 64,2048")
    ap.add_argument("--calibration", default=CALIBRATED_ON,
                    help="plan and score with the cost models calibrated on this card "
                         "(benchmarks/calibration/CARD-SHAPE-DTYPE.json), e.g. nvidia-h200")  # fmt: skip
    a = ap.parse_args(argv)
    if not 0.0 <= a.blend <= 1.0:
        ap.error(f"--blend must be in [0, 1], got {a.blend}")
    if a.drift_follow is not None and a.drift_follow < 0:
        ap.error(f"--drift-follow must be >= 0, got {a.drift_follow}")
    if a.save_timings and not a.measure:
        ap.error("--save-timings needs --measure")
    R = 4 if a.tiny else a.regime_steps
    if a.tune:
        md = tune(R, a.regime_engine_steps, a.workers, a.pool)
        print(md)
        if a.doc == "yes":
            write_section(SECTION + "-tuning", md)
        return 0
    online = {**ONLINE, "move_cost": a.move_cost, "half_life_tokens": a.half_life,
              "min_gain": a.min_gain}  # fmt: skip
    if a.confirm_half_life:
        online["confirm_half_life_tokens"] = a.confirm_half_life
    if a.drift_threshold is not None:
        online["drift_threshold"] = a.drift_threshold
    if a.drift_follow is not None:
        online["drift_follow"] = a.drift_follow
    if a.drift_scales:
        online["drift_scales"] = (
            () if a.drift_scales == "none" else tuple(int(x) for x in a.drift_scales.split(","))
        )
    t0 = time.perf_counter()
    only: dict[str, set[Any]] = {}
    if a.ep:
        only["G"] = {int(x) for x in a.ep.split(",")}
    if a.shapes:
        only["shape"] = set(a.shapes.split(","))
    if a.tokens:
        only["tokens"] = {int(x) for x in a.tokens.split(",")}
    res = run(a.domains, R, a.regime_engine_steps, online, a.tiny, a.workers,
              256 if a.tiny else a.pool, only, a.calibration, a.blend)  # fmt: skip
    print(f"simulated {len(res)} cases in {time.perf_counter() - t0:.0f} s", flush=True)
    scored, how = "cost model, CPU", "every rank's time modelled (exact counts, base included)"
    drift: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    if a.measure:
        order = "given" if a.timing_order == "policy" else "shuffled"
        took = measure(res, a.reps, a.tiny, order, drift, timings)
        if a.save_timings:
            np.savez_compressed(a.save_timings, **timings_arrays(res, timings))
        scored = "GEMMs measured on the GPU" if torch.cuda.is_available() else "CPU, tiny"
        clock = "; ".join(f"{k}: {drift_text(d)}" for k, d in drift.items() if d)
        clocked = "CUDA events" if torch.cuda.is_available() else "the wall clock"
        how = (f"every rank's grouped GEMMs timed ({clocked}, fastest of {a.reps} runs; "
               f"{took:.0f} s of timing; "
               + ("each run in a random order, so that no policy's steps share one stretch of "
                  "the GPU's clock" if order == "shuffled" else
                  "policy after policy: the old order, kept for comparison")
               + (f"; the GPU's clock: {clock}" if clock else "") + ")")  # fmt: skip
    meta = {
        "machine": machine_line(), "domains": a.domains, "R": R,
        "domain_names": DOMAINS[a.domains], "engine_steps": a.regime_engine_steps,
        "online": online, "calibration": a.calibration, "blend": a.blend,
        "timing_order": a.timing_order if a.measure else None, "drift": drift, "duration_s": time.perf_counter() - t0, "scored": scored, "how": how,
        "command": "python3 -m benchmarks.bench_ep_regimes "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }  # fmt: skip
    md = render(res, meta)
    print(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "cases": [
                {"case": asdict(r["case"]), "summary": r["summary"], "sim_s": r["sim_s"]}
                for r in res]}, f, default=str)  # fmt: skip
    if a.doc == "yes":
        # a drifting run is another section: the switches' stays as it was
        write_section(f"{SECTION}-{a.domains}" + (f"-blend-{a.blend:g}" if a.blend else ""), md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
