"""The client's IO thread: the only code in an inference worker that touches a socket.

The serving thread must never wait on the network (ARCHITECTURE.md, invariant 7). So one
daemon thread, started by :meth:`AgentLink.start`, creates its own ZeroMQ context (after any
fork) and owns both sockets of the worker <-> agent hop (one socket, one thread):

- a DEALER to the agent's control socket (``ipc://<runtime-dir>/agent.sock``): ``hello``,
  ``heartbeat``, ``staged``, ``aborted``, ``committed`` up; ``welcome``, ``schedule``,
  ``prepare``, ``abort``, ``heartbeat``, ``error`` down;
- a PUSH to the agent's snapshot socket (``snapshots.sock`` in the same directory): load
  snapshots, sent with NOBLOCK; a full queue or an absent agent is a counted drop (a lost
  snapshot costs resolution, never correctness).

The serving thread talks to it through two plain objects: it puts ``(msg_type, body,
tensors)`` triples on ``outbox`` (a ``queue.Queue``; ``put_nowait`` never blocks on the link,
which drains it every few milliseconds whether or not the agent is up), and it receives the
agent's ``welcome``, ``schedule``, ``prepare`` and ``abort`` through ``deliver(msg_type, body,
tensors)`` (tensors as torch tensors), called from the IO thread after the message was
decoded and validated (bad ones are counted, logged through
``logging.getLogger("eplbd_client")`` and dropped). ``deliver`` should only enqueue: it runs
on the IO thread. Its heartbeats carry the epoch the worker serves (from ``hello()``).

Agent restarts: the link sends ``hello`` (a fresh body from ``hello()``, called on the IO
thread, so it can report the worker's current epoch) on start and again whenever the agent
may have forgotten it: a ``welcome`` or ``heartbeat`` with another incarnation, an ``error``
``hello_required``, or the agent silent for the dead timeout (5 heartbeats). Until the agent
welcomes it, hellos are retried with backoff (0.1 s doubling to 2 s) and control messages
from the outbox wait in a bounded buffer (oldest dropped and counted); so does one whose send
finds the agent gone before the silence is noticed. A ``committed`` reported while the agent
restarts still reaches the planner.

Nothing here raises into the caller after construction; the thread logs and counts instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import zmq

from eplbd.wire import (
    ABORT,
    ABORTED,
    COMMITTED,
    ERROR,
    HEARTBEAT,
    HELLO,
    PREPARE,
    SCHEDULE,
    SNAPSHOT,
    STAGED,
    WELCOME,
    ModelShape,
    SocketOptions,
    WireCounters,
    WireError,
    WireSocket,
    control_client,
    decode,
    new_incarnation,
    snapshot_sender,
    torch_tensors,
    validate,
)

__all__ = ["AgentLink", "snapshot_endpoint_for"]

log = logging.getLogger("eplbd_client")

Deliver = Callable[[str, dict[str, Any], dict[str, torch.Tensor]], None]

_DELIVERED = frozenset({WELCOME, SCHEDULE, PREPARE, ABORT})
_CONTROL_UP = frozenset({STAGED, ABORTED, COMMITTED})
_POLL_MS = 5
_OUTBOX_BATCH = 1024
_PENDING_MAX = 256
_HELLO_BACKOFF = (0.1, 2.0)
_DEAD_HEARTBEATS = 5.0
_CONTROL_OPTIONS = SocketOptions(sndhwm=1000, rcvhwm=1000, reconnect_ivl_max_ms=1000)
_SNAPSHOT_OPTIONS = SocketOptions(
    sndhwm=4, rcvhwm=4, reconnect_ivl_max_ms=1000, heartbeat_ivl_ms=0
)  # telemetry: no ZMTP heartbeats (eplbd.wire.TELEMETRY_OPTIONS says why)


def snapshot_endpoint_for(endpoint: str) -> str:
    """The agent's snapshot endpoint next to its control endpoint.

    ``ipc://DIR/agent.sock`` -> ``ipc://DIR/snapshots.sock``; ``tcp://H:P`` -> ``tcp://H:P+1``.
    """
    if endpoint.startswith("ipc://"):
        return f"ipc://{os.path.join(os.path.dirname(endpoint[6:]), 'snapshots.sock')}"
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[6:].rpartition(":")
        if host and port.isdigit():
            return f"tcp://{host}:{int(port) + 1}"
    raise ValueError(f"cannot derive a snapshot endpoint from {endpoint!r}; pass one")


class AgentLink:
    """A worker's connection to its node agent, run by one IO thread.

    ``endpoint``: the agent's control endpoint; ``deliver``: called on the IO thread with
    each validated ``welcome``/``schedule``/``prepare``/``abort``; ``outbox``: triples from
    the serving thread (``snapshot`` goes to the PUSH socket, ``staged``/``aborted``/
    ``committed`` to the DEALER); ``hello``: returns the worker's hello body (docs/protocol.md)
    and is called on the IO thread; ``heartbeat_s``: the heartbeat interval (the agent counts
    as gone after 5 silent intervals).

    ``stats()`` returns the counters (sent per type, dropped, bad per reason, hellos, ...).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        deliver: Deliver,
        outbox: queue.Queue[Any],
        hello: Callable[[], dict[str, Any]],
        snapshot_endpoint: str | None = None,
        heartbeat_s: float = 1.0,
    ) -> None:
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")
        self.endpoint = endpoint
        self.snapshot_endpoint = snapshot_endpoint or snapshot_endpoint_for(endpoint)
        self.heartbeat_s = float(heartbeat_s)
        self.dead_s = _DEAD_HEARTBEATS * self.heartbeat_s
        self._deliver = deliver
        self._outbox = outbox
        self._hello = hello
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._wire = WireCounters()
        self._welcomed = False
        self._last_rx = 0.0
        # IO thread only: answers waiting for a welcome, and the hello retry schedule
        self._pending: deque[tuple[str, Any, dict[str, torch.Tensor]]] = deque()
        self._backoff = _HELLO_BACKOFF[0]
        self._next_hello = 0.0
        self.agent_incarnation: str | None = None
        self._sender = ("worker", new_incarnation())  # (worker, incarnation) from hello()

    # --- public -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the IO thread (idempotent). Returns at once."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._main, name="eplbd-agent-link", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 2.0) -> bool:
        """Stop the IO thread and close its sockets (linger 0). Idempotent. Returns whether
        the thread has stopped; one still running after ``timeout`` s is logged (a daemon
        thread alive when the interpreter finalizes can take the process down with it)."""
        self._stop.set()
        t = self._thread
        if t is None or t is threading.current_thread():
            return True
        t.join(timeout)
        if t.is_alive():
            log.warning("eplbd: the agent link thread did not stop within %.1f s", timeout)
            return False
        return True

    @property
    def connected(self) -> bool:
        """Whether the agent welcomed this worker and has been heard from recently."""
        return self._welcomed and time.monotonic() - self._last_rx < self.dead_s

    def stats(self) -> dict[str, int]:
        """A copy of the counters: ``sent_<type>``, ``dropped_<type>``, ``bad_<reason>``,
        ``delivered_<type>``, ``deliver_errors``, ``hellos``, ``agent_restarts``, ..."""
        with self._lock:
            out = dict(self._counts)
        for reason, n in list(self._wire.dropped.items()):
            out[f"send_{reason}"] = n
        return out

    # --- the IO thread ------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def _log_bad(self, reason: str, detail: str, msg_type: str = "") -> None:
        key = f"bad_{reason}"
        self._count(key)
        with self._lock:
            n = self._counts[key]
        if n <= 20 or n & (n - 1) == 0:
            log.warning(
                "eplbd: dropped a bad message from the agent (%s, type %s, %d so far): %s",
                reason,
                msg_type or "?",
                n,
                detail,
            )

    def _main(self) -> None:
        ctx: zmq.Context[Any] | None = None
        dealer = push = None
        try:
            ctx = zmq.Context()
            identity = self._identity()
            dealer = control_client(
                ctx,
                self.endpoint,
                identity=identity,
                options=_CONTROL_OPTIONS,
                counters=self._wire,
            )
            push = snapshot_sender(
                ctx, self.snapshot_endpoint, options=_SNAPSHOT_OPTIONS, counters=self._wire
            )
            self._loop(dealer, push)
        except Exception:
            log.exception("eplbd: the agent link stopped on an error; serving goes on without it")
        finally:
            self._welcomed = False
            for s in (push, dealer):
                if s is not None:
                    with contextlib.suppress(Exception):
                        s.close()
            if ctx is not None:
                with contextlib.suppress(Exception):
                    ctx.term()

    def _identity(self) -> str | None:
        """The DEALER identity: the worker id (docs/protocol.md), so a restarted worker takes
        its route back at the agent (ROUTER_HANDOVER); None (a random one) if unusable."""
        try:
            wid = self._hello().get("worker")
        except Exception:
            return None
        if isinstance(wid, str) and 0 < len(wid.encode()) <= 255 and not wid.startswith("\0"):
            return wid
        return None

    def _rehello(self, now: float) -> None:
        """The agent may have forgotten us: say hello now, then with backoff until welcome."""
        self._welcomed = False
        self._backoff = _HELLO_BACKOFF[0]
        self._next_hello = now

    def _loop(self, dealer: WireSocket, push: WireSocket) -> None:
        poller = zmq.Poller()
        poller.register(dealer.socket, zmq.POLLIN)
        model: ModelShape | None = None
        now = time.monotonic()
        self._rehello(now)
        next_hb = now + self.heartbeat_s
        while not self._stop.is_set():
            if poller.poll(_POLL_MS):
                for _ in range(256):
                    try:
                        frames = dealer.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    action = self._on_message(frames, model)
                    if action == "rehello":
                        self._rehello(time.monotonic())
                    elif action == "welcomed":
                        self._flush_pending(dealer)
            now = time.monotonic()
            # outbox: drained every turn, connected or not, so it never grows
            for _ in range(_OUTBOX_BATCH):
                try:
                    item = self._outbox.get_nowait()
                except queue.Empty:
                    break
                self._route(item, dealer, push)
            if self._welcomed and now - self._last_rx >= self.dead_s:
                log.warning("eplbd: agent silent for %.1f s; saying hello again", self.dead_s)
                self._count("agent_silent")
                self._rehello(now)
            if not self._welcomed and now >= self._next_hello:
                m = self._send_hello(dealer)
                if m is not None:
                    model = m
                self._next_hello = now + self._backoff
                self._backoff = min(self._backoff * 2, _HELLO_BACKOFF[1])
            if now >= next_hb:
                next_hb = now + self.heartbeat_s
                if self._welcomed:
                    dealer.send(HEARTBEAT, self._heartbeat_body())

    def _heartbeat_body(self) -> dict[str, Any]:
        """sender, incarnation and (extra) the epoch the worker serves: the agent learns it
        even when a ``committed`` was lost on the way."""
        body: dict[str, Any] = {"sender": self._sender[0], "incarnation": self._sender[1]}
        with contextlib.suppress(Exception):
            epoch = self._hello().get("epoch")
            if type(epoch) is int and epoch >= 0:
                body["epoch"] = epoch
        return body

    def _send_hello(self, dealer: WireSocket) -> ModelShape | None:
        try:
            body = dict(self._hello())
            model = ModelShape.from_hello(body)
        except Exception as e:
            self._count("hello_errors")
            log.warning("eplbd: hello() failed (%s); retrying", e)
            return None
        w, inc = body.get("worker"), body.get("incarnation")
        if isinstance(w, str) and w and isinstance(inc, str) and inc:
            self._sender = (w[:256], inc[:256])
        self._count("hellos")
        self._send(dealer, HELLO, body, {})
        return model

    def _hold(self, item: tuple[str, Any, dict[str, torch.Tensor]]) -> None:
        if len(self._pending) >= _PENDING_MAX:
            dropped = self._pending.popleft()
            self._count(f"dropped_{dropped[0]}")
        self._pending.append(item)

    def _flush_pending(self, dealer: WireSocket) -> None:
        while self._pending and self._welcomed:
            t, b, ts = self._pending[0]
            if not self._send_control(dealer, t, b, ts):
                return
            self._pending.popleft()

    def _send_control(
        self, dealer: WireSocket, msg_type: str, body: Any, tensors: dict[str, torch.Tensor]
    ) -> bool:
        """Send a worker's answer; if the agent cannot take it (gone, or not reading), keep
        it for after the next welcome instead of losing it, and say hello again."""
        try:
            ok = dealer.send(msg_type, body, tensors or None)
        except Exception as e:  # a malformed body: dropping it is all we can do
            self._count("encode_errors")
            log.warning("eplbd: cannot send %s: %s", msg_type, e)
            return True
        if ok:
            self._count(f"sent_{msg_type}")
            return True
        self._count("agent_unreachable")
        self._rehello(time.monotonic())
        return False

    def _route(self, item: Any, dealer: WireSocket, push: WireSocket) -> None:
        try:
            msg_type, body, tensors = item
        except (TypeError, ValueError):
            self._count("outbox_malformed")
            log.warning("eplbd: outbox item is not a (type, body, tensors) triple; dropped")
            return
        tensors = tensors or {}
        if msg_type == SNAPSHOT:
            self._send(push, msg_type, body, tensors)  # a drop is counted as dropped_snapshot
        elif msg_type in _CONTROL_UP:
            ready = self._welcomed and not self._pending
            if not (ready and self._send_control(dealer, msg_type, body, tensors)):
                self._hold((msg_type, body, tensors))
        else:
            self._count("outbox_unknown_type")
            log.warning("eplbd: outbox message type %r is not sent to the agent", msg_type)

    def _send(
        self, sock: WireSocket, msg_type: str, body: Any, tensors: dict[str, torch.Tensor]
    ) -> bool:
        try:
            ok = sock.send(msg_type, body, tensors or None)
        except (WireError, TypeError, ValueError) as e:
            self._count("encode_errors")
            log.warning("eplbd: cannot encode %s: %s", msg_type, e)
            return False
        except Exception as e:  # msgpack or torch on a malformed body: never kill the thread
            self._count("encode_errors")
            log.warning("eplbd: cannot send %s: %s", msg_type, e)
            return False
        self._count(f"sent_{msg_type}" if ok else f"dropped_{msg_type}")
        return ok

    def _on_message(self, frames: list[Any], model: ModelShape | None) -> str:
        """Handle one message from the agent; returns "rehello", "welcomed" or ""."""
        try:
            msg = validate(decode(frames), model=model)
        except WireError as e:
            self._log_bad(e.reason, e.detail)
            return ""
        self._last_rx = time.monotonic()
        body = msg.body
        if msg.type == HEARTBEAT:
            inc = body["incarnation"]
            if self.agent_incarnation is not None and inc != self.agent_incarnation:
                self._count("agent_restarts")
                self.agent_incarnation = inc
                return "rehello"
            return ""
        if msg.type == ERROR:
            if body.get("code") == "hello_required":
                self._count("hello_required")
                return "rehello"
            log.warning("eplbd: agent error %s: %s", body.get("code"), body.get("message"))
            self._count("agent_errors")
            return ""
        if msg.type not in _DELIVERED:
            self._log_bad("unexpected_type", f"{msg.type} is not sent to workers", msg.type)
            return ""
        action = ""
        if msg.type == WELCOME:
            inc = str(body["incarnation"])
            if self.agent_incarnation is not None and inc != self.agent_incarnation:
                self._count("agent_restarts")
            self.agent_incarnation = inc
            self._welcomed = True
            action = "welcomed"
        self._count(f"delivered_{msg.type}")
        try:
            self._deliver(msg.type, body, torch_tensors(msg))
        except Exception:
            self._count("deliver_errors")
            log.exception("eplbd: deliver(%s) raised; message dropped", msg.type)
        return action
