"""Loopback ports for tests that start daemons on tcp."""

from __future__ import annotations

import socket


def free_port_pair() -> int:
    """A loopback TCP port p with p + 1 also free (the planner's control and snapshot
    ports)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free pair of loopback ports")
