"""What one end-to-end GPU benchmark job runs (``bench_e2e_gpu``), as one JSON-able dataclass.

The driver builds an :class:`E2EConfig` from the command line and hands it, as JSON, to every
worker process, so that every EP rank builds the same model, replays the same tokens and runs
the same three runs (no balancing, DeepSeek once, eplbd online) in the same order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from eplbd.demo import PlannerTuning

__all__ = ["RUNS", "E2EConfig", "Mode", "default_modes", "tiny_modes"]

#: The three runs of every mode, in the order they run (the first is the reference).
RUNS = ("none", "deepseek", "eplbd")


@dataclass(frozen=True)
class Mode:
    """A batch shape: ``tokens`` per rank per step, ``steps_per_domain`` timed steps of each
    trace domain (the domain's tokens wrap around when it has fewer)."""

    name: str
    tokens: int
    steps_per_domain: int


def default_modes() -> tuple[Mode, ...]:
    """Decode-like (256 tokens per rank per step) and prefill-like (4096), each about
    5 to 10 s per domain on an H200 so that the online planner has windows to work with."""
    return (Mode("decode", 256, 1000), Mode("prefill", 4096, 400))


def tiny_modes() -> tuple[Mode, ...]:
    return (Mode("decode", 16, 30), Mode("prefill", 64, 15))


@dataclass(frozen=True)
class E2EConfig:
    """One job. Model: DeepSeek-V2-Lite's routed experts (hidden 2048, expert intermediate
    1408, 64 experts, top-6) for ``layers`` of the trace's 26 MoE layers, in ``dtype``.

    world_size: EP ranks (one process and one GPU each); slots_per_gpu: S (P = G * S);
    device: "cuda" (NCCL) or "cpu" (gloo); gemm: "auto" | "grouped" | "loop";
    weight_source: "peer" (NCCL/gloo P2P, the client's default) or "host" (a host pool);
    check_mb: device memory per rank for the full outputs kept for the exact comparison
    (sampled steps; a fingerprint of every step is always compared); graph: "auto" | "on" |
    "off": replay each run's forward as a CUDA graph (auto: with one rank on CUDA and grouped
    GEMMs, where the forward has no host synchronisation; the all-to-all of EP > 1 needs its
    split sizes on the host);
    tuning: the agent's and embedded planner's settings for the online run.
    """

    world_size: int = 1
    device: str = "cuda"
    dtype: str = "bfloat16"
    hidden: int = 2048
    ffn: int = 1408
    experts: int = 64
    top_k: int = 6
    layers: tuple[int, ...] = (0, 4, 7, 11, 14, 18, 21, 25)
    slots_per_gpu: int = 72
    modes: tuple[Mode, ...] = field(default_factory=default_modes)
    domains: tuple[str, ...] = ("intent", "law", "summary", "translation")
    warmup: int = 5
    sync_interval: int = 8
    gemm: str = "auto"
    weight_source: str = "peer"
    graph: str = "auto"
    check_mb: int = 1024
    trace: str = ""
    tiny: bool = False
    seed: int = 0
    run_dir: str = ""
    master_port: int = 0
    agent: str = ""
    pool_dir: str = ""
    install_timeout_s: float = 300.0
    tuning: PlannerTuning = field(default_factory=PlannerTuning)

    @property
    def num_physical(self) -> int:
        return self.world_size * self.slots_per_gpu

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def group_name(self, mode: str) -> str:
        return f"e2e-{mode}"

    def check(self) -> None:
        """Raise ValueError on a job that cannot run."""
        if self.world_size < 1:
            raise ValueError("--world-size must be >= 1")
        if self.num_physical < self.experts:
            raise ValueError(
                f"{self.world_size} x {self.slots_per_gpu} slots cannot hold {self.experts} experts"
            )
        if not self.layers:
            raise ValueError("at least one layer")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, not {self.device!r}")
        if self.gemm not in ("auto", "grouped", "loop"):
            raise ValueError(f"--gemm must be auto, grouped or loop, not {self.gemm!r}")
        if self.graph not in ("auto", "on", "off"):
            raise ValueError(f"--graph must be auto, on or off, not {self.graph!r}")
        if self.graph == "on" and (self.world_size != 1 or self.device != "cuda"):
            raise ValueError("--graph on needs --world-size 1 on cuda")
        if self.weight_source not in ("peer", "host"):
            raise ValueError(f"--weight-source must be peer or host, not {self.weight_source!r}")
        if self.sync_interval < 1:
            raise ValueError("--sync-interval must be >= 1 (layouts change at consensus steps)")
        for m in self.modes:
            if m.tokens < 1 or m.steps_per_domain < 1:
                raise ValueError(f"mode {m.name}: tokens and steps must be >= 1")

    def to_json(self) -> str:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["domains"] = list(self.domains)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> E2EConfig:
        d: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["tuning"] = PlannerTuning(**d.get("tuning", {}))
        d["modes"] = tuple(Mode(**m) for m in d.get("modes", []))
        d["layers"] = tuple(d.get("layers", ()))
        d["domains"] = tuple(d.get("domains", ()))
        return replace(cls(), **d)
