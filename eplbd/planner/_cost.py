"""A cost model of one GPU's expert work in one MoE layer and step, in microseconds.

A GPU does not spend its time in proportion to the rows (token, k pairs) it computes: an
expert GEMM with few rows costs a read of the expert's weights, one with many rows costs
compute, in tiles of rows. And a MoE step is dispatch + expert GEMMs + combine: the
all-to-all moves every row a GPU computes there and back. So, per slot that receives ``n``
rows in a step::

    time(n) = fixed_us * [n > 0] + tile_us * ceil(n / tile_rows) + row_us * n

and a GPU's time is the sum over its slots (plus ``base_us``, the same for every layout).
The constants are measured for one expert shape and dtype on one device by
``benchmarks/bench_cost_model.py`` and stored as JSON (:meth:`CostModel.to_json`);
:func:`default_cost_model` derives them from memory bandwidth and peak FLOP/s where no
calibration exists.

Planning works from a forecast: ``x`` expected rows per step, the actual count varying from
step to step. :meth:`CostModel.slot_time` with ``sampling="poisson"`` (the planner's
default) takes the expectation of ``time(n)`` for ``n ~ Poisson(x)``: a slot expecting 0.5
rows is read in 39% of the steps, not in every one; ``sampling="exact"`` applies the formula
to ``x`` itself (a step's own counts).

Pure: numbers in, numbers out.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

__all__ = ["COST_MODEL_SCHEMA_VERSION", "CostModel", "SAMPLINGS", "default_cost_model"]

COST_MODEL_SCHEMA_VERSION = 1
SAMPLINGS = ("poisson", "exact")

#: Defaults of :func:`default_cost_model`, measured on one H100 80GB HBM3 of the device
#: machines (docs/benchmarks.md): a device-to-device copy moved 3.0 TB/s counting bytes read
#: and written, a large bf16 matrix product ran at 790 TFLOP/s. NVLink 4 moves 450 GB/s per
#: direction per GPU.
DEFAULT_MEM_BANDWIDTH = 3.0e12
DEFAULT_PEAK_FLOPS = 7.9e14
DEFAULT_LINK_BANDWIDTH = 4.5e11
DEFAULT_TILE_ROWS = 128
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}

# Interpolation grid for the Poisson expectation: x from 1e-4 to 1e7 rows, 64 points a decade.
_GRID_LO, _GRID_PER_DECADE = -4.0, 64
_GRID = np.logspace(_GRID_LO, 7.0, 11 * _GRID_PER_DECADE + 1)


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz and Stegun 7.1.26 (absolute error < 1.5e-7); numpy has no erf."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return s * (1.0 - poly * np.exp(-a * a))


def expected_tiles(x: np.ndarray, tile_rows: int) -> np.ndarray:
    """E[ceil(n / T)] for n ~ Poisson(x): P(n > 0) + sum over j >= 1 of P(n > j T), the
    tails by the normal approximation (continuity-corrected). [any shape] -> same."""
    x = np.asarray(x, dtype=np.float64)
    T = float(tile_rows)
    out = -np.expm1(-x)  # P(n > 0)
    sd = np.sqrt(np.maximum(x, 1e-300))
    # P(n > jT) ~ 1 for jT well below x; the terms near x need the normal tail
    lo = np.maximum(1.0, np.floor((x - 6.0 * sd) / T))
    out = out + (lo - 1.0)
    span = int(math.ceil(12.0 * float(np.sqrt(np.max(x, initial=0.0))) / T)) + 2
    for k in range(span):
        j = lo + k
        out = out + 0.5 * (1.0 + _erf((x - j * T - 0.5) / (sd * math.sqrt(2.0))))
    return np.where(x > 0, out, 0.0)


@dataclass(frozen=True)
class CostModel:
    """Per-slot time of expert work, in microseconds (see the module docstring).

    fixed_us: a slot that receives >= 1 row (its weights are read); tile_rows, tile_us: per
    tile of rows (GEMM compute); row_us: per row received (dispatch and combine); base_us:
    per GPU and layer whatever the layout (launches; not a balance term). device, hidden,
    ffn, dtype: what it was measured or derived for; source: "calibrated" or "default";
    fit: how well the calibration fits its measurements (figures, for the record).
    """

    fixed_us: float
    tile_us: float
    tile_rows: int = DEFAULT_TILE_ROWS
    row_us: float = 0.0
    base_us: float = 0.0
    device: str = ""
    hidden: int | None = None
    ffn: int | None = None
    dtype: str = "bfloat16"
    source: str = "default"
    fit: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("fixed_us", "tile_us", "row_us", "base_us"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or v < 0
            ):
                raise ValueError(f"cost model {name} must be a finite number >= 0, got {v!r}")
        if (
            isinstance(self.tile_rows, bool)
            or not isinstance(self.tile_rows, int)
            or self.tile_rows < 1
        ):
            raise ValueError(
                f"cost model tile_rows must be an integer >= 1, got {self.tile_rows!r}"
            )
        if self.fixed_us + self.tile_us + self.row_us <= 0:
            raise ValueError("cost model: fixed_us, tile_us and row_us are all 0")

    # --- time ------------------------------------------------------------------------------

    def slot_time(self, rows: Any, sampling: str = "poisson") -> np.ndarray:
        """Time of a slot receiving ``rows`` rows per step (any shape, >= 0), in us.

        sampling "exact": rows is the step's count; "poisson": rows is the expected count
        of a step and the time is the expectation over n ~ Poisson(rows).
        """
        x = np.asarray(rows, dtype=np.float64)
        if sampling == "exact":
            return (
                self.fixed_us * (x > 0)
                + self.tile_us * np.ceil(x / self.tile_rows)
                + self.row_us * x
            )
        if sampling != "poisson":
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        grid_t, slope = self._table
        # the grid is uniform in log10(x): the segment of x is found by arithmetic, not by a
        # search (np.interp's binary search was most of the planner's time objective)
        with np.errstate(divide="ignore"):
            u = (np.log10(x) - _GRID_LO) * _GRID_PER_DECADE
        i = np.clip(u, 0, _GRID.size - 2).astype(np.intp)
        out = np.asarray(grid_t[i] + slope[i] * (x - _GRID[i]))
        # below the grid the time is linear (x rows: read with probability ~x, one tile);
        # above it (1e7 rows a step) the count's spread is negligible: half a tile on average
        low = x < _GRID[0]
        if low.any():
            out[low] = x[low] * (grid_t[0] / _GRID[0])
        high = x > _GRID[-1]
        if high.any():
            xh = x[high]
            out[high] = (
                self.fixed_us + self.tile_us * (xh / self.tile_rows + 0.5) + self.row_us * xh
            )
        return out

    @functools.cached_property
    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        """Expected time at each grid point, and the slope to the next one."""
        x = _GRID
        t = (
            self.fixed_us * -np.expm1(-x)
            + self.tile_us * expected_tiles(x, self.tile_rows)
            + self.row_us * x
        )
        slope = np.append(np.diff(t) / np.diff(x), 0.0)
        return t, slope

    def gemm_time(self, rows_per_slot: Any) -> float:
        """Modelled time of one GPU's grouped GEMMs for one step (exact counts, no
        dispatch): base + per active slot + per tile. rows_per_slot: [S] counts."""
        n = np.asarray(rows_per_slot, dtype=np.float64)
        return float(
            self.base_us
            + self.fixed_us * (n > 0).sum()
            + self.tile_us * np.ceil(n / self.tile_rows).sum()
        )

    # --- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"schema_version": COST_MODEL_SCHEMA_VERSION, "kind": "eplbd-cost-model", **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Any) -> CostModel:
        """Raises ValueError on anything but a cost model of a known schema."""
        if not isinstance(d, dict):
            raise ValueError(f"cost model JSON must be an object, got {type(d).__name__}")
        ver = d.get("schema_version")
        if ver != COST_MODEL_SCHEMA_VERSION or d.get("kind") != "eplbd-cost-model":
            raise ValueError(
                f"not an eplbd cost model of schema {COST_MODEL_SCHEMA_VERSION} "
                f"(kind {d.get('kind')!r}, schema_version {ver!r})"
            )
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("fixed_us", "tile_us") if k not in d]
        if missing:
            raise ValueError(f"cost model lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        for k in ("hidden", "ffn"):
            v = kwargs.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"cost model {k} must be a positive integer or null, got {v!r}")
        for k in ("device", "dtype", "source"):
            if k in kwargs and not isinstance(kwargs[k], str):
                raise ValueError(f"cost model {k} must be a string")
        if "fit" in kwargs and not isinstance(kwargs["fit"], dict):
            raise ValueError("cost model fit must be an object")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"cost model is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def without_dispatch(self) -> CostModel:
        """The same model with no per-row dispatch cost (GEMMs only)."""
        return replace(self, row_us=0.0)


def default_cost_model(
    hidden: int,
    ffn: int,
    dtype: str = "bfloat16",
    *,
    mem_bandwidth: float = DEFAULT_MEM_BANDWIDTH,
    peak_flops: float = DEFAULT_PEAK_FLOPS,
    link_bandwidth: float | None = DEFAULT_LINK_BANDWIDTH,
    tile_rows: int = DEFAULT_TILE_ROWS,
    device: str = "",
) -> CostModel:
    """A cost model from first principles, for an expert FFN of ``hidden`` x ``ffn`` (gate
    and up [2F, H], down [H, F]) where no calibration exists.

    fixed: the expert's weights (3 H F elements) read at ``mem_bandwidth`` (bytes/s, read
    plus write as a copy counts them); tile: the 6 H F FLOPs per row of a tile at
    ``peak_flops``; row: the row's activations (H elements) sent there and back at
    ``link_bandwidth`` (bytes/s per direction; None: no dispatch term).
    """
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(_DTYPE_BYTES)})")
    for name, v in (("hidden", hidden), ("ffn", ffn), ("tile_rows", tile_rows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    for name, f in (("mem_bandwidth", mem_bandwidth), ("peak_flops", peak_flops)):
        if not (isinstance(f, int | float) and math.isfinite(f) and f > 0):
            raise ValueError(f"{name} must be a positive number, got {f!r}")
    b = _DTYPE_BYTES[dtype]
    weights = 3 * hidden * ffn * b
    row = 0.0
    if link_bandwidth is not None:
        if not (isinstance(link_bandwidth, int | float) and link_bandwidth > 0):
            raise ValueError(f"link_bandwidth must be a positive number, got {link_bandwidth!r}")
        row = 2 * hidden * b / link_bandwidth * 1e6
    return CostModel(
        fixed_us=weights / mem_bandwidth * 1e6,
        tile_us=6.0 * hidden * ffn * tile_rows / peak_flops * 1e6,
        tile_rows=tile_rows,
        row_us=row,
        device=device,
        hidden=hidden,
        ffn=ffn,
        dtype=dtype,
        source="default",
        fit={
            "mem_bandwidth": mem_bandwidth,
            "peak_flops": peak_flops,
            "link_bandwidth": link_bandwidth,
        },
    )
