"""eplbd.planner: where expert replicas should live. Pure: tensors in, tensors out.

- :func:`rebalance_experts`: DeepSeek's EPLB, the baseline (same results as its reference);
- :func:`plan` / :func:`plan_with_report`: the migration-aware planner the daemon uses, and
  its per-layer explanation (:class:`PlanResult`);
- :func:`lower_bound`, :func:`replica_counts`: the best any layout can do, and the replica
  counts that reach the per-replica part of it;
- :func:`gpu_loads`, :func:`balance`, :func:`aggregate_balance`, :func:`bound_ratio`,
  :func:`moves_between`: how good a layout is for a load, and what changing it costs;
- :class:`CostModel`, :class:`CostTier`, :func:`default_cost_model`: modelled time of a
  GPU's expert work (weight reads, tiles of rows, rows dispatched; tiers: the kernel's other
  tile shapes at larger sizes), the time objective's measure;
  :func:`gpu_times`, :func:`time_balance`, :func:`activated_slots`: a layout in time;
- :class:`SlidingWindow`, :class:`Ewma`, :class:`RegimeMean`: forecasts of the next window's load.

See docs/planner.md.
"""

from __future__ import annotations

from eplbd.layout import moves_between
from eplbd.planner._apportion import lower_bound, replica_counts
from eplbd.planner._cost import CostModel, CostTier, default_cost_model
from eplbd.planner._deepseek import rebalance_experts
from eplbd.planner._forecast import Ewma, RegimeMean, RegimeState, SlidingWindow
from eplbd.planner._metrics import (
    activated_slots,
    aggregate_balance,
    balance,
    bound_ratio,
    gpu_loads,
    gpu_times,
    time_balance,
)
from eplbd.planner._plan import OBJECTIVES, POLICIES, REASONS, PlanResult, plan, plan_with_report

__all__ = [
    "CostModel",
    "CostTier",
    "Ewma",
    "OBJECTIVES",
    "POLICIES",
    "PlanResult",
    "REASONS",
    "RegimeMean",
    "RegimeState",
    "SlidingWindow",
    "activated_slots",
    "aggregate_balance",
    "balance",
    "bound_ratio",
    "default_cost_model",
    "gpu_loads",
    "gpu_times",
    "lower_bound",
    "moves_between",
    "plan",
    "plan_with_report",
    "rebalance_experts",
    "replica_counts",
    "time_balance",
]
