"""The agent's settings: one frozen dataclass read by :func:`eplbd.ops.settings.load`.

Defaults < config file (``[agent]`` table, or top-level keys) < ``EPLBD_AGENT_*`` /
``EPLBD_*`` environment < flags. :func:`check_agent_settings` adds the rules that involve
several fields (raises :class:`~eplbd.ops.ConfigError` naming the field; exit code 78).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from eplbd.controller import EMBEDDED_CONTROL_SOCKET, EMBEDDED_SNAPSHOT_SOCKET
from eplbd.ops import settings as cfg
from eplbd.ops.settings import ConfigError

__all__ = [
    "AGENT_SOCKET",
    "AgentSettings",
    "PLANNER_SNAPSHOTS_SOCKET",
    "PLANNER_SOCKET",
    "SNAPSHOTS_SOCKET",
    "check_agent_settings",
    "planner_snapshot_endpoint",
]

AGENT_SOCKET = "agent.sock"
SNAPSHOTS_SOCKET = "snapshots.sock"
#: With --embedded-planner, the planner's control socket (for the agent and the CLI,
#: ``planner.sock``) and its snapshot socket (``planner-snapshots.sock``) live in the runtime
#: directory too; the names are the controller's.
PLANNER_SOCKET: str = EMBEDDED_CONTROL_SOCKET
PLANNER_SNAPSHOTS_SOCKET: str = EMBEDDED_SNAPSHOT_SOCKET

_IPC_MAX = 107


def _check_node(value: Any) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= 200 or not value.isprintable():
        raise ValueError(f"{value!r} must be 1..200 printable characters")


def _check_metrics(value: Any) -> None:
    if value is None or value == "":
        return
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: expected HOST:PORT (port 0 for any free port)")


def planner_snapshot_endpoint(control: str) -> str:
    """Where the planner's snapshot PULL is, given its control endpoint (the planner's own
    rule): ``tcp://host:7050`` -> ``tcp://host:7051`` (control port + 1);
    ``ipc://DIR/NAME`` -> ``ipc://DIR/planner-snapshots.sock``. Raises ValueError."""
    from eplbd.controller import snapshot_endpoint_for

    endpoint: str = snapshot_endpoint_for(control)
    return endpoint


@dataclass(frozen=True)
class AgentSettings:
    """Everything ``eplbd agent`` reads (reference table: docs/daemons.md, ``## Agent``)."""

    ENV_PREFIXES: ClassVar[tuple[str, ...]] = ("EPLBD_AGENT_", "EPLBD_")
    CONFIG_SECTION: ClassVar[str | None] = "agent"

    planner: str | None = cfg.setting(
        None,
        help="planner control endpoint, e.g. tcp://planner-host:7050",
        check=cfg.check_endpoint("tcp", "ipc"),
    )
    planner_snapshots: str | None = cfg.setting(
        None,
        help="planner snapshot endpoint (default: control port + 1; ipc: planner-snapshots.sock)",
        check=cfg.check_endpoint("tcp", "ipc"),
    )
    embedded_planner: bool = cfg.setting(
        False, help="run the planner in this process (single node), on ipc in the runtime dir"
    )
    runtime_dir: Path = cfg.setting(
        Path("/run/eplbd"),
        help="directory of the ipc sockets (agent.sock, snapshots.sock, planner.sock)",
        check=cfg.check_path(absolute=True, directory=True),
    )
    state_dir: Path = cfg.setting(
        Path("/var/lib/eplbd"),
        help="the embedded planner's state directory",
        check=cfg.check_path(absolute=True, directory=True),
    )
    reset_state: bool = cfg.setting(
        False,
        help="the embedded planner: move unreadable state files aside (<file>.corrupt-<time>) "
        "instead of refusing to start",
    )
    node: str = cfg.setting(
        default_factory=socket.gethostname,
        shown_default="the host name",
        help="this node's name (also the agent's id at the planner)",
        check=_check_node,
    )
    window_steps: int = cfg.setting(256, help="recording window length in steps", min=1)
    record_steps: int = cfg.setting(
        64, help="steps recorded per window (the duty cycle's on-time)", min=0
    )
    recording: bool = cfg.setting(True, help="tell workers to record load at all")
    heartbeat_s: float = cfg.setting(
        1.0, help="heartbeat interval to workers and planner, seconds", min=0.01, max=60.0
    )
    dead_timeout_s: float = cfg.setting(
        5.0, help="a worker or planner silent this long is gone, seconds", min=0.05, max=3600.0
    )
    merge_timeout_s: float = cfg.setting(
        2.0,
        help="how long a window's snapshot waits for the other local ranks, seconds",
        min=0.01,
        max=600.0,
    )
    held_snapshots: int = cfg.setting(
        16, help="merged snapshots kept per group while the planner is away", min=1, max=4096
    )
    curve_secret_key: Path | None = cfg.setting(
        None,
        help="this agent's CURVE secret key file (NAME.key_secret) for the planner hop",
        check=cfg.check_path(absolute=True),
    )
    curve_server_key: Path | None = cfg.setting(
        None,
        help="the planner's CURVE public key file (NAME.key)",
        check=cfg.check_path(absolute=True),
    )
    metrics: str | None = cfg.setting(
        "127.0.0.1:9471",
        help="HOST:PORT of the Prometheus /metrics endpoint (empty: off; port 0: any free port)",
        check=_check_metrics,
    )
    log_level: str = cfg.setting(
        "info", help="log level", choices=("debug", "info", "warning", "error")
    )


