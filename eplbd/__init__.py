"""eplbd: an online expert-parallel load balancer for Mixture-of-Experts serving."""

from __future__ import annotations

from eplbd.layout import Layout, LayoutError

__version__ = "0.1.0"

__all__ = ["Layout", "LayoutError", "__version__"]
