"""The planner's state on disk: per group the epoch, recent layouts, the pending attempt and
the history, so that a restarted planner never reuses an epoch and can roll back.

Layout of the state directory::

    <state_dir>/planner.lock          flock: one planner per state directory
    <state_dir>/groups/<group>.json   one file per EP group (name percent-encoded; past
                                      200 characters, cut and a hash of it added)
    <state_dir>/windows/<group>.npz   its load windows and forecast (a cache: see below)

Each file is rewritten whole and atomically: written to a temporary file in the same
directory, fsynced, renamed over the old one, and the directory fsynced. A crash at any point
leaves either the old or the new file, never a mix; leftover temporary files are removed on
start. The file is small: the last ``keep_layouts`` committed layouts (for rollback) and the
last ``keep_history`` attempts.

A file that cannot be read back (not JSON, wrong schema, a layout that does not validate) is
never silently replaced: :meth:`StateStore.load` raises :class:`StoreCorrupt` naming the
file, and the daemon exits with code 78. ``reset_corrupt=True`` (``--reset-state``) moves
such a file aside to ``<name>.corrupt-<unix time>`` and starts that group afresh; its epochs
then restart above the highest epoch the ranks report when they register.

The load windows (closed buckets of logical load, their tokens, the EWMA forecast, and the
regime forecast's state when the planner keeps one) are
written less often (the core decides when: at most once per ``window_save_s``, and at a
clean stop) to ``windows/<group>.npz``, an ``.npz`` of float64 arrays plus a JSON ``meta``
(the epoch in service when written, when the newest bucket closed); read with
``allow_pickle=False``. Losing them costs a restarted planner only its forecast, so an
unreadable file is reported (:class:`WindowsUnreadable`) and skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from eplbd.controller._commit import Attempt
from eplbd.controller._window import WindowState
from eplbd.layout import Layout
from eplbd.planner import RegimeState
from eplbd.wire import ModelShape

__all__ = [
    "STATE_SCHEMA_VERSION",
    "GroupRecord",
    "StateStore",
    "StoreCorrupt",
    "StoreLocked",
    "StoreUnusable",
    "WindowsUnreadable",
    "atomic_write",
    "decode_windows",
    "encode_windows",
]

STATE_SCHEMA_VERSION = 1


class StoreCorrupt(Exception):
    """A state file cannot be used; ``path`` names it and the message says why."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"state file {path} is unusable: {detail} (fix or remove it, or start with "
            "--reset-state to move it aside)"
        )


class StoreLocked(Exception):
    """Another planner holds the state directory."""


class StoreUnusable(Exception):
    """The state directory cannot be created, locked or written (read-only, permissions)."""

    def __init__(self, state_dir: Path, err: OSError) -> None:
        self.state_dir = state_dir
        where = f" ({err.filename})" if err.filename else ""
        super().__init__(
            f"cannot use state directory {state_dir}: {err.strerror or err}{where}; "
            "it must be a writable directory (the state_dir setting)"
        )


class WindowsUnreadable(ValueError):
    """A saved load-window file that cannot be used (skipped: the forecast starts empty)."""


