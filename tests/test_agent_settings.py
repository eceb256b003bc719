"""The agent's settings and control calls: what is refused, and where."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from test_agent_daemon import FakePlanner, settings_for

from eplbd.agent import Schedule, start_agent
from eplbd.agent._settings import AgentSettings, check_agent_settings
from eplbd.ops.settings import ConfigError

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "field, value",
    [
        ("planner_snapshots", "tcp://10.0.0.5:7999"),
        ("curve_secret_key", Path("/k/agent.key_secret")),
        ("curve_server_key", Path("/k/planner.key")),
    ],
)
def test_embedded_planner_refuses_settings_it_would_not_use(
    rundir: Path, field: str, value: Any
) -> None:
    """The embedded planner's links are the agent's own ipc sockets, without CURVE: a
    snapshot endpoint or CURVE keys given with it were ignored (or, the keys, applied to the
    ipc link, which then never came up)."""
    s = AgentSettings(runtime_dir=rundir, embedded_planner=True, metrics=None, **{field: value})
    with pytest.raises(ConfigError) as info:
        check_agent_settings(s)
    assert field in str(info.value) and "embedded" in str(info.value)


def test_a_bad_schedule_is_refused_by_the_caller_and_the_loop_lives_on(
    ctx: zmq.Context[Any], rundir: Path
) -> None:
    fp = FakePlanner(ctx)
    agent = start_agent(settings_for(rundir, fp))
    try:
        with pytest.raises(ValueError, match="bad schedule"):
            agent.daemon.set_schedule(Schedule(4, 8, True))
        # a queued call that fails (here, the core's own check) is logged, not fatal
        agent.daemon.call(lambda core: core.set_schedule(Schedule(4, 8, True)))
        agent.daemon.set_schedule(Schedule(16, 8, True))
        deadline = time.monotonic() + 20
        while agent.daemon.core.schedule != Schedule(16, 8, True):
            assert time.monotonic() < deadline, "the loop never applied the good schedule"
            time.sleep(0.02)
        assert agent.thread.is_alive()
    finally:
        agent.stop()
        fp.close()
