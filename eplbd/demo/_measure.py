"""What the demo reports, computed from what the workers measured (pure, torch-free).

Each step the workers report, summed over ranks, per layer: the tokens each GPU actually
computed (``live`` [L, G], from the physical ids the client mapped), the tokens each GPU would
have computed on the initial layout for the very same routing (``static`` [L, G]), and the
logical load per expert (``experts`` [L, E]). A layer waits for its slowest GPU, and layers
run one after another, so the cost of a run of steps is Σ over steps and layers of the max
GPU load; balance = that Σ max / Σ mean (1.0 is perfect), as in ARCHITECTURE.md.

The lower bound is the same sum with each layer-step's best possible max: max(W/G, min over
replica counts of max_e w_e / r_e) with P slots (an expert's load split evenly across its
replicas; the real per-token dispatch cannot beat it).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Balance", "StepRecord", "balance", "lower_bound_max"]

Matrix = Sequence[Sequence[int]]


@dataclass(frozen=True)
class StepRecord:
    """One step as rank 0 reported it (sums over every rank)."""

    step: int
    epoch: int
    live: Matrix  # [L, G] tokens computed per GPU
    static: Matrix  # [L, G] the initial layout on the same tokens
    experts: Matrix  # [L, E] logical load
    err: float
    domain: str | None = None


def lower_bound_max(load: Sequence[int], num_gpus: int, num_physical: int) -> float:
    """The smallest possible max GPU load of one layer. load [E] -> float.

    max(W / G, min over replica counts r (1 <= r_e <= G, Σ r = P) of max_e w_e / r_e); the
    second term by greedy apportionment (next replica to the largest w / r).
    """
    w = [float(x) for x in load]
    total = sum(w)
    if total <= 0:
        return 0.0
    E = len(w)
    reps = [1] * E
    heap = [(-w[e], e) for e in range(E)]
    heapq.heapify(heap)
    for _ in range(max(0, num_physical - E)):
        while heap:
            neg, e = heapq.heappop(heap)
            if reps[e] < num_gpus:
                reps[e] += 1
                heapq.heappush(heap, (-w[e] / reps[e], e))
                break
        else:
            break
    worst = max(w[e] / reps[e] for e in range(E))
    return max(total / num_gpus, worst)


@dataclass
class Balance:
    """Running Σ max / Σ mean over a set of steps, per layer and in total."""

    num_layers: int
    num_gpus: int
    num_physical: int
    steps: int = 0
    live_max: list[float] = field(default_factory=list)
    static_max: list[float] = field(default_factory=list)
    lb_max: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("live_max", "static_max", "lb_max", "mean"):
            if not getattr(self, name):
                setattr(self, name, [0.0] * self.num_layers)

    def add(self, r: StepRecord) -> None:
        self.steps += 1
        for i in range(self.num_layers):
            live, static = r.live[i], r.static[i]
            self.live_max[i] += max(live)
            self.static_max[i] += max(static)
            self.mean[i] += sum(live) / self.num_gpus
            self.lb_max[i] += lower_bound_max(r.experts[i], self.num_gpus, self.num_physical)

    @staticmethod
    def _ratio(num: float, den: float) -> float | None:
        return num / den if den > 0 else None

    def live(self, layer: int | None = None) -> float | None:
        if layer is None:
            return self._ratio(sum(self.live_max), sum(self.mean))
        return self._ratio(self.live_max[layer], self.mean[layer])

    def static(self, layer: int | None = None) -> float | None:
        if layer is None:
            return self._ratio(sum(self.static_max), sum(self.mean))
        return self._ratio(self.static_max[layer], self.mean[layer])

    def lower_bound(self, layer: int | None = None) -> float | None:
        if layer is None:
            return self._ratio(sum(self.lb_max), sum(self.mean))
        return self._ratio(self.lb_max[layer], self.mean[layer])

    def as_dict(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "live": _r(self.live()),
            "without_eplbd": _r(self.static()),
            "lower_bound": _r(self.lower_bound()),
            "per_layer": [
                {
                    "layer": i,
                    "live": _r(self.live(i)),
                    "without_eplbd": _r(self.static(i)),
                    "lower_bound": _r(self.lower_bound(i)),
                }
                for i in range(self.num_layers)
            ],
        }


def balance(records: Sequence[StepRecord], num_gpus: int, num_physical: int) -> Balance:
    """The :class:`Balance` of ``records`` (all of the same model)."""
    L = len(records[0].live) if records else 0
    b = Balance(L, num_gpus, num_physical)
    for r in records:
        b.add(r)
    return b


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
