"""The CLI's plumbing without a planner: exit codes for unreachable (69), timeout (75), bad
configuration (78) and usage (2), where the planner is looked for, and that ``eplbd status``
does not import torch.

Unreachable and timeout use real sockets: a tcp port nobody listens on, an ipc path with no
socket, and a ROUTER bound by the test that never answers.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from _cli import clean_cli_env, cli

from eplbd.cli._client import (
    CliError,
    check_watch,
    layer_list,
    load_settings,
    planner_endpoint,
)
from eplbd.wire import control_server

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_cli_env(monkeypatch)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="eplbd-t-", dir="/tmp"))
    try:
        yield d
    finally:
        for p in sorted(d.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        d.rmdir()


# --- unreachable and timeout -----------------------------------------------------------------


@pytest.mark.parametrize("cmd", [["status"], ["top"], ["history"], ["heatmap"], ["freeze"]])
def test_refused_tcp_is_unreachable_at_once(cmd: list[str], capsys: Any) -> None:
    port = free_port()
    t0 = time.monotonic()
    rc, out, err = cli(capsys, *cmd, "--planner", f"tcp://127.0.0.1:{port}", "--timeout", "20")
    assert rc == 69
    assert time.monotonic() - t0 < 5  # refused is known at once, not after --timeout
    assert "connection refused" in err and err.startswith(f"eplbd {cmd[0]}:")
    assert out == ""


def test_missing_ipc_socket_is_unreachable(short_dir: Path, capsys: Any) -> None:
    t0 = time.monotonic()
    rc, out, err = cli(capsys, "status", "--runtime-dir", str(short_dir), "--timeout", "20")
    assert rc == 69 and time.monotonic() - t0 < 5
    assert str(short_dir / "planner.sock") in err
    # a socket file left behind with nobody listening: refused
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(short_dir / "planner.sock"))
    s.close()
    rc, out, err = cli(capsys, "status", "--runtime-dir", str(short_dir), "--timeout", "20")
    assert rc == 69 and time.monotonic() - t0 < 10
    assert "refused" in err


def test_silent_planner_is_a_timeout(short_dir: Path, capsys: Any) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    router = control_server(ctx, f"ipc://{short_dir}/planner.sock")
    try:
        t0 = time.monotonic()
        rc, out, err = cli(capsys, "status", "--runtime-dir", str(short_dir), "--timeout", "0.5")
        took = time.monotonic() - t0
        assert rc == 75, err
        assert 0.4 < took < 5
        assert "did not answer within 0.5 s" in err
        assert router.recv(1000) is not None  # the request did arrive
        rc, out, err = cli(
            capsys, "status", "--runtime-dir", str(short_dir), "--timeout", "0.3",
            "--watch", "0.05", "--count", "2", "--json",
        )  # fmt: skip
        assert rc == 75
        lines = out.strip().splitlines()
        assert len(lines) == 2 and all('"error"' in x and '"timeout"' in x for x in lines)
    finally:
        router.close()
        ctx.term()


_STOPPABLE_PLANNER = """
import sys
from eplbd.controller import PlannerService, PlannerSettings
snap = "tcp://127.0.0.1:0" if sys.argv[1].startswith("tcp") else None  # any free port
settings = PlannerSettings(listen=sys.argv[1], snapshot_listen=snap, state_dir=sys.argv[2],
                           metrics=None, log_level="warning", log_format="json")
