"""``eplbd demo`` end to end, small: 2 workers, 2 layers, a few hundred steps.

The real thing (agent with the embedded planner as a subprocess, workers on gloo, EplbClient,
the reference MoE stack), checked through its JSON summary: every output matched the no-EPLB
reference, at least one rebalance committed with every rank flipping at the same step, and
the measured balance after is better than before. Then Ctrl-C in the middle: every process
and the temporary directory are gone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _e2e import threads_of

from eplbd.demo import Balance, DemoConfig, PlannerTuning, StepRecord, lower_bound_max
from eplbd.demo._trace import default_trace_path, load_trace, pick_layers

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--workers", "2", "--layers", "2", "--tokens", "48"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}


def _run_dir(stderr: str) -> Path:
    m = re.search(r"--runtime-dir (\S+)/rt", stderr)
    assert m, stderr
    return Path(m.group(1))


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            pids.append(int(d.name))
    return pids


def _gone(run_dir: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not run_dir.exists() and not _processes_mentioning(str(run_dir)):
            return True
        time.sleep(0.1)
    return False


# --- the pure parts ---------------------------------------------------------------------------


def test_lower_bound_max() -> None:
    # one hot expert: replicas on both GPUs halve it; the rest does not matter
    assert lower_bound_max([10, 0, 0, 0], num_gpus=2, num_physical=6) == 5.0
    # even load: the mean is the bound
    assert lower_bound_max([1, 1, 1, 1], num_gpus=2, num_physical=4) == 2.0
    # no redundant slot: the hottest expert whole
    assert lower_bound_max([6, 1, 1, 0], num_gpus=2, num_physical=4) == 6.0
    # at most one replica per GPU: 9 / 2 = 4.5, below the mean 12 / 2
    assert lower_bound_max([9, 3], num_gpus=2, num_physical=6) == 6.0
    assert lower_bound_max([0, 0], num_gpus=2, num_physical=2) == 0.0


def test_balance_is_sum_of_max_over_sum_of_mean() -> None:
    b = Balance(num_layers=2, num_gpus=2, num_physical=4)
    b.add(
        StepRecord(
            0, 0, live=[[3, 1], [2, 2]], static=[[4, 0], [2, 2]], experts=[[3, 1], [2, 2]], err=0.0
        )
    )
    b.add(
        StepRecord(
            1, 0, live=[[2, 2], [1, 3]], static=[[4, 0], [0, 4]], experts=[[2, 2], [1, 3]], err=0.0
        )
    )
    assert b.steps == 2
    assert b.live(0) == (3 + 2) / (2 + 2)
    assert b.live(1) == (2 + 3) / (2 + 2)
    assert b.live() == (3 + 2 + 2 + 3) / 8
    assert b.static() == (4 + 2 + 4 + 4) / 8
    assert b.lower_bound() is not None and b.lower_bound() <= b.live()
    assert Balance(1, 2, 2).live() is None  # no steps: unknown, not 1.0


def test_config_round_trip() -> None:
    c = DemoConfig(
        workers=3,
        trace="x.npz",
        trace_layers=(0, 5),
        tuning=PlannerTuning(cooldown_s=7, forecast="regime"),
    )
    assert DemoConfig.from_json(c.to_json()) == c
    assert c.tuning.planner_env()["EPLBD_PLANNER_FORECAST"] == "regime"
    with pytest.raises(ValueError):
        DemoConfig(workers=2, experts=16, slots_per_gpu=4).check()


def test_trace_replay_slices() -> None:
    assert pick_layers(26, 4) == [0, 8, 17, 25]
    assert pick_layers(26, 1) == [0]
    t = load_trace(default_trace_path(), [0, 25])
    assert t.domains == ("intent", "law", "summary", "translation")
    assert t.num_experts == 64 and t.top_k == 6 and t.num_layers == 2
    steps, workers, tokens = 40, 2, 8
    a = t.step_ids(0, steps, 0, workers, tokens)
    b = t.step_ids(0, steps, 1, workers, tokens)
    c = t.step_ids(1, steps, 0, workers, tokens)
    assert a.shape == (tokens, 2, 6) and a.dtype == np.int64
    src = t.ids[0]
    assert np.array_equal(a, src[0:8]) and np.array_equal(b, src[8:16])
    assert np.array_equal(c, src[16:24])  # consecutive tokens, rank after rank
    assert t.domain_of(9, steps) == 0 and t.domain_of(10, steps) == 1
    assert np.array_equal(t.step_ids(10, steps, 0, workers, tokens), t.ids[1][0:8])


def _bad_traces(d: Path) -> list[tuple[Path, str]]:
    """Files a user may pass to --trace by mistake, with what the one line must say."""
    cases = []
    npy = d / "law.npy"  # one domain's ids saved with np.save: a .npy, not the .npz archive
    np.save(npy, np.zeros((3, 4, 2), dtype=np.uint8))
    cases.append((npy, "a single .npy array"))
    garbage = d / "garbage.npz"
    garbage.write_bytes(bytes(range(256)) * 4)
    cases.append((garbage, "not an .npz archive"))
    truncated = d / "truncated.npz"
    truncated.write_bytes(default_trace_path().read_bytes()[:5000])
    cases.append((truncated, "not an .npz archive"))
    pickled = d / "objects.npz"
    np.savez(pickled, law_topk_ids=np.array([{"a": 1}], dtype=object))
    cases.append((pickled, "law_topk_ids"))
    other = d / "other.npz"
    np.savez(other, counts=np.zeros((2, 2)))
    cases.append((other, "no <domain>_topk_ids arrays"))
    floats = d / "floats.npz"
    np.savez(floats, law_topk_ids=np.full((4, 2, 2), 1.5))
    cases.append((floats, "integer expert ids"))
    negative = d / "negative.npz"
    np.savez(negative, law_topk_ids=np.full((4, 2, 2), -3, dtype=np.int64))
    cases.append((negative, "negative expert id"))
    cases.append((d / "missing.npz", "no such file"))
    return cases


def test_a_bad_trace_file_is_one_line_and_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from eplbd.cli.main import main

    for path, msg in _bad_traces(tmp_path):
        assert main(["demo", "--trace", str(path), *SMALL]) == 78, path.name
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("eplbd demo: "), err
        assert msg in err and str(path) in err, (path.name, err)
    # and as a process: one line on stderr, no traceback
    p = subprocess.run(
        [sys.executable, "-m", "eplbd", "demo", "--trace", str(tmp_path / "law.npy"), *SMALL],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=150,
    )
    assert p.returncode == 78 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("forecast", ["ewma", "regime"])
def test_demo_rebalances_and_outputs_match(forecast: str) -> None:
    argv = [sys.executable, "-m", "eplbd", "demo", *SMALL, "--steps", "160", "--json"]
    p = subprocess.run(
        [*argv, "--forecast", forecast],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=170,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(p.stdout)
    assert s["schema_version"] >= 1
    assert s["steps"] == 160 and s["workers"] == 2 and s["layers"] == 2
    assert s["forecast"] == forecast
    assert s["outputs_match"] is True and s["max_abs_error"] <= s["tolerance"]
    assert s["rebalances"] >= 1 and s["epochs"] >= 1
    assert s["committed_on_all_ranks"] is True
    assert s["moves"] > 0
    b = s["balance"]
    assert b["steps_before"] > 0 and b["steps_after"] > 0
    assert b["after"] < b["before"]
    assert b["after"] < b["after_without_eplbd"]  # the same tokens on the initial layout
    first = s["rebalance_list"][0]
    assert first["balance_after"] < first["balance_before"]
    assert first["commit_latency_s"] is not None and first["commit_latency_s"] > 0
    assert s["commit_latency_s"]["count"] == s["rebalances"]
    # nothing left behind
    assert _gone(_run_dir(p.stderr))


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_demo_ctrl_c_cleans_up() -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "eplbd", "demo", *SMALL, "--steps", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=ROOT,
        # Ctrl-C as at a terminal: a shell runs a background job (`pytest ... &`) with SIGINT
        # ignored, its children inherit that, and Python then installs no handler: the demo
        # would go on serving (what failed here twice, not a slow cleanup)
        preexec_fn=_sigint_default,
    )
    seen = ""
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 120
        while "workers (EP ranks on gloo)\n" not in seen and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            seen += line
        assert "- starting 2 workers" in seen, seen
        run_dir = _run_dir(seen)
        t0 = time.monotonic()  # the line comes just before the workers are spawned
        while len(_processes_mentioning(str(run_dir))) < 3 and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert (
            run_dir.exists() and len(_processes_mentioning(str(run_dir))) >= 3
        )  # agent, 2 workers
        p.send_signal(signal.SIGINT)
        # A deadline, not a speed limit: the demo's cleanup waits up to 3 s per worker and
        # 5 s for the agent (plus 5 s after each SIGKILL), and a loaded CI machine can starve
        # it.
        try:
            rest, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired as e:
            left = {pid: threads_of(pid) for pid in _processes_mentioning(str(run_dir))}
            out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output
            pytest.fail(
                f"the demo did not exit within 120 s of Ctrl-C; processes left: {left}; "
                f"its output after the banner:\n{seen}{out or ''}"
            )
        assert p.returncode == 130, seen + rest
        assert _gone(run_dir)
    finally:
        if p.poll() is None:  # a failed assertion: let the demo clean up, then insist
            p.send_signal(signal.SIGINT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
