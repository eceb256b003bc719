"""``eplbd agent``: run the node agent daemon in this process until SIGTERM.

::

    eplbd agent --planner tcp://planner-host:7050 --runtime-dir /run/eplbd
    eplbd agent --embedded-planner --runtime-dir /run/eplbd --state-dir /var/lib/eplbd

Settings: defaults < ``--config FILE`` (``[agent]`` table) < ``EPLBD_AGENT_*``/``EPLBD_*`` <
flags; a bad one exits 78 naming the field. The settings are logged at start. Under systemd
(``Type=notify``): READY once the sockets are bound, STATUS lines, WATCHDOG only while the
loop turns, STOPPING on SIGTERM. Another agent on the same runtime directory: exit 1. With
``--embedded-planner``, the planner's start failures exit as ``eplbd planner`` does (78 for
an unreadable state file or an unusable state directory; ``--reset-state`` moves such a file
aside).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from types import FrameType

from eplbd.ops import settings as cfg
from eplbd.ops.exits import EXIT_CONFIG, EXIT_ERROR, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from eplbd.agent._settings import AgentSettings

    cfg.add_arguments(parser, AgentSettings)


def run(args: argparse.Namespace) -> int:
    from eplbd.agent import (
        AgentDaemon,
        AgentSettings,
        check_agent_settings,
        embedded_planner_settings,
    )
    from eplbd.cli.planner_cmd import start_failure
    from eplbd.ops import sdnotify
    from eplbd.ops.logging import configure_logging, get_logger
    from eplbd.ops.sdnotify import Watchdog

    try:
        settings = cfg.load(AgentSettings, args)
        check_agent_settings(settings)
        planner_settings = None
        if settings.embedded_planner:
            config = (
                getattr(args, "config", None)
                or os.environ.get("EPLBD_AGENT_CONFIG")
                or os.environ.get("EPLBD_CONFIG")
            )
            planner_settings = embedded_planner_settings(settings, config=config)
    except cfg.ConfigError as e:
        print(f"eplbd agent: {e}", file=sys.stderr)
        return EXIT_CONFIG

    configure_logging(settings.log_level)
    log = get_logger("eplbd.agent")
    log.info("settings", **cfg.describe(settings))
    if planner_settings is not None:
        log.info("embedded planner settings", **cfg.describe(planner_settings))

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    daemon = AgentDaemon(settings, watchdog=Watchdog(), planner_settings=planner_settings)
    try:
        daemon.open()
    except Exception as e:  # BindError (another agent), the planner's store locked, ...
        # the embedded planner fails as `eplbd planner` does: same message, same exit code
        code, message = start_failure(e) or (EXIT_ERROR, str(e))
        log.error("agent cannot start", error=message, kind=type(e).__name__)
        print(f"eplbd agent: {message}", file=sys.stderr)
        return code
    ep = daemon.endpoints
    log.info(
        "agent serving",
        agent=settings.node,
        incarnation=daemon.incarnation,
        workers=ep.agent,
        snapshots=ep.snapshots,
        planner=ep.planner,
        planner_snapshots=ep.planner_snapshots,
        embedded_planner=settings.embedded_planner,
        metrics=daemon.metrics_url,
    )
    sdnotify.ready(f"serving workers on {ep.agent}; planner {ep.planner}")
    try:
        daemon.run(stop)
    finally:
        sdnotify.stopping("agent stopping")
        daemon.close()
        log.info("agent stopped")
    return EXIT_OK
