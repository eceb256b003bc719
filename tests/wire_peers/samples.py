"""One valid example of every message type (body, tensors), for the wire tests."""

from __future__ import annotations

from typing import Any

import torch

from eplbd.wire import ModelShape

L, E, P, G = 4, 8, 12, 3
MODEL = ModelShape(L, E, P)


def phy2log() -> torch.Tensor:
    return (torch.arange(P, dtype=torch.int64) % E).repeat(L, 1)


def counts(dtype: torch.dtype = torch.int32, tokens: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, tokens + 1, (L, P), generator=g, dtype=dtype)


def hello(rank: int = 0) -> dict[str, Any]:
    return {
        "worker": f"n0-gpu{rank}",
        "incarnation": "1a-0123456789ab",
        "group": "g0",
        "ep_rank": rank,
        "ep_size": G,
        "node": "n0",
        "num_layers": L,
        "num_logical_experts": E,
        "num_physical_experts": P,
        "epoch": 0,
        "software_version": "0.1.0",
        "protocol_version": 1,
    }


SCHED = {"window_steps": 100, "record_steps": 10, "enabled": True}


def samples() -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """type -> (body, tensors): a valid message of every type."""
    common = {"group": "g0", "epoch": 3, "ep_rank": 1, "worker": "n0-gpu1"}
    snap = {
        "incarnation": "1a-0123456789ab",
        "group": "g0",
        "seq": 7,
        "epoch": 2,
        "step_start": 100,
        "step_end": 200,
        "tokens": 100,
    }
    return {
        "hello": (hello(), {}),
        "welcome": (
            {"incarnation": "2b-x", "epoch": 3, "schedule": dict(SCHED)},
            {"phy2log": phy2log()},
        ),
        "agent_hello": (
            {
                "agent": "n0",
                "incarnation": "3c-y",
                "node": "n0",
                "software_version": "0.1.0",
                "protocol_version": 1,
                "workers": [hello(0), hello(1)],
            },
            {},
        ),
        "worker_joined": (
            {"agent": "n0", "group": "g0", "ep_rank": 0, "worker": "n0-gpu0", "incarnation": "i"},
            {},
        ),
        "worker_left": (
            {
                "agent": "n0",
                "group": "g0",
                "ep_rank": 0,
                "worker": "n0-gpu0",
                "incarnation": "i",
                "reason": "dead",
            },
            {},
        ),
        "snapshot": ({**snap, "worker": "n0-gpu1", "ep_rank": 1}, {"counts": counts()}),
        "schedule": (dict(SCHED), {}),
        "prepare": ({"group": "g0", "epoch": 4, "timeout_s": 30.0}, {"phy2log": phy2log()}),
        "staged": ({**common, "ok": True, "reason": "", "staged_bytes": 1 << 20}, {}),
        "committed": ({**common, "step": 1234}, {}),
        "abort": ({"group": "g0", "epoch": 4, "reason": "deadline"}, {}),
        "aborted": ({**common, "reason": "out of memory"}, {}),
        "layout": ({"group": "g0", "epoch": 3}, {"phy2log": phy2log()}),
        "heartbeat": ({"sender": "n0-gpu1", "incarnation": "1a-0123456789ab"}, {}),
        "status_request": ({"what": "status", "group": "g0"}, {}),
        "status_reply": (
            {"data": {"schema_version": 1, "groups": [{"name": "g0", "balance": 1.05}]}},
            {"heat": torch.rand(L, G, dtype=torch.float32)},
        ),
        "command": ({"op": "rollback", "group": "g0", "epoch": 2, "dry_run": False}, {}),
        "command_reply": ({"ok": True, "message": "rolled back to epoch 2", "data": {}}, {}),
        "error": (
            {"code": "unknown_group", "message": "no group g9", "in_reply_to": "command"},
            {},
        ),
    }
