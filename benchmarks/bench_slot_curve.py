"""What the cost model cannot see: how one rank's grouped expert GEMM time moves with its rows.

The planner's cost model (``eplbd/planner/_cost.py``) charges each active slot a fixed cost
and a cost per 128-row tile, additively. This benchmark measures, on a GPU, how well that
form follows the grouped GEMM (``torch._grouped_mm``, the timer of ``bench_cost_model``)
where layouts differ, and how much of the spread between the ranks of one step the model
cannot see:

- *equal rows*: k active slots of r rows each, of S slots (the rest idle), r from 1 to 2048;
- *one slot's rows*: four slots at a fixed count, the fifth from 1 to 2048 rows (the
  marginal cost of rows on one slot, which the planner trades against replicas);
- *the same rows over k slots*: R rows split evenly over 1 to 5 slots (what a replica does);
- *idle slots*: 2 active slots of 2 to 16 (an idle slot's cost);
- *the ranks of a step*: every rank's workload of the ESFT and synthetic steps of
  ``bench_cost_model`` (default and DeepSeek layouts), grouped per step and layer: the
  measured spread between ranks (max / mean) against the model's, and how close the rank
  the model calls slowest is to the measured slowest;
- *two layouts of the same steps*: DeepSeek's layout and eplbd's time objective, both
  planned on the steps' own mean load, and the same steps' slowest rank per layer under
  each, measured and modelled: whether the model's preference between them holds on the GPU.

    python3 -m benchmarks.bench_slot_curve [--shapes v3,v2lite] [--out DIR] [--doc auto|yes|no]
    python3 -m benchmarks.bench_slot_curve --render DIR/slot_curve.json   # docs from a saved run

The model is the card's calibration stored in ``benchmarks/calibration`` (refused if none).
"""

from __future__ import annotations

import argparse
import json
import time
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
from benchmarks._gemm_timer import SHAPES, ExpertShape, GemmTimer
from benchmarks._report import machine_line, write_section
from benchmarks.bench_cost_model import calibration_path, device_slug, trace_workloads
from eplbd.layout import Layout
from eplbd.planner import CostModel, plan_with_report, rebalance_experts

SECTION = "slot-curve"
GRID = (1, 8, 16, 32, 48, 64, 80, 96, 112, 128, 129, 144, 160, 192, 224, 256, 257, 288,
        320, 384, 448, 512, 640, 768, 1024, 1536, 2048)  # fmt: skip
SHOWN = (1, 64, 128, 129, 192, 256, 257, 384, 512, 1024, 2048)


