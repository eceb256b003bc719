"""``--embedded-planner``: the planner service in a thread of the agent's process.

The single-node deployment (and the demo) needs no second daemon: the agent starts the
controller's :class:`PlannerService` with ipc sockets in its own runtime directory,

- ``ipc://<runtime-dir>/planner.sock``: the planner's control socket (the agent's DEALER
  and the CLI: ``eplbd status --planner ipc://<runtime-dir>/planner.sock``),
- ``ipc://<runtime-dir>/planner-snapshots.sock``: its snapshot PULL,

and its state in ``--state-dir``. It then connects to it exactly as to a remote planner, so
both modes run the same code. The planner's metrics join the agent's registry (one
``/metrics`` endpoint per process). Planner tunables come from the ``[planner]`` table of
the same config file and ``EPLBD_PLANNER_*`` variables (:func:`embedded_planner_settings`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eplbd.ops import settings as cfg

if TYPE_CHECKING:
    from eplbd.agent._settings import AgentSettings
    from eplbd.ops.clock import Clock
    from eplbd.ops.metrics import Registry

__all__ = ["embedded_planner_settings", "start_embedded_planner"]


def embedded_planner_settings(
    agent: AgentSettings,
    *,
    config: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The embedded planner's settings: its defaults < the config file's ``[planner]`` table
    (and top-level keys) < ``EPLBD_PLANNER_*`` < what the agent fixes (ipc endpoints in the
    runtime dir, the state dir, no metrics endpoint of its own, the agent's heartbeat and log
    level; ``--reset-state`` of either). Raises :class:`~eplbd.ops.ConfigError`."""
    from eplbd.controller import PlannerSettings

    args: dict[str, Any] = {"config": str(config)} if config is not None else {}
    env = {
        k: v
        for k, v in (os.environ if environ is None else environ).items()
        if k.startswith("EPLBD_PLANNER_")
    }
    base = cfg.load(PlannerSettings, args, env)
    overrides = {
        "reset_state": agent.reset_state or base.reset_state,
        "heartbeat_s": agent.heartbeat_s,
        "log_level": agent.log_level,
    }
    return PlannerSettings.embedded(
        agent.runtime_dir,
        agent.state_dir,
        **{**_fields_of(base), **overrides},
    )


def _fields_of(s: Any) -> dict[str, Any]:
    fixed = {"listen", "snapshot_listen", "state_dir", "metrics"}
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in fixed}


def start_embedded_planner(planner_settings: Any, *, clock: Clock, registry: Registry) -> Any:
    """Start the planner service in a thread; return it once it serves (``.stop()`` ends it).

    ``clock`` is the agent's (one time base per process), ``registry`` the agent's metrics
    registry (one ``/metrics`` endpoint per process). Raises what kept it from starting (its
    state dir locked by another planner, a corrupt state file, a socket in use)."""
    from eplbd.controller import PlannerService

    svc = PlannerService(planner_settings, clock=clock, registry=registry)
    return svc.run_in_thread()
