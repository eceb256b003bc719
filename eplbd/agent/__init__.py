"""eplbd.agent: the node agent daemon (``eplbd agent``), one per GPU node.

It registers the node's workers (``hello`` -> ``welcome`` with the recording schedule and the
group's last committed layout), merges their load snapshots per window and forwards them to
the planner, relays ``prepare``/``abort`` down and ``staged``/``aborted``/``committed`` up,
detects dead workers, and rides out planner outages (holding the newest snapshots, then
resynchronising with ``agent_hello``). See docs/daemons.md, ``## Agent``.

Layers: :class:`AgentCore` (the logic, no sockets, injectable clock), :class:`AgentDaemon`
(sockets and the loop), :func:`start_agent` (an agent in a thread, for tests and the demo),
``eplbd.cli.agent_cmd`` (the daemon process).
"""

from __future__ import annotations

from eplbd.agent._core import (
    HELLO_REQUIRED,
    PLANNER,
    PLANNER_SNAPSHOTS,
    WORKER,
    AgentCore,
    CoreConfig,
    Schedule,
    Send,
)
from eplbd.agent._daemon import AgentDaemon, RunningAgent, start_agent
from eplbd.agent._embedded import embedded_planner_settings, start_embedded_planner
from eplbd.agent._merge import Merged, SnapshotMerger
from eplbd.agent._metrics import AgentMetrics
from eplbd.agent._settings import (
    AGENT_SOCKET,
    PLANNER_SNAPSHOTS_SOCKET,
    PLANNER_SOCKET,
    SNAPSHOTS_SOCKET,
    AgentSettings,
    check_agent_settings,
    planner_snapshot_endpoint,
)

__all__ = [
    "AGENT_SOCKET",
    "AgentCore",
    "AgentDaemon",
    "AgentMetrics",
    "AgentSettings",
    "CoreConfig",
    "HELLO_REQUIRED",
    "Merged",
    "PLANNER",
    "PLANNER_SNAPSHOTS",
    "PLANNER_SNAPSHOTS_SOCKET",
    "PLANNER_SOCKET",
    "RunningAgent",
    "SNAPSHOTS_SOCKET",
    "Schedule",
    "Send",
    "SnapshotMerger",
    "WORKER",
    "check_agent_settings",
    "embedded_planner_settings",
    "planner_snapshot_endpoint",
    "start_agent",
    "start_embedded_planner",
]
