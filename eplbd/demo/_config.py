"""What one demo run does: model shape, workload, length, and the daemons' tuning.

One frozen dataclass travels from the driver to every worker as JSON (``to_json`` /
``from_json``), so every rank builds the same model and the same workload.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = ["DemoConfig", "PlannerTuning", "TOLERANCE", "TRACE_DOMAINS"]

#: Outputs equal the no-EPLB reference up to float64 summation order (about 1e-12 here);
#: anything above this is a wrong expert, a stale weight or a torn layout.
TOLERANCE = 1e-9

#: Domains of benchmarks/data/esft_routing_ids.npz, replayed in this order.
TRACE_DOMAINS = ("intent", "law", "summary", "translation")


@dataclass(frozen=True)
class PlannerTuning:
    """Planner and agent settings for a run of a minute, not a day of serving.

    window_s / windows / min_windows: a forecast after about a second of load; cooldown_s:
    a few seconds between automatic rebalances so the drift is chased but not every window;
    min_gain: a rebalance must gain at least this much balance (max/mean) on some layer;
    window_steps / record_steps: every step is recorded, a snapshot every few steps;
    sync_interval: steps between the clients' consensus rounds (when a staged epoch flips);
    forecast: the planner's forecast, ewma or regime (the mean since the traffic changed).
    """

    window_s: float = 0.5
    windows: int = 4
    min_windows: int = 2
    ewma_alpha: float = 0.5
    cooldown_s: float = 3.0
    min_gain: float = 0.05
    prepare_timeout_s: float = 30.0
    commit_timeout_s: float = 30.0
    window_steps: int = 8
    record_steps: int = 8
    sync_interval: int = 4
    heartbeat_s: float = 0.25
    dead_timeout_s: float = 10.0
    forecast: str = "ewma"

    def planner_env(self) -> dict[str, str]:
        """``EPLBD_PLANNER_*`` variables the agent passes to its embedded planner."""
        return {
            "EPLBD_PLANNER_WINDOW_S": str(self.window_s),
            "EPLBD_PLANNER_WINDOWS": str(self.windows),
            "EPLBD_PLANNER_MIN_WINDOWS": str(self.min_windows),
            "EPLBD_PLANNER_EWMA_ALPHA": str(self.ewma_alpha),
            "EPLBD_PLANNER_COOLDOWN_S": str(self.cooldown_s),
            "EPLBD_PLANNER_MIN_GAIN": str(self.min_gain),
            "EPLBD_PLANNER_PREPARE_TIMEOUT_S": str(self.prepare_timeout_s),
            "EPLBD_PLANNER_COMMIT_TIMEOUT_S": str(self.commit_timeout_s),
            "EPLBD_PLANNER_TICK_S": "0.05",
            "EPLBD_PLANNER_FORECAST": self.forecast,
        }

    def agent_flags(self) -> list[str]:
        return [
            "--window-steps",
            str(self.window_steps),
            "--record-steps",
            str(self.record_steps),
            "--heartbeat-s",
            str(self.heartbeat_s),
            "--dead-timeout-s",
            str(self.dead_timeout_s),
            "--merge-timeout-s",
            "1.0",
            "--metrics",
            "127.0.0.1:0",  # any free port: the demo may run beside a real agent
        ]


@dataclass(frozen=True)
class DemoConfig:
    """One run. Synthetic workload: ``MoEConfig``'s router, its hot spot moving one expert
    every ``1 / drift`` steps. Trace workload (``trace`` set): the ESFT routing ids replayed
    domain after domain, ``steps // 4`` steps each (a domain's tokens wrap around if it has
    fewer than that), ``layers`` of its 26 layers picked evenly.

    workers: EP ranks (processes, gloo); experts / slots_per_gpu / top_k: E, P / G, K;
    tokens: tokens per rank per step; hidden / ffn: expert FFN sizes (real weights, float64).
    """

    workers: int = 4
    layers: int = 4
    steps: int = 480
    experts: int = 16
    slots_per_gpu: int = 6
    top_k: int = 2
    tokens: int = 64
    hidden: int = 32
    ffn: int = 64
    seed: int = 0
    skew: float = 1.5
    drift: float = 1 / 150
    trace: str | None = None
    trace_layers: tuple[int, ...] = ()
    group: str = "demo"
    tuning: PlannerTuning = field(default_factory=PlannerTuning)

    @property
    def num_physical(self) -> int:
        return self.workers * self.slots_per_gpu

    @property
    def mode(self) -> str:
        return "trace" if self.trace else "synthetic"

    def check(self) -> None:
        """Raise ValueError on a shape the demo cannot run."""
        if self.workers < 2:
            raise ValueError("--workers must be at least 2 (one GPU has nothing to balance)")
        if self.layers < 1:
            raise ValueError("--layers must be at least 1")
        if self.steps < 1:
            raise ValueError("--steps must be at least 1")
        if self.num_physical < self.experts:
            raise ValueError(
                f"{self.workers} workers x {self.slots_per_gpu} slots cannot hold "
                f"{self.experts} experts"
            )
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top-k {self.top_k} must be in [1, {self.experts}]")
        if self.tokens < 1:
            raise ValueError("--tokens must be at least 1")

    def to_json(self) -> str:
        d = asdict(self)
        d["trace_layers"] = list(self.trace_layers)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> DemoConfig:
        d: dict[str, Any] = json.loads(text)
        tuning = PlannerTuning(**d.pop("tuning"))
        d["trace_layers"] = tuple(d.get("trace_layers") or ())
        known = {f.name for f in fields(cls)}
        return replace(cls(), **{k: v for k, v in d.items() if k in known}, tuning=tuning)
