"""Sequence and epoch order, liveness with a fake clock, counters and their log lines."""

from __future__ import annotations

import json
import logging
import os

import pytest

from eplbd.wire import (
    ALIVE,
    DEAD,
    STALE,
    EpochTracker,
    LivenessTracker,
    SequenceTracker,
    WireCounters,
    WireError,
    new_incarnation,
    process_incarnation,
)

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_sequence_first_ok_gap_replay() -> None:
    c = WireCounters()
    s = SequenceTracker(c)
    assert s.check("w0", "inc1", 5).status == "first"
    assert s.check("w0", "inc1", 6).status == "ok"
    v = s.check("w0", "inc1", 10)
    assert (v.status, v.missing) == ("gap", 3)
    assert c.missing == {"w0": 3}
    for seq in (10, 9, 0):
        with pytest.raises(WireError) as ei:
            s.check("w0", "inc1", seq)
        assert ei.value.reason == "replay"
    assert s.last("w0") == ("inc1", 10)
    assert s.check("w1", "x", 0).status == "first"  # senders are independent


def test_sequence_restart_and_stale_incarnation() -> None:
    s = SequenceTracker()
    s.check("w0", "old", 100)
    assert s.check("w0", "new", 0).status == "restart"  # sequence starts over
    assert s.check("w0", "new", 1).status == "ok"
    with pytest.raises(WireError) as ei:
        s.check("w0", "old", 101)  # a late message from the replaced process
    assert ei.value.reason == "stale_incarnation"
    s.forget("w0")
    assert s.check("w0", "old", 101).status == "first"


def test_sequence_tracker_is_bounded() -> None:
    s = SequenceTracker(max_senders=3)
    for i in range(5):
        s.check(f"w{i}", "i", 1)
    assert s.last("w0") is None and s.last("w4") == ("i", 1)


def test_epoch_tracker() -> None:
    e = EpochTracker()
    assert e.current("g") == 0
    e.accept("g", 1)
    e.accept("g", 3)
    for stale in (3, 2, 0):  # replayed and older epochs
        with pytest.raises(WireError) as ei:
            e.accept("g", stale)
        assert ei.value.reason == "stale_epoch"
    assert e.current("g") == 3
    e.check("g", 4)
    assert e.current("g") == 3  # check does not record
    e.accept("h", 1)


def test_liveness_states_with_fake_clock() -> None:
    clk = FakeClock()
    lv = LivenessTracker(1.0, clock=clk)
    assert lv.seen("a", "i1") == "new"
    assert lv.state("a") == ALIVE and lv.state("zz") is None
    clk.t += 2.9
    assert lv.sweep() == [] and lv.state("a") == ALIVE
    clk.t += 0.1  # 3 intervals without a message
    assert lv.sweep() == [("a", STALE)]
    assert lv.sweep() == []  # reported once
    clk.t += 2.0  # 5 intervals
    assert lv.sweep() == [("a", DEAD)] and lv.state("a") == DEAD
    assert lv.seen("a", "i1") == "recovered"
    assert lv.sweep() == [] and lv.state("a") == ALIVE
    assert lv.seen("a", "i2") == "restarted"
    assert lv.peers()["a"].restarts == 1 and lv.incarnation("a") == "i2"
    assert lv.seen("a") == "alive"  # a message without an incarnation still refreshes


def test_liveness_recovered_without_a_sweep_in_between() -> None:
    clk = FakeClock()
    lv = LivenessTracker(0.5, stale_after=2, dead_after=4, clock=clk)
    lv.seen("a", "i")
    clk.t += 1.0
    assert lv.state("a") == STALE
    assert lv.seen("a", "i") == "recovered"
    assert lv.sweep() == []


def test_liveness_accepts_clock_objects_and_checks_args() -> None:
    class Obj:
        def __init__(self) -> None:
            self.t = 0.0

        def monotonic(self) -> float:
            return self.t

    o = Obj()
    lv = LivenessTracker(0.1, clock=o)
    lv.seen("p")
    o.t = 0.5
    assert lv.state("p") == DEAD
    lv.forget("p")
    assert lv.state("p") is None
    with pytest.raises(ValueError):
        LivenessTracker(0)
    with pytest.raises(ValueError):
        LivenessTracker(1, stale_after=5, dead_after=3)


def test_incarnations() -> None:
    a, b = new_incarnation(), new_incarnation()
    assert a != b and a.startswith(f"{os.getpid():x}-")
    assert process_incarnation() == process_incarnation()


def test_counters_count_log_and_export(caplog: pytest.LogCaptureFixture) -> None:
    c = WireCounters()
    with caplog.at_level(logging.WARNING, logger="eplbd.wire"):
        c.bad_message(WireError("bad_count", "negative count -3"), "n0-gpu1", "snapshot")
        c.bad_message(WireError("bad_count", "x"), "n0-gpu2", "snapshot")
        c.bad_message(WireError("truncated"), "n0-gpu1")
    c.dropped_send("would_block", "agent", "snapshot")
    c.gap("n0-gpu1", 2)
    c.received["snapshot"] += 1
    d = c.as_dict()
    json.dumps(d)
    assert d["bad"] == {"bad_count": 2, "truncated": 1}
    assert d["bad_by_sender"]["n0-gpu1"] == {"bad_count": 1, "truncated": 1}
    assert d["dropped"] == {"would_block": 1} and d["missing"] == {"n0-gpu1": 2}
    assert c.bad_total == 3 and c.dropped_total == 1
    rec = [r for r in caplog.records if r.name == "eplbd.wire"]
    assert len(rec) == 3
    assert rec[0].reason == "bad_count" and rec[0].sender == "n0-gpu1"  # type: ignore[attr-defined]
    assert "sender=n0-gpu1" in rec[0].getMessage() and "negative count" in rec[0].getMessage()


def test_counters_bound_senders_and_thin_logs(caplog: pytest.LogCaptureFixture) -> None:
    c = WireCounters()
    with caplog.at_level(logging.WARNING, logger="eplbd.wire"):
        for i in range(3000):
            c.bad_message(WireError("bad_body"), f"s{i}")
    assert c.bad["bad_body"] == 3000
    assert len(c.bad_by_sender) == 1025 and c.bad_by_sender["(other)"]["bad_body"] == 3000 - 1024
    n = len([r for r in caplog.records if r.name == "eplbd.wire"])
    assert 100 < n < 120  # 100 lines, then powers of two
