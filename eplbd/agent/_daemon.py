"""The agent's sockets and loop around :class:`~eplbd.agent._core.AgentCore`.

One thread owns all four sockets (one socket, one thread):

- ROUTER ``ipc://<runtime-dir>/agent.sock`` (workers' control) and PULL
  ``ipc://<runtime-dir>/snapshots.sock`` (workers' snapshots), both guarded by a lock file
  so a second agent on the same runtime directory is refused (:class:`~eplbd.wire.BindError`)
  instead of silently stealing the sockets;
- DEALER to the planner's control endpoint and PUSH to its snapshot endpoint
  (``IMMEDIATE``: nothing queues in ZeroMQ for a planner that is not there; reconnect with
  backoff). A snapshot the PUSH cannot take yet waits in the core (bounded, in order, its
  seq kept) and goes out once the PUSH is writable: after a planner restart the control
  connection may come back, and the held snapshots be flushed, before the snapshot one.

Every send is non-blocking: a full queue or a vanished peer is a counted drop, so neither a
slow planner nor a stuck worker can stall the loop, and the loop never waits on anything but
its poller (at most 50 ms, so a stop request is seen quickly). A control message the planner
socket refused goes back to the core (``planner_send_failed``), which keeps the workers'
answers and starts the session over; so does a dropped connection to the planner (a socket
monitor on the DEALER: ZeroMQ gives no receipt for what was queued on it).

:func:`start_agent` runs an agent in a thread of the calling process (tests, the demo);
``eplbd agent`` (:mod:`eplbd.cli.agent_cmd`) runs :meth:`AgentDaemon.run` in its main thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from eplbd.agent._core import (
    PLANNER,
    PLANNER_SNAPSHOTS,
    WORKER,
    AgentCore,
    CoreConfig,
    Schedule,
    Send,
)
from eplbd.agent._embedded import embedded_planner_settings, start_embedded_planner
from eplbd.agent._metrics import AgentMetrics
from eplbd.agent._settings import (
    AGENT_SOCKET,
    SNAPSHOTS_SOCKET,
    AgentSettings,
    planner_snapshot_endpoint,
)
from eplbd.ops import sdnotify
from eplbd.ops.clock import SYSTEM_CLOCK, Clock
from eplbd.ops.logging import get_logger
from eplbd.ops.metrics import MetricsServer, Registry, serve_metrics
from eplbd.ops.sdnotify import Watchdog
from eplbd.wire import (
    SocketOptions,
    WireError,
    WireSocket,
    control_client,
    control_server,
    load_client_keys,
    new_incarnation,
    snapshot_receiver,
    snapshot_sender,
)

__all__ = ["AgentDaemon", "RunningAgent", "start_agent"]

log = get_logger("eplbd.agent")

_MAX_WAIT_S = 0.05
_BATCH = 256  # messages taken from one socket per loop turn (fairness between sockets)
#: Worker snapshots: a few per worker in flight (per pipe); the planner PUSH holds a burst
#: of held snapshots after an outage.
# Telemetry sockets run without ZMTP heartbeats, as eplbd.wire.TELEMETRY_OPTIONS explains.
_WORKER_SNAPSHOT_OPTIONS = SocketOptions(sndhwm=4, rcvhwm=64, heartbeat_ivl_ms=0)
_PLANNER_SNAPSHOT_OPTIONS = SocketOptions(
    sndhwm=256, rcvhwm=4, heartbeat_ivl_ms=0, reconnect_ivl_max_ms=1000
)
#: To the planner: reconnect at least every second (not libzmq's backoff to 5 s), so that
#: after a planner restart or a partition every agent is back within about a second.
_PLANNER_CONTROL_OPTIONS = SocketOptions(reconnect_ivl_max_ms=1000)


@dataclass(frozen=True)
class _Endpoints:
    agent: str
    snapshots: str
    planner: str | None
    planner_snapshots: str | None


class AgentDaemon:
    """``eplbd agent``: open() binds and connects, run() loops until ``stop`` is set, close().

    ``clock`` drives every liveness and merge rule (a FakeClock in tests); ``registry``
    receives the metrics (a fresh one by default; served at ``settings.metrics``).
    ``watchdog`` is fed once per loop turn that made progress.
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        registry: Registry | None = None,
        watchdog: Watchdog | None = None,
        incarnation: str | None = None,
        planner_settings: Any = None,
    ) -> None:
        self.settings = settings
        self.planner_settings = planner_settings
        self.clock = clock
        self.registry = registry if registry is not None else Registry(max_series=256)
        self.metrics = AgentMetrics(self.registry)
        self.watchdog = watchdog
        self.incarnation = incarnation or new_incarnation()
        rd = Path(settings.runtime_dir)
        planner = settings.planner
        planner_snap = settings.planner_snapshots
        if settings.embedded_planner:
            if self.planner_settings is None:
                self.planner_settings = embedded_planner_settings(settings, environ={})
            planner = self.planner_settings.listen
            planner_snap = self.planner_settings.snapshot_endpoint
        elif planner is not None and planner_snap is None:
            planner_snap = planner_snapshot_endpoint(planner)
        self.endpoints = _Endpoints(
            agent=f"ipc://{rd / AGENT_SOCKET}",
            snapshots=f"ipc://{rd / SNAPSHOTS_SOCKET}",
            planner=planner,
            planner_snapshots=planner_snap,
        )
        self.core = AgentCore(
            CoreConfig(
                agent_id=settings.node,
                node=settings.node,
                schedule=Schedule(settings.window_steps, settings.record_steps, settings.recording),
                heartbeat_s=settings.heartbeat_s,
                dead_s=settings.dead_timeout_s,
                merge_timeout_s=settings.merge_timeout_s,
                held_per_group=settings.held_snapshots,
                hello_backoff_max_s=max(2.0, min(10.0, settings.dead_timeout_s)),
                has_planner=planner is not None,
            ),
            incarnation=self.incarnation,
            clock=clock,
        )
        self._ctx: zmq.Context[Any] | None = None
        self._router: WireSocket | None = None
        self._pull: WireSocket | None = None
        self._dealer: WireSocket | None = None
        self._push: WireSocket | None = None
        self._monitor: zmq.Socket[Any] | None = None  # the planner DEALER: (dis)connections
        self._planner_service: Any = None
        self._metrics_server: MetricsServer | None = None
        self._status: dict[str, Any] = self.core.status()
        self._status_lock = threading.Lock()
        self._calls: list[Callable[[AgentCore], list[Send]]] = []
        self._last_publish = -1e18
        self._last_sd_status = ""
        self.loops = 0

    # --- lifetime ---------------------------------------------------------------------------

    def open(self) -> None:
        """Bind the workers' sockets (BindError if another agent holds them), start the
        embedded planner if asked, connect to the planner, start the metrics endpoint."""
        s = self.settings
        Path(s.runtime_dir).mkdir(parents=True, exist_ok=True)
        self._ctx = zmq.Context()
        try:
            self._router = control_server(
                self._ctx,
                self.endpoints.agent,
                counters=self.core.worker_counters,
                reply_errors=False,  # the core answers errors itself
            )
            self._pull = snapshot_receiver(
                self._ctx,
                self.endpoints.snapshots,
                options=_WORKER_SNAPSHOT_OPTIONS,
                counters=self.core.worker_counters,
            )
            if s.embedded_planner:
                self._planner_service = start_embedded_planner(
                    self.planner_settings, clock=self.clock, registry=self.registry
                )
            if self.endpoints.planner is not None:
                curve = None  # none on the ipc link to an embedded planner
                if (
                    not s.embedded_planner
                    and s.curve_secret_key is not None
                    and s.curve_server_key is not None
                ):
                    curve = load_client_keys(s.curve_secret_key, s.curve_server_key)
                self._dealer = control_client(
                    self._ctx,
                    self.endpoints.planner,
                    identity=s.node,
                    curve=curve,
                    options=_PLANNER_CONTROL_OPTIONS,
                    counters=self.core.planner_counters,
                )
                self._monitor = self._dealer.socket.get_monitor_socket(
                    zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                )
                assert self.endpoints.planner_snapshots is not None
                self._push = snapshot_sender(
                    self._ctx,
                    self.endpoints.planner_snapshots,
                    curve=curve,
                    options=_PLANNER_SNAPSHOT_OPTIONS,
                    counters=self.core.planner_counters,
                )
            if s.metrics:
                host, _, port = s.metrics.rpartition(":")
                self._metrics_server = serve_metrics(self.registry, host, int(port))
        except BaseException:
            self.close()
            raise
        log.info(
            "agent listening",
            workers=self.endpoints.agent,
            snapshots=self.endpoints.snapshots,
            planner=self.endpoints.planner,
            planner_snapshots=self.endpoints.planner_snapshots,
        )

    @property
    def metrics_port(self) -> int | None:
        """The bound port of the /metrics endpoint (None when off)."""
        return self._metrics_server.port if self._metrics_server is not None else None

    @property
    def metrics_url(self) -> str | None:
        return self._metrics_server.url if self._metrics_server is not None else None

    @property
    def planner_service(self) -> Any:
        """The embedded planner service (None without ``--embedded-planner``)."""
        return self._planner_service

    def close(self) -> None:
        """Close every socket (linger 0), release the lock files, stop the embedded planner
        and the metrics endpoint. Idempotent."""
        if self._monitor is not None:
            if self._dealer is not None:
                self._dealer.socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        for sock in (self._push, self._dealer, self._pull, self._router):
            if sock is not None:
                sock.close()
        self._push = self._dealer = self._pull = self._router = None
        if self._planner_service is not None:
            try:
                self._planner_service.stop()
            except Exception:  # a failing planner must not keep the agent from exiting
                log.exception("embedded planner did not stop cleanly")
            self._planner_service = None
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # --- the loop -----------------------------------------------------------------------------

    def call(self, fn: Callable[[AgentCore], list[Send]]) -> None:
        """Run ``fn(core)`` in the loop's thread on its next turn (e.g. a schedule change);
        what it returns is sent."""
        with self._status_lock:
            self._calls.append(fn)

    def set_schedule(self, schedule: Schedule) -> None:
        """Change the recording schedule; every worker is told on the loop's next turn.
        Raises ValueError for a bad schedule (here, not later in the loop)."""
        schedule.check()
        self.call(lambda core: core.set_schedule(schedule))

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set. ``open()`` first."""
        assert self._router is not None and self._pull is not None
        poller = zmq.Poller()
        readers: list[tuple[WireSocket, Callable[[list[Any]], list[Send]]]] = [
            (self._router, lambda f: self.core.on_worker(f[0].bytes, f[1:])),
            (self._pull, self.core.on_snapshot),
        ]
        if self._dealer is not None:
            readers.append((self._dealer, self.core.on_planner))
        for sock, _ in readers:
            poller.register(sock.socket, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        self._send(self.core.tick())
        while not stop.is_set():
            wait = self.core.next_deadline() - self.clock.monotonic()
            wait = min(_MAX_WAIT_S, max(0.0, wait))
            try:
                ready = dict(poller.poll(int(wait * 1000)))
            except zmq.ZMQError as e:
                if e.errno == zmq.ETERM:
                    break
                raise
            if self._monitor is not None and self._monitor in ready:
                self._planner_link_events()
            for sock, handle in readers:
                if sock.socket in ready:
                    self._drain(sock, handle)
            if self._calls:
                with self._status_lock:
                    calls, self._calls = self._calls, []
                for fn in calls:
                    try:
                        self._send(fn(self.core))
                    except Exception:  # a caller's mistake must not end the loop
                        log.exception("a queued call failed")
            self._send(self.core.tick())
            self._send_unsent_snapshots()
            self.loops += 1
            self._publish()
            if self.watchdog is not None:
                self.watchdog.progress()
                self.watchdog.maybe_ping()

    def _planner_link_events(self) -> None:
        """The connection to the planner dropped (a ZMTP heartbeat timed out, the planner
        went): what was sent on it may never have arrived, so the core starts over. It came
        up: the core says agent_hello at once if it has no session."""
        assert self._monitor is not None
        while True:
            try:
                ev = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_DISCONNECTED:
                self._send(self.core.planner_link_lost())
            elif ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._send(self.core.planner_link_up())

    def _drain(self, sock: WireSocket, handle: Callable[[list[Any]], list[Send]]) -> None:
        for _ in range(_BATCH):
            try:
                frames = sock.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                out = handle(frames)
            except Exception:  # a bug on one message must not take the node's agent down
                log.exception("message handling failed; dropped", socket=sock.kind)
                continue
            self._send(out)

    def _send(self, out: list[Send]) -> None:
        for s in out:
            if s.to == WORKER:
                sock, to = self._router, s.identity
            elif s.to == PLANNER:
                sock, to = self._dealer, None
            elif s.to == PLANNER_SNAPSHOTS:
                sock, to = self._push, None
                # behind the ones already waiting (seq order), or not connected yet: keep it
                if sock is not None and (self.core.has_unsent_snapshots or not sock.writable()):
                    self.core.snapshot_unsent(s)
                    continue
            else:  # pragma: no cover - the core only makes these three
                raise ValueError(s.to)
            if sock is None:
                continue
            try:
                ok = sock.send(s.msg_type, s.body, s.tensors or None, to=to)
            except WireError as e:
                log.error("cannot encode", type=s.msg_type, error=str(e))
                continue
            if not ok and s.to == PLANNER:  # counted by the socket; the core keeps what matters
                self._send(self.core.planner_send_failed(s))
            elif not ok and s.to == PLANNER_SNAPSHOTS:  # the queue filled meanwhile
                self.core.snapshot_unsent(s)

    def _send_unsent_snapshots(self) -> None:
        """The snapshots kept while the planner's snapshot socket could not take them, once
        it can (in order: whatever it cannot take again is kept again)."""
        push = self._push
        if push is not None and self.core.has_unsent_snapshots and push.writable():
            self._send(self.core.take_unsent_snapshots())

    def _publish(self, force: bool = False) -> None:
        now = self.clock.monotonic()
        if not force and now - self._last_publish < 0.25:
            return
        self._last_publish = now
        st = self.core.status()
        st["endpoints"] = {
            "agent": self.endpoints.agent,
            "snapshots": self.endpoints.snapshots,
            "planner": self.endpoints.planner,
            "planner_snapshots": self.endpoints.planner_snapshots,
        }
        st["wire"] = {
            "workers": self.core.worker_counters.as_dict(),
            "planner": self.core.planner_counters.as_dict(),
        }
        with self._status_lock:
            self._status = st
        self.metrics.update(st, st["wire"])
        line = (
            f"{len(st['workers'])} workers in {sum(1 for g in st['groups'].values() if g['local_ranks'])}"
            f" groups; planner {'connected' if st['planner']['synced'] else 'away'}"
        )
        if line != self._last_sd_status:
            self._last_sd_status = line
            sdnotify.status(line)

    def status(self) -> dict[str, Any]:
        """The agent's state as of the loop's last turn (at most ~0.25 s old). Thread-safe."""
        with self._status_lock:
            return self._status


class RunningAgent:
    """An agent serving in a thread of this process (see :func:`start_agent`)."""

    def __init__(
        self, daemon: AgentDaemon, thread: threading.Thread, stop: threading.Event
    ) -> None:
        self.daemon = daemon
        self.thread = thread
        self._stop = stop

    @property
    def endpoint(self) -> str:
        """The workers' control endpoint, ``ipc://<runtime-dir>/agent.sock``."""
        return self.daemon.endpoints.agent

    @property
    def snapshot_endpoint(self) -> str:
        return self.daemon.endpoints.snapshots

    def status(self) -> dict[str, Any]:
        return self.daemon.status()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, close the sockets (releasing the runtime dir), join the thread."""
        self._stop.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("agent thread did not stop")

    def __enter__(self) -> RunningAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_agent(
    settings: AgentSettings,
    *,
    clock: Clock = SYSTEM_CLOCK,
    registry: Registry | None = None,
    planner_settings: Any = None,
    timeout: float = 30.0,
) -> RunningAgent:
    """Run an agent in a daemon thread; return once it is bound and serving.

    The sockets are created, used and closed in that thread. Raises what ``open()`` raised
    (e.g. :class:`~eplbd.wire.BindError` when another agent holds the runtime directory).
    """
    daemon = AgentDaemon(
        settings, clock=clock, registry=registry, planner_settings=planner_settings
    )
    stop = threading.Event()
    ready = threading.Event()
    failure: list[BaseException] = []

    def main() -> None:
        try:
            daemon.open()
        except BaseException as e:
            failure.append(e)
            ready.set()
            return
        ready.set()
        try:
            daemon.run(stop)
        except Exception:
            log.exception("agent loop crashed")
        finally:
            daemon.close()

    thread = threading.Thread(target=main, name=f"eplbd-agent-{os.getpid()}", daemon=True)
    thread.start()
    if not ready.wait(timeout):
        stop.set()
        raise TimeoutError("agent did not start in time")
    if failure:
        thread.join(timeout)
        raise failure[0]
    return RunningAgent(daemon, thread, stop)
