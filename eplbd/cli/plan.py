"""``eplbd plan``: the planner, offline, on a load file.

::

    eplbd plan LOADFILE --gpus G --slots P [--nodes N] [--previous LAYOUT.json]
               [--policy migration|deepseek] [--groups K] [--min-gain X] [--move-cost X]
               [--max-moves M] [--objective tokens|time] [--cost-model FILE | --expert H,F]
               [--steps N] [--exact] [--json] [-o FILE]

LOADFILE holds the load of each expert of each MoE layer, [L][E]: ``.json`` (a list of
lists of numbers), ``.npy`` or ``.pt`` (a dense real tensor, loaded with ``weights_only``). The
table shows per layer the balance (max / mean GPU load; with the time objective, max / ideal
modelled GPU time) before (under ``--previous``, or the default layout where slot p holds
expert p mod E) and after, the lower bound, the slots moved, the slots per GPU that receive
rows, and why the layer did or did not change; ``--json`` prints one object with the
layout and the same figures; ``-o`` writes the layout (Layout JSON) to FILE.

With a cost model (``--cost-model`` a calibration JSON of ``benchmarks/bench_cost_model``,
or ``--expert H,F``: the default model of an expert of hidden H and ffn F) the planner
balances modelled time (``--objective time``, the default then) and the summary shows the
token and the time balance side by side; ``--steps N``: the load was counted over N forward
steps (the model works per step); ``--exact``: the load is one step's exact rows (not a
forecast).

Exit codes: 0 ok, 2 usage, 78 bad input (unreadable or malformed file, bad shape, negative
or non-finite load or one above 2^53, inconsistent flags), 1 anything else (e.g. ``-o`` not writable).
torch and numpy are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from eplbd.cli._output import Output, add_output_arguments, write_file
from eplbd.ops.exits import EXIT_CONFIG, EXIT_ERROR, EXIT_OK

__all__ = ["add_arguments", "load_file", "run"]

PROG = "eplbd plan"

#: The largest load accepted: exact in float64, and sums over a layer stay far inside the
#: float32 range the planner may compute in (above it, sums overflow to inf, then NaN).
MAX_LOAD = float(2**53)


class InputError(Exception):
    """Bad input data or configuration: exit code 78."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "loadfile", metavar="LOADFILE", help="load per expert [L][E]: .json, .npy or .pt"
    )
    parser.add_argument("--gpus", type=int, required=True, metavar="G", help="GPUs (EP ranks)")
    parser.add_argument(
        "--slots", type=int, required=True, metavar="P",
        help="physical expert slots in all (a multiple of G, at least E)",
    )  # fmt: skip
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default 1)")
    parser.add_argument(
        "--previous", metavar="LAYOUT.json",
        help="the layout now served (Layout JSON): plan close to it",
    )  # fmt: skip
    parser.add_argument(
        "--policy", choices=("migration", "deepseek"), default="migration",
        help="migration (default): migration-aware; deepseek: DeepSeek's EPLB from scratch",
    )  # fmt: skip
    parser.add_argument(
        "--groups", type=int, default=None, metavar="K",
        help="expert groups for --policy deepseek (hierarchical when a multiple of N)",
    )  # fmt: skip
    parser.add_argument(
        "--min-gain", type=float, default=None, metavar="X",
        help="change a layer only if its balance improves by X (default 0.005)",
    )  # fmt: skip
    parser.add_argument(
        "--move-cost",
        type=float,
        default=None,
        metavar="X",
        help="balance a layer must gain to be worth rewriting all its slots (default 0.35)",
    )
    parser.add_argument(
        "--max-moves", type=int, default=None, metavar="M",
        help="change at most M slots in all (with --previous)",
    )  # fmt: skip
    parser.add_argument(
        "--objective", choices=("tokens", "time"), default=None,
        help="balance rows (tokens) or modelled GPU time (time; default with a cost model)",
    )  # fmt: skip
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--cost-model", metavar="FILE",
        help="cost model JSON (a calibration from benchmarks/bench_cost_model.py)",
    )  # fmt: skip
    model.add_argument(
        "--expert", metavar="H,F",
        help="the default cost model of an expert of hidden size H and ffn size F (bf16)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=float, default=None, metavar="N",
        help="forward steps the load was counted over (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--exact", action="store_true",
        help="the load is one step's exact rows, not a forecast (time objective)",
    )  # fmt: skip
    parser.add_argument("-o", "--output", metavar="FILE", help="write the layout JSON to FILE")
    add_output_arguments(parser)


