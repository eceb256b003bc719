"""CURVE: `eplbd keygen`, key loading, and the allow-list on real sockets."""

from __future__ import annotations

import shutil
import stat
import time
from pathlib import Path

import pytest
import zmq
from wire_peers.samples import samples

from eplbd.cli.main import main
from eplbd.wire import (
    HEARTBEAT,
    SNAPSHOT,
    AllowListReload,
    CurveClientKeys,
    WireSocket,
    control_client,
    control_server,
    generate_keypair,
    load_client_keys,
    load_server_keys,
    reload_allow_list,
    snapshot_receiver,
    snapshot_sender,
)

pytestmark = pytest.mark.timeout(60)

HB = {"sender": "c", "incarnation": "i"}
REFUSED_WAIT_MS = 400  # how long a refused client gets to try


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """server, allowed client, denied client; only the allowed one in the allow-list."""
    kd, allow = tmp_path / "keys", tmp_path / "allow"
    allow.mkdir()
    for name in ("server", "good", "bad"):
        generate_keypair(kd, name)
    shutil.copy(kd / "good.key", allow / "good.key")
    return {"dir": kd, "allow": allow}


def client_keys(keys: dict[str, Path], name: str) -> CurveClientKeys:
    return load_client_keys(keys["dir"] / f"{name}.key_secret", keys["dir"] / "server.key")


def talk(cli: WireSocket, srv: WireSocket, wait_ms: int) -> bool:
    """Whether a heartbeat from ``cli`` reaches ``srv`` within ``wait_ms``."""
    deadline = time.monotonic() + wait_ms / 1000
    while time.monotonic() < deadline:
        cli.send(HEARTBEAT, HB, timeout_ms=20)
        if srv.recv(20) is not None:
            return True
    return False


def test_keygen_cli_writes_a_pair_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "k"
    assert main(["keygen", str(d), "--name", "planner"]) == 0
    pub, sec = d / "planner.key", d / "planner.key_secret"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    public, secret = zmq.auth.load_certificate(sec)
    assert len(public) == 40 and secret is not None and len(secret) == 40
    assert zmq.auth.load_certificate(pub) == (public, None)
    before = sec.read_bytes()
    assert main(["keygen", str(d), "--name", "planner"]) == 78
    assert sec.read_bytes() == before
    assert "exists" in capsys.readouterr().err
    assert main(["keygen", str(d), "--name", "other", "--json"]) == 0
    assert '"schema_version": 1' in capsys.readouterr().out


def test_key_loading_errors(keys: dict[str, Path]) -> None:
    with pytest.raises(FileNotFoundError):
        load_server_keys(keys["dir"] / "nope.key_secret", keys["allow"])
    with pytest.raises(ValueError, match="secret"):
        load_server_keys(keys["dir"] / "server.key", keys["allow"])  # public half only
    with pytest.raises(FileNotFoundError):
        load_server_keys(keys["dir"] / "server.key_secret", keys["dir"] / "missing")
    bogus = keys["dir"] / "bogus.key"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ValueError):
        load_client_keys(keys["dir"] / "good.key_secret", bogus)
    k = load_server_keys(keys["dir"] / "server.key_secret", keys["allow"])
    assert k.secret.decode() not in repr(k)
    with pytest.raises(FileExistsError):
        generate_keypair(keys["dir"], "server")


def test_curve_allows_only_listed_keys(ctx: zmq.Context, keys: dict[str, Path]) -> None:
    server = load_server_keys(keys["dir"] / "server.key_secret", keys["allow"])
    srv = control_server(ctx, "tcp://127.0.0.1:*", curve=server)
    socks = [srv]
    try:
        good = control_client(ctx, srv.endpoint, identity="good", curve=client_keys(keys, "good"))
        socks.append(good)
        assert talk(good, srv, 3000)
        got = srv.recv(0)  # drain
        assert srv.send(HEARTBEAT, {"sender": "srv", "incarnation": "s"}, to=b"good")
        assert good.recv(2000) is not None  # encrypted both ways
        del got

        plain = control_client(ctx, srv.endpoint, identity="plain")  # no CURVE at all
        denied = control_client(ctx, srv.endpoint, identity="bad", curve=client_keys(keys, "bad"))
        wrong_server = control_client(
            ctx,
            srv.endpoint,
            identity="mitm",
            curve=load_client_keys(keys["dir"] / "good.key_secret", keys["dir"] / "bad.key"),
        )
        socks += [plain, denied, wrong_server]
        for c in (plain, denied, wrong_server):
            assert not talk(c, srv, REFUSED_WAIT_MS)
            assert not srv.send(
                HEARTBEAT, {"sender": "s", "incarnation": "s"}, to=c.socket.getsockopt(zmq.IDENTITY)
            )
        assert srv.counters.received.get(HEARTBEAT, 0) >= 1
        assert talk(good, srv, 2000)  # the allowed client is unaffected
    finally:
        for s in socks:
            s.close()


def test_reload_allow_list(ctx: zmq.Context, keys: dict[str, Path]) -> None:
    server = load_server_keys(keys["dir"] / "server.key_secret", keys["allow"])
    pull = snapshot_receiver(ctx, "tcp://127.0.0.1:*", curve=server)
    socks = [pull]
    try:
        first = snapshot_sender(ctx, pull.endpoint, curve=client_keys(keys, "bad"))
        socks.append(first)
        b, t = samples()["snapshot"]
        assert not first.send(SNAPSHOT, b, t, timeout_ms=REFUSED_WAIT_MS)  # never connects
        assert pull.recv(100) is None
        shutil.copy(keys["dir"] / "bad.key", keys["allow"] / "bad.key")
        assert reload_allow_list(ctx) == AllowListReload(keys=2, added=1, removed=0)
        # a broken list is refused whole: the one in force stays
        (keys["allow"] / "torn.key").write_text("not a certificate")
        with pytest.raises(ValueError, match="torn.key"):
            reload_allow_list(ctx)
        (keys["allow"] / "torn.key").unlink()
        later = snapshot_sender(ctx, pull.endpoint, curve=client_keys(keys, "bad"))
        socks.append(later)
        assert later.send(SNAPSHOT, b, t, timeout_ms=3000)
        got = pull.recv(3000)
        assert got is not None and got.message.type == SNAPSHOT
    finally:
        for s in socks:
            s.close()


def test_curve_server_may_bind_any_address(ctx: zmq.Context, keys: dict[str, Path]) -> None:
    server = load_server_keys(keys["dir"] / "server.key_secret", keys["allow"])
    with control_server(ctx, "tcp://0.0.0.0:*", curve=server) as srv:
        assert srv.endpoint.startswith("tcp://0.0.0.0:")
    other = load_server_keys(keys["dir"] / "server.key_secret", keys["dir"])
    with control_server(ctx, "tcp://127.0.0.1:*", curve=server), pytest.raises(ValueError):
        control_server(ctx, "tcp://127.0.0.1:*", curve=other)  # one allow-list per context
