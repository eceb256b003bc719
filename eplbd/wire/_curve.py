"""CURVE keys and the allow-list: authentication and encryption between hosts.

Keys are ZeroMQ certificate files (``NAME.key`` public, ``NAME.key_secret`` both halves), as
written by ``eplbd keygen DIR --name NAME`` (``zmq.auth.create_certificates``). A server loads
its secret file and an allow-list directory holding the ``*.key`` public files of the clients
it accepts; a client loads its secret file and the server's public file.

ZeroMQ lets a CURVE server accept *any* client key unless a ZAP handler says otherwise, so
the server socket factory starts one ``zmq.auth.thread.ThreadAuthenticator`` per context
(``configure_curve(location=allow_dir)``) before binding, and stops it when the last CURVE
server socket of that context closes.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

__all__ = [
    "AllowListReload",
    "CurveClientKeys",
    "CurveServerKeys",
    "generate_keypair",
    "load_client_keys",
    "load_server_keys",
    "read_allow_list",
    "reload_allow_list",
]


@dataclass(frozen=True)
class CurveServerKeys:
    """A server's key pair (Z85 bytes, 40 characters each) and its client allow-list dir."""

    public: bytes
    secret: bytes
    allow_dir: Path

    def __repr__(self) -> str:  # never print a secret key
        return f"CurveServerKeys(public={self.public!r}, allow_dir={str(self.allow_dir)!r})"


@dataclass(frozen=True)
class CurveClientKeys:
    """A client's key pair and the public key of the server it talks to (Z85 bytes)."""

    public: bytes
    secret: bytes
    server_public: bytes

    def __repr__(self) -> str:
        return f"CurveClientKeys(public={self.public!r}, server_public={self.server_public!r})"


def generate_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) in ``directory``.

    Refuses to overwrite existing files (FileExistsError). Returns (public, secret) paths.
    """
    d = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad key name {name!r}")
    d.mkdir(parents=True, exist_ok=True)
    for p in (d / f"{name}.key", d / f"{name}.key_secret"):
        if p.exists():
            raise FileExistsError(f"{p} exists; remove it first or pick another --name")
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        pub, sec = zmq.auth.create_certificates(d, name)
    finally:
        os.umask(old)
    os.chmod(pub, 0o644)
    return Path(pub), Path(sec)


def _load(path: str | os.PathLike[str], want_secret: bool) -> tuple[bytes, bytes | None]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"CURVE key file {p} not found")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (ValueError, OSError) as e:
        raise ValueError(f"{p} is not a ZeroMQ certificate: {e}") from e
    if public is None or (want_secret and secret is None):
        raise ValueError(f"{p} holds no {'secret' if want_secret else 'public'} key")
    return public, secret


def load_server_keys(
    secret_file: str | os.PathLike[str], allow_dir: str | os.PathLike[str]
) -> CurveServerKeys:
    """Load a server's ``NAME.key_secret`` and check the allow-list directory exists."""
    public, secret = _load(secret_file, want_secret=True)
    d = Path(allow_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"CURVE allow-list directory {d} not found")
    assert secret is not None
    return CurveServerKeys(public, secret, d.resolve())


def load_client_keys(
    secret_file: str | os.PathLike[str], server_public_file: str | os.PathLike[str]
) -> CurveClientKeys:
    """Load a client's ``NAME.key_secret`` and the server's ``NAME.key``."""
    public, secret = _load(secret_file, want_secret=True)
    server_public, _ = _load(server_public_file, want_secret=False)
    assert secret is not None
    return CurveClientKeys(public, secret, server_public)


# --- the ZAP handler, one per context ---------------------------------------------------------

_lock = threading.Lock()
_auths: dict[int, tuple[ThreadAuthenticator, Path, int]] = {}


def acquire_authenticator(ctx: zmq.Context, allow_dir: Path) -> None:  # type: ignore[type-arg]
    """Start (or share) the context's authenticator for ``allow_dir``."""
    with _lock:
        entry = _auths.get(id(ctx))
        if entry is not None:
            auth, d, n = entry
            if d != allow_dir:
                raise ValueError(
                    f"context already authenticates against {d}; one allow-list per context"
                )
            _auths[id(ctx)] = (auth, d, n + 1)
            return
        auth = _start_authenticator(ctx)
        auth.configure_curve(domain="*", location=str(allow_dir))
        _auths[id(ctx)] = (auth, allow_dir, 1)


def _start_authenticator(ctx: zmq.Context) -> ThreadAuthenticator:  # type: ignore[type-arg]
    # A stopped authenticator's ZAP socket is closed asynchronously: its inproc endpoint can
    # stay taken for a few milliseconds, so a quick re-bind retries instead of failing.
    deadline = time.monotonic() + 2.0
    while True:
        auth = ThreadAuthenticator(ctx)
        try:
            auth.start()
            return auth
        except zmq.ZMQError as e:
            auth.stop()
            if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def release_authenticator(ctx: zmq.Context) -> None:  # type: ignore[type-arg]
    """Drop one reference; the last one stops the authenticator thread."""
    with _lock:
        entry = _auths.get(id(ctx))
        if entry is None:
            return
        auth, d, n = entry
        if n > 1:
            _auths[id(ctx)] = (auth, d, n - 1)
            return
        del _auths[id(ctx)]
    auth.stop()


def read_allow_list(allow_dir: str | os.PathLike[str], *, allow_empty: bool = False) -> set[bytes]:
    """The client public keys (Z85) of every ``*.key`` file in ``allow_dir``.

    Raises ValueError naming the file for anything that would make the list a surprise: a
    missing directory, a file that is not a ZeroMQ certificate, a file with no public key,
    or, unless ``allow_empty``, no key at all (an empty list locks every agent and operator
    out: a reload refuses it; a planner starting before any key was copied accepts it).
    """
    d = Path(allow_dir)
    if not d.is_dir():
        raise ValueError(f"CURVE allow-list directory {d} not found")
    keys: set[bytes] = set()
    for path in sorted(d.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path} is not a ZeroMQ certificate: {e}") from None
        if public is None or len(public) != 40:
            raise ValueError(f"{path} holds no public key")
        keys.add(public)
    if not keys and not allow_empty:
        raise ValueError(f"no *.key file in {d}: an empty allow-list would refuse everyone")
    return keys


@dataclass(frozen=True)
class AllowListReload:
    """What :func:`reload_allow_list` changed: keys allowed now, added and removed."""

    keys: int
    added: int
    removed: int


def reload_allow_list(ctx: zmq.Context) -> AllowListReload | None:  # type: ignore[type-arg]
    """Re-read the allow-list directory of ``ctx``'s authenticator (after adding or removing a
    client key). The new list is checked whole first (:func:`read_allow_list`): if it is
    broken, ValueError says why and the old list stays in force. None when no CURVE
    authenticator runs on ``ctx``. Connections already made are not re-authenticated: a
    removed key is refused at its next connection.
    """
    with _lock:
        entry = _auths.get(id(ctx))
    if entry is None:
        return None
    auth, d, _ = entry
    keys = read_allow_list(d)
    old = set(auth.certs.get("*", {}))
    # the authenticator's table of allowed keys (pyzmq's Authenticator.certs, per domain);
    # one assignment, so its ZAP thread sees the old or the new list, never a mix
    auth.certs["*"] = {k: True for k in keys}
    return AllowListReload(keys=len(keys), added=len(keys - old), removed=len(old - keys))
