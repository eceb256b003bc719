"""How the operator commands reach the planner: settings, one request, one reply, a deadline.

``eplbd status | top | heatmap | history | rebalance | freeze | unfreeze | rollback`` talk to
the planner's control socket (a DEALER to its ROUTER, docs/protocol.md) with
``status_request`` / ``command`` and wait for ``status_reply`` / ``command_reply``.

Where the planner is (:func:`planner_endpoint`), in this order:

- ``--planner ADDR`` / ``EPLBD_PLANNER`` (``tcp://host:7050`` or ``ipc://PATH``);
- ``--runtime-dir DIR`` / ``EPLBD_RUNTIME_DIR``: an agent's runtime directory; its embedded
  planner listens on ``ipc://DIR/planner.sock``;
- otherwise ``/run/eplbd/planner.sock`` when it exists, else ``tcp://127.0.0.1:7050``.

A flag beats an environment variable beats ``--config FILE`` (``EPLBD_CLI_CONFIG``, then
``EPLBD_CONFIG``, the daemons' shared file): a ``[cli]`` table, or, in a daemon's own file,
the planner's address from its ``[agent]`` or ``[planner]`` table
(:meth:`CliSettings.values_from_config`), so ``eplbd status --config /etc/eplbd/eplbd.toml``
finds the planner the daemons use.

Every request has a deadline (``--timeout``, default 5 s) and each takes a fresh socket, so
a late reply to an abandoned request can never be read as the answer to the next one. Exit
codes (:mod:`eplbd.ops.exits`):

- 69 unreachable: no connection within the deadline, connection refused, no socket file,
  a peer that is not a planner this client can talk to (the handshake fails: CURVE refused
  or missing, or not a ZeroMQ peer at all);
- 75 timeout: something accepted the connection but no reply came within the deadline (a
  wedged planner: stopped, overloaded), or ``--wait`` ran out;
- 78 bad configuration: an invalid setting (endpoint, timeout, key files);
- 1 error: the planner answered with an ``error`` or refused the command.

Standard library, pyzmq and msgpack only (through :mod:`eplbd.wire`): ``eplbd status``
must not import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

from eplbd.cli._output import Output, add_output_arguments, emit_json_line
from eplbd.ops import settings as cfg
from eplbd.ops.exits import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

__all__ = [
    "DEFAULT_RUNTIME_DIR",
    "DEFAULT_TCP",
    "HANG_GRACE_S",
    "CliError",
    "CliSettings",
    "PlannerClient",
    "add_common_arguments",
    "check_layers",
    "check_watch",
    "fail",
    "hard_deadline",
    "layer_list",
    "load_settings",
    "open_client",
    "planner_endpoint",
    "quiet_broken_pipe",
    "watch_loop",
]

DEFAULT_RUNTIME_DIR = Path("/run/eplbd")
DEFAULT_TCP = "tcp://127.0.0.1:7050"
PLANNER_SOCKET = "planner.sock"  # the embedded planner's socket in an agent's runtime dir

_SOURCE_RANK = {"default": 0, "file": 1, "env": 2, "flag": 3}


@dataclass(frozen=True)
class CliSettings:
    """Where the planner is and how long to wait for it (flags, env, ``[cli]`` file table)."""

    ENV_PREFIXES: ClassVar[tuple[str, ...]] = ("EPLBD_CLI_", "EPLBD_")
    CONFIG_SECTION: ClassVar[str | None] = "cli"

    planner: str | None = cfg.setting(
        None,
        help="planner control endpoint, e.g. tcp://planner-host:7050 or ipc:///run/eplbd/planner.sock",
        env="EPLBD_PLANNER",  # the same variable the agent reads
        check=cfg.check_endpoint("tcp", "ipc"),
    )
    runtime_dir: Path | None = cfg.setting(
        None,
        help="an agent's runtime directory: talk to its embedded planner (DIR/planner.sock)",
        env="EPLBD_RUNTIME_DIR",  # the same variable the agent reads
        check=cfg.check_path(directory=True),
    )
    timeout: float = cfg.setting(
        5.0, help="seconds to wait for a connection and for each reply", min=0.01, max=3600.0
    )
    curve_secret_key: Path | None = cfg.setting(
        None, help="this client's CURVE secret key file (NAME.key_secret), for a tcp planner"
    )
    curve_server_key: Path | None = cfg.setting(
        None, help="the planner's CURVE public key file (NAME.key)"
    )

    @staticmethod
    def values_from_config(data: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The CLI's settings in a config file, which may be a daemon's own: top-level keys
        of ours (the daemons' are theirs and skipped), then where the planner is from the
        ``[agent]`` table (its ``planner``, or the runtime dir of an ``embedded_planner``)
        or else the ``[planner]`` table (``listen``, a wildcard host read as loopback),
        then the ``[cli]`` table, strictly (an unknown key there is an error)."""
        names = {spec.name for spec in cfg.specs(CliSettings)}
        values = {
            k.replace("-", "_"): v
            for k, v in data.items()
            if not isinstance(v, dict) and k.replace("-", "_") in names
        }
        values.update(_planner_from_daemon_tables(data))
        cli_table = data.get("cli")
        if isinstance(cli_table, dict):
            values.update(cfg.read_table(CliSettings, cli_table, "cli.", where))
        return values


