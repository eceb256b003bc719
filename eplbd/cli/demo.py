"""``eplbd demo``: the whole system on this machine, no GPU needed, in about a minute.

::

    eplbd demo [--workers N] [--layers L] [--steps K] [--trace [FILE]] [--json]

Starts an agent with the embedded planner and N worker processes (EP ranks on gloo) that
serve a MoE layer stack with real expert FFN weights through ``EplbClient``, driven by a
skewed router whose hot experts drift (or, with ``--trace``, by the ESFT routing trace replayed
domain after domain). Shows the measured balance per layer before and after each rebalance,
the epochs, moves and commit times, checks every output against the no-EPLB reference, and
ends with a summary (``--json``: one JSON object on stdout, progress on stderr).

Exit codes: 0 when every output matched and at least one rebalance committed on every rank;
1 otherwise (or when a process failed); 2 for impossible shapes; 78 for a trace file that
cannot be replayed (not an .npz of <domain>_topk_ids integer arrays); 130 on Ctrl-C (after
stopping every process and removing the temporary directory). See docs/demo.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from types import FrameType

from eplbd.cli._output import Output, add_output_arguments
from eplbd.ops.exits import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_USAGE

__all__ = ["add_arguments", "build_config", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=4, metavar="N", help="EP ranks (default 4)")
    parser.add_argument("--layers", type=int, default=4, metavar="L", help="MoE layers (default 4)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="K",
        help="forward steps (default 480; 400 with --trace)",
    )
    parser.add_argument(
        "--trace",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="replay a routing trace (default file: benchmarks/data/esft_routing_ids.npz)",
    )
    parser.add_argument(
        "--tokens", type=int, default=64, metavar="T", help="tokens per worker per step (64)"
    )
    parser.add_argument(
        "--experts", type=int, default=None, metavar="E", help="experts per layer (16; trace: 64)"
    )
    parser.add_argument(
        "--slots-per-gpu",
        type=int,
        default=None,
        metavar="S",
        help="expert slots per worker (default: E/N rounded up, plus 2 (trace: 4) redundant)",
    )
    parser.add_argument(
        "--top-k", type=int, default=None, metavar="K", help="experts per token (2; trace: 6)"
    )
    parser.add_argument("--seed", type=int, default=0, help="model and workload seed")
    parser.add_argument(
        "--forecast",
        choices=("ewma", "regime"),
        default="ewma",
        help="the planner's forecast: ewma, or regime (the mean since the traffic changed)",
    )
    parser.add_argument(
        "--keep-dir", action="store_true", help="keep the temporary run directory (logs)"
    )
    add_output_arguments(parser, watch=False)


def build_config(args: argparse.Namespace) -> object:
    """A :class:`~eplbd.demo._config.DemoConfig` from the flags (ValueError if impossible)."""
    from eplbd.demo._config import DemoConfig

    trace = args.trace
    cfg = DemoConfig(workers=args.workers, layers=args.layers, tokens=args.tokens, seed=args.seed)
    cfg = replace(cfg, tuning=replace(cfg.tuning, forecast=args.forecast))
    if trace is not None:
        from eplbd.demo._trace import default_trace_path, load_trace, pick_layers

        path = trace or str(default_trace_path())
        probe = load_trace(path, [0])  # TraceError: the file itself is wrong (exit 78)
        layers = pick_layers(probe.layers_in_file, args.layers)
        cfg = replace(
            cfg,
            trace=str(path),
            trace_layers=tuple(layers),
            layers=len(layers),
            experts=probe.num_experts,
            top_k=probe.top_k,
            steps=400,
        )
        if args.top_k is not None and args.top_k != probe.top_k:
            raise ValueError(f"the trace routes top-{probe.top_k}; --top-k cannot change it")
        if args.experts is not None and args.experts != probe.num_experts:
            raise ValueError(
                f"the trace has {probe.num_experts} experts; --experts cannot change it"
            )
    else:
        if args.experts is not None:
            cfg = replace(cfg, experts=args.experts)
        if args.top_k is not None:
            cfg = replace(cfg, top_k=args.top_k)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.slots_per_gpu is not None:
        slots = args.slots_per_gpu
    else:
        slots = -(-cfg.experts // max(1, cfg.workers)) + (4 if trace is not None else 2)
    cfg = replace(cfg, slots_per_gpu=slots)
    cfg.check()
    return cfg


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from eplbd.demo._config import DemoConfig
    from eplbd.demo._display import Display, render_summary
    from eplbd.demo._driver import DemoError, DemoRun
    from eplbd.demo._trace import TraceError

    try:
        cfg = build_config(args)
    except TraceError as e:
        print(f"eplbd demo: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as e:
        print(f"eplbd demo: {e}", file=sys.stderr)
        return EXIT_USAGE
    assert isinstance(cfg, DemoConfig)
    if args.json:
        out = Output(sys.stderr, color=args.color, ascii=True if args.ascii else None)
    else:
        out = Output.from_args(args)
    live = bool(getattr(out.stream, "isatty", lambda: False)())
    display = Display(out, live=live)
    out.line(
        out.style("eplbd demo", "bold")
        + f": {cfg.workers} workers (EP ranks on gloo), {cfg.layers} layers x {cfg.experts} "
        + f"experts in {cfg.num_physical} slots, top-{cfg.top_k}, {cfg.tokens * cfg.workers} "
        + "tokens per step, "
        + (
            f"replaying {cfg.trace} (domains in sequence)"
            if cfg.trace
            else "a skewed router whose hot experts drift"
        )
    )
    demo = DemoRun(cfg, on_event=display, keep_dir=args.keep_dir)
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = demo.run()
    except KeyboardInterrupt:
        display.close()
        print("\neplbd demo: interrupted; every process stopped", file=sys.stderr)
        return 130
    except DemoError as e:
        display.close()
        print(f"eplbd demo: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, old)
    display.close()
    if args.keep_dir and demo.run_dir is not None:
        out.line(f"run directory kept: {demo.run_dir}")
    render_summary(out, summary)
    if args.json:
        from eplbd.cli._output import emit_json

        emit_json(summary, sys.stdout)
    ok = summary["outputs_match"] and summary["rebalances"] > 0
    ok = ok and summary["committed_on_all_ranks"]
    if not ok:
        why = []
        if not summary["outputs_match"]:
            why.append("outputs did not match the reference")
        if summary["rebalances"] == 0:
            why.append("nothing was rebalanced")
        if not summary["committed_on_all_ranks"]:
            why.append("ranks did not flip together")
        print(f"eplbd demo: FAILED: {'; '.join(why)}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK
