"""How the cost model prices the layouts each policy chose, against their measured GEMM times.

A planner that minimises modelled time picks the layouts the model likes best, and so also
the ones where the model errs low: the measured gain of the time objective is then smaller
than its modelled gain. This benchmark shows by how much, per policy, from the timings a
GPU run saved (``bench_ep_regimes --measure --save-timings FILE.npz``; an emulation: each
rank's grouped GEMMs timed on one GPU, no all-to-all). It needs no GPU.

Per case and policy: the mean step time (the slowest rank per layer, summed over layers)
measured and modelled, their ratio, the model's error on the rank it calls slowest (median,
measured / modelled - 1) and the active slots per GPU. Where the time objective's ratio
sits above the token objective's, the model overstates what the time objective gains.

    python3 -m benchmarks.bench_model_on_layouts FILE.npz [FILE.npz ...]
        [--calibration CARD | --model FILE.json] [--doc yes|no]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._gemm_timer import SHAPES
from benchmarks._report import write_section
from benchmarks.bench_ep_regimes import stored_models
from eplbd.planner import CostModel

SECTION = "model-on-layouts"


def modelled(model: CostModel, workloads: np.ndarray) -> np.ndarray:
    """Modelled time (us, base included) of each workload [n, S] (-1 past its slots)."""
    rows = np.where(workloads > 0, workloads, 0).astype(np.float64)
    slots = (workloads >= 0).sum(axis=1)
    out = np.zeros(len(workloads))
    for s in np.unique(slots):
        idx = slots == s
        out[idx] = model.rank_time(rows[idx][:, :s])
    return out


def score(z: Any, models: dict[str, CostModel]) -> dict[str, dict[str, dict[str, float]]]:
    """Per case and policy of a saved run ``z`` (the arrays of ``timings_arrays``): measured
    and modelled us per step, their ratio, the error on the model's slowest rank, active
    slots per GPU."""
    by_name = {sh.name: key for key, sh in SHAPES.items()}
    files = set(z.files)
    priced: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for case in sorted({k.split("/")[0] for k in files if k.endswith("/shape")}):
        name = str(z[f"{case}/shape"])
        key = by_name.get(name)
        if key is None or key not in models:
            raise SystemExit(f"{case}: no cost model of {name!r} (--calibration or --model)")
        if name not in priced:
            w = z[f"{name}/workloads"]
            priced[name] = (np.asarray(z[f"{name}/us"], dtype=np.float64),
                            modelled(models[key], w), (w > 0).sum(axis=1))  # fmt: skip
        us, mod, active = priced[name]
        out[case] = {}
        pols = sorted(k.split("/", 1)[1] for k in files if k.startswith(case + "/"))
        for p in (q for q in pols if q != "shape"):
            ix = z[f"{case}/{p}"]  # [steps, L, G] rows of the workloads
            meas, pred = us[ix], mod[ix]
            slowest = pred.argmax(axis=2)[..., None]
            err = np.take_along_axis(meas, slowest, 2) / np.take_along_axis(pred, slowest, 2) - 1
            m, pr = (
                float(meas.max(axis=2).sum(axis=1).mean()),
                float(pred.max(axis=2).sum(axis=1).mean()),
            )
            out[case][p] = {"measured_us": m, "modelled_us": pr, "ratio": m / pr,
                            "slowest_error": float(np.median(err)),
                            "active": float(active[ix].mean())}  # fmt: skip
    return out


def render(files: list[tuple[str, dict[str, Any]]], priced_by: str) -> str:
    lines = [
        "## How the cost model prices each policy's layouts, against their measured GEMMs "
        f"(`bench_model_on_layouts`), priced by {priced_by} — an emulation: no all-to-all",
        "",
        "CPU, from the timings GPU runs saved (`bench_ep_regimes --measure --save-timings`, "
        "benchmarks/results/timings; each rank's grouped GEMMs timed on one GPU). Per policy: "
        "mean step time (slowest rank per layer, summed) measured and modelled, measured / "
        "modelled, the model's error on the rank it calls slowest (median; + : the rank "
        "took longer than modelled) and active slots per GPU. The GPU, versions and run of "
        "each file: benchmarks/results/timings/README.md. `python3 -m "
        "benchmarks.bench_model_on_layouts FILE.npz ...`.",
    ]
    for path, cases in files:
        for case, pols in cases.items():
            lines += ["", f"### {Path(path).name}: {case}", "",
                      "| policy | measured us | modelled us | measured / modelled "
                      "| error on the model's slowest rank | active slots |",
                      "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
            for p, r in pols.items():
                lines.append(
                    f"| {p} | {r['measured_us']:.1f} | {r['modelled_us']:.1f} "
                    f"| {r['ratio']:.3f} | {100 * r['slowest_error']:+.1f}% | {r['active']:.2f} |"
                )
            t, k = pols.get("eplbd-time"), pols.get("eplbd-tokens")
            if t and k:
                lines += ["", f"The time objective's layouts: measured / modelled "
                          f"{100 * (t['ratio'] / k['ratio'] - 1):+.1f}% against the token "
                          "objective's (+ : the model overstates what the time objective "
                          "gains)."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="timings saved by bench_ep_regimes --save-timings")
    ap.add_argument("--calibration", default="nvidia-h100-80gb-hbm3",
                    help="the card whose stored calibration prices the workloads")  # fmt: skip
    ap.add_argument(
        "--model",
        default=None,
        metavar="FILE.json",
        help="price with this cost model (a CostModel JSON, for its expert shape)",
    )
    ap.add_argument("--doc", choices=("yes", "no"), default="no")
    a = ap.parse_args(argv)
    if a.model:
        one = CostModel.from_json(Path(a.model).read_text())
        # the shape the model was calibrated for; the cases of other shapes are refused
        models = {
            k: one for k, sh in SHAPES.items() if (sh.hidden, sh.ffn) == (one.hidden, one.ffn)
        }
        priced_by = Path(a.model).name
    else:
        models, priced_by = stored_models(a.calibration), f"the {a.calibration} calibration"
    # the saved times are the GEMMs alone: price them as bench_ep_regimes scores its steps
    models = {k: m.without_dispatch() for k, m in models.items()}
    done = []
    for f in a.files:
        if not Path(f).is_file():
            raise SystemExit(f"{f}: no such file")
        with np.load(f) as z:
            done.append((f, score(z, models)))
    md = render(done, priced_by)
    print(md)
    if a.doc == "yes":
        write_section(f"{SECTION}-{Path(a.model).stem if a.model else a.calibration}", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