def encode_windows(meta: dict[str, Any], state: WindowState) -> bytes:
    """An ``.npz``: ``buckets`` [n, L, E] and ``forecast`` [L, E] float64 (absent when None),
    ``bucket_tokens`` and ``bucket_steps`` [n] int64, ``meta`` (JSON text, as uint8) with
    ``updates`` added; with a regime forecast, ``regime_mean`` [L, E] (absent when None),
    ``regime_recent`` [scales, L, E] (its drift scales' recent means; absent when none) and
    ``regime_history`` [m] float64, its count, changes, windows since a drift was found and
    how the last change was found in ``meta["regime"]``."""
    import io

    import numpy as np

    doc = dict(meta, schema_version=STATE_SCHEMA_VERSION, updates=state.updates)
    r = state.regime
    if r is not None:
        doc["regime"] = {
            "steps": r.steps, "changes": r.changes, "since_drift": r.since_drift,
            "last_change": r.last_change,
        }  # fmt: skip
    arrays: dict[str, Any] = {
        "meta": np.frombuffer(json.dumps(doc, allow_nan=False).encode(), dtype=np.uint8),
        "bucket_tokens": np.asarray(state.bucket_tokens, dtype=np.int64),
        "bucket_steps": np.asarray(state.bucket_steps, dtype=np.int64),
    }
    if state.buckets:
        arrays["buckets"] = np.stack([b.to("cpu").double().numpy() for b in state.buckets])
    if state.forecast is not None:
        arrays["forecast"] = state.forecast.to("cpu").double().numpy()
    if r is not None:
        arrays["regime_history"] = np.asarray(r.history, dtype=np.float64)
        if r.mean is not None:
            arrays["regime_mean"] = r.mean.to("cpu").double().numpy()
        if r.recent:
            arrays["regime_recent"] = np.stack([t.to("cpu").double().numpy() for t in r.recent])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_windows(raw: bytes) -> tuple[dict[str, Any], WindowState]:
    """The inverse of :func:`encode_windows`. Raises :class:`WindowsUnreadable`."""
    import io

    import numpy as np
    import torch

    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            tokens = [int(x) for x in z["bucket_tokens"]]
            steps = [int(x) for x in z["bucket_steps"]] if "bucket_steps" in z.files else []
            buckets = z["buckets"] if "buckets" in z.files else np.zeros((0, 0, 0))
            forecast = z["forecast"] if "forecast" in z.files else None
            regime = None
            if isinstance(meta, dict) and isinstance(meta.get("regime"), dict):
                rm = z["regime_mean"] if "regime_mean" in z.files else None
                rr = z["regime_recent"] if "regime_recent" in z.files else np.zeros((0, 0, 0))
                regime = RegimeState(
                    mean=None if rm is None else torch.from_numpy(np.array(rm, np.float64)),
                    steps=int(meta["regime"]["steps"]),
                    history=[float(x) for x in z["regime_history"]],
                    changes=int(meta["regime"]["changes"]),
                    recent=[torch.from_numpy(np.array(t, dtype=np.float64)) for t in rr],
                    since_drift=meta["regime"].get("since_drift"),
                    last_change=meta["regime"].get("last_change"),
                )
            if not isinstance(meta, dict) or meta.get("schema_version") != STATE_SCHEMA_VERSION:
                raise ValueError(f"schema_version {meta.get('schema_version')!r}")
            state = WindowState(
                buckets=[torch.from_numpy(np.array(b, dtype=np.float64)) for b in buckets],
                bucket_tokens=tokens,
                forecast=None if forecast is None else torch.from_numpy(np.array(forecast)),
                updates=int(meta.get("updates", 0)),
                bucket_steps=steps,
                regime=regime,
            )
    except Exception as e:  # a damaged zip raises more kinds than its docs say: never fatal
        raise WindowsUnreadable(f"{type(e).__name__}: {e}") from None
    tensors = [*state.buckets, *([] if state.forecast is None else [state.forecast])]
    if regime is not None and regime.mean is not None:
        tensors += [regime.mean, *regime.recent]
    if any(not bool(torch.isfinite(t).all()) or bool((t < 0).any()) for t in tensors):
        raise WindowsUnreadable("loads must be finite and >= 0")
    if regime is not None:
        try:
            regime.check()
        except ValueError as e:
            raise WindowsUnreadable(f"regime forecast: {e}") from None
    return meta, state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes, *, replace: Callable[[str, str], None] = os.replace
) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new content.

    ``replace`` is the rename step (a seam for crash tests).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    replace(str(tmp), str(path))
    _fsync_dir(path.parent)


