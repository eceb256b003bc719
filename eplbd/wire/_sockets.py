"""ZeroMQ sockets that speak the eplbd protocol: factories, bind policy, drop-counting send.

Two channels per hop (see docs/protocol.md):

- control, DEALER -> ROUTER: :func:`control_client` connects, :func:`control_server` binds;
- snapshots, PUSH -> PULL (the receiver binds): :func:`snapshot_sender`,
  :func:`snapshot_receiver`.

Every socket gets: ``LINGER`` (0 by default: closing never hangs), bounded ``SNDHWM`` /
``RCVHWM`` (small on telemetry), ``MAXMSGSIZE`` (a frame above the message limit drops the
connection), ZMTP heartbeats (``HEARTBEAT_IVL/TIMEOUT/TTL``: dead TCP peers are dropped),
``RECONNECT_IVL`` with ``RECONNECT_IVL_MAX`` (exponential backoff; libzmq's default 0 means
none), ``IMMEDIATE`` on senders (nothing queues for a peer that is not connected), stable
identities on DEALERs with ``ROUTER_HANDOVER`` on ROUTERs (a reconnecting peer takes its
identity back), and ``ROUTER_MANDATORY`` (a reply to a vanished peer is counted, not lost
silently).

Bind policy: ``ipc://`` paths must be shorter than 107 characters and are guarded by a lock
file (``PATH.lock``, ``fcntl.flock``) because a second bind to the same path silently steals
it; ``tcp://`` binds to a non-loopback address need CURVE keys or ``allow_insecure=True``.

:class:`WireSocket` is used from one thread only. Its ``send`` never blocks by default: on
``zmq.Again`` (queue full, or no connected peer) the message is dropped and counted.
Its ``recv`` decodes and validates, and counts, logs and drops bad messages (answering
``error`` on a ROUTER) while it keeps waiting until its deadline.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from eplbd.wire._codec import DEFAULT_MAX_BYTES, ERROR, Message, decode, encode, frame_bytes
from eplbd.wire._counters import WireCounters
from eplbd.wire._curve import (
    CurveClientKeys,
    CurveServerKeys,
    acquire_authenticator,
    release_authenticator,
)
from eplbd.wire._errors import WireError
from eplbd.wire._schema import ModelShape, error_body, validate

__all__ = [
    "AGENT_SOCKET",
    "CONTROL_OPTIONS",
    "IPC_PATH_MAX",
    "SNAPSHOT_SOCKET",
    "TELEMETRY_OPTIONS",
    "BindError",
    "Received",
    "SocketOptions",
    "WireSocket",
    "control_client",
    "control_server",
    "ipc_endpoint",
    "snapshot_receiver",
    "snapshot_sender",
]

#: ipc paths must be shorter than this (sockaddr_un.sun_path is 108 bytes with the NUL).
IPC_PATH_MAX = 107
AGENT_SOCKET = "agent.sock"
SNAPSHOT_SOCKET = "snapshots.sock"

Context = zmq.Context  # type: ignore[type-arg]


class BindError(RuntimeError):
    """An endpoint cannot or must not be bound (insecure, too long, already in use)."""


@dataclass(frozen=True)
class SocketOptions:
    """Socket options in milliseconds / messages. Tests shrink the heartbeat times."""

    linger_ms: int = 0
    sndhwm: int = 1000
    rcvhwm: int = 1000
    heartbeat_ivl_ms: int = 1000
    heartbeat_timeout_ms: int = 3000
    heartbeat_ttl_ms: int = 5000
    reconnect_ivl_ms: int = 100
    reconnect_ivl_max_ms: int = 5000
    handshake_ivl_ms: int = 5000
    max_bytes: int = DEFAULT_MAX_BYTES


#: Control: messages that must arrive; a generous queue.
CONTROL_OPTIONS = SocketOptions()
#: Telemetry carries state: a few snapshots in flight, then drop and count. No ZMTP
#: heartbeats: libzmq 4.3.5 aborts the process (``!_io_error``, stream_engine_base.cpp)
#: when a heartbeating socket with a full receive pipe loses its peer, which a stalled
#: receiver under a burst of snapshots hits; liveness comes from the control channel.
TELEMETRY_OPTIONS = SocketOptions(sndhwm=4, rcvhwm=16, heartbeat_ivl_ms=0)


@dataclass(frozen=True)
class Received:
    """One good message. ``peer``: the ROUTER identity to reply to (None on PULL/DEALER);
    ``sender``: a printable name for logs (identity, or the body's worker/agent/sender)."""

    peer: bytes | None
    sender: str
    message: Message


def ipc_endpoint(runtime_dir: str | os.PathLike[str], name: str) -> str:
    """``ipc://<runtime_dir>/<name>``, refusing paths of 107 characters or more."""
    path = os.path.join(os.fspath(runtime_dir), name)
    _check_ipc_path(path)
    return f"ipc://{path}"


def _check_ipc_path(path: str) -> None:
    n = len(path.encode())
    if n >= IPC_PATH_MAX:
        raise BindError(
            f"ipc path {path!r} is {n} characters; it must be shorter than {IPC_PATH_MAX} "
            "(use a shorter --runtime-dir)"
        )
    if not path:
        raise BindError("empty ipc path")


def _is_loopback(host: str) -> bool:
    h = host.strip("[]").lower()
    return h in ("localhost", "::1", "lo") or h.startswith("127.")


def _check_bind_policy(endpoint: str, secure: bool, allow_insecure: bool) -> None:
    if endpoint.startswith(("ipc://", "inproc://")):
        return
    if not endpoint.startswith("tcp://"):
        raise BindError(f"unsupported endpoint {endpoint!r} (use tcp:// or ipc://)")
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
    if ";" in host:  # tcp://src;dst form: the address bound is the part before ';'
        host = host.split(";", 1)[0]
    if not secure and not allow_insecure and not _is_loopback(host):
        raise BindError(
            f"refusing to bind {endpoint} without CURVE keys: only loopback is allowed "
            "insecurely (give keys, or allow_insecure=True / --insecure)"
        )


def _apply(sock: zmq.Socket, opts: SocketOptions, *, sender: bool) -> None:  # type: ignore[type-arg]
    sock.setsockopt(zmq.LINGER, opts.linger_ms)
    sock.setsockopt(zmq.SNDHWM, opts.sndhwm)
    sock.setsockopt(zmq.RCVHWM, opts.rcvhwm)
    sock.setsockopt(zmq.MAXMSGSIZE, opts.max_bytes)
    sock.setsockopt(zmq.HEARTBEAT_IVL, opts.heartbeat_ivl_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, opts.heartbeat_timeout_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, opts.heartbeat_ttl_ms)
    sock.setsockopt(zmq.RECONNECT_IVL, opts.reconnect_ivl_ms)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, opts.reconnect_ivl_max_ms)
    sock.setsockopt(zmq.HANDSHAKE_IVL, opts.handshake_ivl_ms)
    if sender:
        sock.setsockopt(zmq.IMMEDIATE, 1)