PlannerService(settings).run()
"""


@pytest.mark.timeout(240)  # a planner process starting on a loaded machine
@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_a_stopped_planner_is_a_timeout(scheme: str, short_dir: Path, capsys: Any) -> None:
    """SIGSTOP: the kernel still accepts connections, nothing answers. That is the wedged
    planner of exit code 75, not an unreachable one (69)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}" if scheme == "tcp" else f"ipc://{short_dir}/p.sock"
    (short_dir / "state").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _STOPPABLE_PLANNER, endpoint, str(short_dir / "state")],
        env={k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")},
    )
    try:
        deadline = time.monotonic() + 180
        while cli(capsys, "status", "--planner", endpoint, "--timeout", "2")[0] != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "planner never served"
            time.sleep(0.1)
        proc.send_signal(signal.SIGSTOP)
        for timeout in ("1", "6"):  # shorter and longer than the ZMTP heartbeat timeout
            rc, out, err = cli(capsys, "status", "--planner", endpoint, "--timeout", timeout)
            assert rc == 75, (timeout, err)
            assert f"did not answer within {timeout} s" in err and "CURVE" not in err, err
        proc.send_signal(signal.SIGCONT)
        rc, out, err = cli(capsys, "status", "--planner", endpoint, "--timeout", "10")
        assert rc == 0, err
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def test_a_peer_that_is_not_a_planner_is_unreachable_without_curve_advice(
    capsys: Any,
) -> None:
    """A port whose listener hangs up at once (another service, or a proxy or firewall
    standing in for an unroutable address): 69, and no word about CURVE keys."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def hang_up() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conn.close()

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    try:
        rc, out, err = cli(
            capsys, "status", "--planner", f"tcp://127.0.0.1:{port}", "--timeout", "5"
        )
        assert rc == 69, err
        assert "before a ZeroMQ handshake" in err and "CURVE" not in err, err
    finally:
        stop.set()
        t.join(5)
        srv.close()


# --- usage and configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--bogus"],
        ["rollback"],  # EPOCH missing
        ["rollback", "x"],
        ["top", "--layers", "1-x"],
        ["top", "--layers", "3-1"],
        ["heatmap", "--by", "nothing"],
        ["status", "--count", "2"],  # --count needs --watch
        ["status", "--watch", "0"],
        ["status", "--watch", "1", "--count", "0"],
        ["history", "--limit", "0"],
        ["rebalance", "--dry-run", "--wait"],
        # NaN passed "<= 0" and --wait never ended; inf and 1e10 overflowed time.sleep()
        ["rebalance", "--wait", "nan"],
        ["rebalance", "--wait", "inf"],
        ["rollback", "0", "--wait", "nan"],
        ["status", "--watch", "inf"],
        ["top", "--watch", "1e10"],
        ["status", "--watch", "nan"],
        ["top", "--layers", "0-65536"],  # more layers than a message may carry
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str], capsys: Any) -> None:
    rc, out, err = cli(capsys, *argv, "--planner", "tcp://127.0.0.1:1")
    assert rc == 2, (argv, err)
    assert err and out == ""


@pytest.mark.parametrize(
    "argv,env",
    [
        (["--planner", "foo"], {}),
        (["--planner", "udp://x:1"], {}),
        (["--timeout", "-1"], {}),
        (["--timeout", "abc"], {}),
        ([], {"EPLBD_PLANNER": "garbage"}),
        ([], {"EPLBD_TIMEOUT": "0"}),
        ([], {"EPLBD_CLI_TYPO": "1"}),  # an unknown variable under the CLI's own prefix
        (["--curve-secret-key", "/nonexistent.key_secret"], {}),  # CURVE needs both files
    ],
)
def test_bad_configuration_exits_78(
    argv: list[str], env: dict[str, str], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc, out, err = cli(capsys, "status", *argv)
    assert rc == 78, err
    assert "invalid setting" in err


def test_bad_config_file_exits_78(short_dir: Path, capsys: Any) -> None:
    f = short_dir / "cli.toml"
    f.write_text('[cli]\ntimeout = "soon"\n')
    rc, out, err = cli(capsys, "status", "--config", str(f))
    assert rc == 78 and "timeout" in err
    f.write_text("[cli]\nplaner = 'tcp://x:1'\n")
    rc, out, err = cli(capsys, "status", "--config", str(f))
    assert rc == 78 and "planer" in err
    rc, out, err = cli(capsys, "status", "--config", str(short_dir / "missing.toml"))
    assert rc == 78


def test_config_file_is_read(short_dir: Path, capsys: Any) -> None:
    f = short_dir / "cli.toml"
    f.write_text(f"[cli]\nruntime_dir = '{short_dir}'\n")
    rc, out, err = cli(capsys, "status", "--config", str(f))
    assert rc == 69 and str(short_dir / "planner.sock") in err


# --- where the planner is --------------------------------------------------------------------


def _settings(env: dict[str, str], **flags: Any) -> str:
    args = argparse.Namespace(**flags)
    return planner_endpoint(load_settings(args, env))


def test_planner_endpoint_order(tmp_path: Path) -> None:
    rd = str(tmp_path)
    assert _settings({}, planner="tcp://h:1") == "tcp://h:1"
    assert _settings({}, runtime_dir=rd) == f"ipc://{rd}/planner.sock"
    assert _settings({"EPLBD_RUNTIME_DIR": rd}) == f"ipc://{rd}/planner.sock"
    assert _settings({"EPLBD_PLANNER": "tcp://e:2"}) == "tcp://e:2"
    # a flag beats the environment, whichever of the two settings each one gives
    assert _settings({"EPLBD_PLANNER": "tcp://e:2"}, runtime_dir=rd) == f"ipc://{rd}/planner.sock"
    assert _settings({"EPLBD_RUNTIME_DIR": rd}, planner="tcp://h:1") == "tcp://h:1"
    # both from the same source: --planner wins
    assert _settings({}, planner="tcp://h:1", runtime_dir=rd) == "tcp://h:1"
    for var in ("EPLBD_CLI_CONFIG", "EPLBD_CONFIG"):
        with pytest.raises(CliError) as e:
            _settings({var: "/nonexistent.toml"})
        assert e.value.exit_code == 78


DAEMON_FILE = """
log_level = "debug"
heartbeat_s = 0.5
window_steps = 64

