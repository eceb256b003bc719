"""A cost model of one GPU's expert work in one MoE layer and step, in microseconds.

A GPU does not spend its time in proportion to the rows (token, k pairs) it computes: an
expert GEMM with few rows costs a read of the expert's weights, one with many rows costs
compute, in tiles of rows. And a MoE step is dispatch + expert GEMMs + combine: the
all-to-all moves every row a GPU computes there and back. So, per slot that receives ``n``
rows in a step::

    time(n) = fixed_us * [n > 0] + tile_us * ceil(n / tile_rows) + row_us * n

and a GPU's time is the sum over its slots (plus ``base_us``, the same for every layout).

A grouped-GEMM kernel picks its tile shape from the problem's size, so one set of constants
does not fit every regime: ``torch._grouped_mm`` takes 64x128 tiles while a GPU's mean rows
per slot (its rows over its slots, empty ones included) is at most 128, and 128x256 tiles
above (on an H100, 8 slots of 144 rows took 508 us, of 160 rows 333 us). A model may carry
**tiers** (:class:`CostTier`): other constants that apply above a mean of rows per slot.
:meth:`CostModel.at_mean` gives the constants of one regime (the planner picks them from
its load with :meth:`CostModel.for_load`: every layer routes the same rows per step),
:meth:`CostModel.rank_time` picks them per GPU.

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

from eplbd._json import finite

__all__ = ["COST_MODEL_SCHEMA_VERSION", "CostModel", "CostTier", "SAMPLINGS", "default_cost_model"]

#: 2: with tiers (a reader of schema 1 would apply the first tier's constants everywhere, so
#: such a file is refused there); a model without tiers is still written as 1
COST_MODEL_SCHEMA_VERSION = 2
_SCHEMAS = (1, 2)
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


#: Below this many rows a tile, :func:`expected_tiles` sums the Poisson distribution itself
#: up to :data:`_EXACT_MAX` expected rows: the normal tails are up to 9% off at 1 row a tile,
#: 1.7% at 4, 0.6% at 64 and 0.4% at 128. From 64 on (the calibrations' tiles: 64-256) the
#: tails are kept, so plans made before stay the same.
_EXACT_BELOW_TILE = 64
_EXACT_MAX = 256.0
_EXACT_N = 512  # counts summed: P(n >= 512) < 1e-30 for x <= 256


def expected_tiles(x: np.ndarray, tile_rows: int) -> np.ndarray:
    """E[ceil(n / T)] for n ~ Poisson(x): P(n > 0) + sum over j >= 1 of P(n > j T), the
    tails by the normal approximation (continuity-corrected); for tiles of fewer than
    :data:`_EXACT_BELOW_TILE` rows, summed over the distribution up to
    :data:`_EXACT_MAX` rows. [any shape] -> same."""
    x = np.asarray(x, dtype=np.float64)
    out = _expected_tiles_normal(x, tile_rows)
    small = (x > 0) & (x <= _EXACT_MAX)
    if tile_rows < _EXACT_BELOW_TILE and small.any():
        n = np.arange(_EXACT_N, dtype=np.float64)
        log_fact = np.concatenate(([0.0], np.cumsum(np.log(n[1:]))))
        xs = x[small][:, None]
        pmf = np.exp(n * np.log(xs) - xs - log_fact)
        out[small] = pmf @ np.ceil(n / float(tile_rows))
    return out


@functools.lru_cache(maxsize=16)
def _grid_tiles(tile_rows: int) -> np.ndarray:
    # the same for every model of a tile size: a plan makes a new model per regime
    out = expected_tiles(_GRID, tile_rows)
    out.flags.writeable = False
    return out


def _expected_tiles_normal(x: np.ndarray, tile_rows: int) -> np.ndarray:
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
    return np.asarray(np.where(x > 0, out, 0.0), dtype=np.float64)


def _check_rows(x: np.ndarray) -> None:
    # NaN fails both comparisons; a negative count has no time
    if x.size and not (x.min() >= 0 and x.max() < math.inf):
        raise ValueError("rows must be finite numbers >= 0")


def _check_costs(where: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where} {name} must be a finite number >= 0, got {v!r}")
    t = obj.tile_rows
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"{where} tile_rows must be an integer >= 1, got {t!r}")
    if obj.fixed_us + obj.tile_us + getattr(obj, "row_us", 0.0) <= 0:
        raise ValueError(f"{where}: fixed_us, tile_us and row_us are all 0")


_COSTS = ("fixed_us", "tile_us", "row_us", "base_us")
#: what a tier sets: the GEMM's constants. Dispatch and combine (``row_us``) do not depend
#: on the GEMM's tile shape, so every tier keeps the model's.
_TIER_COSTS = ("fixed_us", "tile_us", "base_us")


@dataclass(frozen=True)
class CostTier:
    """The GEMM constants of :class:`CostModel` that apply where a GPU's mean rows per
    slot is above ``above_mean_rows`` (a kernel's other tile shape)."""

    above_mean_rows: float
    fixed_us: float
    tile_us: float
    tile_rows: int
    base_us: float = 0.0

    def __post_init__(self) -> None:
        a = self.above_mean_rows
        if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or a <= 0:
            raise ValueError(f"cost tier above_mean_rows must be a finite number > 0, got {a!r}")
        _check_costs("cost tier", self, _TIER_COSTS)


@dataclass(frozen=True)
class CostModel:
    """Per-slot time of expert work, in microseconds (see the module docstring).

    fixed_us: a slot that receives >= 1 row (its weights are read); tile_rows, tile_us: per
    tile of rows (GEMM compute); row_us: per row received (dispatch and combine); base_us:
    per GPU and layer whatever the layout (launches; not a balance term). device, hidden,
    ffn, dtype: what it was measured or derived for; source: "calibrated" or "default";
    fit: how well the calibration fits its measurements (figures, for the record); tiers:
    other constants above a mean of rows per slot (:class:`CostTier`, ascending; the fields
    above are the regime below the first).
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
    tiers: tuple[CostTier, ...] = ()

    def __post_init__(self) -> None:
        _check_costs("cost model", self, _COSTS)
        for k in ("hidden", "ffn"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"cost model {k} must be a positive integer or None, got {v!r}")
        for k in ("device", "dtype", "source"):
            if not isinstance(getattr(self, k), str):
                raise ValueError(f"cost model {k} must be a string, got {getattr(self, k)!r}")
        if not isinstance(self.fit, dict):
            raise ValueError("cost model fit must be a dict")
        if not isinstance(self.tiers, tuple) or not all(
            isinstance(t, CostTier) for t in self.tiers
        ):
            raise ValueError("cost model tiers must be a tuple of CostTier")
        bounds = [t.above_mean_rows for t in self.tiers]
        if any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"cost model tiers must ascend in above_mean_rows, got {bounds}")

    # --- tiers -----------------------------------------------------------------------------

    def at_mean(self, mean_rows: float) -> CostModel:
        """The model (without tiers) of a GPU whose mean rows per slot is ``mean_rows``."""
        tier = None
        for t in self.tiers:
            if mean_rows > t.above_mean_rows:
                tier = t
        return self._regime(tier)

    def _regime(self, tier: CostTier | None) -> CostModel:
        if tier is None:
            return replace(self, tiers=()) if self.tiers else self
        return replace(self, tiers=(), **{k: getattr(tier, k) for k in (*_TIER_COSTS, "tile_rows")})

    def for_load(self, rows_per_step: Any, num_slots: int) -> CostModel:
        """The model (without tiers) of the regime of a load: ``rows_per_step`` [L, E]
        (or any shape: summed) rows per step over ``num_slots`` slots a layer."""
        if not self.tiers:
            return self
        x = np.asarray(rows_per_step, dtype=np.float64)
        per_layer = x.reshape(x.shape[0], -1).sum(axis=1) if x.ndim > 1 else x.sum()[None]
        # layers with no load (none routed there yet) would halve the mean of the others
        loaded = per_layer[per_layer > 0]
        if not loaded.size:
            return self._regime(None)
        return self.at_mean(float(loaded.mean()) / max(num_slots, 1))

    def rank_time(self, rows: Any) -> np.ndarray:
        """Modelled time of GPUs from their step's exact counts, each in the regime of its
        own mean rows per slot: rows [..., S] -> [...] us (base included)."""
        n = np.asarray(rows, dtype=np.float64)

        def one(m: CostModel) -> np.ndarray:
            return m.base_us + m.slot_time(n, "exact").sum(axis=-1)

        out = one(self._regime(None))
        if self.tiers:
            mean = n.mean(axis=-1) if n.shape[-1] else np.zeros(n.shape[:-1])
            for t in self.tiers:
                out = np.where(mean > t.above_mean_rows, one(self._regime(t)), out)
        return out

    # --- time ------------------------------------------------------------------------------

    def slot_time(self, rows: Any, sampling: str = "poisson") -> np.ndarray:
        """Time of a slot receiving ``rows`` rows per step (any shape, >= 0), in us.

        sampling "exact": rows is the step's count; "poisson": rows is the expected count
        of a step and the time is the expectation over n ~ Poisson(rows). A tiered model
        answers with its first regime's constants: pick the regime first (:meth:`for_load`).
        """
        x = np.asarray(rows, dtype=np.float64)
        _check_rows(x)
        return self._slot_time(x, sampling)

    def _slot_time(self, x: np.ndarray, sampling: str = "poisson") -> np.ndarray:
        """:meth:`slot_time` of rows known to be finite and >= 0 (the planner's, from a
        load it has checked: a check a call is 3% of a plan)."""
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
            # a count's part tile is uniform over the tile: (T - 1) / 2T on average
            T = self.tile_rows
            out[high] = self.fixed_us + self.tile_us * (xh / T + 0.5 - 0.5 / T) + self.row_us * xh
        return out

    @functools.cached_property
    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        """Expected time at each grid point, and the slope to the next one."""
        x = _GRID
        t = (
            self.fixed_us * -np.expm1(-x)
            + self.tile_us * _grid_tiles(self.tile_rows)
            + self.row_us * x
        )
        slope = np.append(np.diff(t) / np.diff(x), 0.0)
        return t, slope

    def gemm_time(self, rows_per_slot: Any) -> float:
        """Modelled time of one GPU's grouped GEMMs for one step (exact counts, no
        dispatch): base + per active slot + per tile, in the regime of its mean rows per
        slot. rows_per_slot: [S] counts."""
        n = np.asarray(rows_per_slot, dtype=np.float64)
        _check_rows(n)
        m = self.at_mean(float(n.mean()) if n.size else 0.0)
        return float(
            m.base_us + m.fixed_us * (n > 0).sum() + m.tile_us * np.ceil(n / m.tile_rows).sum()
        )

    # --- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.tiers:
            d["tiers"] = [asdict(t) for t in self.tiers]  # a list, as JSON reads it back
        else:
            del d["tiers"]
        ver = COST_MODEL_SCHEMA_VERSION if self.tiers else 1
        return {"schema_version": ver, "kind": "eplbd-cost-model", **d}

    def to_json(self) -> str:
        d = self.to_dict()
        d["fit"] = finite(d["fit"])  # a fit's NaN (an empty set's error) is not JSON
        return json.dumps(d, indent=1, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Any) -> CostModel:
        """Raises ValueError on anything but a cost model of a known schema."""
        if not isinstance(d, dict):
            raise ValueError(f"cost model JSON must be an object, got {type(d).__name__}")
        ver = d.get("schema_version")
        if type(ver) is not int or ver not in _SCHEMAS or d.get("kind") != "eplbd-cost-model":
            raise ValueError(
                f"not an eplbd cost model of schema {' or '.join(map(str, _SCHEMAS))} "
                f"(kind {d.get('kind')!r}, schema_version {ver!r})"
            )
        if "tiers" in d and ver == 1:
            raise ValueError("cost model of schema 1 cannot have tiers (schema 2 has them)")
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("fixed_us", "tile_us") if k not in d]
        if missing:
            raise ValueError(f"cost model lacks {', '.join(missing)}")
        # a misspelt key would otherwise leave its default in place without a word
        unknown = sorted(set(d) - known - {"schema_version", "kind"})
        if unknown:
            raise ValueError(f"cost model has unknown {', '.join(map(str, unknown))}")
        kwargs = {k: v for k, v in d.items() if k in known}
        if "tiers" in kwargs:
            kwargs["tiers"] = _tiers_from(kwargs["tiers"], kwargs.get("row_us", 0.0))
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


def _tiers_from(v: Any, row_us: Any) -> tuple[CostTier, ...]:
    if not isinstance(v, list):
        raise ValueError(f"cost model tiers must be a list, got {type(v).__name__}")
    known = set(CostTier.__dataclass_fields__)
    out = []
    for i, t in enumerate(v):
        if not isinstance(t, dict):
            raise ValueError(f"cost model tier {i} must be an object")
        t = dict(t)
        # files of the first tiered calibrations wrote a row_us per tier, always 0; dispatch
        # is the model's own (one for every tier), so only that value or 0 is read
        if "row_us" in t:
            r = t.pop("row_us")
            if r != 0 and r != row_us:
                raise ValueError(
                    f"cost model tier {i}: row_us {r!r} differs from the model's {row_us!r} "
                    "(dispatch cost per row is the model's, one for every tier)"
                )
        extra = sorted(set(t) - known)
        missing = sorted({"above_mean_rows", "fixed_us", "tile_us", "tile_rows"} - set(t))
        if extra or missing:
            raise ValueError(
                f"cost model tier {i}: "
                + "; ".join(
                    x
                    for x in (
                        extra and f"unknown {', '.join(extra)}",
                        missing and f"lacks {', '.join(missing)}",
                    )
                    if x
                )  # fmt: skip
            )
        out.append(CostTier(**t))
    return tuple(out)


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
