"""A loopback TCP relay that can drop one node's traffic, for the control-plane benchmark.

    python -m benchmarks._cp_proxy PORT:TARGET_PORT [PORT:TARGET_PORT ...]

Listens on 127.0.0.1:PORT and relays every connection to 127.0.0.1:TARGET_PORT (an agent's
two planner connections go through it). Prints ``ready`` once listening.

- SIGUSR1: **drop**. From now on every byte is read and discarded, in both directions, on
  existing and new connections, and no close is passed on: to both ends it looks like a
  network partition (nothing arrives; ZMTP heartbeats time out on each side by themselves).
- SIGUSR2: **heal**. Every connection open during the drop is closed (its byte stream lost
  data, so it cannot be resumed); new connections are relayed again.

One thread, ``selectors``; stdlib only.
"""

from __future__ import annotations

import contextlib
import selectors
import signal
import socket
import sys
from dataclasses import dataclass, field

__all__ = ["main"]


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: _Conn | None = None
    out: bytearray = field(default_factory=bytearray)
    poisoned: bool = False  # saw the drop: closed at heal


class Proxy:
    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        self.sel = selectors.DefaultSelector()
        self.targets: dict[socket.socket, int] = {}
        self.conns: set[_Conn] = set()
        self.dropping = False
        self.heal_requested = False
        for port, target in pairs:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", port))
            ls.listen(64)
            ls.setblocking(False)
            self.sel.register(ls, selectors.EVENT_READ, None)
            self.targets[ls] = target

    def _close(self, c: _Conn) -> None:
        if c not in self.conns:
            return
        self.conns.discard(c)
        with contextlib.suppress(Exception):
            self.sel.unregister(c.sock)
        c.sock.close()

    def _accept(self, ls: socket.socket) -> None:
        try:
            s, _ = ls.accept()
        except BlockingIOError:
            return
        s.setblocking(False)
        a = _Conn(s)
        self.conns.add(a)
        self.sel.register(s, selectors.EVENT_READ, a)
        if self.dropping:
            a.poisoned = True
            return
        try:
            up = socket.create_connection(("127.0.0.1", self.targets[ls]), timeout=5)
        except OSError:  # the target is down (e.g. the planner restarts): refuse too
            self._close(a)
            return
        up.setblocking(False)
        b = _Conn(up, peer=a)
        a.peer = b
        self.conns.add(b)
        self.sel.register(up, selectors.EVENT_READ, b)

    def _want_write(self, c: _Conn) -> None:
        ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        with contextlib.suppress(Exception):
            self.sel.modify(c.sock, ev, c)

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if self.dropping or c.poisoned:
            c.poisoned = True
            if not data:  # one end gave up: say nothing to the other, as a partition would
                self._close(c)
            return
        if not data:
            self._close(c)
            if c.peer is not None:
                self._close(c.peer)
            return
        p = c.peer
        if p is None or p not in self.conns:
            return
        p.out += data
        self._flush(p)

    def _flush(self, c: _Conn) -> None:
        if c.out:
            try:
                n = c.sock.send(c.out)
                del c.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(c)
                return
        self._want_write(c)

    def heal(self) -> None:
        self.dropping = False
        for c in list(self.conns):
            if c.poisoned or (c.peer is not None and c.peer.poisoned):
                self._close(c)

    def run(self) -> None:
        print("ready", flush=True)
        while True:
            if self.heal_requested:
                self.heal_requested = False
                self.heal()
            for key, ev in self.sel.select(0.05):
                if key.data is None:
                    self._accept(key.fileobj)  # type: ignore[arg-type]
                    continue
                c: _Conn = key.data
                if c not in self.conns:
                    continue
                if ev & selectors.EVENT_READ:
                    self._read(c)
                if ev & selectors.EVENT_WRITE and c in self.conns:
                    self._flush(c)


def main(argv: list[str]) -> int:
    pairs = []
    for a in argv:
        port, _, target = a.partition(":")
        pairs.append((int(port), int(target)))
    proxy = Proxy(pairs)

    def drop(signum: int, frame: object) -> None:
        proxy.dropping = True
        for c in proxy.conns:
            c.poisoned = True

    def heal(signum: int, frame: object) -> None:
        proxy.heal_requested = True

    signal.signal(signal.SIGUSR1, drop)
    signal.signal(signal.SIGUSR2, heal)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
    proxy.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
