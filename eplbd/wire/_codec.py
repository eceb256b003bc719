"""Frames <-> :class:`Message`: the byte format of every eplbd message.

A message is one ZeroMQ multipart message (ROUTER identity frames, if any, are stripped
before :func:`decode`)::

    frame 0   b"EPLBD"             PROTOCOL_ID
    frame 1   b"\\x01"              PROTOCOL_VERSION, one byte
    frame 2   b"snapshot"          message type, ASCII (one of MESSAGE_TYPES)
    frame 3   msgpack map          body, string keys, always "schema": SCHEMA_VERSION, and
                                   "tensors": [{"name", "dtype", "shape"}, ...] when tensors follow
    frame 4.. raw tensor bytes     one frame per entry of body["tensors"], C order, native
                                   little-endian; bfloat16 travels as its uint8 view

Why raw frames and not msgpack arrays: a [58, 288] int32 count tensor is 66 KB that
``numpy.frombuffer`` turns into an array without parsing or copying. Never pickle: every
byte that arrives is untrusted.

No torch here: tensors decode to numpy arrays, so the processes that only relay and sum
counts (the agent, the CLI) never load torch, and numpy is imported only once a message
carries tensors (``eplbd status`` loads neither). :func:`torch_tensors` gives a message's
arrays as torch tensors (sharing memory) to the code that has torch (the client, the
planner). ``encode`` takes numpy arrays or torch tensors. numpy has no bfloat16: such a frame decodes
to its raw ``uint16`` bits, and ``body["tensors"]`` (or :meth:`Message.wire_dtype`) keeps
the wire dtype, which :func:`torch_tensors` restores.

Decoding is strict about framing (protocol id, version, type name, body, tensor sizes, the
size limit) and leaves field-level checks to :func:`eplbd.wire.validate`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from eplbd.wire._errors import WireError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "ABORT",
    "ABORTED",
    "AGENT_HELLO",
    "COMMAND",
    "COMMAND_REPLY",
    "COMMITTED",
    "DEFAULT_MAX_BYTES",
    "DTYPES",
    "ERROR",
    "HEARTBEAT",
    "HELLO",
    "LAYOUT",
    "MESSAGE_TYPES",
    "Message",
    "PREPARE",
    "PROTOCOL_ID",
    "PROTOCOL_VERSION",
    "SCHEDULE",
    "SCHEMA_VERSION",
    "SNAPSHOT",
    "STAGED",
    "STATUS_REPLY",
    "STATUS_REQUEST",
    "WELCOME",
    "WORKER_JOINED",
    "WORKER_LEFT",
    "decode",
    "encode",
    "frame_bytes",
    "torch_tensors",
]

PROTOCOL_ID = b"EPLBD"
#: Incompatible changes bump this byte; a receiver drops any other version ("bad_version").
PROTOCOL_VERSION = 1
#: Additive changes bump this; receivers accept any schema >= 1 and ignore unknown fields.
SCHEMA_VERSION = 1
#: Default per-message size limit (all frames together), far above any real message:
#: a DeepSeek-V3 phy2log [58, 288] int64 is 134 KB.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024

HELLO = "hello"
WELCOME = "welcome"
AGENT_HELLO = "agent_hello"
WORKER_JOINED = "worker_joined"
WORKER_LEFT = "worker_left"
SNAPSHOT = "snapshot"
SCHEDULE = "schedule"
PREPARE = "prepare"
STAGED = "staged"
COMMITTED = "committed"
ABORT = "abort"
ABORTED = "aborted"
LAYOUT = "layout"
HEARTBEAT = "heartbeat"
STATUS_REQUEST = "status_request"
STATUS_REPLY = "status_reply"
COMMAND = "command"
COMMAND_REPLY = "command_reply"
ERROR = "error"

MESSAGE_TYPES: frozenset[str] = frozenset(
    {
        HELLO,
        WELCOME,
        AGENT_HELLO,
        WORKER_JOINED,
        WORKER_LEFT,
        SNAPSHOT,
        SCHEDULE,
        PREPARE,
        STAGED,
        COMMITTED,
        ABORT,
        ABORTED,
        LAYOUT,
        HEARTBEAT,
        STATUS_REQUEST,
        STATUS_REPLY,
        COMMAND,
        COMMAND_REPLY,
        ERROR,
    }
)
_TYPE_FRAMES: dict[bytes, str] = {t.encode("ascii"): t for t in MESSAGE_TYPES}
_VERSION_FRAME = bytes([PROTOCOL_VERSION])

#: The dtypes a tensor frame may carry: wire name -> bytes per element.
DTYPES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
}
#: Wire dtype -> the numpy dtype a frame decodes to (bfloat16: its raw bits, as uint16;
#: bool: bytes, then != 0, since a byte other than 0/1 is no bool). Filled on first use.
_NP_DTYPES: dict[str, np.dtype[Any]] = {}
_NP_CODES = {
    "bool": "u1",
    "uint8": "u1",
    "int8": "i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "float16": "<f2",
    "bfloat16": "<u2",
    "float32": "<f4",
    "float64": "<f8",
}
#: numpy dtype name -> wire dtype, for encoding arrays (uint16 is not a wire dtype).
_WIRE_OF_NP = {n: n for n in DTYPES if n != "bfloat16"}


def _np_dtypes() -> dict[str, np.dtype[Any]]:
    if not _NP_DTYPES:
        import numpy as np

        _NP_DTYPES.update({k: np.dtype(v) for k, v in _NP_CODES.items()})
    return _NP_DTYPES


_MAX_NDIM = 8
_MAX_TENSORS = 16
_MAX_TYPE_LEN = 32
_MAX_DEPTH = 32

Frame = Any  # bytes | bytearray | memoryview | zmq.Frame
_PLAIN = (bytes, bytearray)


@dataclass(frozen=True)
class Message:
    """One decoded message.

    Fields:
        type: one of MESSAGE_TYPES, e.g. ``"snapshot"``;
        body: the msgpack map, string keys, e.g. ``{"schema": 1, "worker": "n0-r3", ...}``
            (it includes ``"schema"`` and, when tensors came with it, ``"tensors"``);
        tensors: name -> numpy array, e.g. ``{"counts": int32 [58, 288]}`` (bfloat16 as its
            uint16 bits; see :meth:`wire_dtype`). Arrays decoded from writable frames
            (``zmq.Frame`` from ``recv_multipart(copy=False)``, bytearray) share their memory;
            frames given as ``bytes`` are copied once. Always writable.
    """

    type: str
    body: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def schema(self) -> int:
        """The schema version the sender wrote (>= 1)."""
        return int(self.body.get("schema", SCHEMA_VERSION))

    def wire_dtype(self, name: str) -> str:
        """The dtype tensor ``name`` travelled as (e.g. ``"bfloat16"``), from the body's
        tensor specs, or from the array itself for a message built by hand."""
        for spec in self.body.get("tensors") or ():
            if isinstance(spec, dict) and spec.get("name") == name:
                return str(spec.get("dtype"))
        return _dtype_name(self.tensors[name])


def _dtype_name(t: Any) -> str:
    """The wire name of an array's dtype: "int32" for numpy int32 and torch.int32."""
    return str(t.dtype).removeprefix("torch.")