def _planner_from_daemon_tables(data: Mapping[str, Any]) -> dict[str, Any]:
    """{"planner": ENDPOINT} or {"runtime_dir": DIR} from a daemon's config tables."""

    def get(table: Any, key: str) -> Any:
        if not isinstance(table, dict):
            return None
        return table.get(key, table.get(key.replace("_", "-")))

    agent, planner = data.get("agent"), data.get("planner")
    if get(agent, "embedded_planner") is True:
        return {"runtime_dir": get(agent, "runtime_dir") or str(DEFAULT_RUNTIME_DIR)}
    if isinstance(get(agent, "planner"), str):
        return {"planner": get(agent, "planner")}
    listen = get(planner, "listen")
    if isinstance(listen, str):
        if listen.startswith("tcp://"):
            host, _, port = listen[len("tcp://") :].rpartition(":")
            host = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
            listen = f"tcp://{host}:{port}"
        return {"planner": listen}
    return {}


class CliError(Exception):
    """A failure with the exit code it maps to; ``str()`` is the one line for stderr."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR, code: str = "error") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.code = code


def fail(args: argparse.Namespace, err: CliError, stream: IO[str] | None = None) -> int:
    """Print ``eplbd <command>: <message>`` on stderr and return the exit code."""
    s = sys.stderr if stream is None else stream
    s.write(f"eplbd {getattr(args, 'command', '')}: {err}\n")
    s.flush()
    return err.exit_code


# ---------------------------------------------------------------------------------------
# arguments and settings


#: The most layers ``--layers`` may name: the longest list a message may carry (the wire's
#: limit); a range is checked against it before it is expanded.
MAX_LAYERS = 65536


def layer_list(text: str) -> list[int]:
    """``"0,3,5-7"`` -> ``[0, 3, 5, 6, 7]`` (argparse type: a bad list is a usage error)."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError
                if b - a >= MAX_LAYERS:
                    raise argparse.ArgumentTypeError(
                        f"bad layer list {text!r}: more than {MAX_LAYERS} layers"
                    )
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad layer list {text!r}: use e.g. 0,3,5-7") from None
        if len(out) > MAX_LAYERS:
            raise argparse.ArgumentTypeError(
                f"bad layer list {text!r}: more than {MAX_LAYERS} layers"
            )
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"bad layer list {text!r}: use e.g. 0,3,5-7")
    return sorted(out)


