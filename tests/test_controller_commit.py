"""The two-phase commit state machine, without sockets or clocks (times are passed in)."""

from __future__ import annotations

from eplbd.controller import Attempt, Effect
from eplbd.layout import Layout


def attempt(ranks: int = 3, t0: float = 100.0) -> Attempt:
    return Attempt(
        group="g",
        epoch=7,
        previous_epoch=6,
        ranks=tuple(range(ranks)),
        layout=Layout.default(2, 4, 6),
        trigger="auto",
        started_at=t0,
        started_wall=1e9,
        timeout_s=10.0,
        commit_timeout_s=5.0,
    )


def kinds(effects: list[Effect]) -> list[str]:
    return [e.kind for e in effects]


def test_all_staged_then_committed_by_every_rank() -> None:
    a = attempt()
    assert a.state == "preparing" and a.deadline == 110.0
    assert a.on_staged(0, True, "", 10, 101.0, 1.0) == []
    assert a.on_staged(1, True, "", 10, 101.0, 1.0) == []
    assert a.waiting_for() == [2]
    assert a.on_staged(2, True, "", 10, 102.0, 1.0) == []
    assert a.state == "staged" and a.deadline == 107.0
    assert kinds(a.on_committed(1, 500, 103.0, 2.0)) == ["applied"]
    assert a.state == "committing" and a.commit_latency_s == 3.0
    assert a.on_committed(0, 500, 103.1, 2.0) == []
    assert kinds(a.on_committed(2, 500, 103.2, 3.0)) == ["finished"]
    assert a.state == "committed" and a.finished and a.flags == []
    assert a.finished_wall == 3.0
    assert a.to_dict(with_layout=False)["committed"] == {"0": 500, "1": 500, "2": 500}


def test_one_rank_not_ok_aborts() -> None:
    a = attempt()
    a.on_staged(0, True, "", 1, 101.0, 1.0)
    eff = a.on_staged(1, False, "out of staging memory", 0, 101.0, 1.0)
    assert kinds(eff) == ["send_abort", "finished"]
    assert "rank 1" in eff[0].detail and "out of staging memory" in eff[0].detail
    assert a.state == "aborted" and a.aborted_by == {1: "out of staging memory"}
    assert a.on_staged(2, True, "", 1, 101.0, 1.0) == []  # late answers change nothing


def test_deadline_aborts_naming_the_missing_ranks() -> None:
    a = attempt()
    a.on_staged(0, True, "", 1, 101.0, 1.0)
    assert a.tick(109.9, 1.0) == []
    eff = a.tick(110.0, 2.0)
    assert kinds(eff) == ["send_abort", "finished"]
    assert "[1, 2]" in eff[0].detail
    assert a.state == "aborted"


def test_staged_but_no_commit_report_aborts_after_the_commit_timeout() -> None:
    a = attempt(ranks=1)
    a.on_staged(0, True, "", 1, 101.0, 1.0)
    assert a.tick(105.9, 1.0) == []
    assert kinds(a.tick(106.0, 1.0)) == ["send_abort", "finished"]


def test_a_rank_dying_aborts_before_the_flip_only() -> None:
    a = attempt()
    eff = a.on_rank_lost(2, "agent n1 is dead", 101.0, 1.0)
    assert kinds(eff) == ["send_abort", "finished"] and a.state == "aborted"
    assert "agent n1 is dead" in a.reason

    b = attempt()
    for r in range(3):
        b.on_staged(r, True, "", 1, 101.0, 1.0)
    b.on_committed(0, 9, 102.0, 1.0)
    assert b.on_rank_lost(1, "left", 102.0, 1.0) == []  # after the flip nothing can abort
    assert kinds(b.on_committed(2, 9, 102.5, 1.0)) == ["finished"]
    assert b.state == "committed"
    assert any("lost before reporting" in f for f in b.flags)


def test_worker_aborted_message_aborts() -> None:
    a = attempt()
    assert kinds(a.on_aborted(0, "bad layout", 101.0, 1.0)) == ["send_abort", "finished"]
    assert a.aborted_by == {0: "bad layout"}


def test_commit_is_the_truth_even_after_an_abort_or_missing_staged() -> None:
    a = attempt()
    a.on_staged(0, True, "", 1, 101.0, 1.0)
    assert kinds(a.on_committed(1, 40, 101.5, 1.0)) == ["applied"]
    assert any("before every staged" in f for f in a.flags)

    b = attempt()
    b.tick(200.0, 1.0)
    assert b.state == "aborted"
    assert kinds(b.on_committed(0, 40, 201.0, 2.0)) == ["applied"]
    assert b.state == "committing" and b.reason == ""
    assert any("although aborted" in f for f in b.flags)


def test_missing_reports_and_step_disagreement_are_flagged() -> None:
    a = attempt()
    for r in range(3):
        a.on_staged(r, True, "", 1, 101.0, 1.0)
    a.on_committed(0, 40, 102.0, 1.0)
    a.on_committed(1, 41, 102.0, 1.0)
    assert kinds(a.tick(107.0, 2.0)) == ["finished"]
    assert a.state == "committed"
    assert any("no commit report from rank(s) [2]" in f for f in a.flags)
    assert any("different commit steps" in f for f in a.flags)
    assert a.abort("too late", 3.0) == []


def test_persisted_form_round_trips_with_a_fresh_deadline() -> None:
    a = attempt()
    a.on_staged(1, True, "", 77, 101.0, 1.0)
    b = Attempt.from_dict(a.to_dict(), now=5.0)
    assert b.restored and b.epoch == 7 and b.staged == {1: 77} and b.state == "preparing"
    assert b.deadline == 15.0 and b.layout == a.layout
