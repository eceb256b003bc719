"""JSON helpers shared by the core and the CLI (no dependencies beyond the standard library)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["finite"]


def finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: ``value`` with every non-finite float (in mappings,
    lists and tuples) as None (e.g. the balance of an idle layer, a fit's empty error)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
