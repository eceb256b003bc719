"""Real sockets on loopback TCP and ipc: factories, options, bad input, drops, ipc locks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import torch
import zmq
from wire_peers.samples import MODEL, samples

from eplbd.wire import (
    HEARTBEAT,
    IPC_PATH_MAX,
    SNAPSHOT,
    TELEMETRY_OPTIONS,
    BindError,
    SocketOptions,
    WireSocket,
    control_client,
    control_server,
    encode,
    ipc_endpoint,
    snapshot_receiver,
    snapshot_sender,
)

pytestmark = pytest.mark.timeout(60)

HB = {"sender": "w0", "incarnation": "i0"}
_TRACKED: dict[int, list[WireSocket]] = {}  # sockets closed by the fixture


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    _TRACKED[id(c)] = []
    try:
        yield c
    finally:
        for s in _TRACKED.pop(id(c)):
            s.close()
        c.destroy(linger=0)


@pytest.fixture
def rundir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="ew") as d:  # short: ipc path limit
        yield d


def track(ctx: zmq.Context, s: WireSocket) -> WireSocket:
    _TRACKED[id(ctx)].append(s)
    return s


def send_until(sock: WireSocket, msg_type: str, body: dict, tensors=None, **kw) -> None:
    """Senders use IMMEDIATE: retry until the connection is up (at most 5 s)."""
    deadline = time.monotonic() + 5
    while not sock.send(msg_type, body, tensors, timeout_ms=50, **kw):
        assert time.monotonic() < deadline, "connection never came up"


def test_control_round_trip_on_loopback_tcp(ctx: zmq.Context) -> None:
    srv = track(ctx, control_server(ctx, "tcp://127.0.0.1:*"))
    assert srv.endpoint.startswith("tcp://127.0.0.1:") and not srv.endpoint.endswith("*")
    cli = track(ctx, control_client(ctx, srv.endpoint, identity="n0-gpu0"))
    b, t = samples()["prepare"]
    send_until(cli, "prepare", b, t)
    got = srv.recv(2000, model=MODEL)
    assert got is not None and got.peer == b"n0-gpu0" and got.sender == "n0-gpu0"
    assert got.message.type == "prepare" and np.array_equal(
        got.message.tensors["phy2log"], t["phy2log"]
    )
    assert srv.send("staged", samples()["staged"][0], to=got.peer)
    back = cli.recv(2000)
    assert back is not None and back.message.type == "staged" and back.peer is None
    assert srv.counters.received["prepare"] == 1 and cli.counters.sent["prepare"] >= 1


def test_snapshots_over_ipc(ctx: zmq.Context, rundir: str) -> None:
    ep = ipc_endpoint(rundir, "snapshots.sock")
    pull = track(ctx, snapshot_receiver(ctx, ep))
    push = track(ctx, snapshot_sender(ctx, ep))
    b, t = samples()["snapshot"]
    for seq in range(3):
        send_until(push, SNAPSHOT, {**b, "seq": seq}, t)
    seqs = []
    for _ in range(3):
        got = pull.recv(2000, model=MODEL)
        assert got is not None and got.peer is None and got.sender == b["worker"]
        seqs.append(got.message.body["seq"])
        assert np.array_equal(got.message.tensors["counts"], t["counts"])
    assert seqs == [0, 1, 2]
    assert pull.recv(0) is None  # nothing more, no wait


def test_socket_options_are_set(ctx: zmq.Context, rundir: str) -> None:
    opts = SocketOptions(
        heartbeat_ivl_ms=111,
        heartbeat_timeout_ms=333,
        heartbeat_ttl_ms=500,
        reconnect_ivl_ms=50,
        reconnect_ivl_max_ms=4000,
        sndhwm=7,
        rcvhwm=9,
        max_bytes=1 << 20,
    )
    srv = track(ctx, control_server(ctx, "tcp://127.0.0.1:*", options=opts))
    cli = track(ctx, control_client(ctx, srv.endpoint, identity="x", options=opts))
    for s in (srv.socket, cli.socket):
        assert s.getsockopt(zmq.LINGER) == 0
        assert s.getsockopt(zmq.HEARTBEAT_IVL) == 111
        assert s.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 333
        assert s.getsockopt(zmq.HEARTBEAT_TTL) == 500
        assert s.getsockopt(zmq.RECONNECT_IVL) == 50
        assert s.getsockopt(zmq.RECONNECT_IVL_MAX) == 4000
        assert s.getsockopt(zmq.SNDHWM) == 7 and s.getsockopt(zmq.RCVHWM) == 9
        assert s.getsockopt(zmq.MAXMSGSIZE) == 1 << 20
    assert cli.socket.getsockopt(zmq.IMMEDIATE) == 1
    assert cli.socket.getsockopt(zmq.IDENTITY) == b"x"
    push = track(ctx, snapshot_sender(ctx, ipc_endpoint(rundir, "s")))
    assert push.socket.getsockopt(zmq.IMMEDIATE) == 1
    assert push.socket.getsockopt(zmq.SNDHWM) == TELEMETRY_OPTIONS.sndhwm


def test_bad_messages_are_counted_answered_and_the_server_keeps_serving(
    ctx: zmq.Context, caplog: pytest.LogCaptureFixture
) -> None:
    srv = track(ctx, control_server(ctx, "tcp://127.0.0.1:*"))
    cli = track(ctx, control_client(ctx, srv.endpoint, identity="evil"))
    send_until(cli, HEARTBEAT, HB)
    assert srv.recv(2000) is not None
    raw = cli.socket
    hdr = [b"EPLBD", b"\x01"]
    garbage = [
        [b"garbage"],
        [b"EPLBD", b"\x07", b"heartbeat", msgpack.packb({"schema": 1})],
        [*hdr, b"heartbeat", msgpack.packb({1: 2})],
        [*hdr, b"heartbeat", msgpack.packb({"schema": 1, "sender": "x"})],  # lacks incarnation
        [*hdr, b"snapshot", *encode(SNAPSHOT, *samples()["snapshot"])[3:4]],  # tensor missing
    ]
    for frames in garbage:
        raw.send_multipart(frames)
    send_until(cli, HEARTBEAT, {**HB, "sender": "good"})
    got = srv.recv(3000)
    assert got is not None and got.message.body["sender"] == "good"  # still serving
    assert srv.counters.bad == {
        "truncated": 1,
        "bad_version": 1,
        "bad_body": 1,
        "missing_field": 1,
        "frame_count": 1,
    }
    assert srv.counters.bad_by_sender["evil"]["truncated"] == 1
    codes = []
    for _ in garbage:
        err = cli.recv(2000)
        assert err is not None and err.message.type == "error"
        codes.append(err.message.body["code"])
    assert codes == ["truncated", "bad_version", "bad_body", "missing_field", "frame_count"]
    assert any(getattr(r, "sender", None) == "evil" for r in caplog.records)


def test_oversized_message_counted(ctx: zmq.Context, rundir: str) -> None:
    opts = SocketOptions(max_bytes=100_000)
    ep = ipc_endpoint(rundir, "big")
    pull = track(ctx, snapshot_receiver(ctx, ep, options=opts))
    push = track(ctx, snapshot_sender(ctx, ep))
    t = {"a": torch.zeros(60_000, dtype=torch.uint8), "b": torch.zeros(60_000, dtype=torch.uint8)}
    send_until(push, "status_reply", {"data": {}}, t)
    send_until(push, HEARTBEAT, HB)
    got = pull.recv(3000)
    assert got is not None and got.message.type == HEARTBEAT
    assert pull.counters.bad == {"too_large": 1}


def test_send_drops_without_a_peer(ctx: zmq.Context, rundir: str) -> None:
    push = track(ctx, snapshot_sender(ctx, ipc_endpoint(rundir, "nobody")))
    t0 = time.monotonic()
    assert not push.send(HEARTBEAT, HB)  # IMMEDIATE: nothing to queue for
    assert time.monotonic() - t0 < 10  # a send that waited for a peer would never return
    assert push.counters.dropped == {"would_block": 1}
    assert push.counters.dropped_by_peer[push.endpoint] == {"would_block": 1}


def test_send_drops_when_the_receiver_stalls(ctx: zmq.Context, rundir: str) -> None:
    ep = ipc_endpoint(rundir, "stall")
    opts = SocketOptions(sndhwm=2, rcvhwm=2)
    pull = track(ctx, snapshot_receiver(ctx, ep, options=opts))
    push = track(ctx, snapshot_sender(ctx, ep, options=opts))
    b, t = samples()["snapshot"]
    big = {"counts": torch.zeros(58, 288, dtype=torch.int64)}
    send_until(push, SNAPSHOT, b, t)
    sent = 1
    t0 = time.monotonic()
    while push.counters.dropped_total == 0 and time.monotonic() - t0 < 10:
        sent += push.send(SNAPSHOT, {**b, "seq": sent}, big)  # never read: queues fill
    assert push.counters.dropped["would_block"] >= 1
    assert sent < 2000  # bounded queues: a few socket buffers' worth, not unlimited
    assert pull.recv(2000, check=False) is not None  # the receiver still gets what was queued


def test_router_send_to_unknown_peer_is_counted(ctx: zmq.Context) -> None:
    srv = track(ctx, control_server(ctx, "tcp://127.0.0.1:*"))
    assert not srv.send(HEARTBEAT, HB, to=b"ghost")
    assert srv.counters.dropped == {"unroutable": 1}
    with pytest.raises(ValueError):
        srv.send(HEARTBEAT, HB)


def test_router_handover_to_a_reconnecting_identity(ctx: zmq.Context) -> None:
    srv = track(ctx, control_server(ctx, "tcp://127.0.0.1:*"))
    old = track(ctx, control_client(ctx, srv.endpoint, identity="n0"))
    send_until(old, HEARTBEAT, {**HB, "incarnation": "old"})
    assert srv.recv(2000) is not None
    new = track(ctx, control_client(ctx, srv.endpoint, identity="n0"))
    send_until(new, HEARTBEAT, {**HB, "incarnation": "new"})
    got = srv.recv(2000)
    assert got is not None and got.message.body["incarnation"] == "new" and got.peer == b"n0"
    assert srv.send(HEARTBEAT, {"sender": "srv", "incarnation": "s"}, to=b"n0")
    assert new.recv(2000) is not None  # the route now leads to the new connection
    assert old.recv(200) is None


def test_send_after_close_is_counted(ctx: zmq.Context) -> None:
    srv = control_server(ctx, "tcp://127.0.0.1:*")
    srv.close()
    srv.close()  # idempotent
    assert srv.closed and not srv.send(HEARTBEAT, HB, to=b"x")
    assert srv.counters.dropped == {"closed": 1}


def test_recv_deadline(ctx: zmq.Context) -> None:
    with control_server(ctx, "tcp://127.0.0.1:*") as srv:
        t0 = time.monotonic()
        assert srv.recv(150) is None
        # it waited, and not for ever (the upper bound is loose: a loaded machine stalls)
        assert 0.1 <= time.monotonic() - t0 < 10
    assert srv.closed


# --- bind policy and ipc ---------------------------------------------------------------------


def test_non_loopback_bind_needs_keys_or_insecure(ctx: zmq.Context) -> None:
    for ep in ("tcp://0.0.0.0:*", "tcp://*:*", "tcp://10.1.2.3:7050", "tcp://[::]:*"):
        with pytest.raises(BindError, match="without CURVE"):
            control_server(ctx, ep)
        with pytest.raises(BindError, match="without CURVE"):
            snapshot_receiver(ctx, ep)
    s = track(ctx, control_server(ctx, "tcp://0.0.0.0:*", allow_insecure=True))
    assert s.endpoint.startswith("tcp://0.0.0.0:")
    track(ctx, control_server(ctx, "tcp://localhost:*"))
    with pytest.raises(BindError, match="unsupported"):
        control_server(ctx, "udp://127.0.0.1:5000")


def test_ipc_path_length(ctx: zmq.Context, rundir: str) -> None:
    long_dir = os.path.join(rundir, "d" * (IPC_PATH_MAX - len(rundir) - 8))
    with pytest.raises(BindError, match="107"):
        ipc_endpoint(long_dir, "agent.sock")
    path = "/" + "x" * (IPC_PATH_MAX - 1)
    with pytest.raises(BindError, match="shorter than 107"):
        snapshot_receiver(ctx, f"ipc://{path}")
    with pytest.raises(BindError):
        control_client(ctx, f"ipc://{path}")
    ok = "/tmp/" + "y" * (IPC_PATH_MAX - 6)
    assert len(ok) == IPC_PATH_MAX - 1 and ipc_endpoint("/tmp", "y" * (IPC_PATH_MAX - 6))


def test_ipc_lock_refuses_a_second_bind(ctx: zmq.Context, rundir: str) -> None:
    ep = ipc_endpoint(rundir, "agent.sock")
    first = control_server(ctx, ep)
    with pytest.raises(BindError, match="in use"):
        control_server(ctx, ep)
    with pytest.raises(BindError, match="in use"):
        snapshot_receiver(ctx, ep)
    cli = track(ctx, control_client(ctx, ep, identity="w"))
    send_until(cli, HEARTBEAT, HB)
    assert first.recv(2000) is not None  # the first owner still has its clients
    first.close()
    again = track(ctx, control_server(ctx, ep))  # the lock was released
    assert again.endpoint == ep


def test_ipc_lock_held_by_another_process(ctx: zmq.Context, rundir: str) -> None:
    ep = ipc_endpoint(rundir, "agent.sock")
    lock = ep[len("ipc://") :] + ".lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,os,sys,time;fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT);"
            "fcntl.flock(fd,fcntl.LOCK_EX);print('locked',flush=True);time.sleep(60)",
            lock,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(BindError, match="in use"):
            control_server(ctx, ep)
    finally:
        holder.kill()
        holder.wait(10)
    track(ctx, control_server(ctx, ep))  # the dead holder's lock is gone with it


def test_stale_socket_file_is_replaced(ctx: zmq.Context, rundir: str) -> None:
    path = os.path.join(rundir, "agent.sock")
    with open(path, "w") as f:
        f.write("left over by a crashed agent")
    srv = track(ctx, control_server(ctx, f"ipc://{path}"))
    cli = track(ctx, control_client(ctx, srv.endpoint, identity="w"))
    send_until(cli, HEARTBEAT, HB)
    assert srv.recv(2000) is not None


def test_send_frames_forwards_received_frames(ctx: zmq.Context, rundir: str) -> None:
    ep = ipc_endpoint(rundir, "relay")
    pull = track(ctx, snapshot_receiver(ctx, ep))
    push = track(ctx, snapshot_sender(ctx, ep))
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://relay")
        b.connect("inproc://relay")
        body, t = samples()["snapshot"]
        a.send_multipart(encode(SNAPSHOT, body, t))
        assert b.poll(2000)
        raw = b.recv_multipart(copy=False)  # zmq.Frame objects, as a relay holds them
        deadline = time.monotonic() + 5
        while not push.send_frames(raw, timeout_ms=50):
            assert time.monotonic() < deadline
        got = pull.recv(2000, model=MODEL)
        assert got is not None and np.array_equal(got.message.tensors["counts"], t["counts"])
        assert push.counters.sent == {SNAPSHOT: 1}
    finally:
        a.close(linger=0)
        b.close(linger=0)


def test_bad_snapshot_on_pull_is_counted_under_the_peer_address(ctx: zmq.Context) -> None:
    pull = track(ctx, snapshot_receiver(ctx, "tcp://127.0.0.1:*"))
    push = track(ctx, snapshot_sender(ctx, pull.endpoint))
    b, t = samples()["snapshot"]
    bad = t["counts"].clone()
    bad[0, 0] = -5
    send_until(push, SNAPSHOT, b, {"counts": bad})  # well framed, names its worker
    push.socket.send_multipart([b"junk"])  # not even framed: only the address is known
    send_until(push, SNAPSHOT, {**b, "seq": 8}, t)
    got = pull.recv(3000, model=MODEL)
    assert got is not None and got.message.body["seq"] == 8
    assert pull.counters.bad_by_sender[b["worker"]] == {"bad_count": 1}
    assert pull.counters.bad_by_sender["127.0.0.1"] == {"truncated": 1}
