"""eplbd.controller: the central planner daemon (``eplbd planner``).

Pure core, thin plumbing:

- :class:`LoadWindow` / :func:`logical_load` (``_window``): physical counts [L, P] -> logical
  load [L, E] with the phy2log of the snapshot's epoch; sliding windows and an EWMA forecast;
- :func:`decide` / :class:`TriggerPolicy` / :class:`Decision` (``_trigger``): when and where a
  new placement pays for itself (in rows, or in modelled time with a :class:`TimeModel`) (threshold, cooldown, move budget, freeze, force, rollback),
  with the reason and per-layer figures of every decision;
- :class:`Attempt` (``_commit``): the two-phase commit of one epoch as a state machine;
- :class:`StateStore` / :class:`GroupRecord` (``_store``): atomic per-group state files;
- :class:`PlannerCore` (``_core``): all groups and rules; frames in, messages out; no sockets.
  Split by what it decides: state (``_state``), registration (``_registration``), commit
  orchestration (``_orchestration``), status views (``_views``);
- :class:`PlannerService` / :class:`PlannerSettings` (``_service``, ``_settings``): sockets,
  poll loop, metrics, sd_notify; daemon or embedded in an agent (``run_in_thread``).

The status and command data schemas are in ``docs/daemons.md`` ("Planner daemon").

Names are imported on first use (PEP 562), so ``eplbd planner --help`` and a bad setting
(exit 78) answer without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eplbd.controller._commit import Attempt, Effect
    from eplbd.controller._core import (
        STATUS_SCHEMA_VERSION,
        CoreConfig,
        GroupState,
        Outbound,
        PlannerCore,
    )
    from eplbd.controller._figures import (
        TimeFigures,
        TimeModel,
        balance,
        gpu_loads,
        lower_bound_balance,
        slot_loads,
        total_balance,
    )
    from eplbd.controller._metrics import PlannerMetrics
    from eplbd.controller._service import PlannerService
    from eplbd.controller._settings import (
        EMBEDDED_CONTROL_SOCKET,
        EMBEDDED_SNAPSHOT_SOCKET,
        PlannerSettings,
        check_planner_settings,
        snapshot_endpoint_for,
    )
    from eplbd.controller._store import (
        STATE_SCHEMA_VERSION,
        GroupRecord,
        StateStore,
        StoreCorrupt,
        StoreLocked,
        StoreUnusable,
        atomic_write,
    )
    from eplbd.controller._trigger import (
        Decision,
        LayerFigures,
        PlanFn,
        TriggerPolicy,
        decide,
        rollback_decision,
    )
    from eplbd.controller._window import LoadWindow, logical_load

_EXPORTS: dict[str, str] = {
    "Attempt": "_commit",
    "Effect": "_commit",
    "CoreConfig": "_core",
    "GroupState": "_core",
    "Outbound": "_core",
    "PlannerCore": "_core",
    "STATUS_SCHEMA_VERSION": "_core",
    "TimeFigures": "_figures",
    "TimeModel": "_figures",
    "balance": "_figures",
    "gpu_loads": "_figures",
    "lower_bound_balance": "_figures",
    "slot_loads": "_figures",
    "total_balance": "_figures",
    "PlannerMetrics": "_metrics",
    "PlannerService": "_service",
    "EMBEDDED_CONTROL_SOCKET": "_settings",
    "EMBEDDED_SNAPSHOT_SOCKET": "_settings",
    "PlannerSettings": "_settings",
    "check_planner_settings": "_settings",
    "snapshot_endpoint_for": "_settings",
    "GroupRecord": "_store",
    "STATE_SCHEMA_VERSION": "_store",
    "StateStore": "_store",
    "StoreCorrupt": "_store",
    "StoreLocked": "_store",
    "StoreUnusable": "_store",
    "atomic_write": "_store",
    "Decision": "_trigger",
    "LayerFigures": "_trigger",
    "PlanFn": "_trigger",
    "TriggerPolicy": "_trigger",
    "decide": "_trigger",
    "rollback_decision": "_trigger",
    "LoadWindow": "_window",
    "logical_load": "_window",
}

__all__ = [
    "Attempt",
    "CoreConfig",
    "Decision",
    "EMBEDDED_CONTROL_SOCKET",
    "EMBEDDED_SNAPSHOT_SOCKET",
    "Effect",
    "GroupRecord",
    "GroupState",
    "LayerFigures",
    "LoadWindow",
    "Outbound",
    "PlanFn",
    "PlannerCore",
    "PlannerMetrics",
    "PlannerService",
    "PlannerSettings",
    "STATE_SCHEMA_VERSION",
    "STATUS_SCHEMA_VERSION",
    "StateStore",
    "StoreCorrupt",
    "StoreLocked",
    "StoreUnusable",
    "TimeFigures",
    "TimeModel",
    "TriggerPolicy",
    "atomic_write",
    "balance",
    "check_planner_settings",
    "decide",
    "gpu_loads",
    "logical_load",
    "lower_bound_balance",
    "rollback_decision",
    "slot_loads",
    "snapshot_endpoint_for",
    "total_balance",
]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'eplbd.controller' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"eplbd.controller.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
