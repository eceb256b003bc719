"""A peer process for liveness tests: a DEALER that sends `heartbeat` every INTERVAL seconds.

Usage: heartbeat_peer.py ENDPOINT NAME INTERVAL

It builds the frames by hand from docs/protocol.md (pyzmq + msgpack only, no eplbd import),
so it starts fast and doubles as a second implementation of the frame format.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid

import msgpack
import zmq


def main() -> None:
    endpoint, name, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
    incarnation = f"{os.getpid():x}-{uuid.uuid4().hex[:12]}"
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, name.encode())
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.setsockopt(zmq.RECONNECT_IVL, 50)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 200)
    s.connect(endpoint)
    body = msgpack.packb({"schema": 1, "sender": name, "incarnation": incarnation})
    frames = [b"EPLBD", b"\x01", b"heartbeat", body]
    print(incarnation, flush=True)
    while True:
        with contextlib.suppress(zmq.Again):  # telemetry-style: drop when not connected
            s.send_multipart(frames, zmq.NOBLOCK)
        time.sleep(interval)


if __name__ == "__main__":
    main()
