"""Replaying a real routing trace: which logical experts each token of each step picks.

The ESFT trace (``benchmarks/data/esft_routing_ids.npz``) holds, per task domain, the top-6
routed expert ids of every token over 64 experts in 26 MoE layers (uint8
``[tokens, 26, 6]``). The demo replays the domains one after the other, so the load shifts
the way it does when a cluster's traffic changes: ``steps_per_domain`` steps of each,
``workers x tokens`` trace tokens per step, rank r taking its slice of them. A domain with
fewer tokens than its steps need wraps around (the same real routing, seen again).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eplbd.demo._config import TRACE_DOMAINS

__all__ = ["Trace", "TraceError", "default_trace_path", "load_trace", "pick_layers"]

_DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "esft_routing_ids.npz"


def default_trace_path() -> Path:
    """The ESFT trace shipped in the repository (benchmarks/data)."""
    return _DATA


def pick_layers(available: int, wanted: int) -> list[int]:
    """``wanted`` layers spread evenly over ``available``, e.g. (26, 4) -> [0, 8, 17, 25]."""
    n = max(1, min(wanted, available))
    if n == 1:
        return [0]
    return sorted({round(i * (available - 1) / (n - 1)) for i in range(n)})


@dataclass(frozen=True)
class Trace:
    """Per domain: ids int64 [tokens, L, K] for the picked layers."""

    domains: tuple[str, ...]
    ids: tuple[np.ndarray, ...]
    num_experts: int
    top_k: int
    layers_in_file: int = 0  # MoE layers the file holds (the picked ones are in ``ids``)

    @property
    def num_layers(self) -> int:
        return int(self.ids[0].shape[1])

    def domain_of(self, step: int, steps: int) -> int:
        per = max(1, steps // len(self.domains))
        return min(step // per, len(self.domains) - 1)

    def step_ids(self, step: int, steps: int, rank: int, workers: int, tokens: int) -> np.ndarray:
        """ids [tokens, L, K] of ``rank`` at ``step``."""
        d = self.domain_of(step, steps)
        per = max(1, steps // len(self.domains))
        local = step - d * per
        src = self.ids[d]
        start = (local * workers + rank) * tokens
        rows = (np.arange(start, start + tokens) % src.shape[0]).astype(np.int64)
        return src[rows]


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message is one line naming the file."""


_NPZ_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


def _open(path: str | os.PathLike[str]) -> Any:
    """The file as an ``NpzFile``, or TraceError saying what it is instead."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from None
    if head.startswith(_NPY_MAGIC):
        raise TraceError(
            f"{path}: a single .npy array; a trace is an .npz archive of <domain>_topk_ids "
            "arrays [tokens, layers, k], like benchmarks/data/esft_routing_ids.npz"
        )
    if not head.startswith(_NPZ_MAGIC):
        raise TraceError(f"{path}: not an .npz archive (of <domain>_topk_ids arrays)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise TraceError(f"{path}: not an .npz archive ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _array(z: Any, path: str | os.PathLike[str], key: str) -> np.ndarray:
    try:
        a = np.asarray(z[key])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise TraceError(f"{path}: cannot read {key}: {_first_line(e)}") from None
    if a.dtype.kind not in "iu":
        raise TraceError(f"{path}: {key} must hold integer expert ids, not {a.dtype}")
    if a.ndim != 3 or a.shape[0] == 0 or a.shape[2] == 0:
        raise TraceError(f"{path}: {key} must be [tokens, layers, k], got {a.shape}")
    if a.dtype.kind == "i" and int(a.min()) < 0:
        raise TraceError(f"{path}: {key} holds a negative expert id ({int(a.min())})")
    return a


def load_trace(path: str | os.PathLike[str], layers: list[int] | None = None) -> Trace:
    """Read an ESFT-style npz (``<domain>_topk_ids`` integer arrays [tokens, layers, K]).

    Domains come in the order intent, law, summary, translation when present, then any
    others alphabetically. ``layers`` picks layers of the trace (default: all). Raises
    :class:`TraceError` (one line naming the file) for anything else.
    """
    with _open(path) as z:
        names = [k[: -len("_topk_ids")] for k in z.files if k.endswith("_topk_ids")]
        if not names:
            raise TraceError(f"{path}: no <domain>_topk_ids arrays (it holds {sorted(z.files)})")
        order = list(TRACE_DOMAINS)
        names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
        arrays = [_array(z, path, f"{n}_topk_ids") for n in names]
    num_layers, k = arrays[0].shape[1], arrays[0].shape[2]
    if any(a.shape[1:] != (num_layers, k) for a in arrays):
        raise TraceError(f"{path}: domains disagree on [layers, k]")
    sel = list(range(num_layers)) if layers is None else list(layers)
    if not sel or min(sel) < 0 or max(sel) >= num_layers:
        raise TraceError(f"{path}: layers {sel} outside [0, {num_layers})")
    num_experts = int(max(int(a.max()) for a in arrays)) + 1
    ids = tuple(np.ascontiguousarray(a[:, sel, :]).astype(np.int64) for a in arrays)
    return Trace(tuple(names), ids, num_experts, int(k), int(num_layers))