@dataclass
class GroupRecord:
    """What is persisted about one EP group.

    shape: {"num_layers", "num_logical_experts", "num_physical_experts", "ep_size",
    "num_nodes"} or None before any rank registered; epoch: committed epoch in service;
    max_epoch: highest epoch ever prepared (the next one is max_epoch + 1); layouts: the
    last committed layouts by epoch (the current one included); pending: the attempt in
    flight when the file was written; history: finished attempts, oldest first.
    """

    group: str
    shape: dict[str, int] | None = None
    epoch: int = 0
    max_epoch: int = 0
    layouts: dict[int, Layout] = field(default_factory=dict)
    layout_times: dict[int, float] = field(default_factory=dict)
    pending: Attempt | None = None
    frozen: bool = False
    frozen_layers: list[int] = field(default_factory=list)
    last_rebalance_wall: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, keep_layouts: int, keep_history: int) -> bytes:
        epochs = sorted(self.layouts)[-keep_layouts:]
        if self.epoch in self.layouts and self.epoch not in epochs:
            epochs.append(self.epoch)
        doc = {
            "schema_version": STATE_SCHEMA_VERSION,
            "group": self.group,
            "shape": self.shape,
            "epoch": self.epoch,
            "max_epoch": self.max_epoch,
            "layouts": [
                {
                    "epoch": e,
                    "committed_at": self.layout_times.get(e),
                    "layout": self.layouts[e].to_dict(),
                }
                for e in epochs
            ],
            "pending": None if self.pending is None else self.pending.to_dict(),
            "frozen": self.frozen,
            "frozen_layers": sorted(set(self.frozen_layers)),
            "last_rebalance_at": self.last_rebalance_wall,
            "history": self.history[-keep_history:],
            "written_at": time.time(),
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, path: Path, raw: bytes, *, now: float) -> GroupRecord:
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreCorrupt(path, f"not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise StoreCorrupt(path, "not a JSON object")
        if doc.get("schema_version") != STATE_SCHEMA_VERSION:
            raise StoreCorrupt(
                path,
                f"schema_version {doc.get('schema_version')!r} (expected {STATE_SCHEMA_VERSION})",
            )
        try:
            rec = cls(group=_str(doc["group"], "group"))
            shape = doc.get("shape")
            if shape is not None:
                rec.shape = _shape(shape)
            rec.epoch = _int(doc["epoch"], "epoch")
            rec.max_epoch = _int(doc["max_epoch"], "max_epoch")
            for item in _list(doc.get("layouts", []), "layouts"):
                ep = _int(item["epoch"], "a layout's epoch")
                rec.layouts[ep] = _fits(Layout.from_dict(item["layout"]), rec.shape, ep)
                if item.get("committed_at") is not None:
                    rec.layout_times[ep] = float(item["committed_at"])
            if doc.get("pending") is not None:
                rec.pending = Attempt.from_dict(doc["pending"], now=now)
                _fits(rec.pending.layout, rec.shape, rec.pending.epoch)
            frozen = doc.get("frozen", False)
            if not isinstance(frozen, bool):
                raise ValueError(f"frozen={frozen!r} is not true or false")
            rec.frozen = frozen
            rec.frozen_layers = [
                _int(x, "a frozen layer")
                for x in _list(doc.get("frozen_layers", []), "frozen_layers")
            ]
            lr = doc.get("last_rebalance_at")
            rec.last_rebalance_wall = None if lr is None else float(lr)
            hist = doc.get("history", [])
            if not isinstance(hist, list) or not all(isinstance(h, dict) for h in hist):
                raise ValueError("history is not a list of objects")
            rec.history = hist
        except Exception as e:  # whatever the file holds, it is never a crash: a StoreCorrupt
            raise StoreCorrupt(path, f"{type(e).__name__}: {e}") from None
        if rec.epoch > rec.max_epoch or rec.epoch < 0:
            raise StoreCorrupt(path, f"epoch {rec.epoch} is outside [0, max_epoch={rec.max_epoch}]")
        if rec.epoch > 0 and rec.epoch not in rec.layouts:
            raise StoreCorrupt(path, f"the layout of the current epoch {rec.epoch} is missing")
        if rec.pending is not None and rec.pending.epoch > rec.max_epoch:
            raise StoreCorrupt(path, "the pending epoch is above max_epoch")
        return rec


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{what}={v!r} is not an integer >= 0")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{what}={v!r} is not a string")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError(f"{what} is not a list")
    return v


_SHAPE_KEYS = ("num_layers", "num_logical_experts", "num_physical_experts")
_SHAPE_OPTIONAL = ("ep_size", "num_nodes")


def _shape(v: Any) -> dict[str, int]:
    """A persisted model shape: what registration wrote (ModelShape's fields, and ep_size,
    0 when unknown), checked as a hello's would be."""
    if not isinstance(v, dict) or not set(_SHAPE_KEYS) <= set(v) <= {
        *_SHAPE_KEYS,
        *_SHAPE_OPTIONAL,
    }:
        raise ValueError(f"shape {v!r} must have the keys {', '.join(_SHAPE_KEYS)} (and ep_size)")
    out = {str(k): _int(x, f"shape.{k}") for k, x in v.items()}
    ModelShape(out["num_layers"], out["num_logical_experts"], out["num_physical_experts"])
    return out


def _fits(layout: Layout, shape: dict[str, int] | None, epoch: int) -> Layout:
    """A stored layout must fit the stored shape: every snapshot is checked against both."""
    if shape is not None:
        want = (shape["num_layers"], shape["num_logical_experts"], shape["num_physical_experts"])
        have = (layout.num_layers, layout.num_logical, layout.num_physical)
        if have != want:
            raise ValueError(f"the layout of epoch {epoch} is (L, E, P) {have}, shape {want}")
    return layout


