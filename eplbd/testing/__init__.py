"""eplbd.testing: a reference MoE engine and layout generators for tests, the demo and
benchmarks.

- :class:`MoEModel` (from :class:`MoEConfig`): a deterministic MoE layer stack with a skewed,
  drifting router and a no-EPLB :meth:`~MoEModel.reference_forward`;
- :class:`EPMoEEngine`: one EP rank of that stack routed through an ``EplbClient``, with
  all-to-all dispatch to the ranks that own the physical slots;
- :func:`random_layout`, :func:`greedy_layout`: valid layouts without the planner.
"""

from __future__ import annotations

from eplbd.testing._engine import EPMoEEngine
from eplbd.testing._layouts import greedy_layout, random_layout
from eplbd.testing._moe import MoEConfig, MoEModel, expert_ffn

__all__ = [
    "EPMoEEngine",
    "MoEConfig",
    "MoEModel",
    "expert_ffn",
    "greedy_layout",
    "random_layout",
]
