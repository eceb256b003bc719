"""What the plugin changes in vLLM 0.32, one patch per thing it replaces.

vLLM's EPLB lives in ``vllm.distributed.eplb.eplb_state.EplbState``: the model runner builds
one per worker, ``add_model`` gives it the MoE model after loading (both model runners, V1
and V2, go through it), and ``step`` is called once after every forward pass on every rank,
dummy and profile passes included. Each MoE layer's router maps and records through its
``EplbLayerState`` tensors with ``base_router.eplb_map_to_physical_and_record``.

- :func:`eplb_state_add_model` (wraps ``EplbState.add_model``): vLLM builds its state as
  usual, then the model is handed to one :class:`~eplbd_client.EplbClient` for this worker,
  unless :func:`refusal` finds a reason not to (then vLLM's own EPLB runs untouched). The
  client is built from vLLM's EP group (device group, gloo ``cpu_group``), with its weight
  transfers on vLLM's dedicated EPLB group; every MoE layer's expert weights are registered
  and its ``EplbLayerState`` is pointed at the client's routing tensors.
- :func:`eplb_state_step` (wraps ``EplbState.step``): in a worker whose state was handed
  over, ``client.step()`` instead of vLLM's trigger and rebalancing; layouts come only from
  the planner, applied by eplbd's staging and consensus.
- :func:`eplb_map_to_physical_and_record` (replaces ``base_router``'s function of that name
  once a model was handed over): :func:`eplbd.kernels.map_and_record`, same contract as
  vLLM's per-element-atomic Triton kernel (and, on CPU, where vLLM has only a stub, eplbd's
  torch implementation). On other platforms (ROCm, XPU) vLLM's kernel stays; it reads the
  same tensors.

Installing the patches changes nothing by itself: an ``EplbState`` that was not handed over
runs vLLM's own code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eplbd.kernels import map_and_record
from eplbd_client import EplbClient, PeerWeightSource
from eplbd_client.vllm._settings import VllmPluginSettings

__all__ = [
    "Handover",
    "active_client",
    "eplb_map_to_physical_and_record",
    "install",
    "refusal",
]

log = logging.getLogger("vllm.eplbd")

_HANDOVER = "_eplbd_handover"  # attribute of a handed-over EplbState
_PATCHED = "_eplbd_patch"  # marks our wrappers (install is idempotent)
_active: EplbClient | None = None


def active_client() -> EplbClient | None:
    """The client this worker handed its MoE layers to, or None (not handed over)."""
    return _active


@dataclass
class Handover:
    """A worker's EPLB handed to eplbd: its client and vLLM's padding counters.

    padding: vLLM's per-micro-batch device scalars of real (unpadded) tokens, which the
    router passes to map/record; zeroed after every real step so that a dummy forward (idle
    DP rank, profile run), which does not set them, is mapped but never counted.
    """

    client: EplbClient
    padding: Sequence[torch.Tensor]
    served: int = 0

    def step(self, is_dummy: bool) -> None:
        c = self.client
        c.step()
        if not is_dummy:
            for t in self.padding:
                t.zero_()
        if c.epoch != self.served:
            self.served = c.epoch
            if c.ep_rank == 0:
                log.info(
                    "eplbd: group %s serves epoch %d from step %d",
                    c.group_name,
                    c.epoch,
                    c.step_count,
                )


def refusal(
    parallel_config: Any, model: Any, *, model_name: str | None, registered: int
) -> str | None:
    """Why eplbd must not take over this EPLB state (None: it may). Pure; duck-typed.

    ``registered``: models in the state after vLLM's ``add_model`` (a draft model comes
    first)."""
    eplb = parallel_config.eplb_config
    if eplb.use_async:
        return "async EPLB is on; pass --eplb-config '{\"use_async\": false}'"
    if getattr(parallel_config, "enable_elastic_ep", False):
        return "elastic EP is not supported"
    if getattr(parallel_config, "pipeline_parallel_size", 1) != 1:
        return "pipeline parallelism is not supported"
    if model_name is not None or registered != 1:
        return "more than one model uses EPLB (an MoE draft model?)"
    for attr in ("num_moe_layers", "num_logical_experts", "num_physical_experts", "moe_layers"):
        if not hasattr(model, attr):
            return f"the model is not a vLLM MixtureOfExperts model (no {attr})"
    if model.num_moe_layers < 1 or len(model.moe_layers) != model.num_moe_layers:
        return "the model has no MoE layers on this rank"
    if any(getattr(layer, "eplb_state", None) is None for layer in model.moe_layers):
        return "an MoE layer has no EPLB state"
    return None


def install(settings: VllmPluginSettings) -> None:
    """Wrap ``EplbState.add_model`` and ``EplbState.step`` (idempotent)."""
    from vllm.distributed.eplb.eplb_state import EplbState

    if getattr(EplbState.step, _PATCHED, False):
        return
    add_model, step = EplbState.add_model, EplbState.step

    def eplb_state_add_model(
        self: Any, model: Any, model_config: Any, model_name: str | None = None
    ) -> None:
        if getattr(self, _HANDOVER, None) is not None:
            raise RuntimeError(
                "eplbd took over this worker's EPLB, and vLLM now adds a second model to it "
                "(an MoE draft model?): not supported; unset EPLBD_AGENT"
            )
        add_model(self, model, model_config, model_name)
        _take_over(self, model, model_config, model_name, settings)

    def eplb_state_step(
        self: Any, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False
    ) -> None:
        h: Handover | None = getattr(self, _HANDOVER, None)
        if h is None:
            step(self, is_dummy, is_profile, log_stats)
        else:
            h.step(is_dummy or is_profile)

    wrappers: list[tuple[Any, Any]] = [(eplb_state_add_model, add_model), (eplb_state_step, step)]
    for wrapper, original in wrappers:
        setattr(wrapper, _PATCHED, True)
        wrapper.__wrapped__ = original
        wrapper.__doc__ = f"eplbd's patch of vLLM's EplbState.{original.__name__}."
    EplbState.add_model = eplb_state_add_model
    EplbState.step = eplb_state_step


def eplb_map_to_physical_and_record(
    topk_ids: torch.Tensor,
    expert_load_view: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    record_enabled: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """vLLM's signature, eplbd's kernel (same contract: Knuth-hash replica choice, -1 for ids
    outside [0, E), count only while ``record_enabled`` and for unpadded tokens)."""
    return map_and_record(
        topk_ids,
        logical_to_physical_map,
        logical_replica_count,
        expert_load_view,
        record_enabled,
        num_unpadded_tokens,
    )


def _take_over(
    state: Any,
    model: Any,
    model_config: Any,
    model_name: str | None,
    settings: VllmPluginSettings,
) -> None:
    global _active
    reason = refusal(
        state.parallel_config, model, model_name=model_name, registered=len(state.model_states)
    )
    if reason is not None:
        log.warning("eplbd: vLLM's own EPLB runs, eplbd does not take over: %s", reason)
        return
    from vllm.distributed.parallel_state import get_ep_group

    ep = get_ep_group()
    client: EplbClient | None = None
    try:
        client = _build_client(model, model_config, settings)
        failed = None
    except Exception as e:  # every rank must take the same road: agree below
        failed = e
    if not _all_ranks_ok(ep.cpu_group, failed is None):
        if client is not None:
            client.close()
        log.warning(
            "eplbd: vLLM's own EPLB runs: building the eplbd client failed on %s: %s",
            "this rank" if failed is not None else "another rank",
            failed if failed is not None else "see its log",
        )
        return
    assert client is not None
    for i, layer in enumerate(model.moe_layers):
        st = client.layer_state(i)
        ls = layer.eplb_state
        ls.logical_to_physical_map = st.logical_to_physical_map
        ls.logical_replica_count = st.logical_replica_count
        ls.expert_load_view = st.expert_load
        ls.should_record_tensor = st.should_record
    ms = next(iter(state.model_states.values()))
    padding = list(ms.num_unpadded_tokens_tensors or [])
    # vLLM's weight-transfer buffer (one layer's local experts) is never used again: give
    # its memory to eplbd's staging.
    ms.expert_buffer = []
    _route_through_eplbd(client)
    setattr(state, _HANDOVER, Handover(client, padding, served=client.epoch))
    _active = client
    log.info(
        "eplbd: took over EPLB: group %s, EP rank %d of %d, %d MoE layers, %d experts, %d "
        "slots, agent %s; vLLM's rebalancing is off, layouts come from the eplbd planner",
        client.group_name,
        client.ep_rank,
        client.ep_size,
        client.num_layers,
        client.num_logical_experts,
        client.num_physical_experts,
        settings.agent,
    )


def _build_client(model: Any, model_config: Any, settings: VllmPluginSettings) -> EplbClient:
    from vllm.distributed.parallel_state import get_ep_group, get_eplb_group, get_node_count

    ep, eplb = get_ep_group(), get_eplb_group()
    G = ep.world_size
    nodes = max(1, get_node_count())
    weights = [list(ws) for ws in model.expert_weights]
    first = model.moe_layers[0]
    top_k = getattr(getattr(first, "router", None), "top_k", None)
    client = EplbClient(
        model.num_moe_layers,
        model.num_logical_experts,
        model.num_physical_experts,
        ep_rank=ep.rank_in_group,
        ep_size=G,
        agent=settings.agent,
        device=weights[0][0].device,
        group=ep.device_group,
        cpu_group=ep.cpu_group,
        weight_source=PeerWeightSource(
            eplb.device_group, gpus_per_node=G // nodes if G % nodes == 0 else G
        ),
        sync_interval=settings.sync_interval,
        staging_budget_bytes=settings.staging_budget_bytes,
        top_k=top_k if isinstance(top_k, int) else None,
        group_name=settings.group or _default_group(model_config),
        node=settings.node,
    )
    try:
        for layer, ws in enumerate(weights):
            client.register_expert_weights(layer, ws)
    except Exception:
        client.close()
        raise
    return client


def _default_group(model_config: Any) -> str:
    name = str(getattr(model_config, "served_model_name", None) or model_config.model)
    return f"vllm:{name}"[:256]


def _all_ranks_ok(cpu_group: Any, ok: bool) -> bool:
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if dist.get_world_size(cpu_group) > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=cpu_group)
    return int(flag.item()) == 0


def _route_through_eplbd(client: EplbClient) -> None:
    """Replace vLLM's map/record in the routers with eplbd's kernel where the contract is the
    same: CUDA (vLLM's per-element-atomic Triton kernel) and CPU (vLLM has a stub)."""
    from vllm.model_executor.layers.fused_moe.router import base_router
    from vllm.platforms import current_platform

    dev = client.layer_state(0).expert_load.device.type
    if dev == "cpu" or (dev == "cuda" and current_platform.is_cuda()):
        base_router.eplb_map_to_physical_and_record = eplb_map_to_physical_and_record
        log.info("eplbd: MoE routers map and record with eplbd.kernels.map_and_record (%s)", dev)
