"""What the planner records a rank serves when its agent re-tells it (issue 14).

An agent whose relayed ``committed`` was lost (its own stall, a dropped connection) sends a
``worker_joined`` with the worker's hello, same incarnation, carrying the epoch it serves.
The planner must register that epoch for the rank (status shows it), count it as the rank's
commit report, and not treat it as a restart. PlannerCore without sockets, as in
test_controller_core.
"""

from __future__ import annotations

from test_controller_core import Harness, _prepare_epoch, h, hello  # noqa: F401 (fixture h)

from eplbd.wire import COMMITTED, STAGED, WORKER_JOINED


def test_a_re_told_epoch_is_registered_and_completes_the_commit(h: Harness) -> None:  # noqa: F811
    h.hello_all()
    e = _prepare_epoch(h)
    for r in (0, 1):
        h.answer(STAGED, e, r, ok=True, reason="", staged_bytes=1)
    h.answer(COMMITTED, e, 1, step=64)  # rank 0's committed never arrives
    ranks = h.core.status()["groups"][0]["ranks"]
    assert [rk["epoch"] for rk in ranks] == [0, e]
    joined = {
        "agent": "a0",
        "group": "g",
        "ep_rank": 0,
        "worker": "w0",
        "incarnation": "wi0",
        "hello": hello(0, epoch=e),
        "epoch": e,
        "node": "n0",
    }
    h.send(b"a0", WORKER_JOINED, joined)
    g = h.core.status()["groups"][0]
    assert [(rk["state"], rk["epoch"]) for rk in g["ranks"]] == [("alive", e), ("alive", e)]
    assert g["epoch"] == e and g["pending"] is None
    (last,) = [a for a in h.core.status("history")["groups"][0]["attempts"] if a["epoch"] == e]
    assert last["state"] == "committed" and not last["lost"]