[agent]
embedded_planner = true
runtime_dir = "{rd}"
node = "n0"
log_level = "info"

[planner]
cooldown_s = 5.0
listen = "tcp://0.0.0.0:7055"
"""


def test_a_daemons_config_file_tells_where_the_planner_is(tmp_path: Path, capsys: Any) -> None:
    """`eplbd status --config /etc/eplbd/eplbd.toml`: the daemons' keys are theirs, the
    addresses are read from their tables, and [cli] still wins."""
    f = tmp_path / "eplbd.toml"
    rd = tmp_path / "rt"
    f.write_text(DAEMON_FILE.format(rd=rd))
    assert _settings({}, config=str(f)) == f"ipc://{rd}/planner.sock"  # the embedded planner
    assert _settings({"EPLBD_CONFIG": str(f)}) == f"ipc://{rd}/planner.sock"
    rc, out, err = cli(capsys, "status", "--config", str(f))
    assert rc == 69 and str(rd / "planner.sock") in err, err  # not "unknown setting"
    # an agent with a remote planner: its address; a planner host: its listen address
    f.write_text(
        DAEMON_FILE.format(rd=rd).replace("embedded_planner = true", 'planner = "tcp://ph:9"')
    )
    assert _settings({}, config=str(f)) == "tcp://ph:9"
    f.write_text('log_level = "info"\n[planner]\nlisten = "tcp://0.0.0.0:7055"\n')
    assert _settings({}, config=str(f)) == "tcp://127.0.0.1:7055"
    f.write_text('[planner]\nlisten = "ipc:///run/x/p.sock"\n[cli]\ntimeout = 2\n')
    assert _settings({}, config=str(f)) == "ipc:///run/x/p.sock"
    f.write_text('[planner]\nlisten = "tcp://0.0.0.0:7055"\n[cli]\nplanner = "tcp://c:1"\n')
    assert _settings({}, config=str(f)) == "tcp://c:1"
    # flags and the environment still beat the file
    assert _settings({"EPLBD_PLANNER": "tcp://e:2"}, config=str(f)) == "tcp://e:2"
    # [cli] stays strict, and so are table names
    for text in ("[cli]\ntimout = 2\n", "[planer]\nlisten = 'tcp://h:1'\n"):
        f.write_text(text)
        with pytest.raises(CliError) as e:
            _settings({}, config=str(f))
        assert e.value.exit_code == 78


def test_layer_list() -> None:
    assert layer_list("0,3,5-7") == [0, 3, 5, 6, 7]
    assert layer_list(" 2 , 1,1 ") == [1, 2]
    for bad in ("", "a", "1-", "-1", "3-1", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            layer_list(bad)
    # at most the wire's 65536 entries, refused before a range is expanded (a range of 10^11
    # layers built a set of them first); the small cases first, so a regression fails there
    assert len(layer_list("0-65535")) == 65536
    for big in ("0-65536", "0-40000,50000-90000", "5,0-99999999999"):
        with pytest.raises(argparse.ArgumentTypeError, match="more than 65536 layers"):
            layer_list(big)


def test_watch_is_bounded_like_the_timeout() -> None:
    """--watch SECONDS is in (0, 3600], as --timeout is: 1e10 and inf overflowed time.sleep()
    with a traceback after the first refresh, and an hour is a long enough interval."""
    assert check_watch(argparse.Namespace(watch=3600.0, count=None)) is None
    for bad in (3600.5, 1e10, float("inf"), float("nan"), 0.0, -1.0):
        err = check_watch(argparse.Namespace(watch=bad, count=None))
        assert err is not None and err.exit_code == 2, bad


# --- status stays light ----------------------------------------------------------------------


def test_status_does_not_import_torch(short_dir: Path) -> None:
    """The real status path (parse, settings, socket, error) in a fresh interpreter."""
    code = (
        "import sys\n"
        "from eplbd.cli.main import main\n"
        f"rc = main(['status', '--runtime-dir', {str(short_dir)!r}])\n"
        "assert rc == 69, rc\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'triton'))\n"
        "assert not bad, bad[:5]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )
    assert p.returncode == 0, p.stderr


# --- CURVE -----------------------------------------------------------------------------------


def test_curve_planner(short_dir: Path, capsys: Any) -> None:
    """A planner on tcp with CURVE keys: the allowed key gets an answer, no key or a key not
    in the allow list is refused at the handshake (69, said so, and quickly)."""
    from eplbd.controller import PlannerService, PlannerSettings
    from eplbd.wire import generate_keypair

    keys = short_dir / "keys"
    (keys / "allowed").mkdir(parents=True)
    generate_keypair(keys, "planner")
    ops_pub, ops_sec = generate_keypair(short_dir / "ops", "ops")
    (keys / "allowed" / "ops.key").write_bytes(ops_pub.read_bytes())
    _, bad_sec = generate_keypair(short_dir / "bad", "bad")
    (short_dir / "state").mkdir()
    settings = PlannerSettings(
        listen="tcp://127.0.0.1:0",
        state_dir=short_dir / "state",
        curve_keys=keys,
        metrics=None,
    )
    svc = PlannerService(settings).run_in_thread()
    assert svc.control_endpoint is not None
    ep = ["--planner", svc.control_endpoint, "--timeout", "20"]
    server = ["--curve-server-key", str(keys / "planner.key")]
    try:
        rc, out, err = cli(capsys, "status", *ep, "--curve-secret-key", str(ops_sec), *server)
        assert rc == 0, err
        assert svc.control_endpoint in out and "no agents registered" in out
        t0 = time.monotonic()
        rc, out, err = cli(capsys, "status", *ep)
        assert rc == 69 and "handshake failed" in err and "--curve-secret-key" in err
        rc, out, err = cli(capsys, "status", *ep, "--curve-secret-key", str(bad_sec), *server)
        assert rc == 69 and "authentication refused" in err
        assert time.monotonic() - t0 < 10  # not the 20 s timeout
    finally:
        svc.stop()


_STUCK = """
import sys, time
from eplbd.cli._client import hard_deadline
with hard_deadline(0.5):
    if sys.argv[1] == "stuck":
        time.sleep(120)  # in C, the GIL released: as a wait inside libzmq
time.sleep(1.0)  # past the deadline, but out of the block: no exit 75
print("done")
"""


@pytest.mark.parametrize("how", ["stuck", "done"])
def test_a_request_stuck_past_its_deadline_exits_75_with_the_stacks(how: str) -> None:
    r = subprocess.run(
        [sys.executable, "-c", _STUCK, how], capture_output=True, text=True, timeout=60
    )
    if how == "stuck":
        assert r.returncode == 75, r
        assert "is stuck" in r.stderr and "time.sleep" not in r.stdout
        assert 'File "<string>", line 6' in r.stderr, r.stderr  # where it waited
    else:
        assert (r.returncode, r.stdout.strip()) == (0, "done"), r
