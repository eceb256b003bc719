"""eplbd: an online expert-parallel load balancer for Mixture-of-Experts serving.

Public names are loaded lazily so that light commands (``eplbd status``) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Layout", "LayoutError", "__version__"]

_LAZY = {"Layout": "eplbd.layout", "LayoutError": "eplbd.layout"}

if TYPE_CHECKING:
    from eplbd.layout import Layout, LayoutError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eplbd' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