def check_agent_settings(s: AgentSettings) -> None:
    """The rules between fields. Raises ConfigError naming the field."""
    if s.embedded_planner and s.planner is not None:
        raise ConfigError("planner", "give --planner or --embedded-planner, not both")
    if s.embedded_planner:
        # the embedded planner's endpoints are this agent's own ipc sockets, without CURVE
        # (protocol.md): these settings would be unused, so they are refused, not ignored
        for name in ("planner_snapshots", "curve_secret_key", "curve_server_key"):
            if getattr(s, name) is not None:
                raise ConfigError(
                    name,
                    "not used with --embedded-planner (its links are ipc, without CURVE): "
                    "leave it out, or give --planner",
                )
    if not s.embedded_planner and s.planner is None:
        raise ConfigError(
            "planner", "no planner: give --planner tcp://HOST:PORT or --embedded-planner"
        )
    if s.record_steps > s.window_steps:
        raise ConfigError(
            "record_steps", f"{s.record_steps} is more than window_steps ({s.window_steps})"
        )
    if s.dead_timeout_s <= s.heartbeat_s:
        raise ConfigError(
            "dead_timeout_s",
            f"{s.dead_timeout_s} must be longer than heartbeat_s ({s.heartbeat_s}); "
            "about 5 heartbeats is usual",
        )
    if (s.curve_secret_key is None) != (s.curve_server_key is None):
        missing = "curve_server_key" if s.curve_server_key is None else "curve_secret_key"
        raise ConfigError(missing, "CURVE needs both curve_secret_key and curve_server_key")
    for name in (AGENT_SOCKET, SNAPSHOTS_SOCKET, PLANNER_SNAPSHOTS_SOCKET + ".lock"):
        path = str(s.runtime_dir / name)
        if len(path.encode()) >= _IPC_MAX:
            raise ConfigError(
                "runtime_dir",
                f"{path!r} is {len(path.encode())} bytes; ipc paths must be shorter than "
                f"{_IPC_MAX}: use a shorter directory",
            )
    if s.planner is not None and s.planner_snapshots is None:
        try:
            # derived: port 65535 has no port + 1, and an ipc path may grow too long
            cfg.check_endpoint("tcp", "ipc")(planner_snapshot_endpoint(s.planner))
        except ValueError as e:
            raise ConfigError(
                "planner_snapshots", f"no default from planner ({e}): set planner_snapshots"
            ) from None
