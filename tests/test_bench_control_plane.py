"""The control-plane benchmark (benchmarks/bench_control_plane.py) as a CPU smoke test.

A real ``eplbd planner``, two real ``eplbd agent`` processes and four simulated ranks on
their ipc sockets, a tiny model, a few commits, then an agent SIGSTOPped mid-commit and the
planner SIGKILLed mid-commit and restarted: after each, the planner's status must come back
to what every rank serves (within the benchmark's settle limit: a correctness check, not a
speed one), and no agent loads torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from eplbd_client._recorder import window_at  # noqa: E402

from benchmarks._cp_sim import window_at as sim_window_at  # noqa: E402
from benchmarks.bench_control_plane import SCENARIOS, Timing, run_scenario  # noqa: E402

FAST = Timing(
    steps_per_s=40.0,
    staging_s=0.2,
    sync_interval=8,
    window_steps=8,
    record_steps=4,
    heartbeat_s=0.5,
    dead_timeout_s=2.0,
    merge_timeout_s=0.5,
    prepare_timeout_s=5.0,
    commit_timeout_s=10.0,
    window_s=0.5,
    steady_s=3.0,
    commit_every_s=1.0,
    stop_s=3.0,
    kill_down_s=1.0,
    drop_s=3.0,
    settle_limit_s=40.0,
    rank_heartbeat_s=0.5,
    drift_every_s=0.5,
)


def test_simulated_ranks_follow_the_clients_window_rule() -> None:
    for step in range(0, 200, 7):
        for w, r in ((16, 4), (8, 8), (5, 3), (1, 1)):
            assert sim_window_at(step, w, r) == window_at(step, w, r)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_control_plane_smoke_on_two_agents() -> None:
    lines: list[str] = []
    r = run_scenario(SCENARIOS["smoke"], FAST, ("agent_stop", "planner_restart"), log=lines.append)
    log = "\n".join(lines)
    assert r["register_s"] is not None, log
    steady = r["steady"]
    assert steady["agent_torch"] is False, log
    assert steady["snapshots_per_s"] > 0 and steady["merged_complete"] > 0, log
    assert r["commits"]["n"] >= 1, log
    for f in r["faults"]:
        assert f["epoch"] is not None and f["outcome"] in ("committed", "aborted"), (f, log)
        assert f["settle_s"] is not None, (f, log)  # status right for every rank again
