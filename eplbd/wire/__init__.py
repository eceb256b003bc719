"""eplbd.wire: the versioned message layer between workers, agents, the planner and the CLI.

Everything that crosses a process boundary goes through here, so this layer must be boring,
fast and impossible to crash with bad input. The byte-level spec, one table per message type,
is ``docs/protocol.md``; this package implements it.

Codec (pure, no sockets, no torch: tensors decode to numpy arrays)::

    frames = encode(SNAPSHOT, {"worker": "n0-r3", ...}, {"counts": counts})  # -> list[bytes]
    msg = decode(frames, max_bytes=DEFAULT_MAX_BYTES)  # -> Message(type, body, tensors)
    msg = validate(msg, model=ModelShape(58, 256, 288))  # fields, tensors, ranges; defaults
    torch_tensors(msg)  # -> {name: torch.Tensor}, sharing memory (imports torch)

``decode`` and ``validate`` raise :class:`WireError` (and nothing else) with a short
``.reason`` code (one of :data:`REASONS`) on anything malformed.

Order and liveness (pure, injectable clock): :class:`SequenceTracker` (per-sender seq within
an incarnation: gaps counted, replays refused), :class:`EpochTracker` (epochs only grow),
:class:`LivenessTracker` (alive / stale after 3 missed heartbeats / dead after 5; restarts
recognised by incarnation), :func:`process_incarnation`.

Sockets: :func:`control_server` (ROUTER, binds), :func:`control_client` (DEALER),
:func:`snapshot_receiver` (PULL, binds), :func:`snapshot_sender` (PUSH), all returning a
:class:`WireSocket` whose ``send`` never blocks (drops are counted) and whose ``recv`` counts,
logs (``logging.getLogger("eplbd.wire")``) and drops bad messages while it keeps serving.
Bind policy and ipc lock files raise :class:`BindError`. CURVE: :func:`generate_keypair`,
:func:`load_server_keys`, :func:`load_client_keys`, :func:`reload_allow_list`.
"""

from __future__ import annotations

from eplbd.wire._codec import (
    ABORT,
    ABORTED,
    AGENT_HELLO,
    COMMAND,
    COMMAND_REPLY,
    COMMITTED,
    DEFAULT_MAX_BYTES,
    DTYPES,
    ERROR,
    HEARTBEAT,
    HELLO,
    LAYOUT,
    MESSAGE_TYPES,
    PREPARE,
    PROTOCOL_ID,
    PROTOCOL_VERSION,
    SCHEDULE,
    SCHEMA_VERSION,
    SNAPSHOT,
    STAGED,
    STATUS_REPLY,
    STATUS_REQUEST,
    WELCOME,
    WORKER_JOINED,
    WORKER_LEFT,
    Message,
    decode,
    encode,
    frame_bytes,
    torch_tensors,
)
from eplbd.wire._counters import (
    WireCounters,
)
from eplbd.wire._curve import (
    AllowListReload,
    CurveClientKeys,
    CurveServerKeys,
    generate_keypair,
    load_client_keys,
    load_server_keys,
    read_allow_list,
    reload_allow_list,
)
from eplbd.wire._errors import (
    REASONS,
    WireError,
)
from eplbd.wire._liveness import (
    ALIVE,
    DEAD,
    STALE,
    LivenessTracker,
    PeerInfo,
    new_incarnation,
    process_incarnation,
)
from eplbd.wire._order import (
    EpochTracker,
    SequenceTracker,
    SeqVerdict,
)
from eplbd.wire._phy2log import (
    PHY2LOG_DTYPES,
    PHY2LOG_FIELD,
    accepted_phy2log_dtypes,
    held_layouts,
    layout_digest,
    narrow_phy2log,
    narrow_phy2log_each,
)
from eplbd.wire._schema import (
    COMMAND_OPS,
    MAX_TOKENS,
    STATUS_WHATS,
    ModelShape,
    error_body,
    validate,
    validate_body,
)
from eplbd.wire._sockets import (
    AGENT_SOCKET,
    CONTROL_OPTIONS,
    IPC_PATH_MAX,
    SNAPSHOT_SOCKET,
    TELEMETRY_OPTIONS,
    BindError,
    Received,
    SocketOptions,
    WireSocket,
    control_client,
    control_server,
    ipc_endpoint,
    snapshot_receiver,
    snapshot_sender,
)

__all__ = [
    "ABORT",
    "ABORTED",
    "AGENT_HELLO",
    "AGENT_SOCKET",
    "ALIVE",
    "AllowListReload",
    "BindError",
    "COMMAND",
    "COMMAND_OPS",
    "COMMAND_REPLY",
    "COMMITTED",
    "CONTROL_OPTIONS",
    "CurveClientKeys",
    "CurveServerKeys",
    "DEAD",
    "DEFAULT_MAX_BYTES",
    "DTYPES",
    "ERROR",
    "EpochTracker",
    "HEARTBEAT",
    "HELLO",
    "IPC_PATH_MAX",
    "LAYOUT",
    "LivenessTracker",
    "MAX_TOKENS",
    "MESSAGE_TYPES",
    "Message",
    "ModelShape",
    "PHY2LOG_DTYPES",
    "PHY2LOG_FIELD",
    "PREPARE",
    "PROTOCOL_ID",
    "PROTOCOL_VERSION",
    "PeerInfo",
    "REASONS",
    "Received",
    "SCHEDULE",
    "SCHEMA_VERSION",
    "SNAPSHOT",
    "SNAPSHOT_SOCKET",
    "STAGED",
    "STALE",
    "STATUS_REPLY",
    "STATUS_REQUEST",
    "STATUS_WHATS",
    "SeqVerdict",
    "SequenceTracker",
    "SocketOptions",
    "TELEMETRY_OPTIONS",
    "WELCOME",
    "WORKER_JOINED",
    "WORKER_LEFT",
    "WireCounters",
    "WireError",
    "WireSocket",
    "accepted_phy2log_dtypes",
    "control_client",
    "control_server",
    "decode",
    "encode",
    "error_body",
    "frame_bytes",
    "generate_keypair",
    "held_layouts",
    "ipc_endpoint",
    "layout_digest",
    "load_client_keys",
    "load_server_keys",
    "narrow_phy2log",
    "narrow_phy2log_each",
    "new_incarnation",
    "process_incarnation",
    "read_allow_list",
    "reload_allow_list",
    "snapshot_receiver",
    "snapshot_sender",
    "torch_tensors",
    "validate",
    "validate_body",
]