def load_file(path: str) -> Any:
    """Read a load file into a float64 numpy array [L, E]. Raises InputError."""
    import numpy as np

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".npy", ".pt", ".pth"):
        raise InputError(f"{path}: unsupported file type {suffix or '(none)'!r} (.json, .npy, .pt)")
    try:
        if suffix == ".json":
            import json

            data: Any = json.loads(p.read_text())
            if isinstance(data, dict) and "load" in data:
                data = data["load"]
            if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
                raise InputError(f"{path}: expected a JSON list of lists [layers][experts]")
            for row in data:
                for x in row:
                    if isinstance(x, bool) or not isinstance(x, int | float):
                        raise InputError(f"{path}: load values must be numbers, got {x!r}")
        elif suffix == ".npy":
            # mapped, not read: the file must hold the data its header declares, so a tiny
            # file declaring a huge shape is refused instead of allocated
            try:
                data = np.array(np.load(p, mmap_mode="r", allow_pickle=False))
            except ValueError as e:
                if "mmap length" not in str(e):
                    raise
                raise InputError(
                    f"{path}: cannot read: the file is shorter than the shape its header "
                    "declares (truncated?)"
                ) from e
        else:
            import torch

            try:
                data = torch.load(p, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors alike
                raise InputError(f"{path}: cannot read: {_first_line(e)}") from e
            if not isinstance(data, torch.Tensor):
                raise InputError(f"{path}: expected a tensor, got {type(data).__name__}")
            # the cast to float64 would take a complex tensor's real part and a bool as 0/1
            if data.layout != torch.strided or data.is_complex() or data.dtype == torch.bool:
                raise InputError(
                    f"{path}: expected a dense tensor of real numbers, got {data.dtype} "
                    f"({str(data.layout).removeprefix('torch.')})"
                )
            data = data.detach().to(torch.float64).numpy()
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file") from e
    except RecursionError as e:  # a RuntimeError, but its message says nothing useful
        raise InputError(f"{path}: cannot read: nested too deeply") from e
    except (OSError, ValueError, RuntimeError, EOFError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {_first_line(e)}") from e
    except MemoryError as e:
        raise InputError(f"{path}: too large to load") from e
    try:
        arr = np.asarray(data)
    except ValueError as e:
        raise InputError(f"{path}: not a rectangular array: {e}") from e
    if arr.dtype == object or arr.dtype.kind not in "iuf":
        raise InputError(f"{path}: expected numbers in a rectangular [layers][experts] array")
    if arr.ndim != 2:
        raise InputError(f"{path}: expected 2 dimensions [layers][experts], got shape {arr.shape}")
    try:
        arr = arr.astype(np.float64)
    except MemoryError as e:
        raise InputError(f"{path}: too large to load ({arr.shape[0]} x {arr.shape[1]})") from e
    for bad, what in ((~np.isfinite(arr), "is not finite"), (arr > MAX_LOAD, "is above 2^53")):
        if bad.any():
            layer, expert = (int(i) for i in np.argwhere(bad)[0])
            raise InputError(
                f"{path}: load {float(arr[layer, expert]):g} at layer {layer} expert {expert} {what} "
                "(loads are token counts or rates: scale them down)"
            )
    return arr


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from e


def _read_previous(path: str) -> Any:
    from eplbd.layout import Layout, LayoutError

    text = _read_text(path)
    try:
        return Layout.from_json(text)
    except LayoutError as e:
        raise InputError(f"{path}: {e}") from e
    except RecursionError as e:  # json.loads on [[[[...: a bad file, not a crash
        raise InputError(f"{path}: not a layout JSON file: nested too deeply") from e


def _cost_model(args: argparse.Namespace) -> Any:
    """The CostModel of --cost-model or --expert, or None. Raises InputError."""
    from eplbd.planner import CostModel, default_cost_model

    if args.cost_model:
        text = _read_text(args.cost_model)
        try:
            return CostModel.from_json(text)
        except ValueError as e:
            raise InputError(f"{args.cost_model}: {e}") from e
        except RecursionError as e:  # json.loads on [[[[...: a bad file, not a crash
            raise InputError(f"{args.cost_model}: not a cost model: nested too deeply") from e
    if args.expert:
        parts = args.expert.split(",")
        try:
            h, f = (int(x) for x in parts)
            return default_cost_model(h, f)
        except ValueError as e:
            raise InputError(
                f"--expert wants H,F (two positive integers), got {args.expert!r}"
            ) from e
    return None


def _plan(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """-> (load, cost model or None, PlanResult)."""
    from eplbd.planner import plan_with_report

    load = load_file(args.loadfile)
    previous = None if args.previous is None else _read_previous(args.previous)
    model = _cost_model(args)
    kwargs: dict[str, Any] = {}
    if args.objective is not None:
        kwargs["objective"] = args.objective
    if model is not None:
        kwargs["cost_model"] = model
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.exact:
        kwargs["sampling"] = "exact"
    if args.min_gain is not None:
        kwargs["min_gain"] = args.min_gain
    if args.move_cost is not None:
        kwargs["move_cost"] = args.move_cost
    if args.max_moves is not None:
        kwargs["max_moves"] = args.max_moves
    try:
        res = plan_with_report(
            load,
            num_gpus=args.gpus,
            num_physical_experts=args.slots,
            num_nodes=args.nodes,
            previous=previous,
            policy=args.policy,
            num_groups=args.groups,
            **kwargs,
        )
    except ValueError as e:
        raise InputError(str(e)) from e
    return load, model, res


def _metrics(load: Any, model: Any, result: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What the layout does in rows and, with a model, in time: token balance, time balance
    (Σ max / Σ mean of modelled GPU times), slots per GPU that receive rows (per step)."""
    from eplbd.planner import activated_slots, aggregate_balance, time_balance

    steps = 1.0 if args.steps is None else args.steps
    sampling = "exact" if args.exact else "poisson"
    lay, G = result.layout, result.num_gpus
    act = activated_slots(load, lay, G, steps=steps, sampling=sampling)
    out: dict[str, Any] = {
        "token_balance": aggregate_balance(load, lay, G),
        "activated_slots_per_gpu": {
            "mean": float(act.mean()),
            "max": float(act.max()),
            "slots_per_gpu": lay.num_physical // G,
        },
        "layers_activated_max": [float(x) for x in act.max(dim=1).values],
    }
    if model is not None:
        out["time_balance"] = time_balance(load, lay, G, model, steps=steps, sampling=sampling)
        out["cost_model"] = {
            k: getattr(model, k) for k in ("device", "hidden", "ffn", "dtype", "source")
        }
    return out


def _render(out: Output, result: Any, metrics: dict[str, Any]) -> None:
    act = metrics["layers_activated_max"]
    rows = [
        [
            d["layer"],
            d["balance_before"],
            d["balance_after"],
            d["lower_bound"],
            d["moves"],
            f"{act[d['layer']]:.1f}",
            out.style("yes", "green") if d["changed"] else "no",
            d["reason"].replace("_", " "),
        ]
        for d in result.layers()
    ]
    out.table(
        ["layer", "before", "after", "bound", "moves", "active", "changed", "reason"],
        rows,
        align=[">", ">", ">", ">", ">", ">", "<", "<"],
    )
    s = result.summary()
    pct = 100.0 * s["moves"] / s["slots"] if s["slots"] else 0.0
    out.line()
    out.line(
        f"{s['num_layers']} layers x {s['num_logical_experts']} experts, "
        f"{s['num_physical_experts']} slots on {s['num_gpus']} GPUs"
        + (f" in {s['num_nodes']} nodes" if s["num_nodes"] > 1 else "")
        + f", policy {s['policy']}"
    )
    what = "time vs ideal" if s["objective"] == "time" else "balance"
    out.line(
        f"{what} (sum max / sum mean): {s['balance_before']:.4f} -> "
        + out.style(f"{s['balance_after']:.4f}", "bold")
        + f"  (lower bound {s['lower_bound']:.4f}; after / bound {s['bound_ratio']:.4f})"
    )
    a = metrics["activated_slots_per_gpu"]
    line = f"after: token balance {metrics['token_balance']:.4f}"
    if "time_balance" in metrics:
        line += f", modelled time balance {metrics['time_balance']:.4f}"
    line += (
        f"; slots per GPU receiving rows per step: mean {a['mean']:.2f}, max {a['max']:.2f} "
        f"of {a['slots_per_gpu']} (column active: a layer's busiest GPU)"
    )
    out.line(line)
    out.line(
        f"moves: {s['moves']} of {s['slots']} slots ({pct:.1f}%); "
        f"layers changed: {s['layers_changed']} of {s['num_layers']}"
    )


def run(args: argparse.Namespace) -> int:
    out = Output.from_args(args)
    try:
        load, model, result = _plan(args)
        metrics = _metrics(load, model, result, args)
    except InputError as e:
        print(f"{PROG}: error: {_first_line(e)}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        print(f"{PROG}: internal error: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    if args.output:
        try:
            write_file(args.output, result.layout.to_json() + "\n")
        except OSError as e:
            print(f"{PROG}: error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
            return EXIT_ERROR
    if out.json:
        figures = result.to_dict()
        figures["metrics"] = metrics
        out.emit_json({"layout": result.layout.to_dict(), "figures": figures})
    else:
        _render(out, result, metrics)
    return EXIT_OK
