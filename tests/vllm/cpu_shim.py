"""TEST-ONLY: makes vLLM 0.32's CPU backend run expert parallelism and EPLB, so that the
eplbd plugin can be tested on vLLM's own engine in CI. NOT part of eplbd, never installed:
the tests put this directory on ``PYTHONPATH``, where vLLM finds it as a general plugin
through ``eplbd_test_cpu_shim-0.dist-info/entry_points.txt``. It edits no vLLM file; it
patches at run time, in every vLLM process, the places where vLLM 0.32 refuses or breaks EP
and EPLB on CPU:

1. ``config/parallel.py`` allows EPLB only on CUDA, ROCm and XPU: the module's view of the
   platform admits it.
2. The CPU fused-MoE experts ignore ``expert_map`` and index their local weights with global
   expert ids: non-local ids are given weight 0 and a local id.
3. ``CPUModelRunner.load_model`` never builds an ``EplbState``: built as the GPU runner does.
4. The CPU ``eplb_map_to_physical_and_record`` is a stub returning the ids unchanged: a torch
   version of vLLM's Triton kernel (Knuth-hash replica choice, count while recording).
5. ``torch.Event(enable_timing=True)`` in ``EplbState.rearrange`` cannot record on CPU:
   wall-clock events.
6. ``torch.accelerator.current_stream()`` in the gloo communicator fails without an
   accelerator: a stream whose synchronize does nothing.
7. Async EPLB's worker thread asserts a CUDA device and dies silently, leaving the rebalance
   half done: on CPU, starting it raises instead.

Only active on vLLM's CPU platform; a no-op elsewhere.
"""

from __future__ import annotations

import inspect
import logging
import time
import types
from typing import Any

import torch

log = logging.getLogger("vllm.eplbd_test_cpu_shim")


class _WallClockEvent:
    """torch.Event's surface for timing on CPU (5)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.t = 0.0

    def record(self, stream: Any = None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _WallClockEvent) -> float:
        return (end.t - self.t) * 1000.0


class _HostStream:
    """What ``torch.accelerator.current_stream()`` returns on CPU (6)."""

    def synchronize(self) -> None:
        pass


def _torch_without_accelerator() -> types.ModuleType:
    """The ``torch`` the EPLB modules see: wall-clock events, a host stream."""
    accel = types.SimpleNamespace(
        **{k: getattr(torch.accelerator, k) for k in dir(torch.accelerator) if k[0] != "_"}
    )
    accel.current_stream = lambda *a, **k: _HostStream()
    mod = types.ModuleType("torch")
    mod.__dict__.update(torch.__dict__)
    mod.Event = _WallClockEvent  # type: ignore[attr-defined]
    mod.accelerator = accel  # type: ignore[attr-defined]
    return mod


def eplb_map_to_physical_and_record(
    topk_ids: torch.Tensor,
    expert_load_view: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    record_enabled: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """vLLM's CUDA map/record semantics in torch, for the CPU backend (4). Written from vLLM's
    Triton kernel (``router/base_router.py``), independently of eplbd's."""
    n = topk_ids.numel()
    if n == 0:
        return topk_ids
    k = topk_ids.shape[-1]
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < logical_to_physical_map.shape[0])
    e = torch.where(valid, flat, 0)
    count = logical_replica_count[e].long().clamp_min(1)
    token = torch.arange(n, dtype=torch.int64) // k
    replica = ((token * 2654435769) & 0xFFFFFFFF) % count
    phys = torch.where(valid, logical_to_physical_map[e, replica].long(), -1)
    if bool(record_enabled.reshape(-1)[0]):
        m = (phys >= 0) & (phys < expert_load_view.numel())
        if num_unpadded_tokens is not None:
            m &= torch.arange(n) < int(num_unpadded_tokens) * k
        hits = phys[m]
        expert_load_view.index_add_(0, hits, torch.ones(hits.numel(), dtype=expert_load_view.dtype))
    return phys.to(topk_ids.dtype).reshape(topk_ids.shape)


class _PlatformAdmittingEplb:
    """The platform as ``config/parallel.py`` sees it (1): the CPU platform, except that its
    EPLB check passes."""

    def __init__(self, platform: Any) -> None:
        self._platform = platform

    def __getattr__(self, name: str) -> Any:
        return getattr(self._platform, name)

    def is_cuda_alike(self) -> bool:
        return True


def _experts_honouring_expert_map(apply: Any) -> Any:
    """(2) ``CPUUnquantizedExperts.apply`` given local ids: a token's non-local experts get
    weight 0 (their partial sums come from the other EP ranks)."""
    sig = inspect.signature(apply)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        b = sig.bind(*args, **kwargs)
        expert_map = b.arguments.get("expert_map")
        if expert_map is not None:
            ids = b.arguments["topk_ids"]
            local = expert_map[ids.long()]
            b.arguments["topk_weights"] = b.arguments["topk_weights"].masked_fill(local < 0, 0)
            b.arguments["topk_ids"] = local.clamp_min(0).to(ids.dtype)
            b.arguments["expert_map"] = None
        return apply(*b.args, **b.kwargs)

    return wrapper


def _load_model_building_eplb_state(load_model: Any) -> Any:
    """(3) ``CPUModelRunner.load_model``, then what the GPU runner does for EPLB."""

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        load_model(self, *args, **kwargs)
        if not self.parallel_config.enable_eplb:
            return
        from vllm.distributed.eplb.eplb_state import EplbState
        from vllm.model_executor.models.interfaces import get_mixture_of_experts_model

        self.eplb_state = EplbState(self.parallel_config, self.device)
        self._moe_model = get_mixture_of_experts_model(self.model)
        if self._moe_model is not None:
            self.eplb_state.add_model(self._moe_model, self.model_config)
            if self.eplb_state.is_async:
                self.eplb_state.start_async_loop()

    return wrapper


def _start_async_loop_refusing(self: Any, *args: Any, **kwargs: Any) -> None:
    """(7) replaces ``EplbState.start_async_loop``."""
    if self.is_async:
        raise RuntimeError("test shim: async EPLB does not run on vLLM's CPU backend")


def register() -> None:
    """vLLM general-plugin hook (``eplbd_test_cpu_shim``)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.config.parallel as parallel
    from vllm.distributed.eplb import eplb_communicator, eplb_state
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe
    from vllm.model_executor.layers.fused_moe.router import base_router
    from vllm.v1.worker import cpu_model_runner

    if isinstance(parallel.current_platform, _PlatformAdmittingEplb):
        return  # already registered in this process
    parallel.current_platform = _PlatformAdmittingEplb(parallel.current_platform)
    experts = cpu_moe.CPUUnquantizedExperts
    experts.apply = _experts_honouring_expert_map(experts.apply)  # type: ignore[method-assign]
    runner = cpu_model_runner.CPUModelRunner
    runner.load_model = _load_model_building_eplb_state(runner.load_model)  # type: ignore[method-assign]
    base_router.eplb_map_to_physical_and_record = eplb_map_to_physical_and_record
    cpu_torch = _torch_without_accelerator()
    eplb_state.torch = cpu_torch  # type: ignore[attr-defined]
    eplb_communicator.torch = cpu_torch  # type: ignore[attr-defined]
    eplb_state.EplbState.start_async_loop = _start_async_loop_refusing  # type: ignore[method-assign]
    log.warning("TEST-ONLY eplbd CPU shim: vLLM's CPU backend runs EP and EPLB in this process")
