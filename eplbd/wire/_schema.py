"""Field-level validation of decoded messages, one schema per message type.

:func:`validate` is what turns "a well-framed message" into "a message the daemon may use":
required fields present with the right types and in range, optional fields filled with their
defaults (so receivers can index ``body[...]`` without ``KeyError``), tensors with the right
names, dtypes and shapes (against the registered model when given), counts non-negative and
not larger than the token count, phy2log ids inside [0, E), a layout's optional ``share``
(the weighted split) of the layout's shape, non-negative, every expert's shares adding up to
between 1 and P - E + 1. Unknown fields are kept and ignored. Everything here is pure: no sockets, no clocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from eplbd.wire._codec import (
    ABORT,
    ABORTED,
    AGENT_HELLO,
    COMMAND,
    COMMAND_REPLY,
    COMMITTED,
    ERROR,
    HEARTBEAT,
    HELLO,
    LAYOUT,
    MESSAGE_TYPES,
    PREPARE,
    SCHEDULE,
    SNAPSHOT,
    STAGED,
    STATUS_REPLY,
    STATUS_REQUEST,
    WELCOME,
    WORKER_JOINED,
    WORKER_LEFT,
    Message,
)
from eplbd.wire._errors import WireError
from eplbd.wire._phy2log import PHY2LOG_DTYPES

__all__ = [
    "COMMAND_OPS",
    "MAX_TOKENS",
    "STATUS_WHATS",
    "ModelShape",
    "error_body",
    "validate",
    "validate_body",
]

#: Largest token count a snapshot may claim (2**48: far beyond any window).
MAX_TOKENS = 2**48
_MAX_INT = 2**63 - 1
_MAX_ID = 256
_MAX_TEXT = 4096
_MAX_LIST = 65536
COMMAND_OPS: frozenset[str] = frozenset({"rebalance", "freeze", "unfreeze", "rollback"})
#: The ``what`` values the planner answers; others get an ``error`` reply from the planner.
STATUS_WHATS: frozenset[str] = frozenset({"status", "history", "top", "heatmap", "layout"})


@dataclass(frozen=True)
class ModelShape:
    """The registered shape of an EP group's MoE model, e.g. DeepSeek-V3: (58, 256, 288).

    Fields: num_layers L, num_logical_experts E, num_physical_experts P (slots of the group).
    """

    num_layers: int
    num_logical_experts: int
    num_physical_experts: int

    def __post_init__(self) -> None:
        L, E, P = self.num_layers, self.num_logical_experts, self.num_physical_experts
        if not (_is_int(L) and _is_int(E) and _is_int(P)) or min(L, E, P) < 1 or P < E:
            raise WireError("bad_field", f"model shape L={L} E={E} P={P} is not valid")

    @classmethod
    def from_hello(cls, body: Mapping[str, Any]) -> ModelShape:
        """The model shape a (validated) ``hello`` body declares."""
        try:
            return cls(
                body["num_layers"], body["num_logical_experts"], body["num_physical_experts"]
            )
        except KeyError as e:
            raise WireError("missing_field", f"hello lacks {e.args[0]!r}") from None

    @property
    def lp(self) -> tuple[int, int]:
        """(L, P): the shape of counts and phy2log."""
        return (self.num_layers, self.num_physical_experts)


# --- field checks ---------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return type(x) is int  # msgpack gives exact ints; bool (a subclass) is refused


def _uint(x: Any) -> bool:
    return type(x) is int and 0 <= x <= _MAX_INT


def _pos(x: Any) -> bool:
    return type(x) is int and 1 <= x <= _MAX_INT


def _ident(x: Any) -> bool:
    return type(x) is str and 0 < len(x) <= _MAX_ID


def _text(x: Any) -> bool:
    return isinstance(x, str) and len(x) <= _MAX_TEXT


def _bool(x: Any) -> bool:
    return isinstance(x, bool)


def _pos_float(x: Any) -> bool:
    return (
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and 0 < x <= 1e7
    )


def _map(x: Any) -> bool:
    return isinstance(x, dict)


def _uint_list(x: Any) -> bool:
    return (
        type(x) is list
        and len(x) <= _MAX_LIST
        and all(type(v) is int and 0 <= v <= _MAX_INT for v in x)
    )


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or check(x)


_Check = Callable[[Any], bool]
_DESC: dict[Any, str] = {
    _uint: "an integer >= 0",
    _pos: "an integer >= 1",
    _ident: "a non-empty string of at most 256 characters",
    _text: "a string of at most 4096 characters",
    _bool: "a boolean",
    _pos_float: "a finite number > 0",
    _map: "a map",
    _uint_list: "a list of integers >= 0",
}


@dataclass(frozen=True)
class _Schema:
    required: dict[str, _Check]
    optional: dict[str, tuple[_Check, Any]]
    extra: Callable[[dict[str, Any], Message, ModelShape | None], None] | None = None


def _need(body: dict[str, Any], ok: bool, field: str, what: str) -> None:
    if not ok:
        raise WireError("bad_field", f"{field}={body.get(field)!r}: {what}")


def _hello_extra(b: dict[str, Any], msg: Message, model: ModelShape | None) -> None:
    _need(b, b["ep_rank"] < b["ep_size"], "ep_rank", f"must be < ep_size ({b['ep_size']})")
    E, P = b["num_logical_experts"], b["num_physical_experts"]
    _need(b, P >= E, "num_physical_experts", f"must be >= num_logical_experts ({E})")
    _need(b, P % b["ep_size"] == 0, "num_physical_experts", "must be a multiple of ep_size")
    if model is not None and ModelShape.from_hello(b) != model:
        raise WireError(
            "model_mismatch",
            f"hello declares L={b['num_layers']} E={E} P={P}, group registered "
            f"L={model.num_layers} E={model.num_logical_experts} P={model.num_physical_experts}",
        )


def _schedule_extra(b: dict[str, Any], msg: Message, model: ModelShape | None) -> None:
    _need(b, b["record_steps"] <= b["window_steps"], "record_steps", "must be <= window_steps")


def _welcome_extra(b: dict[str, Any], msg: Message, model: ModelShape | None) -> None:
    try:
        b["schedule"] = validate_body(SCHEDULE, b["schedule"])
    except WireError as e:
        raise WireError(e.reason, f"schedule: {e.detail}") from None
    if b["epoch"] > 0:
        _check_phy2log(msg, model)


def _agent_hello_extra(b: dict[str, Any], msg: Message, model: ModelShape | None) -> None:
    workers = b["workers"]
    _need(b, isinstance(workers, list) and len(workers) <= 4096, "workers", "a list of hellos")
    out = []
    for i, w in enumerate(workers):
        try:
            out.append(validate_body(HELLO, w))
        except WireError as e:
            raise WireError(e.reason, f"workers[{i}]: {e.detail}") from None
    b["workers"] = out


def _snapshot_extra(b: dict[str, Any], msg: Message, model: ModelShape | None) -> None:
    _need(b, b["step_end"] >= b["step_start"], "step_end", "must be >= step_start")
    _need(b, b["tokens"] <= MAX_TOKENS, "tokens", f"must be <= {MAX_TOKENS}")
    # exactly one sender pair, whole, and no field of the other: the planner checks an
    # agent's ranks against ep_ranks, which a stray worker field must not stand in for
    w = [k for k in ("worker", "ep_rank") if b[k] is not None]
    a = [k for k in ("agent", "ep_ranks") if b[k] is not None]
    if not ((len(w) == 2 and not a) or (len(a) == 2 and not w)):
        raise WireError(
            "missing_field",
            f"snapshot needs (worker, ep_rank) or (agent, ep_ranks), not both; got {w + a}",
        )
    _need(b, b["ep_ranks"] is None or len(b["ep_ranks"]) > 0, "ep_ranks", "at least one rank")
    counts = _tensor(msg, "counts", ("int32", "int64"), model)
    if math.prod(counts.shape):
        lo, hi = int(counts.min()), int(counts.max())
        if lo < 0:
            raise WireError("bad_count", f"negative count {lo}")
        if hi > b["tokens"]:
            raise WireError("bad_count", f"count {hi} exceeds tokens={b['tokens']}")


def _phy2log_extra(b: dict[str, Any], msg: Message, model: ModelShape | None) -> None:
    _check_phy2log(msg, model)


def _command_extra(b: dict[str, Any], msg: Message, model: ModelShape | None) -> None:
    _need(b, b["op"] in COMMAND_OPS, "op", f"one of {sorted(COMMAND_OPS)}")
    if b["op"] == "rollback":
        _need(b, b["epoch"] is not None, "epoch", "rollback needs an epoch")


def _tensor(msg: Message, name: str, dtypes: tuple[str, ...], model: ModelShape | None) -> Any:
    """The [L, P] tensor ``name`` (a numpy array, or a torch tensor in a hand-built
    message: only ``shape``, ``ndim``, ``min`` and ``max`` are used)."""
    t = msg.tensors.get(name)
    if t is None:
        raise WireError("missing_tensor", f"{msg.type} needs tensor {name!r}")
    dt = msg.wire_dtype(name)
    if dt not in dtypes:
        raise WireError("bad_dtype", f"{name} has dtype {dt}, expected one of {dtypes}")
    if t.ndim != 2:
        raise WireError("bad_shape", f"{name} has shape {tuple(t.shape)}, expected [L, P]")
    if model is not None and tuple(t.shape) != model.lp:
        raise WireError("bad_shape", f"{name} has shape {tuple(t.shape)}, model has {model.lp}")
    return t


def _check_phy2log(msg: Message, model: ModelShape | None) -> None:
    t = _tensor(msg, "phy2log", PHY2LOG_DTYPES, model)
    if not math.prod(t.shape):
        raise WireError("bad_shape", "phy2log is empty")
    lo, hi = int(t.min()), int(t.max())
    E = model.num_logical_experts if model is not None else _MAX_INT
    if lo < 0 or hi >= E:
        bad = lo if lo < 0 else hi
        raise WireError("bad_layout", f"phy2log holds expert id {bad}, outside [0, {E})")
    if "share" in msg.tensors:
        _check_share(msg, t, model)


def _check_share(msg: Message, phy2log: Any, model: ModelShape | None) -> None:
    """The optional weighted split of a layout: ``share`` [L, P] int64 like phy2log, >= 0;
    with the model known, every expert's shares add up to between 1 (some replica gets its
    rows) and P - E + 1 (the dispatch table fits the engines' maps)."""
    sh = _tensor(msg, "share", ("int64",), model)
    if tuple(sh.shape) != tuple(phy2log.shape):
        raise WireError(
            "bad_shape", f"share has shape {tuple(sh.shape)}, phy2log {tuple(phy2log.shape)}"
        )
    if int(sh.min()) < 0:
        raise WireError("bad_layout", f"share holds a negative value {int(sh.min())}")
    if model is None:
        return
    import numpy as np

    L, P = model.lp
    E = model.num_logical_experts
    idx = np.asarray(phy2log, dtype=np.int64) + np.arange(L, dtype=np.int64)[:, None] * E
    per = np.asarray(sh, dtype=np.int64).clip(max=P)
    total = np.bincount(idx.ravel(), weights=per.ravel(), minlength=L * E).reshape(L, E)
    lo, hi = float(total.min()), float(total.max())
    if lo < 1:
        layer, expert = (int(v[0]) for v in np.nonzero(total < 1))
        raise WireError(
            "bad_layout", f"share: expert {expert} of layer {layer} has no replica with a share > 0"
        )
    if hi > P - E + 1:
        raise WireError("bad_layout", f"share: an expert's shares add up to {hi:g} > P - E + 1")


_GROUP_RANK = {"group": _ident, "epoch": _uint, "ep_rank": _uint, "worker": _ident}

SCHEMAS: dict[str, _Schema] = {
    HELLO: _Schema(
        {
            "worker": _ident,
            "incarnation": _ident,
            "group": _ident,
            "ep_rank": _uint,
            "ep_size": _pos,
            "node": _ident,
            "num_layers": _pos,
            "num_logical_experts": _pos,
            "num_physical_experts": _pos,
            "epoch": _uint,
            "software_version": _text,
            "protocol_version": _pos,
        },
        {},
        _hello_extra,
    ),
    WELCOME: _Schema({"incarnation": _ident, "epoch": _uint, "schedule": _map}, {}, _welcome_extra),
    AGENT_HELLO: _Schema(
        {
            "agent": _ident,
            "incarnation": _ident,
            "node": _ident,
            "software_version": _text,
            "protocol_version": _pos,
            "workers": lambda x: isinstance(x, list),
        },
        {},
        _agent_hello_extra,
    ),
    WORKER_JOINED: _Schema(
        {
            "agent": _ident,
            "group": _ident,
            "ep_rank": _uint,
            "worker": _ident,
            "incarnation": _ident,
        },
        {},
    ),
    WORKER_LEFT: _Schema(
        {
            "agent": _ident,
            "group": _ident,
            "ep_rank": _uint,
            "worker": _ident,
            "incarnation": _ident,
            "reason": _text,
        },
        {},
    ),
    SNAPSHOT: _Schema(
        {
            "incarnation": _ident,
            "group": _ident,
            "seq": _uint,
            "epoch": _uint,
            "step_start": _uint,
            "step_end": _uint,
            "tokens": _uint,
        },
        {
            "worker": (_opt(_ident), None),
            "ep_rank": (_opt(_uint), None),
            "agent": (_opt(_ident), None),
            "ep_ranks": (_opt(_uint_list), None),
        },
        _snapshot_extra,
    ),
    SCHEDULE: _Schema(
        {"window_steps": _pos, "record_steps": _uint, "enabled": _bool}, {}, _schedule_extra
    ),
    PREPARE: _Schema({"group": _ident, "epoch": _pos, "timeout_s": _pos_float}, {}, _phy2log_extra),
    STAGED: _Schema({**_GROUP_RANK, "ok": _bool, "reason": _text, "staged_bytes": _uint}, {}),
    COMMITTED: _Schema({**_GROUP_RANK, "step": _uint}, {}),
    ABORT: _Schema({"group": _ident, "epoch": _uint, "reason": _text}, {}),
    ABORTED: _Schema({**_GROUP_RANK, "reason": _text}, {}),
    LAYOUT: _Schema({"group": _ident, "epoch": _uint}, {}, _phy2log_extra),
    HEARTBEAT: _Schema({"sender": _ident, "incarnation": _ident}, {}),
    STATUS_REQUEST: _Schema(
        {"what": _ident}, {"group": (_opt(_ident), None), "epoch": (_opt(_uint), None)}
    ),
    STATUS_REPLY: _Schema({"data": _map}, {}),
    COMMAND: _Schema(
        {"op": _ident, "group": _ident},
        {
            "layers": (_opt(_uint_list), None),
            "epoch": (_opt(_uint), None),
            "dry_run": (_bool, False),
        },
        _command_extra,
    ),
    COMMAND_REPLY: _Schema({"ok": _bool, "message": _text}, {"data": (_map, {})}),
    ERROR: _Schema({"code": _ident, "message": _text}, {"in_reply_to": (_text, "")}),
}
assert set(SCHEMAS) == MESSAGE_TYPES


def _describe(check: _Check) -> str:
    return _DESC.get(check, "of the right type")


def validate(msg: Message, *, model: ModelShape | None = None) -> Message:
    """Check a decoded message against its type's schema; return it with defaults filled.

    ``model`` is the group's registered shape: with it, ``counts`` and ``phy2log`` must be
    [L, P], phy2log ids < E, and a ``hello`` must declare the same shape. Without it, only
    what the message itself implies is checked. The returned message has a new body dict in
    which absent optional fields hold their defaults; the tensors are the same objects.
    Raises :class:`WireError`.
    """
    if not isinstance(msg, Message) or msg.type not in SCHEMAS:
        raise WireError("unknown_type", f"cannot validate {msg!r:.80}")
    body = _check_fields(msg.type, msg.body)
    out = Message(msg.type, body, msg.tensors)
    extra = SCHEMAS[msg.type].extra
    if extra is not None:
        extra(body, out, model)
    return out


def validate_body(msg_type: str, body: Any) -> dict[str, Any]:
    """Validate a tensor-free body of ``msg_type`` (e.g. the ``workers`` of an agent_hello)."""
    if not isinstance(body, dict):
        raise WireError("bad_field", f"{msg_type} body is a {type(body).__name__}, not a map")
    return validate(Message(msg_type, body, {})).body


def _check_fields(msg_type: str, body: dict[str, Any]) -> dict[str, Any]:
    schema = SCHEMAS[msg_type]
    out = dict(body)
    for name, check in schema.required.items():
        if name not in body:
            raise WireError("missing_field", f"{msg_type} lacks {name!r}")
        if not check(body[name]):
            raise WireError(
                "bad_field", f"{msg_type}.{name}={body[name]!r:.60}: not {_describe(check)}"
            )
    for name, (check, default) in schema.optional.items():
        if name not in body or body[name] is None and default is not None:
            out[name] = default
        elif not check(body[name]):
            raise WireError("bad_field", f"{msg_type}.{name}={body[name]!r:.60}: wrong type")
    return out


def error_body(err: WireError, in_reply_to: str = "") -> dict[str, Any]:
    """The body of the ``error`` reply for a bad message."""
    return {"code": err.reason, "message": err.detail[:_MAX_TEXT], "in_reply_to": in_reply_to}
