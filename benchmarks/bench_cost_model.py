"""Calibrate the cost model of expert GEMMs on a GPU, and validate it against measured times.

Target (../shared/design/TARGETS.md): a cost model of expert GEMM time (per slot: a weight
read when active, plus a cost per tile of rows), measured grouped-GEMM times on the same
GPU as the reference; report its error.

    python3 -m benchmarks.bench_cost_model [--shapes v2lite,v3] [--out DIR] [--doc auto|yes|no]
    python3 -m benchmarks.bench_cost_model --render DIR/cost_model.json   # docs from a saved run
    python3 -m benchmarks.bench_cost_model --forms DIR/cost_model.json    # other model forms
    python3 -m benchmarks.bench_cost_model --refit DIR/cost_model.json [--tiers 128|none]

For each expert shape (DeepSeek-V2-Lite: hidden 2048, ffn 1408; DeepSeek-V3: 7168, 2048;
bf16) it times one rank's grouped expert GEMMs (``benchmarks/_gemm_timer.py``) for

- *fit* workloads: 1 to 16 active slots with equal rows (1 to 4096), and random skewed row
  counts with idle slots; the model ``time = base + fixed * active slots + tile * tiles``
  is fitted to them by least squares on the relative error, for tile sizes 16 to 256, and
  the tile size with the lowest median error kept; with the grouped kernel, once each side
  of the mean rows per slot where it changes its tile shape (:data:`GROUPED_TIERS`), the
  model's tiers;
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
import math
import re
from dataclasses import replace
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
from eplbd.planner import CostModel, CostTier, default_cost_model, rebalance_experts

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


#: torch._grouped_mm's switch of tile shape: 64x128 tiles while a call's mean rows per group
#: (empty groups included) is at most 128, 128x256 above (its GroupMM.cu; measured on an H100:
#: docs/benchmarks.md, cost-model-tiers-nvidia-h100-80gb-hbm3). A calibration of the grouped
#: kernel fits one set of constants each side.
GROUPED_TIERS = (128.0,)
FIT_SET = "fit (uniform and random)"


def calibrate(
    shape: ExpertShape, device: str, ceilings: dict[str, float], tiny: bool, reps: int,
    tiers: tuple[float, ...] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Time the workloads on ``device`` and fit the model (:func:`fit_sets`); ``tiers``:
    the mean rows per slot above which other constants apply (None: the grouped kernel's,
    :data:`GROUPED_TIERS`, where it runs; none for the per-expert loop)."""
    fit_wl = uniform_workloads(tiny) + random_workloads(40 if tiny else 250, 1, tiny)
    hold_wl = random_workloads(30 if tiny else 250, 2, tiny)
    traces = trace_workloads(tiny)
    every = fit_wl + hold_wl + [w for v in traces.values() for w in v]
    timer = GemmTimer(shape, max(len(w) for w in every), max(sum(w) for w in every), device)
    times = np.array(timer.time(every, reps=reps))
    sets: dict[str, tuple[list[list[int]], np.ndarray]] = {}
    at = 0
    for key, wl in ((FIT_SET, fit_wl), ("held out: random", hold_wl),
                    *((f"held out: {k}", v) for k, v in traces.items())):  # fmt: skip
        sets[key] = (wl, times[at : at + len(wl)])
        at += len(wl)
    if tiers is None:  # the tile shapes are the CUDA kernel's
        tiers = GROUPED_TIERS if timer.grouped and device == "cuda" else ()
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    dtype = shape.dtype if device == "cuda" else "float32"
    meta = {"device": name, "dtype": dtype, "torch": torch.__version__}
    out = fit_sets(shape.__dict__, sets, ceilings, tiers, meta)
    return {**out, "grouped": timer.grouped, "points": {"workloads": every, "us": times.tolist()}}


def _fit_regime(wl: list[list[int]], t: np.ndarray) -> tuple[CostModel, dict[int, float]]:
    """The best tile size's model for workloads ``wl`` timed ``t``, and each tile size's
    median error on them."""
    best: tuple[float, CostModel] | None = None
    per_tile = {}
    for tile in TILES:
        c = fit(wl, t, tile)
        m = CostModel(fixed_us=float(c[1]), tile_us=float(max(c[2], 1e-9)), tile_rows=tile,
                      base_us=float(c[0]))  # fmt: skip
        e = errors(m, wl, t)["median_abs"]
        per_tile[tile] = e
        if best is None or e < best[0]:
            best = (e, m)
    assert best is not None
    return best[1], per_tile


