"""The planner daemon's plumbing: sockets, the poll loop, metrics, systemd, shutdown.

One thread owns both sockets (ZeroMQ sockets are not thread-safe): it polls the control
ROUTER (agents and the CLI) and the snapshot PULL, hands every message's frames to the
:class:`PlannerCore`, sends what the core returns without ever blocking (a full queue is a
counted drop), and calls ``core.tick()`` at least every ``tick_s``. The systemd watchdog is
fed only from this loop, after an iteration completes, so a wedged loop stops the pings.

Two ways to run it:

- the daemon (``eplbd planner``): ``PlannerService(settings, notify=True).run()`` in the main
  thread; SIGTERM/SIGINT call :meth:`PlannerService.request_stop`, SIGHUP
  :meth:`PlannerService.request_reload` (the CURVE allow-list);
- embedded (the agent's ``--embedded-planner``)::

      svc = PlannerService(PlannerSettings.embedded(runtime_dir, state_dir)).run_in_thread()
      ...  # connect to svc.control_endpoint / svc.snapshot_endpoint
      svc.stop()

  ``run_in_thread`` returns once the sockets are bound and the state restored, or raises
  what prevented it (StoreCorrupt, StoreLocked, BindError, ...).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import zmq

from eplbd.controller._core import Outbound, PlannerCore
from eplbd.controller._metrics import PlannerMetrics
from eplbd.controller._settings import PlannerSettings, check_planner_settings
from eplbd.controller._store import StateStore
from eplbd.controller._trigger import PlanFn
from eplbd.ops import sdnotify
from eplbd.ops.clock import SYSTEM_CLOCK, Clock
from eplbd.ops.logging import get_logger
from eplbd.ops.metrics import MetricsServer, Registry, serve_metrics
from eplbd.ops.sdnotify import Watchdog
from eplbd.wire import (
    WireError,
    WireSocket,
    control_server,
    load_server_keys,
    read_allow_list,
    reload_allow_list,
    snapshot_receiver,
)

__all__ = ["PlannerService"]

log = get_logger("eplbd.controller")

_DRAIN = 512  # messages per socket per loop iteration, so ticks stay on time under a flood
_STATUS_EVERY_S = 10.0


class PlannerService:
    """The planner daemon around a :class:`PlannerCore` (see the module docstring).

    ``clock`` drives the core's rules (tests may pass a FakeClock and still use real
    sockets); ``plan_fn`` replaces :func:`eplbd.planner.plan`; ``registry`` collects the
    metrics (a new one by default); ``notify`` sends sd_notify READY/STATUS/WATCHDOG/STOPPING.
    """

    def __init__(
        self,
        settings: PlannerSettings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        plan_fn: PlanFn | None = None,
        registry: Registry | None = None,
        notify: bool = False,
    ) -> None:
        check_planner_settings(settings)
        self.settings = settings
        self.clock = clock
        self.notify = notify
        self.metrics = PlannerMetrics(registry)
        self.store = StateStore(
            settings.state_dir,
            keep_layouts=settings.keep_layouts,
            keep_history=settings.keep_history,
        )
        self.core = PlannerCore(
            settings.core_config(),
            store=self.store,
            clock=clock,
            plan_fn=plan_fn,
            metrics=self.metrics,
        )
        self.control_endpoint: str | None = None
        self.snapshot_endpoint: str | None = None
        self.metrics_server: MetricsServer | None = None
        self.internal_errors = 0
        self.loops = 0
        self._opened = False
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._ctx: zmq.Context[Any] | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> list[str]:
        """Lock the state directory and restore every group (before any socket is bound).

        Raises StoreLocked (another planner runs on it) or StoreCorrupt (a file cannot be
        read and ``reset_state`` is off). Returns notes on files moved aside.
        """
        if self._opened:
            return self.core.notes
        self.store.open()
        try:
            notes = self.core.restore(reset_corrupt=self.settings.reset_state)
        except BaseException:
            self.store.close()
            raise
        for note in notes:
            log.warning("state file reset", note=note)
        self._opened = True
        return notes

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_server is None else self.metrics_server.url

    def request_stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._stop.set()

    def request_reload(self) -> None:
        """Ask the loop to re-read the CURVE allow-list (SIGHUP; safe from a signal handler)."""
        self._reload.set()

    def run(self) -> None:
        """Open, bind, serve until :meth:`request_stop`, then close everything."""
        ctx: zmq.Context[Any] = zmq.Context()
        self._ctx = ctx
        ctrl: WireSocket | None = None
        snap: WireSocket | None = None
        try:
            self.open()
            curve = None
            if (paths := self.settings.curve_paths) is not None:
                curve = load_server_keys(*paths)
                # a broken key file stops the start (ValueError: exit 78) before any bind
                allowed = len(read_allow_list(curve.allow_dir, allow_empty=True))
                self.metrics.curve_keys(allowed)
                if not allowed:
                    log.warning(
                        "the CURVE allow-list is empty: every client is refused until keys "
                        "are added (then systemctl reload)",
                        allow_dir=str(curve.allow_dir),
                    )
            ctrl = control_server(
                ctx,
                self.settings.listen,
                curve=curve,
                allow_insecure=self.settings.insecure,
                counters=self.core.counters,
            )
            snap = snapshot_receiver(
                ctx,
                self.settings.snapshot_endpoint,
                curve=curve,
                allow_insecure=self.settings.insecure,
                counters=self.core.counters,
            )
            self.control_endpoint = ctrl.endpoint
            self.snapshot_endpoint = snap.endpoint
            self.core.endpoints = {"control": ctrl.endpoint, "snapshots": snap.endpoint}
            if self.settings.metrics:
                host, _, port = self.settings.metrics.rpartition(":")
                self.metrics_server = serve_metrics(self.metrics.registry, host, int(port))
                self.core.endpoints["metrics"] = self.metrics_server.url
            log.info(
                "planner serving",
                control=ctrl.endpoint,
                snapshots=snap.endpoint,
                metrics=self.metrics_url,
                curve=curve is not None,
                incarnation=self.core.incarnation,
                groups=self.core.group_names(),
            )
            self._ready.set()
            if self.notify:
                sdnotify.ready(self._status_line())
            self._loop(ctrl, snap)
        except BaseException as e:
            self._error = e
            raise
        finally:
            if self.notify:
                sdnotify.stopping("planner stopping")
            for s in (ctrl, snap):
                if s is not None:
                    s.close()
            if self.metrics_server is not None:
                self.metrics_server.close()
            if self._opened:
                self.core.save_windows()
            self.store.close()
            ctx.term()
            self._done.set()
            self._ready.set()
            log.info("planner stopped")

    def run_in_thread(self, timeout: float = 30.0) -> PlannerService:
        """Serve from a daemon thread; return once serving (or raise why it could not)."""
        if self._thread is not None:
            raise RuntimeError("already running")

        def target() -> None:
            with contextlib.suppress(BaseException):
                self.run()

        self._thread = threading.Thread(target=target, name="eplbd-planner", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"the planner did not start within {timeout} s")
        if self._error is not None:
            self._thread.join(5)
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and wait for it to close its sockets (embedded use)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._ready.is_set() and not self._done.is_set()

    # --- the loop --------------------------------------------------------------------------

    def _status_line(self) -> str:
        n = len(self.core.groups)
        epochs = ", ".join(f"{g.name}@{g.record.epoch}" for g in self.core.groups.values())
        return f"serving {n} group(s){': ' + epochs if epochs else ''}; {len(self.core.agents)} agent(s)"

    def _loop(self, ctrl: WireSocket, snap: WireSocket) -> None:
        poller = zmq.Poller()
        poller.register(ctrl.socket, zmq.POLLIN)
        poller.register(snap.socket, zmq.POLLIN)
        wd = Watchdog(clock=self.clock) if self.notify else None
        tick_s = self.settings.tick_s
        next_status = time.monotonic() + _STATUS_EVERY_S
        while not self._stop.is_set():
            wait = tick_s
            nd = self.core.next_deadline()
            if nd is not None:
                wait = max(0.0, min(wait, nd - self.clock.monotonic()))
            if wd is not None:
                wait = wd.poll_interval(wait)
            events = dict(poller.poll(int(wait * 1000)))
            self.core.loop_turn(wait)
            if self._reload.is_set():
                self._reload.clear()
                self._reload_allow_list()
            if ctrl.socket in events:
                self._drain_control(ctrl)
            if snap.socket in events:
                self._drain_snapshots(snap)
            try:
                self._send(ctrl, self.core.tick())
            except Exception:
                self.internal_errors += 1
                log.exception("tick failed")
            self.loops += 1
            if wd is not None:
                wd.progress()
                wd.maybe_ping()
            if self.notify and time.monotonic() >= next_status:
                next_status = time.monotonic() + _STATUS_EVERY_S
                sdnotify.status(self._status_line())

    def _reload_allow_list(self) -> None:
        """Re-read the CURVE allow-list in the loop's thread (its context's authenticator); a
        broken list is refused and the one in force stays. Logged and counted either way."""
        if self.settings.curve_paths is None:
            log.info("reload requested: nothing to reload (no CURVE keys)")
            return
        assert self._ctx is not None  # the loop runs inside run()
        try:
            done = reload_allow_list(self._ctx)
        except ValueError as e:
            log.error("allow-list reload refused; the previous list stays", error=str(e))
            self.metrics.curve_reload("refused")
            return
        if done is None:  # pragma: no cover - CURVE sockets always start an authenticator
            return
        log.info("allow-list reloaded", keys=done.keys, added=done.added, removed=done.removed)
        self.metrics.curve_reload("ok")
        self.metrics.curve_keys(done.keys)

    def _drain_control(self, ctrl: WireSocket) -> None:
        for _ in range(_DRAIN):
            try:
                frames = ctrl.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 1:
                continue
            identity = frames[0].bytes
            try:
                out = self.core.on_control_frames(identity, frames[1:])
            except Exception:
                self.internal_errors += 1
                self.metrics.dropped("internal_error")
                log.exception("control message failed", peer=identity.hex()[:16])
                continue
            self._send(ctrl, out)

    def _drain_snapshots(self, snap: WireSocket) -> None:
        for _ in range(_DRAIN):
            try:
                frames = snap.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self.core.on_snapshot_frames(frames)
            except Exception:
                self.internal_errors += 1
                self.metrics.dropped("internal_error")
                log.exception("snapshot failed")

    def _send(self, ctrl: WireSocket, out: list[Outbound]) -> None:
        for o in out:
            try:
                ok = ctrl.send(o.type, o.body, o.tensors, to=o.identity)
            except WireError as e:  # a bug: the core built a message the codec refuses
                self.internal_errors += 1
                log.error("cannot encode outbound message", type=o.type, error=str(e))
                continue
            if not ok:
                self.metrics.dropped("send_" + o.type)
