"""Frames <-> Message: round trips of every type, framing errors, and fuzzing of decode."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_peers.samples import MODEL, samples

import eplbd.wire as wire
from eplbd.wire import (
    DTYPES,
    MESSAGE_TYPES,
    PROTOCOL_ID,
    PROTOCOL_VERSION,
    SCHEMA_VERSION,
    SNAPSHOT,
    Message,
    WireError,
    decode,
    encode,
    torch_tensors,
    validate,
)

pytestmark = pytest.mark.timeout(120)

HDR = [PROTOCOL_ID, bytes([PROTOCOL_VERSION])]


def reason(frames: list, **kw: int) -> str:
    with pytest.raises(WireError) as ei:
        decode(frames, **kw)
    return ei.value.reason


def body(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def test_all_is_sorted_and_complete() -> None:
    assert wire.__all__ == sorted(wire.__all__)
    for name in wire.__all__:
        assert hasattr(wire, name), name
    for t in MESSAGE_TYPES:  # every type has its constant, named after it
        assert getattr(wire, t.upper()) == t


def test_constants() -> None:
    assert PROTOCOL_ID == b"EPLBD" and PROTOCOL_VERSION == 1 and SCHEMA_VERSION == 1


def test_samples_cover_every_type() -> None:
    assert set(samples()) == MESSAGE_TYPES


@pytest.mark.parametrize("msg_type", sorted(MESSAGE_TYPES))
def test_round_trip_every_type(msg_type: str) -> None:
    b, tensors = samples()[msg_type]
    frames = encode(msg_type, b, tensors)
    assert all(isinstance(f, bytes) for f in frames)
    assert frames[:3] == [*HDR, msg_type.encode()]
    msg = validate(decode(frames), model=MODEL)
    assert msg.type == msg_type and msg.schema == SCHEMA_VERSION
    for k, v in b.items():
        assert msg.body[k] == v
    assert set(msg.tensors) == set(tensors)
    got = torch_tensors(msg)
    for k, t in tensors.items():
        assert isinstance(msg.tensors[k], np.ndarray)
        assert got[k].dtype == t.dtype and torch.equal(got[k], t)


@pytest.mark.parametrize("msg_type", sorted(MESSAGE_TYPES))
def test_a_relay_re_encodes_byte_identical(msg_type: str) -> None:
    b, tensors = samples()[msg_type]
    frames = encode(msg_type, b, tensors)
    msg = decode(frames)
    assert encode(msg.type, msg.body, msg.tensors) == frames


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_every_dtype_round_trips_bit_exact(dtype_name: str) -> None:
    dt = getattr(torch, dtype_name)
    src = torch.randn(3, 5, dtype=torch.float64).mul(1000)
    t = (src > 0) if dt == torch.bool else src.to(dt)
    if dt.is_floating_point:
        t[0, 0] = float("nan")
        t[0, 1] = float("-inf")
    msg = decode(encode("status_reply", {"data": {}}, {"t": t}))
    out = torch_tensors(msg)["t"]
    assert out.dtype == dt and out.shape == t.shape
    assert torch.equal(out.view(torch.uint8), t.contiguous().view(torch.uint8))
    assert msg.body["tensors"][0]["dtype"] == dtype_name
    assert len(encode("status_reply", {"data": {}}, {"t": t})[4]) == t.numel() * DTYPES[dtype_name]


def test_bfloat16_travels_as_raw_bytes() -> None:
    t = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    frames = encode("status_reply", {"data": {}}, {"w": t})
    assert frames[4] == t.view(torch.uint8).numpy().tobytes()
    msg = decode(frames)
    assert msg.tensors["w"].dtype == np.uint16 and msg.wire_dtype("w") == "bfloat16"
    assert torch.equal(torch_tensors(msg)["w"], t)


@pytest.mark.parametrize("dtype_name", sorted(set(DTYPES) - {"bfloat16"}))
def test_numpy_arrays_encode_like_torch_tensors(dtype_name: str) -> None:
    t = torch.arange(-6, 6, dtype=torch.float64).view(3, 4)
    t = (t > 0) if dtype_name == "bool" else t.to(getattr(torch, dtype_name))
    a = t.numpy()
    assert encode("status_reply", {"data": {}}, {"t": a}) == encode(
        "status_reply", {"data": {}}, {"t": t}
    )
    big_endian = a.astype(a.dtype.newbyteorder(">"))
    assert encode("status_reply", {"data": {}}, {"t": big_endian})[4] == a.tobytes()
    got = decode(encode("status_reply", {"data": {}}, {"t": a.T})).tensors["t"]
    assert got.dtype == a.dtype and np.array_equal(got, a.T)


def test_odd_tensors_round_trip() -> None:
    base = torch.arange(24, dtype=torch.int64).view(4, 6)
    cases = {
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 5, dtype=torch.int32),
        "noncontig": base.t(),
        "sliced": base[:, ::2],
    }
    got = torch_tensors(decode(encode("status_reply", {"data": {}}, cases)))
    for k, t in cases.items():
        assert got[k].shape == t.shape and torch.equal(got[k], t), k


def test_decode_from_bytes_copies_so_tensors_are_safe_to_write() -> None:
    c = torch.arange(12, dtype=torch.int32).view(3, 4)
    frames = encode("status_reply", {"data": {}}, {"c": c})
    msg = decode(frames)
    msg.tensors["c"] += 1
    assert np.array_equal(decode(frames).tensors["c"], c.numpy())  # bytes were not written


def test_decode_zmq_frames_is_zero_copy() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://zc")
        b.connect("inproc://zc")
        c = torch.arange(58 * 288, dtype=torch.int32).view(58, 288)
        a.send_multipart(encode("status_reply", {"data": {}}, {"c": c}))
        assert b.poll(2000)
        frames = b.recv_multipart(copy=False)
        msg = decode(frames)
        buf = frames[4].buffer
        arr = msg.tensors["c"]
        assert np.array_equal(arr, c.numpy())
        arr[0, 0] = 12345  # the array is the frame's memory
        assert np.frombuffer(buf, dtype=np.int32)[0] == 12345
        t = torch_tensors(msg)["c"]  # and so is the tensor made from it
        assert t[0, 0].item() == 12345 and t.data_ptr() % 4 == 0
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def test_decode_accepts_memoryview_and_bytearray() -> None:
    b, tensors = samples()["snapshot"]
    frames = encode(SNAPSHOT, b, tensors)
    for conv in (bytearray, memoryview, lambda x: memoryview(bytearray(x))):
        msg = validate(decode([conv(f) for f in frames]), model=MODEL)
        assert np.array_equal(msg.tensors["counts"], tensors["counts"].numpy())


def test_unknown_fields_are_kept_and_ignored() -> None:
    b, tensors = samples()["snapshot"]
    msg = validate(decode(encode(SNAPSHOT, {**b, "future_field": [1, 2]}, tensors)), model=MODEL)
    assert msg.body["future_field"] == [1, 2]


def test_newer_schema_accepted() -> None:
    frames = encode("heartbeat", {"sender": "a", "incarnation": "b"})
    frames[3] = body({"schema": 2, "sender": "a", "incarnation": "b", "new": {"x": 1}})
    assert validate(decode(frames)).schema == 2


# --- framing errors --------------------------------------------------------------------------


def good() -> list[bytes]:
    b, tensors = samples()["snapshot"]
    return encode(SNAPSHOT, b, tensors)


def test_truncated_frame_lists() -> None:
    f = good()
    for n in range(4):
        assert reason(f[:n]) == "truncated"


def test_wrong_frame_counts() -> None:
    f = good()
    assert reason(f[:4]) == "frame_count"  # tensor described, frame missing
    assert reason([*f, b"\x00" * 8]) == "frame_count"  # one frame too many
    hb = encode("heartbeat", {"sender": "a", "incarnation": "b"})
    assert reason([*hb, b"extra"]) == "frame_count"


def test_bad_protocol_and_version() -> None:
    f = good()
    assert reason([b"EPLBX", *f[1:]]) == "bad_protocol"
    assert reason([b"", *f[1:]]) == "bad_protocol"
    for v in (b"\x02", b"\x00", b"", b"\x01\x01", b"1"):
        assert reason([f[0], v, *f[2:]]) == "bad_version"


def test_bad_and_unknown_type() -> None:
    f = good()
    assert reason([*f[:2], b"snapshots", *f[3:]]) == "unknown_type"
    assert reason([*f[:2], b"", *f[3:]]) == "unknown_type"
    assert reason([*f[:2], "snäp".encode(), *f[3:]]) == "bad_type"
    assert reason([*f[:2], b"x" * 1000, *f[3:]]) == "bad_type"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x85",  # map header, no content
        msgpack.packb([1, 2, 3]),
        msgpack.packb(7),
        msgpack.packb("map"),
        msgpack.packb(None),
        msgpack.packb({1: 2, "schema": 1}),  # integer key
        msgpack.packb({"schema": 1, "x": {3: "int key nested"}}),
        msgpack.packb({b"schema": 1}),  # bytes key
        msgpack.packb({"schema": 1}) + b"\x00",  # trailing data
        b"\xa3\xff\xfe\xfd",  # invalid utf-8 string
        b"\x91" * 5000 + b"\xc0",  # deep nesting
    ],
)
def test_bad_bodies(raw: bytes) -> None:
    assert reason([*HDR, b"heartbeat", raw]) in ("bad_body", "bad_schema")


@pytest.mark.parametrize("schema", [None, 0, -1, "1", 1.0, True, [1]])
def test_bad_schema(schema: object) -> None:
    d = {"sender": "a", "incarnation": "b"}
    if schema is not None:
        d["schema"] = schema
    assert reason([*HDR, b"heartbeat", body(d)]) == "bad_schema"


def tensor_msg(spec: object, frames: list[bytes]) -> list[bytes]:
    return [*HDR, b"status_reply", body({"schema": 1, "data": {}, "tensors": spec}), *frames]


def test_tensor_spec_errors() -> None:
    ok = {"name": "t", "dtype": "int32", "shape": [2, 2]}
    data = bytes(16)
    assert decode(tensor_msg([ok], [data])).tensors["t"].shape == (2, 2)
    assert reason(tensor_msg([{**ok, "dtype": "complex64"}], [data])) == "bad_dtype"
    assert reason(tensor_msg([{**ok, "dtype": "object"}], [data])) == "bad_dtype"
    assert reason(tensor_msg([{**ok, "dtype": 3}], [data])) == "bad_dtype"
    assert reason(tensor_msg([{**ok, "shape": [-2, -2]}], [data])) == "bad_tensor_spec"
    assert reason(tensor_msg([{**ok, "shape": [2.0, 2]}], [data])) == "bad_tensor_spec"
    assert reason(tensor_msg([{**ok, "shape": [True, 4]}], [data])) == "bad_tensor_spec"
    assert reason(tensor_msg([{**ok, "shape": [1] * 9}], [b"\0" * 4])) == "bad_tensor_spec"
    assert reason(tensor_msg([{**ok, "shape": "2x2"}], [data])) == "bad_tensor_spec"
    assert reason(tensor_msg([{**ok, "name": ""}], [data])) == "bad_tensor_spec"
    assert reason(tensor_msg([ok, ok], [data, data])) == "bad_tensor_spec"  # repeated name
    assert reason(tensor_msg(["t"], [data])) == "bad_tensor_spec"
    assert reason(tensor_msg({"t": ok}, [data])) == "bad_tensor_spec"
    assert reason(tensor_msg([ok] * 17, [data] * 17)) == "bad_tensor_spec"


def test_tensor_frame_size_mismatch() -> None:
    ok = {"name": "t", "dtype": "int64", "shape": [3, 4]}
    for n in (0, 95, 97, 48, 1000):
        assert reason(tensor_msg([ok], [bytes(n)])) == "tensor_size"
    assert reason(tensor_msg([{**ok, "shape": [2**39, 2**39]}], [bytes(8)])) == "tensor_size"


def test_size_limit() -> None:
    f = good()
    total = sum(map(len, f))
    assert decode(f, max_bytes=total).type == SNAPSHOT
    assert reason(f, max_bytes=total - 1) == "too_large"
    big = tensor_msg([{"name": "t", "dtype": "uint8", "shape": [1 << 20]}], [bytes(1 << 20)])
    assert reason(big, max_bytes=1 << 19) == "too_large"


def test_bool_frames_are_normalised() -> None:
    frames = tensor_msg([{"name": "b", "dtype": "bool", "shape": [3]}], [bytes([0, 1, 7])])
    assert decode(frames).tensors["b"].tolist() == [False, True, True]


def test_decode_rejects_non_frames() -> None:
    assert reason([*HDR, b"heartbeat", 12345]) == "bad_body"  # type: ignore[list-item]
    assert reason(None) == "truncated"  # type: ignore[arg-type]
    odd = memoryview(bytes(16)).cast("B", (4, 4))[::2]
    assert reason([*HDR, b"heartbeat", odd]) == "bad_body"


def test_encode_refuses_what_a_receiver_would_refuse() -> None:
    with pytest.raises(WireError) as ei:
        encode("nope", {})
    assert ei.value.reason == "unknown_type"
    with pytest.raises(WireError):
        encode("status_reply", {"data": {1: 2}})
    with pytest.raises(WireError) as ei:
        encode("status_reply", {"data": {}}, {"c": torch.zeros(2, dtype=torch.complex64)})
    assert ei.value.reason == "bad_dtype"
    for bad in (np.zeros(2, dtype=np.complex64), np.zeros(2, dtype=np.uint16)):
        with pytest.raises(WireError) as ei:
            encode("status_reply", {"data": {}}, {"c": bad})
        assert ei.value.reason == "bad_dtype"
    with pytest.raises(WireError):
        encode("status_reply", {"data": {}}, {"c": [1, 2]})  # type: ignore[dict-item]


def test_wire_error_reasons_are_closed() -> None:
    with pytest.raises(ValueError):
        WireError("not_a_reason")
    e = WireError("bad_field", "x")
    assert e.reason == "bad_field" and "x" in str(e) and isinstance(e, ValueError)


# --- fuzzing: decode (and validate) raise WireError and nothing else ---------------------------


def decode_only_wire_errors(frames: list) -> Message | None:
    try:
        msg = decode(frames, max_bytes=1 << 16)
    except WireError:
        return None
    try:
        return validate(msg, model=MODEL)
    except WireError:
        return None


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_fuzz_random_frames(frames: list[bytes]) -> None:
    decode_only_wire_errors(frames)


@FUZZ
@given(
    st.sampled_from(sorted(MESSAGE_TYPES)),
    st.binary(max_size=300),
    st.lists(st.binary(max_size=64), max_size=4),
)
def test_fuzz_random_bodies_behind_valid_header(
    msg_type: str, raw: bytes, tensors: list[bytes]
) -> None:
    decode_only_wire_errors([*HDR, msg_type.encode(), raw, *tensors])


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(FUZZ, max_examples=150)
@given(
    st.sampled_from(sorted(MESSAGE_TYPES)),
    st.data(),
)
def test_fuzz_structured_bodies(msg_type: str, data: st.DataObject) -> None:
    """Valid msgpack maps with the real field names but random values (and tensor specs)."""
    b, tensors = samples()[msg_type]
    d: dict = {"schema": 1}
    for k in b:
        if data.draw(st.booleans()):
            d[k] = b[k] if data.draw(st.booleans()) else data.draw(msgpack_values)
    frames: list[bytes] = []
    if tensors and data.draw(st.booleans()):
        name = next(iter(tensors))
        dtype = data.draw(st.sampled_from([*DTYPES, "int128"]))
        shape = data.draw(st.lists(st.integers(-1, 20), max_size=3))
        n = data.draw(st.integers(0, 2000))
        d["tensors"] = [{"name": name, "dtype": dtype, "shape": shape}]
        frames = [bytes(data.draw(st.binary(min_size=n, max_size=n)) if n < 64 else bytes(n))]
    decode_only_wire_errors([*HDR, msg_type.encode(), body(d), *frames])


@FUZZ
@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.data())
def test_fuzz_mutated_valid_messages(msg_type: str, data: st.DataObject) -> None:
    b, tensors = samples()[msg_type]
    frames = [bytearray(f) for f in encode(msg_type, b, tensors)]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frames) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "drop", "dup"]))
        if op == "flip" and frames[i]:
            j = data.draw(st.integers(0, len(frames[i]) - 1))
            frames[i][j] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            frames[i] = frames[i][: data.draw(st.integers(0, len(frames[i])))]
        elif op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "dup":
            frames.insert(i, bytearray(frames[i]))
    decode_only_wire_errors([bytes(f) for f in frames])


@FUZZ
@given(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**63), 2**63 - 1))
def test_fuzz_numbers_in_snapshot(f: float, i: int) -> None:
    b, tensors = samples()["snapshot"]
    for k in ("tokens", "seq", "step_end"):
        for v in (f, i):
            msg = decode_only_wire_errors(encode(SNAPSHOT, {**b, k: v}, tensors))
            if msg is not None:  # accepted only when it is a sane non-negative int
                assert (
                    isinstance(v, int) and 0 <= v and not (isinstance(v, float) and math.isnan(v))
                )


def test_codec_needs_no_torch() -> None:
    """The agent and the CLI never import torch: tensors decode to numpy arrays."""
    pkg = Path(__file__).resolve().parent.parent / "eplbd"
    code = f"""
import sys, types
import numpy as np
sys.modules["torch"] = None  # any import of torch now fails
pkg = types.ModuleType("eplbd"); pkg.__path__ = [{str(pkg)!r}]; sys.modules["eplbd"] = pkg
import eplbd.wire as w
m = w.validate(w.decode(w.encode("status_request", {{"what": "status"}})))
assert m.body["group"] is None
b = {{"agent": "a", "ep_ranks": [0], "incarnation": "i", "group": "g", "seq": 1, "epoch": 0,
      "step_start": 0, "step_end": 4, "tokens": 9}}
c = np.full((2, 8), 9, dtype=np.int32)
m = w.validate(w.decode(w.encode("snapshot", b, {{"counts": c}})), model=w.ModelShape(2, 4, 8))
assert np.array_equal(m.tensors["counts"], c)
try:
    w.decode(w.encode("heartbeat", {{"sender": "a", "incarnation": "b"}})[:3])
except w.WireError as e:
    print("ok", e.reason)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok truncated"