#: A temporary file of :func:`atomic_write` (``.<name>.tmp-<pid>``) in the state directories.
_TMP_NAME = re.compile(r"\..+\.(json|npz)\.tmp-[0-9]+")
#: The longest file stem kept as the percent-encoded name: with ``.json`` and
#: atomic_write's ``.``, ``.tmp-<pid>`` the file name stays under the usual 255 bytes.
_MAX_STEM = 200


def _file_stem(group: str) -> str:
    """A group's file name without its suffix: the name percent-encoded, or where that is
    too long for a file name (the wire allows 256 characters, and encoding can triple them)
    its first part and a hash of the whole name."""
    stem = quote(group, safe="")
    if len(stem) <= _MAX_STEM:
        return stem
    digest = hashlib.sha256(group.encode()).hexdigest()[:24]
    return f"{stem[: _MAX_STEM - len(digest) - 1]}~{digest}"


class StateStore:
    """Reads and writes the per-group state files under ``state_dir`` (see module docstring)."""

    def __init__(
        self,
        state_dir: Path | str,
        *,
        keep_layouts: int = 16,
        keep_history: int = 256,
        replace: Callable[[str, str], None] = os.replace,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.groups_dir = self.state_dir / "groups"
        self.windows_dir = self.state_dir / "windows"
        self.keep_layouts = keep_layouts
        self.keep_history = keep_history
        self._replace = replace
        self._lock_fd: int | None = None
        self.writes = 0
        self.window_writes = 0

    def open(self) -> None:
        """Create the directories and take the lock (raises :class:`StoreLocked`, or
        :class:`StoreUnusable` when the directory cannot be created or written)."""
        try:
            self.groups_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(self.state_dir / "planner.lock", os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as e:
            raise StoreUnusable(self.state_dir, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(f"another planner holds {self.state_dir / 'planner.lock'}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        for d in (self.groups_dir, self.windows_dir):
            for tmp in d.glob(".*.tmp-*"):
                # only atomic_write's own leftovers: a group named ".x.tmp-2" has a file too
                if _TMP_NAME.fullmatch(tmp.name):
                    with contextlib.suppress(OSError):
                        tmp.unlink()

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def path_of(self, group: str) -> Path:
        return self.groups_dir / (_file_stem(group) + ".json")

    def load(
        self, *, now: float, reset_corrupt: bool = False
    ) -> tuple[dict[str, GroupRecord], list[str]]:
        """Every group's record, and notes about files moved aside (``reset_corrupt``)."""
        out: dict[str, GroupRecord] = {}
        notes: list[str] = []
        if not self.groups_dir.is_dir():
            return out, notes
        for path in sorted(self.groups_dir.glob("*.json")):
            try:
                rec = GroupRecord.from_json(path, path.read_bytes(), now=now)
                if self.path_of(rec.group).name != path.name:
                    said = unquote(path.name[: -len(".json")])
                    raise StoreCorrupt(path, f"holds group {rec.group!r}, name says {said!r}")
            except OSError as e:
                corrupt = StoreCorrupt(path, f"cannot read: {e.strerror}")
                if not reset_corrupt:
                    raise corrupt from None
                notes.append(self._quarantine(path, corrupt))
                continue
            except StoreCorrupt as err:
                if not reset_corrupt:
                    raise
                notes.append(self._quarantine(path, err))
                continue
            out[rec.group] = rec
        return out, notes

    def _quarantine(self, path: Path, err: StoreCorrupt) -> str:
        dest = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, dest)
        _fsync_dir(path.parent)
        return f"{err.detail}: moved {path} aside to {dest}"

    def save(self, rec: GroupRecord) -> None:
        """Atomically write one group's record."""
        self.groups_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        data = rec.to_json(self.keep_layouts, self.keep_history)
        atomic_write(self.path_of(rec.group), data, replace=self._replace)
        self.writes += 1

    def windows_path_of(self, group: str) -> Path:
        return self.windows_dir / (_file_stem(group) + ".npz")

    def save_windows(self, group: str, meta: dict[str, Any], state: WindowState) -> None:
        """Atomically write one group's load windows (:func:`encode_windows`)."""
        self.windows_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        data = encode_windows(meta, state)
        atomic_write(self.windows_path_of(group), data, replace=self._replace)
        self.window_writes += 1

    def load_windows(self, group: str) -> tuple[dict[str, Any], WindowState] | None:
        """One group's saved load windows, None if there are none. Raises
        :class:`WindowsUnreadable` (with the file named) if the file cannot be used."""
        path = self.windows_path_of(group)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise WindowsUnreadable(f"{path}: cannot read: {e.strerror}") from None
        try:
            return decode_windows(raw)
        except WindowsUnreadable as e:
            raise WindowsUnreadable(f"{path}: {e}") from None