def check_layers(layers: list[int] | None, num_layers: int | None, group: str) -> None:
    """Refuse layers the model does not have (CliError 1), as the planner refuses them in
    ``freeze --layers``: a view must not quietly show fewer layers than were asked for."""
    if layers is None or num_layers is None:
        return
    bad = [x for x in layers if x >= num_layers]
    if bad:
        raise CliError(
            f"layers {bad} do not exist in group {group} (the model has {num_layers})",
            EXIT_ERROR,
            "bad_layers",
        )


def add_common_arguments(
    parser: argparse.ArgumentParser, *, watch: bool = False, layers: bool = True
) -> None:
    """``--group``, ``--layers``, the output flags and the connection settings."""
    parser.add_argument("--group", metavar="NAME", help="EP group (default: all, or the only one)")
    if layers:
        parser.add_argument(
            "--layers",
            type=layer_list,
            metavar="LIST",
            help="layers to show or act on, e.g. 0,3,5-7 (default: all)",
        )
    add_output_arguments(parser, watch=watch)
    if watch:
        parser.add_argument(
            "--count",
            type=int,
            metavar="N",
            help="with --watch: stop after N refreshes (default: until Ctrl-C)",
        )
    cfg.add_arguments(parser, CliSettings)


def load_settings(
    args: argparse.Namespace | Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> CliSettings:
    """The CLI settings from flags, the environment and ``--config``; CliError(78) if bad."""
    env = dict(os.environ if environ is None else environ)
    try:
        s = cfg.load(CliSettings, args, env)
    except cfg.ConfigError as e:
        raise CliError(str(e), EXIT_CONFIG, "bad_configuration") from None
    if (s.curve_secret_key is None) != (s.curve_server_key is None):
        missing = "curve_server_key" if s.curve_server_key is None else "curve_secret_key"
        raise CliError(
            str(cfg.ConfigError(missing, "CURVE needs both curve_secret_key and curve_server_key")),
            EXIT_CONFIG,
            "bad_configuration",
        )
    return s


def planner_endpoint(s: CliSettings) -> str:
    """The endpoint to talk to (see the module docstring for the order)."""
    src = cfg.sources(s)

    def rank(name: str) -> int:
        return _SOURCE_RANK.get(src.get(name, "default").split(" ", 1)[0], 0)

    if s.planner is not None and (s.runtime_dir is None or rank("planner") >= rank("runtime_dir")):
        return s.planner
    if s.runtime_dir is not None:
        return f"ipc://{s.runtime_dir / PLANNER_SOCKET}"
    default_sock = DEFAULT_RUNTIME_DIR / PLANNER_SOCKET
    if default_sock.exists():
        return f"ipc://{default_sock}"
    return DEFAULT_TCP


# ---------------------------------------------------------------------------------------
# requests


#: The start of a ZMTP 3 greeting: signature and major version. A server answers it with its
#: whole greeting (mechanism included) before it has seen ours.
_ZMTP_HELLO = b"\xff" + bytes(8) + b"\x7f" + b"\x03"

#: :func:`zmtp_mechanism` when the peer closed the connection / never answered.
HUNG_UP, SILENT = "(hung up)", "(silent)"


def zmtp_mechanism(endpoint: str, timeout_s: float) -> str:
    """What a ZeroMQ server at ``endpoint`` announces in its greeting: its security mechanism
    (``NULL``, ``CURVE``), or :data:`HUNG_UP` when the peer closed the connection or answered
    something else (not a ZeroMQ server), or :data:`SILENT` when it accepted the connection
    but said nothing within ``timeout_s`` (a stopped process). A diagnostic for a failed
    handshake; stdlib sockets only."""
    import socket

    family: int
    address: Any
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        address = (host, int(port))
    elif endpoint.startswith("ipc://"):
        family, address = socket.AF_UNIX, endpoint[len("ipc://") :]
    else:
        return HUNG_UP
    data = b""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(address)
            s.sendall(_ZMTP_HELLO)
            while len(data) < 32:
                chunk = s.recv(64 - len(data))
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        if not data:
            return SILENT
    except (OSError, ValueError):
        pass
    if len(data) < 32 or data[0] != 0xFF or data[9] != 0x7F:
        return HUNG_UP
    return data[12:32].rstrip(b"\0").decode("ascii", "replace") or HUNG_UP


#: A request this long past its own deadline is stuck outside the code that keeps the
#: deadline (e.g. in libzmq, a context that never terminates): better a stack trace and exit
#: 75 than an operator's shell or a monitoring script that hangs.
HANG_GRACE_S = 10.0


@contextlib.contextmanager
def hard_deadline(seconds: float) -> Iterator[None]:
    """Print every thread's stack and exit 75 if the block runs ``seconds`` past its start.

    A timer thread, so it fires while the main thread waits in C code with the GIL released
    (libzmq, sockets)."""
    import faulthandler
    import threading

    def fire() -> None:
        print(
            f"eplbd: internal error: a planner request is stuck {seconds:g} s after it "
            "started, past its own deadline; the stacks (please report them):",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_TIMEOUT)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class PlannerClient:
    """Requests to one planner endpoint, each on a fresh DEALER with a deadline.

    ``request`` returns the reply :class:`~eplbd.wire.Message` or raises :class:`CliError`
    (69 / 75 / 1). A socket monitor tells a refused connection or handshake apart from a
    slow planner, so an absent planner fails at once instead of after the whole timeout.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 5.0,
        curve_secret_key: Path | None = None,
        curve_server_key: Path | None = None,
    ) -> None:
        import zmq

        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._curve: Any = None
        if curve_secret_key is not None and curve_server_key is not None:
            from eplbd.wire import load_client_keys

            try:
                self._curve = load_client_keys(curve_secret_key, curve_server_key)
            except (OSError, ValueError) as e:
                raise CliError(f"cannot load CURVE keys: {e}", EXIT_CONFIG) from None
        self._ctx: Any = zmq.Context()

    def close(self) -> None:
        if self._ctx is not None:
            with hard_deadline(HANG_GRACE_S):
                self._ctx.term()
            self._ctx = None

    def __enter__(self) -> PlannerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, why: str, *, hint: bool = True) -> CliError:
        tail = (
            " (is `eplbd planner` or `eplbd agent --embedded-planner` running? see --planner / "
            "--runtime-dir)"
            if hint
            else ""
        )
        return CliError(
            f"cannot reach the planner at {self.endpoint}: {why}{tail}",
            EXIT_UNREACHABLE,
            "unreachable",
        )

    def _timeout(self, sent: bool) -> CliError:
        how = "" if sent else " (the connection was accepted; is it stopped or overloaded?)"
        return CliError(
            f"the planner at {self.endpoint} did not answer within {self.timeout_s:g} s{how}",
            EXIT_TIMEOUT,
            "timeout",
        )

    def _handshake_failed(self, left_s: float) -> CliError:
        """Why the peer hung up during the ZeroMQ handshake, from the greeting it sends."""
        mechanism = zmtp_mechanism(self.endpoint, min(1.0, max(0.05, left_s)))
        if mechanism == SILENT:  # the handshake timed out: it accepts but does not answer
            return self._timeout(False)
        if mechanism == HUNG_UP:
            why = (
                "the peer closed the connection before a ZeroMQ handshake: no eplbd planner "
                "there (another service on that port, or a proxy or firewall in the way)"
            )
        elif mechanism == "CURVE" and self._curve is None:
            why = (
                "handshake failed: this planner requires CURVE keys (--curve-secret-key and "
                "--curve-server-key, or EPLBD_CLI_CURVE_SECRET_KEY / EPLBD_CLI_CURVE_SERVER_KEY)"
            )
        elif mechanism == "CURVE":
            why = "handshake failed (is --curve-server-key the planner's public key?)"
        elif self._curve is not None:
            why = f"handshake failed: this planner does not use CURVE ({mechanism}); drop the keys"
        else:
            why = f"handshake failed ({mechanism})"
        return self._unreachable(why, hint=False)

    def request(self, msg_type: str, body: Mapping[str, Any]) -> Any:
        """Send one message and return the validated reply (a ``Message``): see
        :meth:`_request`; never hangs past the deadline plus :data:`HANG_GRACE_S`."""
        with hard_deadline(self.timeout_s + HANG_GRACE_S):
            return self._request(msg_type, body)

    def _request(self, msg_type: str, body: Mapping[str, Any]) -> Any:
        """Send one message and return the validated reply (a ``Message``).

        69: nothing accepts the connection (refused, no socket file, no route within the
        deadline), or the peer is not a planner this client can talk to (the handshake fails);
        75: something accepted the connection but no reply came in time (a wedged planner:
        SIGSTOP, overload); 1: the planner answered with an error."""
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        from eplbd.wire import ERROR, BindError, WireError, control_client

        if self.endpoint.startswith("ipc://") and not self.endpoint.startswith("ipc://@"):
            path = self.endpoint[len("ipc://") :]
            if not os.path.exists(path):
                raise self._unreachable(f"no socket {path}")
        deadline = time.monotonic() + self.timeout_s
        try:
            sock = control_client(self._ctx, self.endpoint, curve=self._curve)
        except (BindError, zmq.ZMQError, ValueError) as e:
            raise CliError(f"bad planner endpoint {self.endpoint!r}: {e}", EXIT_CONFIG) from None
        mon = sock.socket.get_monitor_socket(
            zmq.EVENT_CONNECTED
            | zmq.EVENT_CONNECT_RETRIED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_DISCONNECTED
        )
        try:
            poller = zmq.Poller()
            poller.register(mon, zmq.POLLIN)
            poller.register(sock.socket, zmq.POLLOUT)
            sent = False
            connected = False  # something accepted a connection (a wedged planner does)
            retried = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    # the monitor may miss an ipc connection made before it started: ask the
                    # peer directly whether something accepts and stays silent
                    if sent or connected or zmtp_mechanism(self.endpoint, 0.5) == SILENT:
                        raise self._timeout(sent)
                    raise self._unreachable(f"no connection within {self.timeout_s:g} s")
                events = dict(poller.poll(max(1, int(left * 1000))))
                if mon in events:
                    ev = recv_monitor_message(mon)
                    kind = ev["event"]
                    if kind == zmq.EVENT_CONNECTED:
                        connected, retried = True, 0
                    if kind == zmq.EVENT_CONNECT_RETRIED:
                        # the monitor starts after connect(): the first retry may follow a
                        # failure it did not see; a second one in a row is a refusal
                        retried += 1
                        if retried >= 2 and sent:
                            raise self._unreachable(
                                "the connection closed before the reply, and nothing listens "
                                "there now",
                                hint=False,
                            )
                        if retried >= 2:
                            raise self._unreachable("connection refused")
                    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                        raise self._unreachable(
                            "CURVE authentication refused (is this client's public key in the "
                            "planner's allow list?)",
                            hint=False,
                        )
                    if kind in (
                        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                    ):
                        raise self._handshake_failed(deadline - time.monotonic())
                    # EVENT_DISCONNECTED: a wedged planner's connection times out (ZMTP
                    # heartbeats) and is made again; keep waiting, the deadline decides
                if not sent and sock.socket in events:
                    if not sock.send(msg_type, body, timeout_ms=0):
                        continue
                    sent = True
                    poller.unregister(sock.socket)
                    poller.register(sock.socket, zmq.POLLIN)
                    continue
                if sent and sock.socket in events:
                    got = sock.recv(0)
                    if got is None:  # a bad message: counted and dropped; keep waiting
                        continue
                    msg = got.message
                    if msg.type == ERROR:
                        b = msg.body
                        raise CliError(
                            f"{b.get('message') or b.get('code')}", EXIT_ERROR, str(b.get("code"))
                        )
                    return msg
        except WireError as e:  # pragma: no cover - send-side encoding of our own bodies
            raise CliError(f"cannot encode the request: {e}", EXIT_ERROR) from None
        finally:
            with contextlib.suppress(Exception):
                sock.socket.disable_monitor()
            mon.close(linger=0)
            sock.close()

    def status(
        self, what: str = "status", group: str | None = None, *, epoch: int | None = None
    ) -> dict[str, Any]:
        """``status_request`` -> the reply's ``data`` map (schemas in docs/daemons.md)."""
        from eplbd.wire import STATUS_REPLY, STATUS_REQUEST

        body: dict[str, Any] = {"what": what}
        if group is not None:
            body["group"] = group
        if epoch is not None:
            body["epoch"] = epoch
        msg = self.request(STATUS_REQUEST, body)
        if msg.type != STATUS_REPLY:
            raise CliError(f"unexpected reply {msg.type!r} to a status request", EXIT_ERROR)
        data = dict(msg.body["data"])
        if msg.tensors:
            data.setdefault("tensors", {k: v.tolist() for k, v in msg.tensors.items()})
        return data

    def command(
        self,
        op: str,
        group: str,
        *,
        layers: list[int] | None = None,
        epoch: int | None = None,
        dry_run: bool = False,
    ) -> tuple[bool, str, dict[str, Any]]:
        """``command`` -> (ok, message, data) from the ``command_reply``."""
        from eplbd.wire import COMMAND, COMMAND_REPLY

        body: dict[str, Any] = {"op": op, "group": group, "dry_run": dry_run}
        if layers is not None:
            body["layers"] = list(layers)
        if epoch is not None:
            body["epoch"] = epoch
        msg = self.request(COMMAND, body)
        if msg.type != COMMAND_REPLY:
            raise CliError(f"unexpected reply {msg.type!r} to a command", EXIT_ERROR)
        b = msg.body
        return bool(b["ok"]), str(b["message"]), dict(b.get("data") or {})


def open_client(args: argparse.Namespace) -> PlannerClient:
    """A :class:`PlannerClient` from the parsed arguments (CliError 78 on bad settings)."""
    given = {k: v for k, v in vars(args).items() if k in _SETTING_NAMES or k == "config"}
    s = load_settings(given)
    return PlannerClient(
        planner_endpoint(s),
        timeout_s=s.timeout,
        curve_secret_key=s.curve_secret_key,
        curve_server_key=s.curve_server_key,
    )


_SETTING_NAMES = frozenset(spec.name for spec in cfg.specs(CliSettings))


# ---------------------------------------------------------------------------------------
# --watch


_CLEAR = "\x1b[H\x1b[2J"


def quiet_broken_pipe(fn: Callable[[], int]) -> int:
    """Run ``fn``; when the reader of stdout goes away (``eplbd history | head``), stop
    quietly with 0 instead of a traceback (and keep Python's exit flush from raising)."""
    try:
        return fn()
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def watch_loop(
    args: argparse.Namespace,
    fetch: Callable[[PlannerClient], dict[str, Any]],
    render: Callable[[Output, dict[str, Any]], None],
    *,
    stream: IO[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run one view once, or every ``--watch`` seconds.

    ``fetch`` asks the planner and returns the JSON document of the view; ``render`` writes
    its table. Once: errors exit with their code. Under ``--watch``: a TTY is redrawn in
    place, other streams get one block (or one JSON line) per refresh; a failed refresh is
    shown (``{"error": ...}`` in JSON) and the loop goes on; Ctrl-C ends it with 0, and
    ``--count N`` after N refreshes with the last refresh's code. A closed stdout ends it
    quietly with 0.
    """
    return quiet_broken_pipe(lambda: _watch_loop(args, fetch, render, stream, sleep))


def _watch_loop(
    args: argparse.Namespace,
    fetch: Callable[[PlannerClient], dict[str, Any]],
    render: Callable[[Output, dict[str, Any]], None],
    stream: IO[str] | None,
    sleep: Callable[[float], None],
) -> int:
    out = Output.from_args(args, stream)
    interval = getattr(args, "watch", None)
    bad = check_watch(args)
    if bad is not None:
        return fail(args, bad)
    try:
        client = open_client(args)
    except CliError as e:
        return fail(args, e)
    with client:
        if interval is None:
            try:
                doc = fetch(client)
            except CliError as e:
                return fail(args, e)
            if out.json:
                out.emit_json(doc)
            else:
                render(out, doc)
            out.flush()
            return EXIT_OK
        count = getattr(args, "count", None)
        tty = bool(getattr(out.stream, "isatty", lambda: False)()) and not out.json
        code = EXIT_OK
        n = 0
        try:
            for _ in _forever():
                started = time.monotonic()
                try:
                    doc = fetch(client)
                    code = EXIT_OK
                except CliError as e:
                    doc = {"error": {"code": e.code, "message": str(e), "exit_code": e.exit_code}}
                    code = e.exit_code
                if out.json:
                    emit_json_line(doc, out.stream)
                else:
                    if tty:
                        out.write(_CLEAR)
                    stamp = time.strftime("%H:%M:%S")
                    out.line(
                        out.style(f"every {interval:g}s: eplbd {args.command}  {stamp}", "dim")
                    )
                    if "error" in doc:
                        out.line(out.style(doc["error"]["message"], "red"))
                    else:
                        render(out, doc)
                    if not tty:
                        out.line()
                    out.flush()
                n += 1
                if count is not None and n >= count:
                    return code
                sleep(max(0.0, interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            return EXIT_OK
    return code  # pragma: no cover - the loop only returns from inside


def _forever() -> Iterator[None]:
    while True:
        yield None


#: The longest ``--watch`` interval, as for ``--timeout``: time.sleep() overflows on 1e10.
MAX_WATCH_S = 3600.0


def check_watch(args: argparse.Namespace) -> CliError | None:
    """``--watch SECONDS`` must be in (0, :data:`MAX_WATCH_S`]; ``--count N`` needs
    ``--watch`` and N >= 1."""
    interval = getattr(args, "watch", None)
    count = getattr(args, "count", None)
    if interval is not None and not 0 < interval <= MAX_WATCH_S:  # NaN fails both
        return CliError(
            f"--watch SECONDS must be positive and at most {MAX_WATCH_S:g}", EXIT_USAGE, "usage"
        )
    if count is not None and count < 1:
        return CliError("--count must be at least 1", EXIT_USAGE, "usage")
    if count is not None and interval is None:
        return CliError("--count needs --watch", EXIT_USAGE, "usage")
    return None


# ---------------------------------------------------------------------------------------
# small formatting shared by the views


def fmt_duration(seconds: float | None) -> str:
    """``3.2s``, ``4m12s``, ``2h05m``, ``3d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def fmt_ago(at: float | None, now: float | None) -> str:
    """How long before ``now`` (both planner wall-clock timestamps) ``at`` was."""
    if at is None or now is None:
        return "-"
    return fmt_duration(now - at) + " ago"


def fmt_ranks(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    out: list[str] = []
    rs = sorted(set(ranks))
    i = 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        out.append(str(rs[i]) if i == j else f"{rs[i]}-{rs[j]}")
        i = j + 1
    return ",".join(out) or "-"


def balance_style(value: float | None) -> tuple[str, ...]:
    """Colour of a balance figure: green up to 1.10, yellow up to 1.30, red above."""
    if value is None:
        return ()
    if value <= 1.10:
        return ("green",)
    if value <= 1.30:
        return ("yellow",)
    return ("red",)


def fmt_balance(out: Output, value: float | None) -> str:
    """A balance (max/mean) with three decimals, coloured on a terminal."""
    if value is None:
        return "-"
    return out.style(f"{value:.3f}", *balance_style(value))