def _printable(identity: bytes) -> str:
    s = identity[:64].decode("utf-8", "backslashreplace")
    return s if s.isprintable() and s else identity[:32].hex()


class WireSocket:
    """One eplbd socket (one thread only). Build it with the factories of this module.

    Attributes: ``socket`` (the zmq socket, for pollers), ``kind`` ("router", "dealer",
    "push", "pull"), ``endpoint`` (the bound endpoint as libzmq reports it, e.g.
    ``tcp://127.0.0.1:40123``, or the connected one), ``counters``, ``options``.
    """

    def __init__(
        self,
        sock: zmq.Socket,  # type: ignore[type-arg]
        kind: str,
        endpoint: str,
        *,
        counters: WireCounters | None,
        options: SocketOptions,
        reply_errors: bool = False,
        lock_fd: int | None = None,
        auth_ctx: Context | None = None,
    ) -> None:
        self.socket = sock
        self.kind = kind
        self.endpoint = endpoint
        self.counters = counters if counters is not None else WireCounters()
        self.options = options
        self.reply_errors = reply_errors
        self._lock_fd = lock_fd
        self._auth_ctx = auth_ctx
        self._closed = False

    # --- sending --------------------------------------------------------------------------

    def writable(self) -> bool:
        """Whether a send would be queued now: a peer is connected (with ``IMMEDIATE``) and
        its queue has room. Never blocks."""
        if self._closed:
            return False
        try:
            return bool(self.socket.poll(0, zmq.POLLOUT))
        except zmq.ZMQError:
            return False

    def send(
        self,
        msg_type: str,
        body: Mapping[str, Any],
        tensors: Mapping[str, Any] | None = None,
        *,
        to: bytes | None = None,
        timeout_ms: int = 0,
    ) -> bool:
        """Encode and send; ``to`` is the peer identity (ROUTER only); ``tensors``: numpy
        arrays or torch tensors.

        Waits at most ``timeout_ms`` for room (0: never blocks). Returns False, counting the
        drop under "would_block" (queue full or, with IMMEDIATE, no connected peer),
        "unroutable" (ROUTER: no such peer) or "closed", when the message was not queued.
        """
        return self.send_frames(encode(msg_type, body, tensors), to=to, timeout_ms=timeout_ms)

    def send_frames(
        self, frames: Sequence[Any], *, to: bytes | None = None, timeout_ms: int = 0
    ) -> bool:
        """Send frames made by :func:`encode`, or received ones (bytes or ``zmq.Frame``): a
        relay forwards a message without re-encoding it."""
        msg_type = "?"
        if len(frames) > 2:
            msg_type = bytes(frame_bytes(frames[2]))[:32].decode("ascii", "replace")
        out = list(frames)
        if self.kind == "router":
            if to is None:
                raise ValueError("a ROUTER send needs the peer identity (to=...)")
            out.insert(0, to)
        peer = _printable(to) if to is not None else self.endpoint
        if self._closed:
            self.counters.dropped_send("closed", peer, msg_type)
            return False
        try:
            if timeout_ms > 0 and not self.socket.poll(timeout_ms, zmq.POLLOUT):
                self.counters.dropped_send("would_block", peer, msg_type)
                return False
            self.socket.send_multipart(out, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.counters.dropped_send("would_block", peer, msg_type)
            return False
        except zmq.ZMQError as e:
            reason = "unroutable" if e.errno == errno.EHOSTUNREACH else "closed"
            self.counters.dropped_send(reason, peer, msg_type)
            return False
        self.counters.sent[msg_type] += 1
        return True

    # --- receiving ------------------------------------------------------------------------

    def recv(
        self,
        timeout_ms: int | None = 0,
        *,
        model: ModelShape | None = None,
        check: bool = True,
    ) -> Received | None:
        """The next good message, or None when ``timeout_ms`` passes (None: wait forever).

        Decodes (the size limit is ``options.max_bytes``) and, with ``check``, validates
        (against ``model`` when given). Bad messages are counted, logged with their sender,
        answered with ``error`` on a ROUTER, and skipped.
        """
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        sock = self.socket
        while True:
            try:
                frames = _recv_frames(sock)
            except zmq.Again:
                if deadline is None:
                    wait = -1
                else:
                    wait = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
                    if wait == 0:
                        return None
                if not sock.poll(wait, zmq.POLLIN):
                    return None
                continue
            got = self._accept(frames, model, check)
            if got is not None:
                return got

    def _accept(self, frames: list[Any], model: ModelShape | None, check: bool) -> Received | None:
        peer: bytes | None = None
        if self.kind == "router":
            peer = frames[0].bytes
            frames = frames[1:]
        msg: Message | None = None
        try:
            msg = decode(frames, max_bytes=self.options.max_bytes)
            if check:
                msg = validate(msg, model=model)
        except WireError as e:
            sender = self._sender(peer, msg, frames)
            msg_type = msg.type if msg is not None else ""
            self.counters.bad_message(e, sender, msg_type)
            if peer is not None and self.reply_errors:
                self.send(ERROR, error_body(e, msg_type), to=peer)
            return None
        self.counters.received[msg.type] += 1
        return Received(peer, self._sender(peer, msg, frames), msg)

    @staticmethod
    def _sender(peer: bytes | None, msg: Message | None, frames: list[Any]) -> str:
        if peer is not None:
            return _printable(peer)
        if msg is not None:
            for key in ("worker", "agent", "sender"):
                v = msg.body.get(key)
                if isinstance(v, str) and v:
                    return v[:64]
        if frames:
            with contextlib.suppress(Exception):
                addr = frames[0].get("Peer-Address")
                if addr:
                    return str(addr)
        return "unknown"

    # --- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket (linger from the options), release the ipc lock and the
        context's authenticator reference. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.socket.close(linger=self.options.linger_ms)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the fd releases the flock
            self._lock_fd = None
        if self._auth_ctx is not None:
            release_authenticator(self._auth_ctx)
            self._auth_ctx = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> WireSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WireSocket({self.kind} {self.endpoint})"


def _recv_frames(sock: zmq.Socket) -> list[zmq.Frame]:  # type: ignore[type-arg]
    """``recv_multipart(NOBLOCK, copy=False)`` without a getsockopt(RCVMORE) per frame:
    ``Frame.more`` says the same, at a third of the cost per snapshot."""
    frame = sock.recv(zmq.NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(zmq.NOBLOCK, copy=False)
        frames.append(frame)
    return frames


def _lock_ipc(path: str) -> int:
    _check_ipc_path(path)
    lock_path = path + ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise BindError(
            f"ipc://{path} is in use: another process holds the lock {lock_path}"
        ) from e
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket file left by a crashed owner; we hold the lock now
    return fd


def _bind(
    ctx: Context,
    sock_type: int,
    kind: str,
    endpoint: str,
    *,
    curve: CurveServerKeys | None,
    allow_insecure: bool,
    options: SocketOptions,
    counters: WireCounters | None,
    reply_errors: bool = False,
) -> WireSocket:
    _check_bind_policy(endpoint, curve is not None, allow_insecure)
    lock_fd = None
    ipc_path = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None
    if ipc_path is not None and not ipc_path.startswith("@"):
        lock_fd = _lock_ipc(ipc_path)
    sock = ctx.socket(sock_type)
    auth_ctx = None
    try:
        _apply(sock, options, sender=False)
        if sock_type == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if curve is not None:
            acquire_authenticator(ctx, curve.allow_dir)
            auth_ctx = ctx
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise BindError(f"cannot bind {endpoint}: {e}") from e
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    except BaseException:
        sock.close(linger=0)
        if lock_fd is not None:
            os.close(lock_fd)
        if auth_ctx is not None:
            release_authenticator(auth_ctx)
        raise
    return WireSocket(
        sock,
        kind,
        bound,
        counters=counters,
        options=options,
        reply_errors=reply_errors,
        lock_fd=lock_fd,
        auth_ctx=auth_ctx,
    )


def _connect(
    ctx: Context,
    sock_type: int,
    kind: str,
    endpoint: str,
    *,
    identity: str | None,
    curve: CurveClientKeys | None,
    options: SocketOptions,
    counters: WireCounters | None,
) -> WireSocket:
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        _check_ipc_path(endpoint[len("ipc://") :])
    sock = ctx.socket(sock_type)
    try:
        _apply(sock, options, sender=True)
        if identity is not None:
            ident = identity.encode()
            if not 0 < len(ident) <= 255 or ident[0] == 0:
                raise ValueError(f"identity {identity!r} must be 1..255 bytes, not starting NUL")
            sock.setsockopt(zmq.IDENTITY, ident)
        if curve is not None:
            sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
            sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public)
        sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return WireSocket(sock, kind, endpoint, counters=counters, options=options)


def control_server(
    ctx: Context,
    endpoint: str,
    *,
    curve: CurveServerKeys | None = None,
    allow_insecure: bool = False,
    options: SocketOptions = CONTROL_OPTIONS,
    counters: WireCounters | None = None,
    reply_errors: bool = True,
) -> WireSocket:
    """Bind a ROUTER for control messages (agent for workers, planner for agents and CLI).

    ``endpoint`` may end in ``:*`` (read the port from ``.endpoint``). Raises BindError.
    """
    return _bind(
        ctx,
        zmq.ROUTER,
        "router",
        endpoint,
        curve=curve,
        allow_insecure=allow_insecure,
        options=options,
        counters=counters,
        reply_errors=reply_errors,
    )


def control_client(
    ctx: Context,
    endpoint: str,
    *,
    identity: str | None = None,
    curve: CurveClientKeys | None = None,
    options: SocketOptions = CONTROL_OPTIONS,
    counters: WireCounters | None = None,
) -> WireSocket:
    """Connect a DEALER for control messages. Give a stable ``identity`` (e.g. the worker
    name): with ROUTER_HANDOVER, a reconnect under the same identity takes over the route."""
    return _connect(
        ctx,
        zmq.DEALER,
        "dealer",
        endpoint,
        identity=identity,
        curve=curve,
        options=options,
        counters=counters,
    )


def snapshot_receiver(
    ctx: Context,
    endpoint: str,
    *,
    curve: CurveServerKeys | None = None,
    allow_insecure: bool = False,
    options: SocketOptions = TELEMETRY_OPTIONS,
    counters: WireCounters | None = None,
) -> WireSocket:
    """Bind a PULL for snapshots (the receiver binds). Raises BindError."""
    return _bind(
        ctx,
        zmq.PULL,
        "pull",
        endpoint,
        curve=curve,
        allow_insecure=allow_insecure,
        options=options,
        counters=counters,
    )


def snapshot_sender(
    ctx: Context,
    endpoint: str,
    *,
    curve: CurveClientKeys | None = None,
    options: SocketOptions = TELEMETRY_OPTIONS,
    counters: WireCounters | None = None,
) -> WireSocket:
    """Connect a PUSH for snapshots; ``send`` drops and counts when the queue is full."""
    return _connect(
        ctx,
        zmq.PUSH,
        "push",
        endpoint,
        identity=None,
        curve=curve,
        options=options,
        counters=counters,
    )
