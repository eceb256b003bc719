"""Calibrate the cost model of expert GEMMs on a GPU, and validate it against measured times.

Target (../shared/design/TARGETS.md): a cost model of expert GEMM time (per slot: a weight
read when active, plus a cost per tile of rows), measured grouped-GEMM times on the same
GPU as the reference; report its error.

    python3 -m benchmarks.bench_cost_model [--shapes v2lite,v3] [--out DIR] [--doc auto|yes|no]
    python3 -m benchmarks.bench_cost_model --render DIR/cost_model.json   # docs from a saved run
    python3 -m benchmarks.bench_cost_model --forms DIR/cost_model.json    # other model forms

For each expert shape (DeepSeek-V2-Lite: hidden 2048, ffn 1408; DeepSeek-V3: 7168, 2048;
bf16) it times one rank's grouped expert GEMMs (``benchmarks/_gemm_timer.py``) for

- *fit* workloads: 1 to 16 active slots with equal rows (1 to 4096), and random skewed row
  counts with idle slots; the model ``time = base + fixed * active slots + tile * tiles``
  is fitted to them by least squares on the relative error, for tile sizes 16 to 256, and
  the tile size with the lowest median error kept;
- *held-out* workloads: other random ones, and the real ranks' workloads of the ESFT traces
  (EP = 8 and 16, decode-like 64 and 256 tokens per rank, prefill-like 2048, slot p holding
  expert p mod E and DeepSeek's layout) and of DeepSeek-V3-size synthetic routing (EP = 32
  and 64): the model's error on them is the figure reported, beside the error of the
  default model derived from the measured copy bandwidth and bf16 matrix rate.

The fitted model is written to ``benchmarks/calibration/<device>-<shape>-bf16.json``
(``CostModel.to_json``: the planner's and ``eplbd plan --cost-model``'s input).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._ep_trace import (
    dispatch_counts,
    esft_stream,
    expert_load,
    step_ids,
    synthetic_stream,
)
from benchmarks._gemm_timer import SHAPES, ExpertShape, GemmTimer, hardware_ceilings
from benchmarks._report import machine_line, write_section
from eplbd.layout import Layout
from eplbd.planner import CostModel, default_cost_model, rebalance_experts

SECTION = "cost-model"
CALIBRATION = Path(__file__).resolve().parent / "calibration"
TILES = (16, 32, 64, 128, 256)


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def calibration_path(device: str, shape: ExpertShape) -> Path:
    return CALIBRATION / f"{device_slug(device)}-{device_slug(shape.name)}-{shape.dtype}.json"


# --- workloads ---------------------------------------------------------------------------


def uniform_workloads(tiny: bool) -> list[list[int]]:
    acts = (1, 2, 5) if tiny else (1, 2, 3, 5, 9, 16)
    rows = (
        (1, 9, 40) if tiny else (1, 8, 32, 64, 100, 128, 129, 192, 256, 384, 512, 1024, 2048, 4096)
    )
    out = []
    for a in acts:
        S = 9 if a <= 9 else 16
        for r in rows:
            out.append([r] * a + [0] * (S - a))
    return out


def random_workloads(n: int, seed: int, tiny: bool) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    top = 1.5 if tiny else 3.6
    for _ in range(n):
        S = int(rng.choice([5, 9, 16]))
        scale = 10 ** rng.uniform(0.0, top)
        idle = rng.uniform(0.0, 0.6)
        r = np.where(rng.random(S) < idle, 0, np.round(scale * rng.lognormal(0, 1.0, S)))
        if r.sum() == 0:
            r[0] = 1
        out.append([int(x) for x in r])
    return out


def trace_workloads(tiny: bool, seed: int = 1) -> dict[str, list[list[int]]]:
    """Per (trace, EP, tokens per rank, layout): every rank's rows per slot in a few steps."""
    out: dict[str, list[list[int]]] = {}
    rng = np.random.default_rng(seed)
    esft = esft_stream([3, 13] if not tiny else [3])
    whole = expert_load(esft.ids, 64)
    cases: list[tuple[str, Any, int, int, int]] = [
        ("ESFT", esft, 8, 72, 64),
        ("ESFT", esft, 16, 80, 64),
    ]
    if not tiny:
        syn = synthetic_stream(4, 64 * 64, num_layers=1, seed=seed)
        cases += [("synthetic V3", syn, 32, 288, 256), ("synthetic V3", syn, 64, 320, 256)]
    for name, stream, G, P, E in cases:
        L = stream.num_layers
        load = expert_load(stream.ids, E)
        if name == "ESFT":
            load = whole
        layouts = {
            "default": Layout.default(L, E, P),
            "DeepSeek": Layout.from_phy2log(
                rebalance_experts(load.astype(float), P, 1, 1, G)[0], E
            ),
        }
        for tokens in (64, 256, 2048):
            if tiny and tokens > 64:
                continue
            if G * tokens * 2 > stream.ids.shape[0] * 4 and tokens == 2048 and G > 16:
                continue
            for lname, lay in layouts.items():
                table, count = (t.numpy() for t in lay.dispatch())
                key = f"{name}, EP {G}, {tokens} tokens/rank, {lname} layout"
                wl = []
                for step in rng.integers(0, 50, 2 if tiny else 3):
                    ids = step_ids(stream, int(step), G, tokens)
                    for layer in range(L):
                        c = dispatch_counts(ids[:, :, layer], table[layer], count[layer], P)
                        wl += [list(map(int, r)) for r in c.reshape(G, P // G)]
                out[key] = wl
    return out


# --- fitting -------------------------------------------------------------------------------


def features(wl: list[list[int]], tile: int) -> np.ndarray:
    """[n, 3]: 1, active slots, tiles."""
    return np.array([[1.0, sum(1 for r in w if r > 0), sum(-(-r // tile) for r in w)] for w in wl])


def fit(wl: list[list[int]], t: np.ndarray, tile: int) -> np.ndarray:
    """Least squares on the relative error, coefficients >= 0 (a negative one is dropped
    and the rest refitted). -> [base, fixed, tile] in us."""
    X = features(wl, tile) / t[:, None]
    keep = [0, 1, 2]
    coef = np.zeros(3)
    while keep:
        c, *_ = np.linalg.lstsq(X[:, keep], np.ones(len(t)), rcond=None)
        if (c >= 0).all():
            coef[:] = 0
            coef[keep] = c
            return coef
        keep.pop(int(np.argmin(c)))
    return coef


def errors(model: CostModel, wl: list[list[int]], t: np.ndarray) -> dict[str, float]:
    pred = np.array([model.gemm_time(w) for w in wl])
    rel = (pred - t) / t
    a = np.abs(rel)
    return {
        "n": len(wl),
        "median_abs": float(np.median(a)),
        "p90_abs": float(np.quantile(a, 0.9)),
        "max_abs": float(a.max()),
        "mean": float(rel.mean()),
    }


def calibrate(
    shape: ExpertShape, device: str, ceilings: dict[str, float], tiny: bool, reps: int
) -> dict[str, Any]:
    fit_wl = uniform_workloads(tiny) + random_workloads(40 if tiny else 250, 1, tiny)
    hold_wl = random_workloads(30 if tiny else 250, 2, tiny)
    traces = trace_workloads(tiny)
    every = fit_wl + hold_wl + [w for v in traces.values() for w in v]
    timer = GemmTimer(shape, max(len(w) for w in every), max(sum(w) for w in every), device)
    times = np.array(timer.time(every, reps=reps))
    nf, nh = len(fit_wl), len(hold_wl)
    t_fit, t_hold = times[:nf], times[nf : nf + nh]
    best: tuple[float, int, np.ndarray] | None = None
    per_tile = {}
    for tile in TILES:
        c = fit(fit_wl, t_fit, tile)
        m = CostModel(
            fixed_us=float(c[1]),
            tile_us=float(max(c[2], 1e-9)),
            tile_rows=tile,
            base_us=float(c[0]),
        )
        e = errors(m, fit_wl, t_fit)["median_abs"]
        per_tile[tile] = e
        if best is None or e < best[0]:
            best = (e, tile, c)
    assert best is not None
    _, tile, c = best
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    dtype = shape.dtype if device == "cuda" else "float32"
    model = CostModel(
        fixed_us=float(c[1]), tile_us=float(max(c[2], 1e-9)), tile_rows=tile, base_us=float(c[0]),
        device=name, hidden=shape.hidden, ffn=shape.ffn, dtype=dtype, source="calibrated",
    )  # fmt: skip
    default = default_cost_model(
        shape.hidden, shape.ffn, shape.dtype, link_bandwidth=None,
        **({"mem_bandwidth": ceilings["copy_bytes_per_s"], "peak_flops": ceilings["bf16_flops_per_s"]}
           if ceilings else {}),
    )  # fmt: skip
    sets: dict[str, tuple[list[list[int]], np.ndarray]] = {
        "fit (uniform and random)": (fit_wl, t_fit),
        "held out: random": (hold_wl, t_hold),
    }
    at = nf + nh
    for key, wl in traces.items():
        sets[f"held out: {key}"] = (wl, times[at : at + len(wl)])
        at += len(wl)
    report = {
        name_: {"calibrated": errors(model, wl, t), "default": errors(default, wl, t),
                "median_us": float(np.median(t))}
        for name_, (wl, t) in sets.items()
    }  # fmt: skip
    held = [w for k, (w, _) in sets.items() if k.startswith("held")]
    held_t = np.concatenate([t for k, (_, t) in sets.items() if k.startswith("held")])
    held_wl = [w for ws in held for w in ws]
    summary = errors(model, held_wl, held_t)
    model = CostModel(**{**model.__dict__, "fit": {
        "tile_median_error": per_tile, "held_out": summary,
        "default_held_out": errors(default, held_wl, held_t),
        "ceilings": ceilings, "torch": torch.__version__, "workloads": len(every),
    }})  # fmt: skip
    return {
        "shape": shape.__dict__,
        "model": model.to_dict(),
        "default": default.to_dict(),
        "sets": report,
        "grouped": timer.grouped,
        "points": {"workloads": every, "us": times.tolist()},
    }


#: other forms of the model, fitted the same way to a saved run's points (``--forms``):
#: name -> the features of a workload besides the constant and the active slots
FORMS = {
    "tiles of 128 (the model)": lambda w: [np.ceil(w / 128).sum()],
    "tiles of 64 and of 128": lambda w: [np.ceil(w / 128).sum(), np.ceil(w / 64).sum()],
    "tiles of 128 and of 256": lambda w: [np.ceil(w / 128).sum(), np.ceil(w / 256).sum()],
    "tiles of 128 and the fullest slot's": lambda w: [
        np.ceil(w / 128).sum(), np.ceil(w.max() / 128)],
    "rows (no tiles)": lambda w: [w.sum()],
}  # fmt: skip


def forms(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each form of :data:`FORMS` fitted (least squares on the relative error) to the fit
    workloads of a saved shape's run ``r``; its median error on the fit, random held-out and
    trace workloads, and its p90 on the traces."""
    wl = [np.asarray(w, dtype=np.float64) for w in r["points"]["workloads"]]
    t = np.asarray(r["points"]["us"], dtype=np.float64)
    nf = r["sets"]["fit (uniform and random)"]["calibrated"]["n"]
    nh = r["sets"]["held out: random"]["calibrated"]["n"]
    out = []
    for name, feat in FORMS.items():
        X = np.array([[1.0, float((w > 0).sum()), *feat(w)] for w in wl])
        c, *_ = np.linalg.lstsq(X[:nf] / t[:nf, None], np.ones(nf), rcond=None)
        rel = np.abs(X @ c - t) / t
        tr = rel[nf + nh :]
        out.append({
            "form": name, "coef_us": [float(x) for x in c],
            "fit": float(np.median(rel[:nf])), "held_random": float(np.median(rel[nf : nf + nh])),
            "traces": float(np.median(tr)), "traces_p90": float(np.quantile(tr, 0.9)),
        })  # fmt: skip
    return out


def render_forms(res: dict[str, Any]) -> str:
    dev = res["shapes"][0]["model"]["device"]
    lines = [
        f"## Other forms of the cost model (`bench_cost_model --forms`), {dev}",
        "",
        f"Machine: {res['machine']}. Each form (base + fixed x active slots + the features "
        "named) fitted like the model to the fit workloads of one calibration run, then its "
        "median error (|model - measured| / measured) on each set. Coefficients in us: base, "
        "per active slot, then per feature.",
        "",
    ]
    for r in res["shapes"]:
        lines += [
            f"### {r['shape']['name']}",
            "",
            "| form | coefficients us | fit | held out: random | held out: traces | traces p90 |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for f in forms(r):
            lines.append(
                f"| {f['form']} | {', '.join(f'{x:.2f}' for x in f['coef_us'])} | "
                f"{100 * f['fit']:.1f}% | {100 * f['held_random']:.1f}% | "
                f"{100 * f['traces']:.1f}% | {100 * f['traces_p90']:.1f}% |"
            )
        lines.append("")
    return "\n".join(lines)


# --- the report ----------------------------------------------------------------------------


def section(res: dict[str, Any]) -> str:
    """One docs section per card: a calibration on another GPU does not replace this one's."""
    return f"{SECTION}-{device_slug(res['shapes'][0]['model']['device'])}"


def render(res: dict[str, Any]) -> str:
    lines = [
        f"## Cost model of expert GEMMs (`bench_cost_model`), {res['shapes'][0]['model']['device']}",
        "",
        f"Machine: {res['machine']}.",
        "",
        "One rank's grouped expert GEMMs (gate/up `torch._grouped_mm`, SiLU, down), bf16, timed "
        "on the GPU with CUDA events (median of 3, each call on other weights, each run in a "
        "random order, calls queued behind a GPU sleep so no launch gap is timed). Model: "
        "time = base + fixed x active "
        "slots + tile x sum of ceil(rows / tile rows) per slot, fitted by least squares on the "
        "relative error to the *fit* workloads; every other row is held out. *default*: the "
        "model derived from this GPU's measured copy bandwidth and bf16 matrix rate "
        "(`default_cost_model`). Error = |model - measured| / measured. "
        "`python3 -m benchmarks.bench_cost_model`.",
        "",
    ]
    ce = res.get("ceilings") or {}
    if ce:
        lines += [
            f"Ceilings measured in the same run: device-to-device copy "
            f"{ce['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), bf16 8192^3 matrix "
            f"product {ce['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s.",
            "",
        ]
    for r in res["shapes"]:
        m = r["model"]
        sh = r["shape"]
        lines += [
            f"### {sh['name']} expert (hidden {sh['hidden']}, ffn {sh['ffn']}, {sh['dtype']})",
            "",
            f"Calibrated: fixed {m['fixed_us']:.2f} us per active slot, {m['tile_us']:.2f} us per "
            f"tile of {m['tile_rows']} rows, base {m['base_us']:.1f} us "
            f"(default model: fixed {r['default']['fixed_us']:.2f} us, tile "
            f"{r['default']['tile_us']:.2f} us per {r['default']['tile_rows']} rows). Stored in "
            f"`benchmarks/calibration/{r['file']}`. Median error on the fit set by tile size: "
            + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in m["fit"]["tile_median_error"].items())
            + ".",
            "",
            "| workloads | n | median measured us | calibrated median err | p90 | max | mean (signed) | default median err | default p90 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in r["sets"].items():
            c, d = s["calibrated"], s["default"]
            lines.append(
                f"| {name} | {c['n']} | {s['median_us']:.1f} | {100 * c['median_abs']:.1f}% | "
                f"{100 * c['p90_abs']:.1f}% | {100 * c['max_abs']:.1f}% | {100 * c['mean']:+.1f}% | "
                f"{100 * d['median_abs']:.1f}% | {100 * d['p90_abs']:.1f}% |"
            )
        h = m["fit"]["held_out"]
        lines += [
            "",
            f"All held-out workloads ({h['n']}): median error {100 * h['median_abs']:.1f}%, "
            f"p90 {100 * h['p90_abs']:.1f}%, max {100 * h['max_abs']:.1f}%.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.bench_cost_model", description=__doc__)
    ap.add_argument("--shapes", default="v2lite,v3")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--tiny", action="store_true", help="small sizes (the CPU smoke test)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--out", default=None, help="directory for cost_model.json and the calibrations"
    )
    ap.add_argument("--doc", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--render", default=None, help="write the docs and calibrations of a saved run")
    ap.add_argument("--forms", default=None, help="fit other model forms to a saved run's points")
    a = ap.parse_args(argv)
    if a.forms:
        res = json.loads(Path(a.forms).read_text())
        md = render_forms(res)
        if a.doc == "yes":
            write_section(f"{section(res)}-forms", md)
        print(md)
        return 0
    if a.render:
        res = json.loads(Path(a.render).read_text())
        store(res)
        write_section(section(res), render(res))
        print(render(res))
        return 0
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ceilings = hardware_ceilings(device)
    shapes = [SHAPES[s] for s in a.shapes.split(",") if s]
    if a.tiny:
        shapes = [ExpertShape(s.name, 64, 32, s.dtype) for s in shapes]
    res: dict[str, Any] = {"machine": machine_line(), "ceilings": ceilings, "shapes": []}
    for shape in shapes:
        r = calibrate(shape, device, ceilings, a.tiny, a.reps)
        r["file"] = calibration_path(r["model"]["device"], shape).name
        res["shapes"].append(r)
        print(
            json.dumps({k: v for k, v in r.items() if k != "points"}, indent=1)[:3000], flush=True
        )
    md = render(res)
    print(md)
    if a.out:
        d = Path(a.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "cost_model.json").write_text(json.dumps(res))
    if a.doc == "yes" or (a.doc == "auto" and device == "cuda" and not a.tiny):
        store(res)
        write_section(section(res), md)
    return 0


def store(res: dict[str, Any]) -> None:
    """Write each calibrated model to benchmarks/calibration/."""
    CALIBRATION.mkdir(exist_ok=True)
    for r in res["shapes"]:
        (CALIBRATION / r["file"]).write_text(CostModel.from_dict(r["model"]).to_json() + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
