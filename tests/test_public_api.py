"""Every package's public surface: a sorted ``__all__`` whose names all resolve."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "eplbd",
    "eplbd.agent",
    "eplbd.controller",
    "eplbd.kernels",
    "eplbd.ops",
    "eplbd.planner",
    "eplbd.testing",
    "eplbd.wire",
    "eplbd_client",
    "eplbd_client.vllm",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    mod = importlib.import_module(name)
    names = list(mod.__all__)
    assert names == sorted(names), f"{name}.__all__ is not sorted"
    assert len(set(names)) == len(names), f"{name}.__all__ repeats a name"
    for n in names:
        assert getattr(mod, n, None) is not None, f"{name}.{n} is listed but missing"


def test_fixed_interfaces_are_public() -> None:
    from eplbd_client import EplbClient

    from eplbd.kernels import map_and_record
    from eplbd.planner import plan, rebalance_experts

    assert callable(map_and_record) and callable(plan) and callable(rebalance_experts)
    for method in (
        "register_expert_weights",
        "map_and_record",
        "step",
        "layer_state",
        "prepare",
        "close",
    ):
        assert callable(getattr(EplbClient, method))
    assert isinstance(EplbClient.epoch, property)
