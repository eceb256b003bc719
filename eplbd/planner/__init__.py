"""eplbd.planner: where expert replicas should live. Pure: tensors in, tensors out.

- :func:`rebalance_experts`: DeepSeek's EPLB, the baseline (same results as its reference);
- :func:`plan` / :func:`plan_with_report`: the migration-aware planner the daemon uses, and
  its per-layer explanation (:class:`PlanResult`);
- :func:`lower_bound`, :func:`replica_counts`: the best any layout can do, and the replica
  counts that reach the per-replica part of it;
- :func:`gpu_loads`, :func:`balance`, :func:`aggregate_balance`, :func:`bound_ratio`,
  :func:`moves_between`: how good a layout is for a load, and what changing it costs;
- :class:`SlidingWindow`, :class:`Ewma`: forecasts of the next window's load.

See docs/planner.md.
"""

from __future__ import annotations

from eplbd.layout import moves_between
from eplbd.planner._apportion import lower_bound, replica_counts
from eplbd.planner._deepseek import rebalance_experts
from eplbd.planner._forecast import Ewma, SlidingWindow
from eplbd.planner._metrics import aggregate_balance, balance, bound_ratio, gpu_loads
from eplbd.planner._plan import POLICIES, REASONS, PlanResult, plan, plan_with_report

__all__ = [
    "Ewma",
    "POLICIES",
    "PlanResult",
    "REASONS",
    "SlidingWindow",
    "aggregate_balance",
    "balance",
    "bound_ratio",
    "gpu_loads",
    "lower_bound",
    "moves_between",
    "plan",
    "plan_with_report",
    "rebalance_experts",
    "replica_counts",
]
