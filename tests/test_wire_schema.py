"""validate(): required fields, types, ranges, tensors against the model, defaults."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from wire_peers.samples import MODEL, E, L, P, hello, phy2log, samples

from eplbd.wire import (
    MESSAGE_TYPES,
    PHY2LOG_DTYPES,
    PHY2LOG_FIELD,
    Message,
    ModelShape,
    WireError,
    accepted_phy2log_dtypes,
    decode,
    encode,
    error_body,
    narrow_phy2log,
    validate,
    validate_body,
)
from eplbd.wire._schema import SCHEMAS

pytestmark = pytest.mark.timeout(60)


def check(msg_type: str, body: dict[str, Any], tensors: dict | None = None, model=MODEL) -> Message:
    return validate(decode(encode(msg_type, body, tensors)), model=model)


def reason(msg_type: str, body: dict[str, Any], tensors: dict | None = None, model=MODEL) -> str:
    with pytest.raises(WireError) as ei:
        check(msg_type, body, tensors, model)
    return ei.value.reason


def wrong_value(value: Any) -> Any:
    """A value of another type than ``value``."""
    if isinstance(value, bool):
        return 1
    if isinstance(value, str):
        return 12345
    if isinstance(value, int | float):
        return "12"
    return 3.5


@pytest.mark.parametrize("msg_type", sorted(MESSAGE_TYPES))
def test_every_required_field_is_required_and_typed(msg_type: str) -> None:
    body, tensors = samples()[msg_type]
    for field in SCHEMAS[msg_type].required:
        b = dict(body)
        del b[field]
        assert reason(msg_type, b, tensors) == "missing_field", field
        b[field] = wrong_value(body[field])
        assert reason(msg_type, b, tensors) == "bad_field", field
        b[field] = None
        assert reason(msg_type, b, tensors) == "bad_field", field


@pytest.mark.parametrize("msg_type", sorted(MESSAGE_TYPES))
def test_optional_fields_get_defaults(msg_type: str) -> None:
    body, tensors = samples()[msg_type]
    opt = SCHEMAS[msg_type].optional
    b = {k: v for k, v in body.items() if k not in opt or k in ("worker", "ep_rank")}
    if msg_type == "command":
        b["op"] = "rebalance"  # rollback needs its epoch
    msg = check(msg_type, b, tensors)
    for k, (_, default) in opt.items():
        if k not in b:
            assert msg.body[k] == default
    for k, _ in opt.items():
        if k in b:
            bad = dict(b)
            bad[k] = [object.__name__]  # a list where none is allowed
            if k != "ep_ranks":
                assert reason(msg_type, bad, tensors) == "bad_field", k


def test_bools_are_not_ints_and_ints_not_bools() -> None:
    b, t = samples()["snapshot"]
    assert reason("snapshot", {**b, "seq": True}, t) == "bad_field"
    s = samples()["schedule"][0]
    assert reason("schedule", {**s, "enabled": 1}) == "bad_field"


def test_int_ranges() -> None:
    b, t = samples()["snapshot"]
    assert reason("snapshot", {**b, "seq": -1}, t) == "bad_field"
    assert reason("snapshot", {**b, "epoch": 2**64 - 1}, t) == "bad_field"
    assert reason("snapshot", {**b, "step_end": 99}, t) == "bad_field"  # < step_start
    assert reason("snapshot", {**b, "tokens": 2**48 + 1}, t) == "bad_field"
    assert reason("snapshot", {**b, "worker": ""}, t) == "bad_field"
    assert reason("snapshot", {**b, "worker": "x" * 257}, t) == "bad_field"


# --- snapshot counts -------------------------------------------------------------------------


def snap(counts: torch.Tensor, **kw: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    b, _ = samples()["snapshot"]
    return {**b, **kw}, {"counts": counts}


def test_snapshot_counts_checks() -> None:
    c = torch.full((L, P), 5, dtype=torch.int32)
    assert check("snapshot", *snap(c)).tensors["counts"] is not None
    assert check("snapshot", *snap(c.long())).body["tokens"] == 100
    neg = c.clone()
    neg[2, 3] = -1
    assert reason("snapshot", *snap(neg)) == "bad_count"
    huge = c.long()
    huge[0, 0] = 2**62
    assert reason("snapshot", *snap(huge)) == "bad_count"
    assert reason("snapshot", *snap(c, tokens=4)) == "bad_count"  # a count above tokens
    assert check("snapshot", *snap(torch.zeros(L, P, dtype=torch.int32), tokens=0))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.int16, torch.uint8, torch.bool]
)
def test_snapshot_counts_dtype(dtype: torch.dtype) -> None:
    c = torch.ones(L, P).to(dtype)
    assert reason("snapshot", *snap(c)) == "bad_dtype"


def test_snapshot_nan_counts_refused() -> None:
    c = torch.ones(L, P, dtype=torch.float64)
    c[1, 1] = float("nan")
    assert reason("snapshot", *snap(c)) == "bad_dtype"


def test_snapshot_shapes() -> None:
    c = torch.ones(L, P, dtype=torch.int32)
    assert reason("snapshot", *snap(c[:, :-1])) == "bad_shape"
    assert reason("snapshot", *snap(c[:-1])) == "bad_shape"
    assert reason("snapshot", *snap(c.reshape(-1))) == "bad_shape"
    assert reason("snapshot", *snap(c.reshape(2, L, -1))) == "bad_shape"
    assert check("snapshot", *snap(c[:, :-1]), model=None)  # without a model: 2-D is enough
    b, _ = snap(c)
    assert reason("snapshot", b, {}) == "missing_tensor"
    assert reason("snapshot", b, {"count": c}) == "missing_tensor"


def test_snapshot_sender_pairs() -> None:
    c = torch.ones(L, P, dtype=torch.int32)
    b, t = snap(c)
    agent = {k: v for k, v in b.items() if k not in ("worker", "ep_rank")}
    msg = check("snapshot", {**agent, "agent": "n0", "ep_ranks": [0, 1]}, t)
    assert msg.body["worker"] is None and msg.body["ep_ranks"] == [0, 1]
    assert reason("snapshot", agent, t) == "missing_field"
    assert reason("snapshot", {**b, "agent": "n0", "ep_ranks": [0]}, t) == "missing_field"
    assert reason("snapshot", {**agent, "agent": "n0", "ep_ranks": [0, -1]}, t) == "bad_field"
    # a whole pair and a stray field of the other, or an agent naming no rank
    assert reason("snapshot", {**b, "agent": "n0"}, t) == "missing_field"
    assert reason("snapshot", {**agent, "agent": "n0", "ep_ranks": [0], "worker": "w"}, t) == (
        "missing_field"
    )
    assert reason("snapshot", {**agent, "agent": "n0", "ep_ranks": []}, t) == "bad_field"


# --- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("msg_type", ["prepare", "layout", "welcome"])
def test_phy2log_checks(msg_type: str) -> None:
    b, _ = samples()[msg_type]
    p = phy2log()
    assert check(msg_type, b, {"phy2log": p})
    out = p.clone()
    out[1, 2] = E
    assert reason(msg_type, b, {"phy2log": out}) == "bad_layout"
    out[1, 2] = -1
    assert reason(msg_type, b, {"phy2log": out}) == "bad_layout"
    # the compact forms (int16, int32) are read; other dtypes are refused
    assert check(msg_type, b, {"phy2log": p.int()})
    assert check(msg_type, b, {"phy2log": p.short()})
    assert reason(msg_type, b, {"phy2log": out.short()}) == "bad_layout"
    assert reason(msg_type, b, {"phy2log": p.to(torch.int8)}) == "bad_dtype"
    assert reason(msg_type, b, {"phy2log": p.to(torch.uint8)}) == "bad_dtype"
    assert reason(msg_type, b, {"phy2log": p.double()}) == "bad_dtype"
    assert reason(msg_type, b, {"phy2log": p[:, :-1]}) == "bad_shape"
    assert reason(msg_type, b, {}) == "missing_tensor"
    big = p.clone()
    big[0, 0] = E + 5  # without a model only negatives are refused
    assert check(msg_type, b, {"phy2log": big}, model=None)


@pytest.mark.parametrize("msg_type", ["prepare", "layout", "welcome"])
def test_share_checks(msg_type: str) -> None:
    """The optional weighted split: absent is the equal split; a bad one is refused."""
    b, _ = samples()[msg_type]
    p = phy2log()  # experts 0-3 in slots e and e + 8, experts 4-7 once
    share = torch.ones(L, P, dtype=torch.int64)
    share[:, 8] = 0  # expert 0's rows all to slot 0
    share[:, 1] = 3  # expert 1's rows 3 : 1 to slots 1 and 9
    msg = check(msg_type, b, {"phy2log": p, "share": share})
    assert torch.equal(torch.from_numpy(msg.tensors["share"]), share)
    assert reason(msg_type, b, {"phy2log": p, "share": share.double()}) == "bad_dtype"
    nan = share.double()
    nan[0, 0] = float("nan")
    assert reason(msg_type, b, {"phy2log": p, "share": nan}) == "bad_dtype"
    assert reason(msg_type, b, {"phy2log": p, "share": share[:, :-1]}) == "bad_shape"
    neg = share.clone()
    neg[2, 3] = -1
    assert reason(msg_type, b, {"phy2log": p, "share": neg}) == "bad_layout"
    idle = share.clone()
    idle[3, 0] = 0  # expert 0 of layer 3: both replicas idle
    assert reason(msg_type, b, {"phy2log": p, "share": idle}) == "bad_layout"
    wide = share.clone()
    wide[1, 4] = P - E + 2  # more than the engines' maps hold
    assert reason(msg_type, b, {"phy2log": p, "share": wide}) == "bad_layout"
    # without a model, the shape against phy2log and the sign are still checked
    assert reason(msg_type, b, {"phy2log": p, "share": neg}, model=None) == "bad_layout"
    assert reason(msg_type, b, {"phy2log": p, "share": share[1:]}, model=None) == "bad_shape"
    assert check(msg_type, b, {"phy2log": p, "share": idle}, model=None)


def test_phy2log_compact_form() -> None:
    """A sender narrows phy2log to what the receiver declared; an old peer gets int64."""
    p = phy2log().numpy()
    assert accepted_phy2log_dtypes({}) == ("int64",)  # an older peer declares nothing
    assert accepted_phy2log_dtypes({PHY2LOG_FIELD: "int16"}) == ("int64",)  # malformed
    new = accepted_phy2log_dtypes({PHY2LOG_FIELD: ["int16", "int32", "int64", "int4"]})
    assert new == PHY2LOG_DTYPES
    assert accepted_phy2log_dtypes({PHY2LOG_FIELD: ["int32", 7]}) == ("int32", "int64")
    assert narrow_phy2log(p, ("int64",)).dtype == np.int64
    small = narrow_phy2log(p, new)
    assert small.dtype == np.int16 and small.flags.c_contiguous
    assert np.array_equal(small, p)
    wide = p.copy()
    wide[0, 0] = 40000  # does not fit int16: the next accepted type
    assert narrow_phy2log(wide, new).dtype == np.int32
    assert narrow_phy2log(wide, ("int16", "int64")).dtype == np.int64
    # a narrowed frame decodes and validates like the int64 one
    frames = encode("prepare", samples()["prepare"][0], {"phy2log": small})
    msg = validate(decode(frames), model=MODEL)
    assert msg.tensors["phy2log"].dtype == np.int16
    assert np.array_equal(msg.tensors["phy2log"], p)


def test_prepare_epoch_and_timeout() -> None:
    b, t = samples()["prepare"]
    assert reason("prepare", {**b, "epoch": 0}, t) == "bad_field"
    for bad in (0, -1.0, float("nan"), float("inf"), 1e9, "5"):
        assert reason("prepare", {**b, "timeout_s": bad}, t) == "bad_field", bad
    assert check("prepare", {**b, "timeout_s": 5}, t).body["timeout_s"] == 5


def test_welcome_epoch_zero_needs_no_layout_and_schedule_is_checked() -> None:
    b, _ = samples()["welcome"]
    assert check("welcome", {**b, "epoch": 0}, None).tensors == {}
    bad = {**b, "epoch": 0, "schedule": {"window_steps": 10, "record_steps": 11, "enabled": True}}
    assert reason("welcome", bad) == "bad_field"
    assert reason("welcome", {**b, "epoch": 0, "schedule": {"window_steps": 10}}) == "missing_field"


def test_schedule_ranges() -> None:
    s = samples()["schedule"][0]
    assert reason("schedule", {**s, "window_steps": 0}) == "bad_field"
    assert reason("schedule", {**s, "record_steps": s["window_steps"] + 1}) == "bad_field"
    assert check("schedule", {**s, "record_steps": s["window_steps"]})


# --- hello and the model ---------------------------------------------------------------------


def test_hello_consistency() -> None:
    h = hello()
    assert reason("hello", {**h, "ep_rank": h["ep_size"]}) == "bad_field"
    assert reason("hello", {**h, "ep_size": 0}) == "bad_field"
    assert reason("hello", {**h, "num_physical_experts": E - 1}) == "bad_field"
    assert reason("hello", {**h, "num_physical_experts": P + 1}) == "bad_field"  # % ep_size
    assert reason("hello", {**h, "num_layers": L + 1}) == "model_mismatch"
    assert check("hello", {**h, "num_layers": L + 1}, model=None)
    assert ModelShape.from_hello(check("hello", h).body) == MODEL


def test_agent_hello_validates_each_worker() -> None:
    b, _ = samples()["agent_hello"]
    bad = hello(1)
    del bad["group"]
    with pytest.raises(WireError) as ei:
        check("agent_hello", {**b, "workers": [hello(0), bad]})
    assert ei.value.reason == "missing_field" and "workers[1]" in ei.value.detail
    assert reason("agent_hello", {**b, "workers": [hello(0), "x"]}) == "bad_field"
    assert check("agent_hello", {**b, "workers": []}).body["workers"] == []


def test_model_shape_validation() -> None:
    for bad in [(0, 1, 1), (1, 4, 3), (1, 1.0, 1), (True, 1, 1)]:
        with pytest.raises(WireError):
            ModelShape(*bad)  # type: ignore[arg-type]
    assert ModelShape(58, 256, 288).lp == (58, 288)
    with pytest.raises(WireError):
        ModelShape.from_hello({"num_layers": 1})


# --- CLI messages ----------------------------------------------------------------------------


def test_command_rules() -> None:
    b = {"op": "rebalance", "group": "g0"}
    msg = check("command", b)
    assert msg.body["dry_run"] is False and msg.body["layers"] is None and msg.body["epoch"] is None
    assert reason("command", {**b, "op": "explode"}) == "bad_field"
    assert reason("command", {**b, "op": "rollback"}) == "bad_field"  # needs an epoch
    assert reason("command", {**b, "layers": [1, -2]}) == "bad_field"
    assert reason("command", {**b, "dry_run": "yes"}) == "bad_field"
    assert check("command", {**b, "dry_run": None}).body["dry_run"] is False


def test_error_body_and_reply() -> None:
    e = WireError("bad_count", "negative count -1")
    b = error_body(e, "snapshot")
    msg = check("error", b)
    assert msg.body == {**b, "schema": 1}
    assert check("error", {"code": "x", "message": ""}).body["in_reply_to"] == ""


def test_validate_body_and_foreign_input() -> None:
    assert validate_body("schedule", {"window_steps": 5, "record_steps": 5, "enabled": False})
    with pytest.raises(WireError):
        validate_body("schedule", [1, 2])
    with pytest.raises(WireError) as ei:
        validate("not a message")  # type: ignore[arg-type]
    assert ei.value.reason == "unknown_type"


def test_validate_does_not_mutate_the_input() -> None:
    msg = decode(encode("command", {"op": "freeze", "group": "g0"}))
    before = dict(msg.body)
    out = validate(msg)
    assert msg.body == before and "dry_run" in out.body
