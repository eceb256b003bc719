"""The planner's state files: round trip, atomic replacement, corruption, the lock."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from eplbd.controller import (
    Attempt,
    GroupRecord,
    StateStore,
    StoreCorrupt,
    StoreLocked,
)
from eplbd.layout import Layout


def record(epoch: int = 3, group: str = "g/0 é") -> GroupRecord:
    lay = Layout.default(2, 4, 6)
    moved = Layout.from_phy2log([[0, 1, 2, 3, 3, 3], [0, 1, 2, 3, 0, 0]], 4)
    rec = GroupRecord(group=group, epoch=epoch, max_epoch=epoch + 1)
    rec.shape = {"num_layers": 2, "num_logical_experts": 4, "num_physical_experts": 6, "ep_size": 2}
    rec.layouts = {epoch - 1: lay, epoch: moved}
    rec.layout_times = {epoch: 1.5e9}
    rec.frozen_layers = [1]
    rec.history = [{"epoch": epoch, "state": "committed", "reason": ""}]
    rec.pending = Attempt(
        group=group,
        epoch=epoch + 1,
        previous_epoch=epoch,
        ranks=(0, 1),
        layout=lay,
        trigger="force",
        started_at=10.0,
        started_wall=1.6e9,
        timeout_s=30.0,
        commit_timeout_s=30.0,
    )
    return rec


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.open()
    rec = record()
    store.save(rec)
    got, notes = store.load(now=50.0)
    assert notes == []
    back = got[rec.group]
    assert (back.epoch, back.max_epoch, back.shape) == (3, 4, rec.shape)
    assert back.layouts == rec.layouts and back.layout_times == {3: 1.5e9}
    assert back.frozen_layers == [1] and back.frozen is False
    assert back.history == rec.history
    assert back.pending is not None and back.pending.epoch == 4
    assert back.pending.restored and back.pending.deadline == 80.0
    assert back.pending.layout == rec.pending.layout
    # the file name is the percent-encoded group name
    assert [p.name for p in (tmp_path / "groups").iterdir()] == ["g%2F0%20%C3%A9.json"]
    store.close()


def test_kept_layouts_and_history_are_bounded(tmp_path: Path) -> None:
    store = StateStore(tmp_path, keep_layouts=2, keep_history=3)
    store.open()
    rec = GroupRecord(group="g", epoch=5, max_epoch=5)
    rec.layouts = {e: Layout.default(1, 2, 2) for e in range(1, 6)}
    rec.history = [{"epoch": e} for e in range(10)]
    store.save(rec)
    back = store.load(now=0.0)[0]["g"]
    assert sorted(back.layouts) == [4, 5]
    assert [h["epoch"] for h in back.history] == [7, 8, 9]
    store.close()


def test_a_crash_between_write_and_rename_leaves_the_old_state(tmp_path: Path) -> None:
    # A real process dies (os._exit) after the new file is written and fsynced, before rename.
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_controller_store import record
        from eplbd.controller import StateStore
        store = StateStore({str(tmp_path)!r})
        store.open()
        store.save(record(epoch=3, group="g"))
        crash = StateStore({str(tmp_path)!r}, replace=lambda a, b: os._exit(9))
        crash.save(record(epoch=8, group="g"))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr.decode()
    leftovers = list((tmp_path / "groups").glob(".*.tmp-*"))
    assert len(leftovers) == 1  # the new content was written, never renamed
    assert json.loads(leftovers[0].read_text())["epoch"] == 8
    store = StateStore(tmp_path)
    store.open()  # removes the leftover
    assert list((tmp_path / "groups").glob(".*.tmp-*")) == []
    assert store.load(now=0.0)[0]["g"].epoch == 3
    store.close()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"schema_version": 99}',
        b'{"schema_version": 1, "group": "g", "epoch": 2, "max_epoch": 1}',
        b'{"schema_version": 1, "group": "g", "epoch": 1, "max_epoch": 1, "layouts": []}',
        b'{"schema_version": 1, "group": "g", "epoch": 0, "max_epoch": 1, "layouts": '
        b'[{"epoch": 1, "layout": {"schema_version": 1, "num_logical_experts": 3, '
        b'"phy2log": [[0, 1, 1]]}}]}',
        b'{"schema_version": 1, "group": "other", "epoch": 0, "max_epoch": 0}',
    ],
)
def test_corrupt_files_are_refused_by_name_or_moved_aside(tmp_path: Path, content: bytes) -> None:
    store = StateStore(tmp_path)
    store.open()
    path = tmp_path / "groups" / "g.json"
    path.write_bytes(content)
    with pytest.raises(StoreCorrupt) as info:
        store.load(now=0.0)
    assert info.value.path == path and "--reset-state" in str(info.value)
    got, notes = store.load(now=0.0, reset_corrupt=True)
    assert got == {} and len(notes) == 1 and "moved" in notes[0]
    assert not path.exists()
    assert len(list((tmp_path / "groups").glob("g.json.corrupt-*"))) == 1
    store.close()


def _drop_shape_key(d: dict) -> None:
    del d["shape"]["num_physical_experts"]


def _wider_layout(d: dict) -> None:
    d["layouts"][-1]["layout"]["phy2log"] = [[0, 1, 2, 3, 3, 3, 0, 1], [0, 1, 2, 3, 0, 0, 1, 2]]


def _staged_null(d: dict) -> None:
    d["pending"]["staged"] = None


def _frozen_text(d: dict) -> None:
    d["frozen"] = "false"


def _float_epoch(d: dict) -> None:
    d["epoch"] = 3.0


def _zero_layers(d: dict) -> None:
    d["shape"]["num_layers"] = 0


@pytest.mark.parametrize(
    "damage",
    [_drop_shape_key, _wider_layout, _staged_null, _frozen_text, _float_epoch, _zero_layers],
)
def test_a_damaged_field_is_store_corrupt_not_a_crash(tmp_path: Path, damage: Any) -> None:
    """Whatever a file holds, loading raises StoreCorrupt naming it (so --reset-state can move
    it aside), never another exception (the daemon would exit 1 and systemd restart it)."""
    store = StateStore(tmp_path)
    store.open()
    rec = record(group="g")
    store.save(rec)
    path = store.path_of("g")
    doc = json.loads(path.read_bytes())
    damage(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreCorrupt) as info:
        store.load(now=0.0)
    assert info.value.path == path
    got, notes = store.load(now=0.0, reset_corrupt=True)
    assert got == {} and len(notes) == 1 and not path.exists()
    store.close()


def test_one_planner_per_state_directory(tmp_path: Path) -> None:
    a = StateStore(tmp_path)
    a.open()
    with pytest.raises(StoreLocked):
        StateStore(tmp_path).open()
    a.close()
    b = StateStore(tmp_path)
    b.open()
    b.close()


def test_windows_file_carries_the_regime_forecast_and_refuses_a_bad_one() -> None:
    import io

    import numpy as np
    import torch

    from eplbd.controller import LoadWindow
    from eplbd.controller._store import decode_windows, encode_windows

    w = LoadWindow(2, 3, window_s=1.0, num_windows=4, alpha=0.5, forecast="regime")
    for i in range(6):
        w.add(torch.tensor([[5.0 + i, 2.0, 3.0], [1.0, 1.0, 4.0 + 3 * i]]), 10, float(i))
    w.roll(10.0)
    raw = encode_windows({"epoch": 2}, w.state())
    meta, st = decode_windows(raw)
    assert meta["epoch"] == 2 and st.regime is not None
    want = w.state().regime
    assert want is not None and want.mean is not None and st.regime.mean is not None
    assert torch.equal(st.regime.mean, want.mean) and st.regime.history == want.history
    assert (st.regime.steps, st.regime.changes) == (want.steps, want.changes)
    assert len(want.recent) == 2 and len(st.regime.recent) == 2
    assert all(torch.equal(x, y) for x, y in zip(st.regime.recent, want.recent, strict=True))
    # following a drift: how long ago it was found is kept too
    following = dataclasses.replace(w.state(), regime=dataclasses.replace(want, since_drift=3))
    assert decode_windows(encode_windows({}, following))[1].regime.since_drift == 3  # type: ignore[union-attr]
    # and how the last change was found (status says it after a restart)
    drifted = dataclasses.replace(w.state(), regime=dataclasses.replace(want, last_change="drift"))
    assert decode_windows(encode_windows({}, drifted))[1].regime.last_change == "drift"  # type: ignore[union-attr]

    def tampered(**arrays: object) -> bytes:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        d.update(arrays)
        buf = io.BytesIO()
        np.savez(buf, **d)  # type: ignore[arg-type]
        return buf.getvalue()

    def regime_meta(**kw: object) -> object:
        doc = dict(meta, regime=dict(meta["regime"], **kw))
        return np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)

    # a file of the release before: no since_drift, no last_change; it restores, not following
    old = dict(meta, regime={k: meta["regime"][k] for k in ("steps", "changes")})
    st_old = decode_windows(tampered(meta=np.frombuffer(json.dumps(old).encode(), np.uint8)))[1]
    assert st_old.regime is not None
    assert (st_old.regime.since_drift, st_old.regime.last_change) == (None, None)
    LoadWindow(2, 3, window_s=1.0, num_windows=4, alpha=0.5, forecast="regime").restore(st_old)

    for bad in (
        tampered(regime_history=np.array([1.0, -2.0])),
        tampered(regime_mean=np.full((2, 3), np.nan)),
        tampered(regime_mean=np.ones((3, 3))),
        tampered(regime_recent=np.full((2, 2, 3), np.inf)),
        tampered(regime_recent=np.ones((2, 3, 3))),
        tampered(meta=regime_meta(since_drift=-1)),
        tampered(meta=regime_meta(since_drift="soon")),
        tampered(meta=regime_meta(last_change="sideways")),
        tampered(meta=regime_meta(last_change=["drift"])),
    ):
        with pytest.raises(ValueError):  # unreadable, or refused by the window
            st2 = decode_windows(bad)[1]
            LoadWindow(2, 3, window_s=1.0, num_windows=4, alpha=0.5, forecast="regime").restore(st2)


def test_any_damage_to_a_windows_file_is_windows_unreadable() -> None:
    """A windows file is a cache: whatever is wrong with it, decoding raises
    WindowsUnreadable (skipped at start), never another exception (fatal to the daemon)."""
    import io

    import numpy as np
    import torch

    from eplbd.controller import LoadWindow
    from eplbd.controller._store import WindowsUnreadable, decode_windows, encode_windows

    w = LoadWindow(2, 3, window_s=1.0, num_windows=4, alpha=0.5)
    w.add(torch.ones(2, 3), 10, 0.0)
    w.roll(2.0)
    raw = encode_windows({"epoch": 1}, w.state())
    # the central directory's compression method of the first member: a zip numpy cannot read
    at = raw.index(b"PK\x01\x02") + 10
    damaged = [raw[:at] + bytes([99]) + raw[at + 1 :]]
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    d["meta"] = np.frombuffer(b"[1, 2]", dtype=np.uint8)  # JSON, not an object
    buf = io.BytesIO()
    np.savez(buf, **d)  # type: ignore[arg-type]
    damaged.append(buf.getvalue())
    # and every single flipped byte of the file
    damaged += [raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1 :] for i in range(0, len(raw), 7)]
    for bad in damaged:
        with contextlib.suppress(WindowsUnreadable):  # anything else fails the test
            decode_windows(bad)


@pytest.mark.parametrize(
    "group",
    [
        "vllm:/mnt/models/" + "/".join(["deepseek-ai-DeepSeek-V3-0324-fp8"] * 7),  # 256 chars
        "é" * 256,  # percent-encoding makes each of these 6 characters
        ".blue.tmp-2",  # looks like a leftover temporary file
    ],
)
def test_any_legal_group_name_is_saved_kept_over_restarts_and_read_back(
    tmp_path: Path, group: str
) -> None:
    assert len(group) <= 256  # the wire's limit on a group name
    store = StateStore(tmp_path)
    store.open()
    store.save(record(group=group))
    assert len(store.path_of(group).name) + len(".tmp-4194304") + 1 <= 255
    store.close()
    store = StateStore(tmp_path)
    store.open()  # removes leftovers of atomic_write, and only those
    got, notes = store.load(now=0.0)
    assert notes == [] and list(got) == [group] and got[group].epoch == 3
    store.close()
