"""`eplbd planner`: the central planner daemon (see docs/daemons.md, "Planner daemon").

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 78 on a bad setting or an unreadable
state file (systemd does not restart: restarting would fail the same way), 1 when another
planner holds the state directory or a socket cannot be bound.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from eplbd.ops import settings as cfg
from eplbd.ops.exits import EXIT_CONFIG, EXIT_ERROR, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from eplbd.controller._settings import PlannerSettings

    cfg.add_arguments(parser, PlannerSettings)


def run(args: argparse.Namespace) -> int:
    from eplbd.controller._settings import PlannerSettings, check_planner_settings

    given = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = cfg.load(PlannerSettings, given)
        check_planner_settings(settings)
    except cfg.ConfigError as e:
        print(f"eplbd planner: {e}", file=sys.stderr)
        return EXIT_CONFIG
    # only now the heavy imports (torch, zmq): a bad setting answers fast
    from eplbd.controller import PlannerService, StoreCorrupt, StoreLocked
    from eplbd.ops.logging import configure_logging, get_logger
    from eplbd.wire import BindError

    json_logs = None if settings.log_format == "auto" else settings.log_format == "json"
    configure_logging(settings.log_level, json_logs)
    log = get_logger("eplbd.controller")
    log.info("settings", settings=cfg.describe(settings), sources=cfg.sources(settings))

    service = PlannerService(settings, notify=True)
    try:
        service.open()
    except StoreCorrupt as e:
        log.error("state unreadable", error=str(e), path=str(e.path))
        print(f"eplbd planner: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreLocked as e:
        log.error("state directory locked", error=str(e))
        print(f"eplbd planner: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        log.error("state directory unusable", error=str(e))
        print(f"eplbd planner: cannot use state directory: {e}", file=sys.stderr)
        return EXIT_CONFIG

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal", signal=signal.Signals(signum).name)
        service.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service.run()
    except BindError as e:
        log.error("cannot bind", error=str(e))
        print(f"eplbd planner: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (FileNotFoundError, ValueError) as e:  # CURVE key files
        log.error("cannot start", error=str(e))
        print(f"eplbd planner: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK
