"""`eplbd` command line: argparse subcommands, each in its own module, imported lazily.

Lazy import keeps `eplbd status` free of torch: a subcommand module is imported only when
that subcommand runs. Each module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from eplbd.ops.exits import EXIT_OK, EXIT_USAGE

# name -> (module under eplbd.cli, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "planner": ("planner_cmd", "run the central planner daemon"),
    "agent": ("agent_cmd", "run the node agent daemon"),
    "status": ("status", "show planner, groups, agents, ranks and epochs"),
    "top": ("top", "live per-layer balance, lower bound and hot experts"),
    "heatmap": ("heatmap", "load per layer x GPU (or expert) in the terminal"),
    "history": ("history", "rebalance attempts with reason, gain, moves and outcome"),
    "rebalance": ("control", "rebalance now (or --dry-run to show the plan)"),
    "freeze": ("control", "stop rebalancing a group or some layers"),
    "unfreeze": ("control", "resume rebalancing a group or some layers"),
    "rollback": ("control", "go back to an earlier epoch's layout"),
    "layout": ("layout", "show a layout (or write it for eplbd plan --previous), or diff two"),
    "plan": ("plan", "plan a layout offline from a load file"),
    "keygen": ("keygen", "generate a CURVE key pair"),
    "demo": ("demo", "run planner, agent and workers on this machine, live"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(
        prog="eplbd", description="Online expert-parallel load balancer for MoE serving."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    module: Any = None
    for name, (mod, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(command=name)
        if name == wanted:
            module = importlib.import_module(f"eplbd.cli.{mod}")
            module.add_arguments(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        from eplbd import __version__

        print(f"eplbd {__version__}")
        return EXIT_OK
    if module is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(module.run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`eplbd history | head`): not an error of ours. Point stdout
        # at devnull so the interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
