"""Turns an end-to-end job's measurements into a summary and markdown (pure: dicts in, text out).

``result``: what rank 0 wrote (``result.json``, see ``_e2e_worker``); ``history``: per mode,
the planner's attempts for that mode's group (``status history``), matched to the commits
the workers served by epoch. The docs section holds one block per group size, so that the
2- and 4-GPU runs, made by different jobs, sit side by side.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

__all__ = [
    "SECTION",
    "block_key",
    "command_for",
    "doc_section",
    "render_result",
    "summarise",
]

SECTION = "e2e-gpu"
MB = 1e6

COMMANDS = """\
Commands. Each line below is one call of the device tool (one process per GPU, spawned by the
script, NCCL; the agent with its embedded planner beside them on ipc sockets in a temporary
directory), each under its 600 s limit (`--timeout-s 540`; decode and prefill are separate
calls for that reason). First, here, from the repository root:
`bash /work/shared/tools/gpu-wheels` (pyzmq and structlog into `.whl/`); every call then
carries `[".whl"]`.

EP = 4 (issue 15), on `nvidia-h100-x4` (or `nvidia-h200-x4`): DeepSeek-V2-Lite shapes, the
four ESFT domains, decode-like and prefill-like, four runs, the online planner on the time
objective; then the same with `--weight-source host` (a node-local host pool of every
expert under /dev/shm instead of peer-to-peer NCCL transfers):

```
__SETUP__ python3 -m benchmarks.bench_e2e_gpu --world-size 4 --modes decode --objective time --timeout-s 540 --doc no --out $OUT/ws4-decode
__SETUP__ python3 -m benchmarks.bench_e2e_gpu --world-size 4 --modes prefill --objective time --timeout-s 540 --doc no --out $OUT/ws4-prefill
__SETUP__ python3 -m benchmarks.bench_e2e_gpu --world-size 4 --modes decode --objective time --weight-source host --timeout-s 540 --doc no --out $OUT/ws4-host-decode
__SETUP__ python3 -m benchmarks.bench_e2e_gpu --world-size 4 --modes prefill --objective time --weight-source host --timeout-s 540 --doc no --out $OUT/ws4-host-prefill
```

EP = 8 (issue 16), on `nvidia-h100-x8` (or `nvidia-h200-x8`): DeepSeek-V3 expert shapes
(`--shape v3`: hidden 7168, expert intermediate 2048, 256 routed experts, top-8, P = 288,
8 layers: about 24 GiB of expert weights per GPU, as much again while a whole new placement is
staged), synthetic DeepSeek-V3-size routing, four runs, fewer steps per domain (a V3
prefill step is several times a V2-Lite one):

```
__SETUP__ python3 -m benchmarks.bench_e2e_gpu --world-size 8 --shape v3 --modes decode --decode-steps 500 --objective time --timeout-s 540 --doc no --out $OUT/ws8-v3-decode
__SETUP__ python3 -m benchmarks.bench_e2e_gpu --world-size 8 --shape v3 --modes prefill --prefill-steps 100 --objective time --timeout-s 540 --doc no --out $OUT/ws8-v3-prefill
```

Then, back here, write the blocks into this section (jobs
of one group size, shape and weight source share a block):
`python3 -m benchmarks.bench_e2e_gpu --render FILES_AT/ws4-decode/e2e.json FILES_AT/ws4-prefill/e2e.json`
(likewise `ws4-host-*`, `ws8-v3-*`). On the CPU (gloo, tiny dimensions; what
tests/test_bench_e2e_smoke.py runs): the same lines with `--device cpu --world-size 2 --tiny`.

The time objective uses the calibration of the GPU model and expert shape in
`benchmarks/calibration` when there is one (today: H200, both shapes), else the planner's
default model of the shape (H100 bandwidth and FLOP/s); the block says which.
`--objective tokens` plans rows instead. `--every N` / `--every-window W` set DeepSeek every
N's interval and window (default: a quarter of a domain's steps, and N / 3); `--runs`
picks runs (none first); `--decode-steps / --prefill-steps` set the steps per domain,
`--window-s / --cooldown-s / --min-gain` the online planner's pace.
""".replace(
    "__SETUP__",
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PWD/clients PYTHONUNBUFFERED=1 &&",
)

METHOD = """\
What runs: an EP group of G ranks (one process and one GPU each) serving a stack of MoE
layers: by default DeepSeek-V2-Lite's (hidden 2048, expert intermediate 1408, 64 routed
experts, top-6, 8 of its 26 layers picked evenly, bf16, P = 72 slots) replaying the ESFT
routing trace (`benchmarks/data/esft_routing_ids.npz`, domains intent, law, summary,
translation one after the other, each domain's tokens wrapping around); with `--shape v3`
DeepSeek-V3's (hidden 7168, expert intermediate 2048, 256 routed experts, top-8, P = E + 32,
8 layers) replaying synthetic routing of that size (the ESFT traces have 64 experts):
`benchmarks/_ep_trace.synthetic_stream`, the generator of the one-GPU emulation, four
domains of 65536 tokens, each its own heavy-tailed popularity drifting from step to step with
two regime switches. Per layer: RMS norm, router softmax at the trace's ids,
`EplbClient.map_and_record` (the real kernel), dispatch of every (token, k) pair to the GPU
owning its physical slot with `all_to_all_single`, the slots' expert GEMMs grouped by slot
(gate/up, SiLU, down), results sent back and combined in k order, a residual add. No
attention: the MoE time is the whole step. Four runs in one job, same tokens: *none* (slot p
holds expert p mod E), *deepseek* (DeepSeek's EPLB computed once from the whole trace's load,
installed with `client.prepare` on every rank before the timed steps), *deepseek-every-n*
(DeepSeek's EPLB recomputed every N steps inside the serving loop from the load of the last
W steps, all-reduced over the ranks, and installed at once: every rank stops serving at the
same step until the new placement is in, what vLLM's synchronous EPLB does with its defaults
`step_interval` 3000 and `window_size` 1000; those would fire at most once in these runs, so
N is a quarter of a domain's steps and W = N / 3, vLLM's ratio; the weights move through the
same client and weight source as the other runs), *eplbd* (the client connected to
`eplbd agent --embedded-planner`, which records, plans and commits while the steps run,
with the objective the block names). MoE time: CUDA events around each step's forward, the
slowest rank per step; mean ms/step with stalls: MoE + `step()` + the stop-the-world
rebalances, over the steps. Balance: rows (token, k pairs) computed per GPU, Σ over steps and
layers of the max over GPUs / Σ of the mean; modelled time: the same with each GPU's
modelled expert time of the step (the cost model the block names, each slot's exact rows).
Commit: time from the layout's validation on the ranks to the step that serves it (the
planner's prepare-to-commit latency beside it); stall: the `step()` that applied it minus a
median `step()` of the same kind (DeepSeek every N: the whole stop, load all-reduce, plan,
transfer and apply); bytes: expert weights fetched from other ranks. Outputs: a per-token
fingerprint of every step and the full outputs of sampled steps against the *none* run,
tolerance |d| <= 2^-3 rms(ref) + 2^-4 |ref| (bf16 GEMMs of other batch shapes round
differently; a wrong expert moves outputs by tens of percent). Blocks measured before the
fourth run and the time objective show three runs and the token objective.

With one rank (EP = 1) and grouped GEMMs the forward has no host synchronisation (every row
stays on the GPU, T x K of them, known in advance; with EP > 1 the all-to-all needs its
split sizes on the host), so it is captured once per run and replayed as a CUDA graph
(`--graph auto`; `--graph off` launches it eagerly, the block marked *eager*). For EP = 1
the job also reports how far the MoE step is from the hardware limit: the active slots'
weights read once at the measured copy bandwidth and the expert GEMMs' FLOPs at the
measured bf16 matrix rate (per layer the larger, summed over layers), and the time of the
same rows' grouped GEMMs alone.
"""


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _attempts(history: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not history:
        return []
    out: list[dict[str, Any]] = []
    for g in history.get("groups") or []:
        out.extend(g.get("attempts") or [])
    return out


def summarise(result: dict[str, Any], history: dict[str, Any]) -> dict[str, Any]:
    """Per mode: every run's headline figures, gains, commits with the planner's view."""
    G = int(result["config"]["world_size"])
    modes = []
    for m in result["modes"]:
        runs = {r["run"]: r for r in m["runs"]}
        base = runs["none"]["moe_ms_median"]
        atts = {int(a.get("epoch", -1)): a for a in _attempts(history.get(m["mode"]))}
        rows = []
        for name, r in runs.items():
            commits = list(r["commits"])
            for c in commits:
                a = atts.get(int(c["epoch"]))
                if a is not None:
                    c["planner_commit_latency_s"] = a.get("commit_latency_s")
                    c["planner_state"] = a.get("state")
                    dec = a.get("decision") or {}
                    c["planned_balance_before"] = dec.get("balance_now")
                    c["planned_balance_after"] = dec.get("balance_after")
            ins = r.get("install")
            rebal = list(r.get("rebalances") or [])
            every = ([ins] if ins else []) + commits + rebal
            check = r.get("check")
            stalls = [b["stall_ms"] for b in rebal]
            rows.append(
                {
                    "run": name,
                    "moe_ms_median": r["moe_ms_median"],
                    "moe_ms_p99": r["moe_ms_p99"],
                    "serve_ms_mean": r.get("serve_ms_mean"),
                    "speedup_vs_none": base / r["moe_ms_median"]
                    if base and r["moe_ms_median"]
                    else None,
                    "balance": r["balance"],
                    "time_balance": r.get("time_balance"),
                    "modelled_ms_median": r.get("modelled_ms_median"),
                    "commits": len(commits) + len([b for b in rebal if b["moves"]]),
                    "install": ins,
                    "commit_list": commits,
                    "rebalances": rebal,
                    "stall_ms_median": statistics.median(stalls) if stalls else None,
                    "stall_ms_total": sum(stalls) if stalls else None,
                    "fetched_bytes": sum(c["fetched_bytes"] for c in every),
                    "moves": sum(c["moves"] for c in every),
                    "max_commit_s": max(
                        (c["commit_s"] for c in every if c.get("commit_s") is not None),
                        default=None,
                    ),
                    "max_stall_ms": max((c["stall_ms"] for c in every), default=None),
                    "host_step_ms_median": r["host_step_ms_median"],
                    "host_step_ms_consensus_median": r.get("host_step_ms_consensus_median"),
                    "check": check,
                    "outputs_ok": None if check is None else bool(check["ok"]),
                    "commits_agree": r["commits_agree"],
                    "attempts_aborted": sum(1 for a in atts.values() if a.get("state") == "aborted")
                    if name == "eplbd"
                    else 0,
                }
            )
        decisions: dict[str, int] = {}
        for g in (history.get(m["mode"]) or {}).get("groups") or []:
            for dec in g.get("decisions") or []:
                key = str(dec.get("reason"))
                decisions[key] = decisions.get(key, 0) + int(dec.get("repeats") or 1)
        med = {r["run"]: r["moe_ms_median"] for r in rows}
        e = med.get("eplbd")
        others = [v for k, v in med.items() if k != "eplbd"]
        modes.append(
            {
                "mode": m["mode"],
                "tokens_per_rank": m["tokens_per_rank"],
                "steps": m["steps"],
                "every": m.get("every"),
                "runs": rows,
                "eplbd_beats_both": _beats(e, [med.get("none"), med.get("deepseek")]),
                "eplbd_beats_all": _beats(e, others),
                "hardware": m.get("hardware"),
                "gain_vs_none": _gain(med.get("none"), e),
                "gain_vs_deepseek": _gain(med.get("deepseek"), e),
                "gain_vs_every": _gain(med.get("deepseek-every-n"), e),
                "planner_decisions": decisions,
            }
        )
    outputs_ok = all(
        r["outputs_ok"] is not False for m in modes for r in m["runs"] if r["run"] != "none"
    )
    return {
        "world_size": G,
        "device": result["device_name"],
        "machine": result["machine"],
        "gemm": result["gemm"],
        "gemm_note": result.get("gemm_note"),
        "graph": bool(result.get("graph")),
        "degenerate": G == 1,
        "outputs_ok": outputs_ok,
        "modes": modes,
    }


def _beats(e: float | None, others: list[float | None]) -> bool:
    return bool(e is not None and others and all(o is not None and e < o for o in others))


def _gain(ref: float | None, x: float | None) -> float | None:
    """Fraction of the reference's time saved (0.10: 10% faster)."""
    if ref is None or x is None or ref <= 0:
        return None
    return 1.0 - x / ref


def block_key(result: dict[str, Any]) -> str:
    G = int(result["config"]["world_size"])
    dev = str(result["config"]["device"])
    key = f"ws{G}" if dev == "cuda" else f"ws{G}-{dev}"
    shape = result["config"].get("shape", "v2lite")
    if shape != "v2lite":
        key += f"-{shape}"
    if result["config"].get("weight_source") == "host":
        key += "-host"
    if G == 1 and dev == "cuda" and not result.get("graph"):
        key += "-eager"  # the same job without CUDA graphs, beside the graphed one
    return key


def command_for(cfg: dict[str, Any]) -> str:
    """The command line that reproduces a job's configuration (options left at their
    defaults are not repeated)."""
    from benchmarks._e2e_config import E2EConfig, default_modes, tiny_modes

    tiny = bool(cfg.get("tiny"))
    parts = ["python3 -m benchmarks.bench_e2e_gpu", f"--world-size {cfg['world_size']}"]
    parts.append(f"--device {cfg['device']}")
    if tiny:
        parts.append("--tiny")
    defaults = {m.name: m for m in (tiny_modes() if tiny else default_modes())}
    names = [m["name"] for m in cfg["modes"]]
    if names != list(defaults):
        parts.append("--modes " + ",".join(names))
    for m in cfg["modes"]:
        d = defaults[m["name"]]
        if m["tokens"] != d.tokens:
            parts.append(f"--{m['name']}-tokens {m['tokens']}")
        if m["steps_per_domain"] != d.steps_per_domain:
            parts.append(f"--{m['name']}-steps {m['steps_per_domain']}")
    from benchmarks._e2e_config import RUNS, SHAPES

    shape = cfg.get("shape", "v2lite")
    if shape != "v2lite":
        parts.append(f"--shape {shape}")
    preset = SHAPES[shape]
    if not tiny:
        for key in ("hidden", "ffn", "experts", "top_k"):
            if cfg[key] != preset[key]:
                parts.append(f"--{key.replace('_', '-')} {cfg[key]}")
    routing = cfg.get("routing", "esft")
    if routing != preset["routing"]:
        parts.append(f"--routing {routing}")
    if cfg.get("objective", "tokens") != "time":
        parts.append(f"--objective {cfg.get('objective', 'tokens')}")
    runs = list(cfg.get("runs", ["none", "deepseek", "eplbd"]))
    if runs != list(RUNS):
        parts.append("--runs " + ",".join(runs))
    for key in ("every", "every_window"):
        if cfg.get(key):
            parts.append(f"--{key.replace('_', '-')} {cfg[key]}")
    base = E2EConfig()
    if not tiny:
        if len(cfg["layers"]) != preset["layers"]:
            parts.append(f"--layers {len(cfg['layers'])}")
        if cfg["sync_interval"] != base.sync_interval:
            parts.append(f"--sync-interval {cfg['sync_interval']}")
        for key in ("window_s", "windows", "min_windows", "cooldown_s", "min_gain"):
            if cfg["tuning"][key] != getattr(base.tuning, key):
                parts.append(f"--{key.replace('_', '-')} {cfg['tuning'][key]}")
    for key in ("gemm", "weight_source", "graph"):
        if cfg[key] != getattr(base, key):
            parts.append(f"--{key.replace('_', '-')} {cfg[key]}")
    if tuple(cfg["domains"]) != base.domains and routing == "esft":
        parts.append("--domains " + ",".join(cfg["domains"]))
    return " ".join(parts)


def _objective_line(result: dict[str, Any]) -> str:
    cfg = result["config"]
    objective = cfg.get("objective", "tokens")
    cm = result.get("cost_model") or {}
    what = cfg.get("cost_model_note") or (
        f"{cm.get('source', '?')} model of {cm.get('hidden')},{cm.get('ffn')}" if cm else "none"
    )
    routing = cfg.get("routing", "esft")
    trace = (
        "the ESFT routing trace (DeepSeek-V2-Lite: 64 experts, top-6)"
        if routing == "esft"
        else f"synthetic DeepSeek-V3-size routing ({cfg['experts']} experts, top-{cfg['top_k']}: "
        "the ESFT traces have 64; `benchmarks/_ep_trace.synthetic_stream`, heavy-tailed "
        "popularity drifting step to step with two regime switches, "
        f"{cfg.get('synthetic_tokens')} tokens per domain, each domain its own popularity)"
    )
    return (
        f"Online planner objective: **{objective}**; cost model (the planner's and the "
        f"modelled-time balance below): {what}. Routing: {trace}."
    )


def render_result(result: dict[str, Any], summary: dict[str, Any]) -> str:
    """Markdown of one job (one group size)."""
    cfg = result["config"]
    G = summary["world_size"]
    eager = G == 1 and not summary["graph"] and cfg["device"] == "cuda"
    out = [
        f"### EP = {G}{', eager' if eager else ''}"
        f"{', ' + cfg['shape'] if cfg.get('shape', 'v2lite') != 'v2lite' else ''} "
        f"({summary['device']})",
        "",
        f"Machine: {summary['machine']}. Expert GEMMs: {summary['gemm']} "
        f"({summary['gemm_note']}); forward {'replayed as a CUDA graph' if summary['graph'] else 'launched eagerly'}. Layers {cfg['layers']} of the trace, P = "
        f"{G * cfg['slots_per_gpu']} slots ({cfg['slots_per_gpu']} per GPU), hidden "
        f"{cfg['hidden']}, ffn {cfg['ffn']}, {cfg['experts']} experts, top-{cfg['top_k']}, "
        f"{cfg['dtype']}; sync_interval "
        f"{cfg['sync_interval']}; planner window {cfg['tuning']['window_s']} s x "
        f"{cfg['tuning']['windows']}, cooldown {cfg['tuning']['cooldown_s']} s, min gain "
        f"{cfg['tuning']['min_gain']}; weights from {cfg['weight_source']}.",
        "",
        _objective_line(result),
        "",
        f"Command: `{command_for(cfg)}`"
        + (f" (the job took {result['duration_s']:g} s)." if "duration_s" in result else "."),
        "",
    ]
    if summary["degenerate"]:
        out += [
            "**One GPU: the balancing comparison is degenerate.** Every row lands on the "
            "one GPU (balance 1.0 by definition), so balancing has nothing to gain (replicas "
            "only split the same rows into more GEMM groups); this run exercises the code "
            "paths (on CUDA: NCCL, the Triton kernel, the client staging DeepSeek's layout and "
            "swapping it in place on the GPU, replicas copied locally) and times them. The "
            "differences between the three runs here are no balancing effect; gains are "
            "measured only with EP >= 2.",
            "",
        ]
    for m in summary["modes"]:
        out += [
            f"**{m['mode']}**: {m['tokens_per_rank']} tokens per rank per step "
            f"({m['tokens_per_rank'] * G} per step), {m['steps']} timed steps per run.",
            "",
            "| run | MoE ms median | p99 | vs none | mean ms/step with stalls | GPU max/mean rows "
            "| modelled time max/mean | commits | moves | fetched MB | max commit s "
            "| max stall ms | step() ms (consensus) | outputs vs none |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in m["runs"]:
            c = r["check"]
            if c is None:
                outs = "reference"
            else:
                outs = (
                    f"{'equal' if c['ok'] else 'DIFFERENT'} (max abs diff "
                    f"{c['max_abs_diff']:.3g} of {c['ref_max_abs']:.3g}, {c['steps_full']} full "
                    f"steps; fingerprints {c['fingerprint_max_abs_diff']:.3g}, "
                    f"{c['steps_fingerprint']} steps)"
                )
            ncommit = r["commits"] + (1 if r["install"] else 0)
            out.append(
                f"| {r['run']} | {_f(r['moe_ms_median'])} | {_f(r['moe_ms_p99'])} | "
                f"{_f(r['speedup_vs_none'], 3)}x | {_f(r.get('serve_ms_mean'))} | "
                f"{_f(r['balance'], 4)} | {_f(r.get('time_balance'), 4)} | {ncommit}"
                f"{' (before timing)' if r['install'] else ''} | {r['moves']} | "
                f"{r['fetched_bytes'] / MB:.1f} | {_f(r['max_commit_s'])} | "
                f"{_f(r['max_stall_ms'])} | {_f(r['host_step_ms_median'], 4)} "
                f"({_f(r['host_step_ms_consensus_median'])}) | {outs} |"
            )
        out.append("")
        verdict = "yes" if m["eplbd_beats_both"] else "no"
        line = (
            f"eplbd online vs none: {_pct(m['gain_vs_none'])} of the MoE time saved; vs DeepSeek "
            f"once: {_pct(m['gain_vs_deepseek'])}"
        )
        if m.get("gain_vs_every") is not None:
            line += f"; vs DeepSeek every N: {_pct(m['gain_vs_every'])}"
        out.append(
            line
            + f". Beats none and DeepSeek once: **{verdict}**"
            + (
                f"; beats every other run: **{'yes' if m['eplbd_beats_all'] else 'no'}**"
                if "eplbd_beats_all" in m
                else ""
            )
            + "."
            + (" (one GPU: expected no)" if summary["degenerate"] else "")
        )
        if all(r.get("modelled_ms_median") is not None for r in m["runs"]):
            out.append(
                "Modelled expert time per step (the cost model on each step's rows, slowest GPU "
                "per layer, summed; what the one-GPU emulation reports), median: "
                + ", ".join(f"{r['run']} {r['modelled_ms_median']:.4g} ms" for r in m["runs"])
                + "."
            )
        ev = m.get("every")
        dn = next((r for r in m["runs"] if r["run"] == "deepseek-every-n"), None)
        if ev and dn is not None:
            out.append(
                f"DeepSeek every N: recomputed every {ev['n']} steps from the load of the last "
                f"{ev['window']}, {len(dn['rebalances'])} times, serving stopped on every rank "
                f"meanwhile: stall median {_f(dn['stall_ms_median'])} ms, max "
                f"{_f(dn['max_stall_ms'])} ms, total {_f(dn['stall_ms_total'])} ms (in "
                "'ms/step with stalls': MoE + step() + stalls over the steps)."
            )
        hw = m.get("hardware")
        if hw:
            ce = hw["ceilings"]
            out.append(
                f"Hardware limit of the *{hw['run']}* run's MoE step (one GPU, measured ceilings: copy "
                f"{ce['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 {ce['bf16_flops_per_s'] / 1e12:.0f} "
                f"TFLOP/s): the active slots' weights ({hw['active_slots']:.1f} per layer) read once "
                f"{hw['weights_ms']:.3f} ms, the expert GEMMs' FLOPs {hw['flops_ms']:.3f} ms; per layer "
                f"the larger, summed: **{hw['limit_ms']:.3f} ms** (both added: {hw['limit_sum_ms']:.3f} ms). "
                f"The grouped GEMMs of the same rows alone, timed: {hw['gemm_ms']:.3f} ms. MoE step: "
                f"{hw['moe_ms']:.3f} ms, so **{100 * hw['limit_ms'] / hw['moe_ms']:.0f}% of the limit** "
                f"({100 * hw['gemm_ms'] / hw['moe_ms']:.0f}% of the step in the expert GEMMs)."
            )
        if m.get("planner_decisions"):
            out.append(
                "Planner decisions during the eplbd run: "
                + ", ".join(f"{k} x{v}" for k, v in sorted(m["planner_decisions"].items()))
                + "."
            )
        commits = [
            (r["run"], c)
            for r in m["runs"]
            for c in ([r["install"]] if r["install"] else [])
            + r["commit_list"]
            + [b for b in r.get("rebalances") or [] if b["moves"]]
        ]
        if commits:
            out += [
                "",
                "| run | epoch | first step served | commit s (ranks) | planner prepare->commit s "
                "| moves | fetched MB | apply step ms | stall ms |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for run, c in commits:
                step = "before timing" if run == "deepseek" else str(c.get("step"))
                out.append(
                    f"| {run} | {c['epoch']} | {step} | {_f(c.get('commit_s'))} | "
                    f"{_f(c.get('planner_commit_latency_s'))} | {c['moves']}"
                    f"{' (split only)' if c.get('split_changed') and not c['moves'] else ''} | "
                    f"{c['fetched_bytes'] / MB:.1f} | "
                    f"{_f(c.get('step_ms', c.get('apply_step_ms')))} | {_f(c['stall_ms'])} |"
                )
        out.append("")
    if not summary["outputs_ok"]:
        out.append("**Outputs differ from the no-balancing run: a correctness bug.**")
    return "\n".join(out).rstrip() + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


_BLOCK = re.compile(r"<!-- e2e:(?P<key>[\w-]+) -->\n(?P<body>.*?)<!-- /e2e:(?P=key) -->", re.S)


def _key_words(key: str) -> str:
    """ "ws8-v3-host" -> "8 (DeepSeek-V3 shapes, host pool)"."""
    n, *rest = key[2:].split("-")
    words = {"v3": "DeepSeek-V3 shapes", "host": "host pool", "eager": "eager", "cpu": "CPU"}
    return n + (f" ({', '.join(words.get(r, r) for r in rest)})" if rest else "")


def doc_section(existing: str | None, key: str | None, block: str | None) -> str:
    """The whole ``e2e-gpu`` section: header, commands, status, then one block per group
    size (``key`` replaced by ``block``; the others kept from ``existing``)."""
    blocks: dict[str, str] = {}
    if existing:
        for mt in _BLOCK.finditer(existing):
            blocks[mt.group("key")] = mt.group("body")
    if key is not None and block is not None:
        blocks[key] = block.rstrip() + "\n"
    keys = sorted(blocks, key=lambda k: (int(re.sub(r"\D.*", "", k[2:]) or 0), k))
    measured = [k for k in keys if "-cpu" not in k]
    want = ["ws2", "ws4", "ws8-v3"]
    missing = [k for k in want if k not in blocks]
    status = "Status: "
    if measured:
        status += "measured here: " + ", ".join(f"EP = {_key_words(k)}" for k in measured) + ". "
    if missing:
        status += (
            "Not yet run: "
            + ", ".join(f"EP = {_key_words(k)}" for k in missing)
            + " (no machine with that many GPUs was lent so far; "
            "the CPU smoke test runs the whole job with EP = 2 on gloo, tiny dimensions)."
        )
    parts = [
        "## End to end on GPUs (`bench_e2e_gpu`)",
        "",
        METHOD,
        COMMANDS,
        status.rstrip(),
        "",
    ]
    for k in keys:
        parts.append(f"<!-- e2e:{k} -->\n{blocks[k]}<!-- /e2e:{k} -->")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"
