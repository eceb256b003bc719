"""EplbClient in real multi-process EP groups (gloo on CPU; NCCL variants need 2 GPUs).

The reference MoE stack runs while layouts change (tests/_client_scenarios.py has the script), and
every rank's record is checked here: outputs equal to the no-EPLB reference at every step,
one epoch per step across the group, aborted / late / refused epochs never served, snapshots
that add up to the routed load and never span an epoch change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _client_scenarios import NUM_PHYSICAL, SHARE_STEPS, STEPS, SYNC, layouts, make_pool
from _mp import run_ranks

pytestmark = pytest.mark.slow


def _by_type(msgs: list[Any], t: str) -> list[dict[str, Any]]:
    return [b for typ, b, _ in msgs if typ == t]


def _check_run(res: list[dict[str, Any]], world: int) -> None:
    lay = layouts(world)
    # (1) every output equals the no-EPLB reference, in every step.
    for r, out in enumerate(res):
        worst = max(out["errors"])
        assert worst < 1e-10, f"rank {r}: output differs from the reference by {worst}"
    # (2) one epoch per step across the group; switches only at consensus steps.
    epochs = [out["epochs"] for out in res]
    for r in range(1, world):
        diff = [s for s in range(STEPS) if epochs[r][s] != epochs[0][s]]
        assert not diff, f"rank {r} served another epoch than rank 0 at steps {diff[:5]}"
    served = epochs[0]
    assert sorted(set(served)) == [0, 1, 3, 6], served
    switches = [s for s in range(1, STEPS) if served[s] != served[s - 1]]
    assert len(switches) == 3 and all(s % SYNC == 0 for s in switches), switches
    for r, out in enumerate(res):
        assert torch.equal(out["final_phy2log"], lay[6])
        assert out["weights_ok"], f"rank {r}: live weights do not match the final layout"
        committed = _by_type(out["msgs"], "committed")
        assert [b["epoch"] for b in committed] == [1, 3, 6]
        assert [b["step"] for b in committed] == switches
        assert all(b["ep_rank"] == r and b["worker"] == f"w{r}" for b in committed)
        # (3) refused, aborted and late epochs leave every rank on the old layout.
        aborted = {b["epoch"]: b["reason"] for b in _by_type(out["msgs"], "aborted")}
        assert {2, 4, 5, 7} <= set(aborted), aborted
        assert "different layouts" in aborted[7], aborted[7]
        staged = {b["epoch"] for b in _by_type(out["msgs"], "staged")}
        assert {1, 3, 6} <= staged
        assert staged <= {1, 2, 3, 4, 5, 6, 7}
        stats = out["stats"]
        assert stats.get("outbox_dropped", 0) == 0 and stats.get("snapshots_dropped", 0) == 0
        assert stats["received_prepare"] == (2 if r % 2 else 1)
    r0 = res[0]
    assert "no replica" in r0["refused"][2] and "no replica" in _aborted(r0, 2)
    assert 2 not in {b["epoch"] for b in _by_type(r0["msgs"], "staged")}
    assert _aborted(r0, 4) == "test abort"
    assert "deadline missed" in _aborted(r0, 5), _aborted(r0, 5)
    for r in range(1, world - 1):
        reason = _aborted(res[r], 5)
        assert "deadline missed" in reason or "failed on another rank" in reason, reason
    assert "already failed" in res[-1]["refused"][5]
    for r in range(1, world):
        # Dropped at a round, or refused when the prepare came after the group's verdict.
        for e in (2, 4):
            reason = _aborted(res[r], e)
            assert "failed on another rank" in reason or "already failed" in reason, reason
    # Snapshots: the routed load of their steps, all in one epoch, tagged with it.
    for r, out in enumerate(res):
        snaps = [(b, ts["counts"]) for typ, b, ts in out["msgs"] if typ == "snapshot"]
        assert len(snaps) >= 15
        assert [b["seq"] for b, _ in snaps] == list(range(len(snaps)))
        prev_end = 0
        for b, counts in snaps:
            s0, s1 = b["step_start"], b["step_end"]
            assert prev_end <= s0 < s1 <= s0 + 4
            prev_end = s1
            assert {out["epochs"][s] for s in range(s0, s1)} == {b["epoch"]}
            assert counts.shape == (2, NUM_PHYSICAL) and counts.dtype == torch.int32
            assert torch.equal(counts.long(), out["loads"][s0:s1].sum(0)), (r, s0, s1)
            assert b["tokens"] == sum(out["tokens"][s0:s1])


def _aborted(out: dict[str, Any], epoch: int) -> str:
    return next(b["reason"] for b in _by_type(out["msgs"], "aborted") if b["epoch"] == epoch)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("world", "source", "gpus_per_node"),
    [(2, "peer", 1), (2, "pool", 2), (4, "peer", 2), (4, "pool", 4)],
)
def test_layout_changes_gloo(tmp_path: Path, world: int, source: str, gpus_per_node: int) -> None:
    if source == "pool":
        make_pool(tmp_path)
    res = run_ranks(
        "layout_changes",
        world,
        tmp_path,
        timeout_s=100,
        source=source,
        gpus_per_node=gpus_per_node,
    )
    _check_run(res, world)


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("source", ["peer", "pool"])
def test_layout_changes_nccl(tmp_path: Path, source: str) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if source == "pool":
        make_pool(tmp_path)
    res = run_ranks(
        "layout_changes",
        2,
        tmp_path,
        timeout_s=280,
        backend="nccl",
        source=source,
        gpus_per_node=2,
    )
    _check_run(res, 2)


@pytest.mark.timeout(60)
def test_peer_source_transfers_and_gives_up_together(tmp_path: Path) -> None:
    res = run_ranks("peer_source_direct", 4, tmp_path, timeout_s=50)
    assert all(r["ok"] for r in res)
    assert sum(r["wanted"] for r in res) > 0
    expert_bytes = (2 * 32 * 16 + 16 * 32) * 8  # w13 + w2 of one expert, float64
    assert all(r["received"] == r["wanted"] * expert_bytes for r in res)  # each expert once
    assert res[0]["rounds"] > 1  # chunk_bytes forced several rounds
    for r in res:
        assert "could not set up" in r["errors"][0], r["errors"]
        assert r["errors"][1] == ""  # second attempt: transfers nothing, succeeds on every rank


@pytest.mark.timeout(120)
def test_weighted_splits_keep_outputs_and_flip_every_rank_at_one_step(tmp_path: Path) -> None:
    world = 2
    res = run_ranks("share_changes", world, tmp_path, timeout_s=100)
    a = layouts(world)[1]
    for r, out in enumerate(res):
        worst = max(out["errors"])
        assert worst < 1e-10, f"rank {r}: output differs from the reference by {worst}"
    served = res[0]["epochs"]
    for r in range(1, world):
        diff = [s for s in range(SHARE_STEPS) if res[r]["epochs"][s] != served[s]]
        assert not diff, f"rank {r} served another epoch than rank 0 at steps {diff[:5]}"
    assert sorted(set(served)) == [0, 1, 2, 5], served
    switches = [s for s in range(1, SHARE_STEPS) if served[s] != served[s - 1]]
    assert len(switches) == 3 and all(s % SYNC == 0 for s in switches), switches
    for r, out in enumerate(res):
        committed = _by_type(out["msgs"], "committed")
        assert [b["epoch"] for b in committed] == [1, 2, 5]
        assert [b["step"] for b in committed] == switches
        lay = out["layout"]
        assert torch.equal(lay.phy2log, a) and lay.share is None and out["weights_ok"]
        # a share-only change stages the maps and nothing else
        staged = {b["epoch"]: b["staged_bytes"] for b in _by_type(out["msgs"], "staged")}
        assert staged[1] > out["map_bytes"]
        assert staged[2] == out["map_bytes"] and staged[5] == out["map_bytes"]
        aborted = {b["epoch"]: b["reason"] for b in _by_type(out["msgs"], "aborted")}
        assert {3, 4} <= set(aborted), aborted
        assert "different layouts" in aborted[4], aborted[4]
        # the split is real: a slot with share 0 receives no rows, and the others do
        for e, share in out["shares"].items():
            steps = [s for s in range(SHARE_STEPS) if served[s] == e]
            routed = out["loads"][steps].sum(dim=0)
            assert int(routed[share == 0].sum()) == 0, (r, e)
            assert int((routed[share > 0] > 0).sum()) > 0.8 * int((share > 0).sum()), (r, e)
    r0 = res[0]
    assert "negative" in _aborted(r0, 3) and 3 not in {
        b["epoch"] for b in _by_type(r0["msgs"], "staged")
    }