def _mean_rows(w: list[int]) -> float:
    return sum(w) / len(w) if w else 0.0


def fit_sets(
    shape: dict[str, Any], sets: dict[str, tuple[list[list[int]], np.ndarray]],
    ceilings: dict[str, float], tiers: tuple[float, ...], meta: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    """The model fitted to ``sets[FIT_SET]`` (per regime where ``tiers`` names the mean rows
    per slot that part them, each its own tile size), and its errors on every set beside
    the default model's and one regime's (the same fit over every workload)."""
    fit_wl, t_fit = sets[FIT_SET]
    one, per_tile = _fit_regime(fit_wl, t_fit)
    bounds = (-1.0, *tiers, float("inf"))  # -1: an idle workload (mean 0) is in the first
    regimes: list[CostModel] = []
    tier_errors: dict[str, dict[int, float]] = {}
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        idx = [i for i, w in enumerate(fit_wl) if lo < _mean_rows(w) <= hi]
        if len(idx) < 8:
            raise ValueError(
                f"{len(idx)} fit workloads of a mean of ({lo:g}, {hi:g}] rows a slot: "
                "too few to fit a tier"
            )
        m, e = _fit_regime([fit_wl[i] for i in idx], t_fit[idx])
        regimes.append(m)
        tier_errors[f"{max(lo, 0):g}-{hi:g}"] = e
    base = regimes[0] if tiers else one
    common = {"hidden": shape["hidden"], "ffn": shape["ffn"], "dtype": meta["dtype"],
              "device": meta["device"], "source": "calibrated"}  # fmt: skip
    model = CostModel(
        fixed_us=base.fixed_us, tile_us=base.tile_us, tile_rows=base.tile_rows,
        base_us=base.base_us, **common,
        tiers=tuple(CostTier(above_mean_rows=lo, fixed_us=m.fixed_us, tile_us=m.tile_us,
                             tile_rows=m.tile_rows, base_us=m.base_us)
                    for lo, m in zip(tiers, regimes[1:], strict=True)),
    )  # fmt: skip
    single = CostModel(**{**one.__dict__, **common})
    default = default_cost_model(
        shape["hidden"], shape["ffn"], shape["dtype"], link_bandwidth=None,
        **({"mem_bandwidth": ceilings["copy_bytes_per_s"], "peak_flops": ceilings["bf16_flops_per_s"]}
           if ceilings else {}),
    )  # fmt: skip
    report = {
        name_: {"calibrated": errors(model, wl, t), "default": errors(default, wl, t),
                "one_regime": errors(single, wl, t), "median_us": float(np.median(t))}
        for name_, (wl, t) in sets.items()
    }  # fmt: skip
    held_wl = [w for k, (ws, _) in sets.items() if k != FIT_SET for w in ws]
    held_t = np.concatenate([t for k, (_, t) in sets.items() if k != FIT_SET])
    model = replace(model, fit={
        "tile_median_error": per_tile if not tiers else tier_errors,
        "held_out": errors(model, held_wl, held_t),
        "one_regime_held_out": errors(single, held_wl, held_t),
        "default_held_out": errors(default, held_wl, held_t),
        "ceilings": ceilings, "torch": meta["torch"],
        "workloads": sum(len(wl) for wl, _ in sets.values()),
    })  # fmt: skip
    return {
        "shape": shape,
        "model": model.to_dict(),
        "one_regime": single.to_dict(),
        "default": default.to_dict(),
        "sets": report,
    }


def refit(res: dict[str, Any], tiers: tuple[float, ...]) -> dict[str, Any]:
    """A saved run (``--out``'s cost_model.json) fitted again from its points, with
    ``tiers``: the same sets (their sizes in its report), the same machine and ceilings."""
    out = {**res, "shapes": []}
    for r in res["shapes"]:
        wl, t = r["points"]["workloads"], np.asarray(r["points"]["us"], dtype=np.float64)
        sets: dict[str, tuple[list[list[int]], np.ndarray]] = {}
        at = 0
        for key, s in r["sets"].items():
            n = s["calibrated"]["n"]
            sets[key] = (wl[at : at + n], t[at : at + n])
            at += n
        if at != len(wl) or FIT_SET not in sets:
            raise ValueError(f"{r['shape']['name']}: the saved sets do not add up to its points")
        m = r["model"]
        meta = {"device": m["device"], "dtype": m["dtype"], "torch": m["fit"]["torch"]}
        new = fit_sets(r["shape"], sets, res.get("ceilings") or {}, tiers, meta)
        out["shapes"].append({**r, **new, "refit": {"tiers": list(tiers)}})
    return out


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
        "relative error to the *fit* workloads; every other row is held out. With tiers, "
        "one such model each side of a mean of rows per slot where the kernel changes its "
        "tile shape (each GPU in the regime of its own workload); *one regime*: the same fit "
        "over every workload, as before tiers. *default*: the "
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
        tiers = m.get("tiers") or []
        errs = m["fit"]["tile_median_error"]

        def by_tile(e: dict[str, float]) -> str:
            return ", ".join(f"{k}: {100 * v:.1f}%" for k, v in e.items())

        lines += [
            f"### {sh['name']} expert (hidden {sh['hidden']}, ffn {sh['ffn']}, {sh['dtype']})",
            "",
            "Calibrated: "
            + "; ".join(
                f"{where}fixed {t['fixed_us']:.2f} us per active slot, {t['tile_us']:.2f} us "
                f"per tile of {t['tile_rows']} rows, base {t['base_us']:.1f} us"
                for where, t in (
                    ((f"up to {tiers[0]['above_mean_rows']:g} rows a slot on average: ", m),)
                    if tiers else (("", m),)
                ) + tuple((f"above {t['above_mean_rows']:g}: ", t) for t in tiers)
            )
            + f" (default model: fixed {r['default']['fixed_us']:.2f} us, tile "
            f"{r['default']['tile_us']:.2f} us per {r['default']['tile_rows']} rows). Stored in "
            f"`benchmarks/calibration/{r['file']}`. Median error on the fit set by tile size: "
            + ("; ".join(f"mean rows a slot {k}: {by_tile(v)}" for k, v in errs.items())
               if tiers else by_tile(errs))
            + ".",
            "",
            "| workloads | n | median measured us | calibrated median err | p90 | max | mean (signed) | one regime median err | p90 | default median err | default p90 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for name, s in r["sets"].items():
            c, d = s["calibrated"], s["default"]
            o = s.get("one_regime", c)
            lines.append(
                f"| {name} | {c['n']} | {s['median_us']:.1f} | {100 * c['median_abs']:.1f}% | "
                f"{100 * c['p90_abs']:.1f}% | {100 * c['max_abs']:.1f}% | {100 * c['mean']:+.1f}% | "
                f"{100 * o['median_abs']:.1f}% | {100 * o['p90_abs']:.1f}% | "
                f"{100 * d['median_abs']:.1f}% | {100 * d['p90_abs']:.1f}% |"
            )
        h = m["fit"]["held_out"]
        o = m["fit"].get("one_regime_held_out", h)
        lines += [
            "",
            f"All held-out workloads ({h['n']}): median error {100 * h['median_abs']:.1f}%, "
            f"p90 {100 * h['p90_abs']:.1f}%, max {100 * h['max_abs']:.1f}%"
            + (f" (one regime: {100 * o['median_abs']:.1f}%, p90 {100 * o['p90_abs']:.1f}%, "
               f"max {100 * o['max_abs']:.1f}%)" if tiers else "")
            + ".",
            "",
        ]  # fmt: skip
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
    ap.add_argument("--refit", default=None,
                    help="fit the model again to a saved run's points (with --tiers), and "
                         "with --doc yes store the calibrations and docs")  # fmt: skip
    ap.add_argument("--tiers", default=None,
                    help="mean rows per slot where the kernel changes tile shape, e.g. 128, "
                         "or none (default: torch._grouped_mm's, "
                         f"{','.join(f'{x:g}' for x in GROUPED_TIERS)}, on a GPU)")  # fmt: skip
    a = ap.parse_args(argv)
    tiers: tuple[float, ...] | None = None
    if a.tiers is not None:
        try:
            tiers = () if a.tiers == "none" else tuple(float(x) for x in a.tiers.split(","))
        except ValueError:
            ap.error(f"--tiers must be numbers or none, got {a.tiers!r}")
        if not all(math.isfinite(x) and x > 0 for x in tiers) or list(tiers) != sorted(set(tiers)):
            ap.error(f"--tiers must be finite, > 0 and ascend, got {a.tiers!r}")
    if a.refit:
        try:
            res = refit(json.loads(Path(a.refit).read_text()),
                        GROUPED_TIERS if tiers is None else tiers)  # fmt: skip
        except ValueError as e:
            ap.error(f"--refit {a.refit}: {e}")
        md = render(res)
        if a.doc == "yes":
            store(res)
            write_section(section(res), md)
        print(md)
        return 0
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
        r = calibrate(shape, device, ceilings, a.tiny, a.reps, tiers)
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
