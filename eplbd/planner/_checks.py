"""Argument checks shared by the planner's public functions.

Every public entry point converts its load to a float64 numpy array ``[L, E]`` here and
checks the topology, so that a bad argument fails with one clear :class:`ValueError` before
any work starts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eplbd.layout import Layout

#: Largest total load of a layer: far above any real count, far below where float64 sums
#: and products overflow.
MAX_TOTAL = 1e200


def as_load(load: Any, name: str = "load", dtype: type = np.float64) -> np.ndarray:
    """``load`` (tensor, array or nested list) [L, E] -> a C-contiguous numpy array.

    Raises ValueError unless it is a 2-D array of real numbers, finite and non-negative,
    with at least one layer and one expert, and no layer's total above :data:`MAX_TOTAL`.
    """
    if isinstance(load, torch.Tensor):
        t = load.detach().to("cpu")
        if t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
        arr = t.to(torch.float64).numpy()
    else:
        try:
            raw = np.asarray(load)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} is not a rectangular array of numbers: {e}") from e
        if raw.dtype == object or raw.dtype.kind not in "iuf":
            raise ValueError(f"{name} must hold real numbers, got dtype {raw.dtype}")
        arr = raw.astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [layers, experts], got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} has no layers or no experts (shape {tuple(arr.shape)})")
    if not np.isfinite(arr).all():
        layer, expert = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} is not finite at layer {layer} expert {expert}")
    if (arr < 0).any():
        layer, expert = np.argwhere(arr < 0)[0]
        raise ValueError(f"{name} is negative at layer {layer} expert {expert}")
    with np.errstate(over="ignore"):
        total = arr.sum(axis=1)
    big = ~np.isfinite(total) | (total > MAX_TOTAL)
    if big.any():
        raise ValueError(
            f"{name} of layer {int(np.argmax(big))} is too large to plan with "
            f"(its total exceeds {MAX_TOTAL:g})"
        )
    # + 0.0 turns -0.0 into +0.0, which the bit-pattern sort keys rely on.
    return np.ascontiguousarray(arr.astype(dtype, copy=False) + dtype(0.0))


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_topology(num_logical: int, num_physical: Any, num_gpus: Any, num_nodes: Any) -> None:
    """P >= E, P a multiple of G, G a multiple of N; raises ValueError naming the problem."""
    P = check_int(num_physical, "num_physical_experts")
    G = check_int(num_gpus, "num_gpus")
    N = check_int(num_nodes, "num_nodes")
    if P < num_logical:
        raise ValueError(f"{P} physical slots cannot hold {num_logical} logical experts")
    if P % G:
        raise ValueError(f"{P} physical slots cannot be split evenly over {G} GPUs")
    if G % N:
        raise ValueError(f"{G} GPUs cannot be split evenly over {N} nodes")


def check_previous(previous: Any, L: int, E: int, P: int) -> Layout:
    if not isinstance(previous, Layout):
        raise ValueError(f"previous must be an eplbd.layout.Layout, got {type(previous).__name__}")
    if previous.num_layers != L or previous.num_logical != E or previous.num_physical != P:
        raise ValueError(
            f"previous layout has {previous.num_layers} layers x {previous.num_logical} "
            f"experts x {previous.num_physical} slots; the load needs {L} x {E} x {P}"
        )
    return previous


def replica_cap(num_logical: int, num_physical: int, num_gpus: int) -> int:
    """Most replicas one expert may get: G (one per GPU), unless E * G < P forces more."""
    return max(num_gpus, -(-num_physical // num_logical))