def frame_bytes(frame: Frame) -> bytes | bytearray | memoryview:
    """A bytes-like view of one frame (``zmq.Frame`` exposes ``.buffer``)."""
    if type(frame) in _PLAIN:
        return frame  # type: ignore[no-any-return]
    buf = getattr(frame, "buffer", None)  # zmq.Frame: a writable view of the message
    if type(buf) is memoryview:
        return buf
    if isinstance(frame, bytes | bytearray):
        return frame
    if isinstance(frame, memoryview):
        if frame.format in ("B", "b", "c") and frame.ndim == 1:
            return frame
        try:
            return frame.cast("B")
        except TypeError:
            raise WireError("bad_body", "frame is a non-contiguous memoryview") from None
    raise WireError("bad_body", f"frame of type {type(frame).__name__} is not bytes-like")


def _check_keys(obj: Any, depth: int = 0) -> None:
    """Refuse what the receiver would refuse: non-string map keys, absurd nesting."""
    if depth > _MAX_DEPTH:
        raise WireError("bad_field", "body nested too deeply")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise WireError("bad_field", f"map key {k!r} is not a string")
            _check_keys(v, depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check_keys(v, depth + 1)


def encode(
    msg_type: str, body: Mapping[str, Any], tensors: Mapping[str, Any] | None = None
) -> list[bytes]:
    """Build the frames of one message (without any ROUTER identity).

    ``body`` must hold msgpack-able values with string keys; ``"schema"`` and ``"tensors"``
    are written by this function. ``tensors`` maps names to numpy arrays or torch tensors
    (any device: copied to the CPU), each sent contiguous in C order. Raises
    :class:`WireError` for an unknown type, a non-string key or an unsupported dtype.
    """
    if msg_type not in MESSAGE_TYPES:
        raise WireError("unknown_type", f"cannot encode unknown message type {msg_type!r}")
    _check_keys(body)
    out_body = dict(body)
    out_body["schema"] = SCHEMA_VERSION
    frames = [PROTOCOL_ID, _VERSION_FRAME, msg_type.encode("ascii"), b""]
    if tensors:
        specs = []
        for name, t in tensors.items():
            dt, raw, shape = _raw(name, t)
            specs.append({"name": str(name), "dtype": dt, "shape": shape})
            frames.append(raw)
        out_body["tensors"] = specs
    else:
        out_body.pop("tensors", None)
    frames[3] = msgpack.packb(out_body, use_bin_type=True)
    return frames


def _raw(name: Any, t: Any) -> tuple[str, bytes, list[int]]:
    """(wire dtype, C-order bytes, shape) of a numpy array or a torch tensor."""
    np = sys.modules.get("numpy")  # an array implies numpy is imported already
    if np is not None and isinstance(t, np.ndarray):
        dt = _WIRE_OF_NP.get(t.dtype.name)
        if dt is None:
            raise WireError("bad_dtype", f"tensor {name!r} has unsupported dtype {t.dtype}")
        a = np.ascontiguousarray(t, dtype=t.dtype.newbyteorder("<"))  # no copy if it is so
        return dt, a.tobytes(), list(t.shape)
    torch = sys.modules.get("torch")  # a torch tensor implies torch is imported already
    if torch is None or not isinstance(t, torch.Tensor):
        raise WireError("bad_tensor_spec", f"tensor {name!r} is a {type(t).__name__}")
    dt = _dtype_name(t)
    if dt not in DTYPES:
        raise WireError("bad_dtype", f"tensor {name!r} has unsupported dtype {t.dtype}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return dt, flat.view(torch.uint8).numpy().tobytes(), list(t.shape)


def decode(frames: Sequence[Frame], *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse the frames of one message (ROUTER identities already stripped).

    Accepts ``bytes``, ``bytearray``, ``memoryview`` or ``zmq.Frame`` items. Checks the size
    limit first (before parsing anything), then protocol id, version, type, body and tensor
    frames. Raises :class:`WireError` and nothing else on any malformed input.
    """
    try:
        bufs = [frame_bytes(f) for f in frames]
    except TypeError as e:  # frames is not iterable
        raise WireError("truncated", f"frames are not a sequence: {e}") from None
    total = sum(b.nbytes if type(b) is memoryview else len(b) for b in bufs)
    if total > max_bytes:
        raise WireError("too_large", f"message of {total} bytes exceeds the limit {max_bytes}")
    if len(bufs) < 4:
        raise WireError("truncated", f"{len(bufs)} frame(s), at least 4 expected")
    if bufs[0] != PROTOCOL_ID:
        raise WireError("bad_protocol", "frame 0 is not the eplbd protocol id")
    if bufs[1] != _VERSION_FRAME:
        raise WireError("bad_version", f"protocol version {bytes(bufs[1])[:4]!r} not supported")
    tb = bytes(bufs[2])
    msg_type = _TYPE_FRAMES.get(tb)
    if msg_type is None:
        if len(tb) > _MAX_TYPE_LEN or not tb.isascii():
            raise WireError("bad_type", "type frame is not a short ASCII name")
        raise WireError("unknown_type", f"unknown message type {tb.decode('ascii')!r}")
    try:
        body = msgpack.unpackb(bufs[3], raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, StackError, ...)
        raise WireError("bad_body", f"body is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(body, dict):
        raise WireError("bad_body", f"body is a {type(body).__name__}, not a map")
    for k in body:
        if not isinstance(k, str):
            raise WireError("bad_body", "body has a non-string key")
    schema = body.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise WireError("bad_schema", f"schema {schema!r} is not an integer >= 1")
    tensors = _decode_tensors(body.get("tensors"), bufs[4:])
    return Message(msg_type, body, tensors)


def _decode_tensors(specs: Any, bufs: list[Any]) -> dict[str, Any]:
    if specs is None:
        specs = []
    if not isinstance(specs, list) or len(specs) > _MAX_TENSORS:
        raise WireError("bad_tensor_spec", "body['tensors'] is not a list of at most 16 entries")
    if len(specs) != len(bufs):
        raise WireError(
            "frame_count", f"{len(bufs)} tensor frame(s) for {len(specs)} described tensor(s)"
        )
    out: dict[str, Any] = {}
    for i, (spec, buf) in enumerate(zip(specs, bufs, strict=True)):
        if not isinstance(spec, dict):
            raise WireError("bad_tensor_spec", f"tensor spec {i} is not a map")
        name, dtn, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if not isinstance(name, str) or not name or len(name) > 64 or name in out:
            raise WireError("bad_tensor_spec", f"tensor {i} has a bad or repeated name")
        itemsize = DTYPES.get(dtn) if isinstance(dtn, str) else None
        if itemsize is None:
            raise WireError("bad_dtype", f"tensor {name!r} has unsupported dtype {dtn!r}")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
            raise WireError("bad_tensor_spec", f"tensor {name!r} has a bad shape {shape!r}")
        for d in shape:
            if type(d) is not int or not 0 <= d < 2**40:
                raise WireError("bad_tensor_spec", f"tensor {name!r} has a bad shape {shape!r}")
        want = math.prod(shape) * itemsize
        have = buf.nbytes if isinstance(buf, memoryview) else len(buf)
        if have != want:
            raise WireError(
                "tensor_size", f"tensor {name!r}: frame of {have} bytes, {dtn} {shape} needs {want}"
            )
        out[name] = _array_from(buf, str(dtn), shape)
    return out


def _array_from(buf: Any, dtn: str, shape: list[int]) -> np.ndarray:
    import numpy as np

    dtype = _np_dtypes()[dtn]
    if isinstance(buf, bytes) or (isinstance(buf, memoryview) and buf.readonly):
        buf = bytearray(buf)  # arrays are writable: never alias immutable memory
    a = np.frombuffer(buf, dtype=dtype)
    if dtn == "bool":
        a = a != 0  # a byte other than 0/1 is not a valid bool
    elif not a.flags.aligned:
        a = a.copy()  # zero-copy receive can leave a frame unaligned
    return a.reshape(shape)


def torch_tensors(msg: Message) -> dict[str, torch.Tensor]:
    """``msg.tensors`` as CPU torch tensors sharing the arrays' memory, each with the dtype
    it travelled as (bfloat16 restored). Imports torch: for the code that runs a model."""
    import torch

    out = {}
    for name, a in msg.tensors.items():
        t = torch.from_numpy(a)
        if msg.wire_dtype(name) == "bfloat16":
            t = t.view(torch.bfloat16)
        out[name] = t
    return out