def workloads(tiny: bool) -> tuple[list[list[int]], list[list[Any]]]:
    """The probe's workloads and their tags: ["equal", S, k, r], ["one", S, base, r],
    ["spread", S, k, R], ["idle", S, 2, r]."""
    grid = (1, 8, 40) if tiny else GRID
    wl: list[list[int]] = []
    tags: list[list[Any]] = []
    for S in (5, 9):
        for k in range(1, S + 1):
            for r in grid:
                wl.append([r] * k + [0] * (S - k))
                tags.append(["equal", S, k, r])
    for base in (32, 96, 200):
        for r in grid:
            wl.append([base] * 4 + [r])
            tags.append(["one", 5, base, r])
    for R in (256, 384, 512, 768, 1024, 2048):
        for k in range(1, 6):
            wl.append([R // k + (1 if i < R % k else 0) for i in range(k)] + [0] * (5 - k))
            tags.append(["spread", 5, k, R])
    for S in (2, 3, 5, 9, 16):
        for r in (64, 256):
            wl.append([r, r] + [0] * (S - 2))
            tags.append(["idle", S, 2, r])
    return wl, tags


def layout_pairs(tiny: bool, model: CostModel, steps: int = 8) -> dict[str, dict[str, Any]]:
    """Per case, every rank's workload of ``steps`` steps and every layer under DeepSeek's
    layout and under eplbd's time objective (``model``), both planned on the mean load of
    those steps (the same information for both). -> key -> {"G", layout -> workloads}"""
    esft = esft_stream([3] if tiny else [3, 9, 15, 21])
    cases: list[tuple[str, Any, int, int, int]] = [("ESFT", esft, 16, 80, 64)]
    if not tiny:
        cases += [("ESFT", esft, 16, 80, 2048)]
        syn = synthetic_stream(4, 64 * 64, num_layers=2, seed=1)
        cases += [("synthetic V3", syn, 32, 288, 64), ("synthetic V3", syn, 64, 320, 64)]
    out = {}
    for name, stream, G, P, tokens in cases:
        E, L = stream.num_experts, stream.num_layers
        n = 2 if tiny else steps
        ids = [step_ids(stream, 1000 + 7 * s, G, tokens) for s in range(n)]
        load = expert_load(np.stack(ids), E) / n  # mean rows of a step, [L, E]
        lays = {
            "DeepSeek": Layout.from_phy2log(rebalance_experts(load, P, 1, 1, G)[0], E),
            "eplbd time": plan_with_report(
                load, num_gpus=G, num_physical_experts=P, cost_model=model
            ).layout,
        }
        entry: dict[str, Any] = {"G": G}
        for lname, lay in lays.items():
            table, count = (t.numpy() for t in lay.dispatch())
            entry[lname] = [
                list(map(int, r))
                for x in ids
                for layer in range(L)
                for r in dispatch_counts(x[:, :, layer], table[layer], count[layer], P).reshape(
                    G, P // G
                )
            ]
        out[f"{name}, EP {G}, {tokens} tokens/rank"] = entry
    return out


def measure(
    shape: ExpertShape, device: str, tiny: bool, reps: int, model: CostModel
) -> dict[str, Any]:
    wl, tags = workloads(tiny)
    traces = trace_workloads(tiny)
    pairs = layout_pairs(tiny, model)
    pair_wl = [w for v in pairs.values() for k, ws in v.items() if k != "G" for w in ws]
    every = wl + [w for v in traces.values() for w in v] + pair_wl
    timer = GemmTimer(shape, max(len(w) for w in every), max(sum(w) for w in every), device)
    t0 = time.perf_counter()
    us = timer.time(every, reps=reps, warmup=2)
    again = timer.time(wl, reps=reps, warmup=1)  # run-to-run spread of the same calls
    out_traces, at = {}, len(wl)
    for key, w in traces.items():
        out_traces[key] = {"workloads": w, "us": us[at : at + len(w)]}
        at += len(w)
    out_pairs: dict[str, Any] = {}
    for key, v in pairs.items():
        out_pairs[key] = {"G": v["G"]}
        for lname, ws in v.items():
            if lname != "G":
                out_pairs[key][lname] = {"workloads": ws, "us": us[at : at + len(ws)]}
                at += len(ws)
    return {
        "pairs": out_pairs,
        "shape": shape.__dict__,
        "workloads": wl,
        "tags": tags,
        "us": us[: len(wl)],
        "us_again": again,
        "traces": out_traces,
        "seconds": time.perf_counter() - t0,
    }


# --- the report ----------------------------------------------------------------------------


def _at(r: dict[str, Any], tag: list[Any]) -> float | None:
    for t, u in zip(r["tags"], r["us"], strict=True):
        if t == tag:
            return float(u)
    return None


def rank_spread(r: dict[str, Any], model: CostModel) -> list[dict[str, Any]]:
    """Per trace case: the ranks of each (step, layer) measured and modelled."""
    out = []
    for key, v in r["traces"].items():
        G = int(key.split("EP ")[1].split(",")[0])
        t = np.asarray(v["us"], dtype=np.float64).reshape(-1, G)
        m = np.array([model.gemm_time(w) for w in v["workloads"]]).reshape(-1, G)
        picked = t[np.arange(len(t)), m.argmax(axis=1)] / t.max(axis=1)
        out.append({
            "case": key,
            "groups": len(t),
            "measured_max_over_mean": float((t.max(axis=1) / t.mean(axis=1)).mean()),
            "modelled_max_over_mean": float((m.max(axis=1) / m.mean(axis=1)).mean()),
            "max_error": float(np.median(np.abs(m.max(axis=1) - t.max(axis=1)) / t.max(axis=1))),
            "picked_over_slowest": float(picked.mean()),
        })  # fmt: skip
    return out


def pair_compare(r: dict[str, Any], model: CostModel) -> list[dict[str, Any]]:
    """Per case of ``layout_pairs``: the mean slowest rank, measured and modelled, under
    DeepSeek's layout and eplbd's time objective."""
    out = []
    for key, v in r.get("pairs", {}).items():
        G = v["G"]
        row: dict[str, Any] = {"case": key}
        for lname, tag in (("DeepSeek", "ds"), ("eplbd time", "ep")):
            ws, us = v[lname]["workloads"], np.asarray(v[lname]["us"], dtype=np.float64)
            m = np.array([model.gemm_time(w) for w in ws])
            row[f"{tag}_us"] = float(us.reshape(-1, G).max(axis=1).mean())
            row[f"{tag}_model_us"] = float(m.reshape(-1, G).max(axis=1).mean())
            row[f"{tag}_active"] = float(np.mean([sum(1 for x in w if x > 0) for w in ws]))
        out.append(row)
    return out


def render(res: dict[str, Any]) -> str:
    dev = res["device"]
    lines = [
        f"## What the cost model cannot see: one rank's GEMM time against its rows "
        f"(`bench_slot_curve`), {dev}",
        "",
        f"Machine: {res['machine']}. One rank's grouped expert GEMMs (`torch._grouped_mm`, "
        f"bf16, the timer of `bench_cost_model`: CUDA events, median of {res['reps']}, each "
        "call on other weights, each run in a random order). Model: the card's stored "
        "calibration. "
        "`python3 -m benchmarks.bench_slot_curve`.",
        "",
    ]
    for r in res["shapes"]:
        sh = r["shape"]
        model = CostModel.from_dict(r["model"])
        rel = np.abs(np.asarray(r["us"]) - np.asarray(r["us_again"])) / np.asarray(r["us"])
        lines += [
            f"### {sh['name']} expert (hidden {sh['hidden']}, ffn {sh['ffn']})",
            "",
            f"Model: fixed {model.fixed_us:.1f} us per active slot, {model.tile_us:.1f} us per "
            f"tile of {model.tile_rows} rows, base {model.base_us:.1f} us. The same calls "
            f"timed twice differ by {100 * float(np.median(rel)):.1f}% (median).",
            "",
            "k active slots of r rows each (measured us; model in brackets):",
            "",
            "| slots | " + " | ".join(f"r={x}" for x in SHOWN) + " |",
            "|---|" + "---:|" * len(SHOWN),
        ]
        for S, k in ((5, 1), (5, 2), (5, 5), (9, 9)):
            cells = []
            for x in SHOWN:
                u = _at(r, ["equal", S, k, x])
                w = [x] * k + [0] * (S - k)
                cells.append("" if u is None else f"{u:.0f} ({model.gemm_time(w):.0f})")
            lines.append(f"| {k} of {S} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Four slots at a fixed count, the fifth at r rows (measured us; model in brackets):",
            "",
            "| four slots at | " + " | ".join(f"r={x}" for x in SHOWN) + " |",
            "|---|" + "---:|" * len(SHOWN),
        ]
        for base in (32, 96, 200):
            cells = []
            for x in SHOWN:
                u = _at(r, ["one", 5, base, x])
                cells.append(
                    "" if u is None else f"{u:.0f} ({model.gemm_time([base] * 4 + [x]):.0f})"
                )
            lines.append(f"| {base} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "R rows split evenly over k of 5 slots (measured us; model in brackets):",
            "",
            "| R | k=1 | k=2 | k=3 | k=4 | k=5 |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for R in (256, 384, 512, 768, 1024, 2048):
            cells = []
            for k in range(1, 6):
                u = _at(r, ["spread", 5, k, R])
                w = [R // k + (1 if i < R % k else 0) for i in range(k)]
                cells.append("" if u is None else f"{u:.0f} ({model.gemm_time(w):.0f})")
            lines.append(f"| {R} | " + " | ".join(cells) + " |")
        idle = [(t[1], t[3], u) for t, u in zip(r["tags"], r["us"], strict=True) if t[0] == "idle"]
        lines += [
            "",
            "Two active slots among S (idle slots' cost): "
            + "; ".join(f"S={S}, {x} rows: {u:.0f} us" for S, x, u in idle)
            + ".",
            "",
            "The ranks of one step (every rank's workload of a few steps, per step and layer): "
            "measured and modelled max / mean over the ranks, the model's error on the slowest "
            "rank (median), and the measured time of the rank the model calls slowest over the "
            "measured slowest (mean):",
            "",
            "| steps | groups | measured max/mean | modelled max/mean | error on the max | model's pick / slowest |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s in rank_spread(r, model):
            lines.append(
                f"| {s['case']} | {s['groups']} | {s['measured_max_over_mean']:.3f} | "
                f"{s['modelled_max_over_mean']:.3f} | {100 * s['max_error']:.1f}% | "
                f"{s['picked_over_slowest']:.3f} |"
            )
        pc = pair_compare(r, model)
        if pc:
            lines += [
                "",
                "Two layouts of the same steps, both planned on those steps' mean load: the "
                "slowest rank's time per step and layer (mean, us), measured and modelled, and "
                "active slots per GPU:",
                "",
                "| steps | DeepSeek measured | eplbd time measured | eplbd / DeepSeek measured "
                "| DeepSeek modelled | eplbd time modelled | eplbd / DeepSeek modelled "
                "| active slots DeepSeek | eplbd |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for c in pc:
                lines.append(
                    f"| {c['case']} | {c['ds_us']:.0f} | {c['ep_us']:.0f} | "
                    f"{c['ep_us'] / c['ds_us']:.3f} | {c['ds_model_us']:.0f} | "
                    f"{c['ep_model_us']:.0f} | {c['ep_model_us'] / c['ds_model_us']:.3f} | "
                    f"{c['ds_active']:.2f} | {c['ep_active']:.2f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.bench_slot_curve", description=__doc__)
    ap.add_argument("--shapes", default="v3,v2lite")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--tiny", action="store_true", help="small sizes (the CPU smoke test)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="directory for slot_curve.json")
    ap.add_argument("--doc", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--render", default=None, help="write the docs of a saved run")
    a = ap.parse_args(argv)
    if a.render:
        res = json.loads(Path(a.render).read_text())
        write_section(f"{SECTION}-{device_slug(res['device'])}", render(res))
        print(render(res))
        return 0
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    res: dict[str, Any] = {"machine": machine_line(), "device": name, "reps": a.reps,
                           "shapes": []}  # fmt: skip
    for key in a.shapes.split(","):
        shape = SHAPES[key]
        if a.tiny:
            shape = ExpertShape(shape.name, 64, 32, shape.dtype)
            model = CostModel(fixed_us=1.0, tile_us=1.0, base_us=1.0, device="CPU")
        else:
            path = calibration_path(name, shape)
            if not path.exists():
                raise SystemExit(f"no calibration of {shape.name} for {name} ({path.name})")
            model = CostModel.from_json(path.read_text())
        r = measure(shape, device, a.tiny, a.reps, model)
        r["model"] = model.to_dict()
        res["shapes"].append(r)
        print(f"{shape.name}: {len(r['us'])} workloads, {r['seconds']:.1f} s", flush=True)
    md = render(res)
    print(md)
    if a.out:
        d = Path(a.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "slot_curve.json").write_text(json.dumps(res))
    if a.doc == "yes" or (a.doc == "auto" and device == "cuda" and not a.tiny):
        write_section(f"{SECTION}-{device_slug(name)}", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
