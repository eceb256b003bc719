"""eplbd.demo: ``eplbd demo``, the whole system on one machine, no GPU needed (docs/demo.md).

- :class:`DemoConfig` / :class:`PlannerTuning` (``_config``): what a run does; the tolerance
  of the output check (:data:`TOLERANCE`);
- :class:`DemoRun` (``_driver``): starts the agent (embedded planner) and the workers as
  subprocesses, follows them, summarises, always cleans up; :class:`DemoError`;
- ``_worker``: one EP rank (``python3 -m eplbd.demo._worker``), imports torch;
- ``_measure``: balance from the tokens each GPU computed (pure, torch-free);
- ``_trace``: replaying a routing trace; ``_display``: the live panel and the summary.

Importing this package does not import torch; only the workers do.
"""

from __future__ import annotations

from eplbd.demo._config import TOLERANCE, DemoConfig, PlannerTuning
from eplbd.demo._driver import DemoError, DemoRun, Rebalance
from eplbd.demo._measure import Balance, StepRecord, lower_bound_max

__all__ = [
    "Balance",
    "DemoConfig",
    "DemoError",
    "DemoRun",
    "PlannerTuning",
    "Rebalance",
    "StepRecord",
    "TOLERANCE",
    "lower_bound_max",
]
