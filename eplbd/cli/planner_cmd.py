"""`eplbd planner`: the central planner daemon (see docs/daemons.md, "Planner daemon").

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 78 on a bad setting, an unreadable state
file, a state directory that cannot be written or a bad CURVE key file (systemd does not
restart: restarting would fail the same way), 1 when another planner holds the state
directory or a socket or the metrics port cannot be bound. ``eplbd agent --embedded-planner``
exits with the same codes and messages for the same causes (:func:`start_failure`).
SIGHUP re-reads the CURVE allow-list (systemd's ExecReload).
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from eplbd.ops import settings as cfg
from eplbd.ops.exits import EXIT_CONFIG, EXIT_ERROR, EXIT_OK

__all__ = ["add_arguments", "run", "start_failure"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from eplbd.controller._settings import PlannerSettings

    cfg.add_arguments(parser, PlannerSettings)


def start_failure(e: BaseException) -> tuple[int, str] | None:
    """Exit code and one line for what kept a planner (daemon or embedded) from starting;
    None for anything else (a bug: let it show)."""
    from eplbd.controller import StoreCorrupt, StoreLocked, StoreUnusable
    from eplbd.wire import BindError

    if isinstance(e, StoreCorrupt | StoreUnusable):
        return EXIT_CONFIG, str(e)
    if isinstance(e, StoreLocked | BindError):
        return EXIT_ERROR, str(e)
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return EXIT_ERROR, str(e)  # the metrics endpoint (the message names it)
    return None


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
    from eplbd.controller import PlannerService
    from eplbd.ops.logging import configure_logging, get_logger

    json_logs = None if settings.log_format == "auto" else settings.log_format == "json"
    configure_logging(settings.log_level, json_logs)
    log = get_logger("eplbd.controller")
    log.info("settings", settings=cfg.describe(settings), sources=cfg.sources(settings))

    service = PlannerService(settings, notify=True)

    def failed(e: BaseException) -> int:
        known = start_failure(e)
        if known is None and isinstance(e, FileNotFoundError | ValueError):
            known = EXIT_CONFIG, str(e)  # a CURVE key file
        if known is None:
            raise e
        code, message = known
        log.error("planner cannot start", error=message, kind=type(e).__name__)
        print(f"eplbd planner: {message}", file=sys.stderr)
        return code

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal", signal=signal.Signals(signum).name)
        service.request_stop()

    def on_hup(signum: int, frame: Any) -> None:
        log.info("signal", signal="SIGHUP")
        service.request_reload()

    signal.signal(signal.SIGHUP, on_hup)  # its default action would kill the planner
    try:
        service.open()
    except Exception as e:
        return failed(e)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        service.run()
    except Exception as e:
        return failed(e)
    return EXIT_OK
