"""What the tests ask each vLLM worker (through ``LLM.collective_rpc``): who runs its EPLB
and with which layout. Runs inside the worker process. Not part of eplbd."""

from __future__ import annotations

from typing import Any


def worker_state(worker: Any) -> dict[str, Any]:
    """``{"rank", "eplbd", "epoch", "steps", "stats", "phy2log", "step_impl", "map_impl"}``:
    ``eplbd`` whether the plugin took over; ``phy2log`` the layout served now ([L][P]);
    ``step_impl``/``map_impl`` the qualified names of ``EplbState.step`` and the routers'
    map/record function."""
    from eplbd_client.vllm import active_client
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.distributed.parallel_state import get_ep_group
    from vllm.model_executor.layers.fused_moe.router import base_router

    fn = base_router.eplb_map_to_physical_and_record
    out: dict[str, Any] = {
        "rank": get_ep_group().rank_in_group,
        "step_impl": f"{EplbState.step.__module__}.{EplbState.step.__qualname__}",
        "map_impl": f"{fn.__module__}.{fn.__qualname__}",
    }
    client = active_client()
    if client is not None:
        out.update(
            eplbd=True,
            epoch=client.epoch,
            steps=client.step_count,
            stats=client.stats,
            phy2log=client.layout.phy2log.tolist(),
        )
    else:
        state = worker.model_runner.eplb_state
        ms = next(iter(state.model_states.values()))
        out.update(eplbd=False, phy2log=ms.physical_to_logical_map.cpu().tolist())
    return out
