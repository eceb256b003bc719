"""The end-to-end GPU benchmark (benchmarks/bench_e2e_gpu.py) on the CPU.

- the whole job, tiny dimensions, EP = 2 on gloo, with the real agent and embedded planner:
  four runs per mode, outputs equal to the no-balancing run, DeepSeek's layout installed
  through the client (weights fetched from the peer), DeepSeek recomputed every N steps with
  every rank stopped at the same steps, the online client registered and shipping
  snapshots to a planner with the time objective, the docs left alone;
- the DeepSeek-V3 preset: P = 288 at EP = 8, synthetic routing of that size;
- in one process, one rank: the output check passes for a rebalanced layout and fails for a
  wrong expert (so the job's "equal" means something);
- the docs section keeps the block of each group size when another one is written;
- the weights are a function of their key only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks._e2e_model import (  # noqa: E402
    Dims,
    EPStack,
    compare_outputs,
    fingerprint_vector,
    hash_values,
    pick_gemm,
    step_inputs,
)
from benchmarks._e2e_report import doc_section  # noqa: E402

TRACE = ROOT / "benchmarks" / "data" / "esft_routing_ids.npz"


@pytest.mark.slow
@pytest.mark.timeout(170)
def test_tiny_job_on_cpu_runs_all_four_and_outputs_match(tmp_path: Path) -> None:
    out = tmp_path / "out"
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_bytes() if doc.exists() else None
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "clients"), *([env["PYTHONPATH"]] if "PYTHONPATH" in env else [])]
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_e2e_gpu",
            "--device",
            "cpu",
            "--world-size",
            "2",
            "--tiny",
            "--doc",
            "no",
            "--timeout-s",
            "140",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=160,
    )
    # a rank's dying words (a library's assertion, faulthandler's stacks) can sit far above
    # the agent log's tail: show every line that is not a JSON log record too
    raw = [ln for ln in proc.stderr.splitlines() if not ln.startswith("{")]
    assert proc.returncode == 0, (
        proc.stdout[-3000:] + proc.stderr[-5000:] + "\nnot log records:\n" + "\n".join(raw[-80:])
    )
    saved = json.loads((out / "e2e.json").read_text())
    md = (out / "e2e.md").read_text()
    summary, result = saved["summary"], saved["result"]
    assert summary["world_size"] == 2 and not summary["degenerate"]
    assert summary["outputs_ok"] is True
    assert [m["mode"] for m in result["modes"]] == ["decode", "prefill"]
    for m in result["modes"]:
        runs = {r["run"]: r for r in m["runs"]}
        assert list(runs) == ["none", "deepseek", "deepseek-every-n", "eplbd"]
        for r in runs.values():
            assert r["steps"] == m["steps"] and len(r["moe_ms"]) == m["steps"]
            assert r["moe_ms_median"] > 0 and r["balance"] >= 1.0 and r["time_balance"] >= 1.0
            assert r["commits_agree"] is True
        assert runs["none"]["check"] is None and runs["none"]["epoch_final"] == 0
        for name in ("deepseek", "deepseek-every-n", "eplbd"):
            c = runs[name]["check"]
            assert c["ok"] is True and c["violations"] == 0 and c["fingerprint_violations"] == 0
            assert c["steps_fingerprint"] == m["steps"] and c["steps_full"] >= 1
        ins = runs["deepseek"]["install"]
        assert runs["deepseek"]["epoch_final"] == 1 and ins["epoch"] == 1
        assert ins["moves"] > 0 and ins["fetched_bytes"] > 0  # experts came from the peer
        assert runs["deepseek"]["sync_interval"] > 0 and runs["none"]["sync_interval"] == 0
        every = runs["deepseek-every-n"]
        n = m["every"]["n"]
        assert [b["step"] for b in every["rebalances"]] == list(range(n, m["steps"], n))
        moved = [b for b in every["rebalances"] if b["moves"]]
        assert moved and every["epoch_final"] == len(moved)  # one epoch per real change
        assert all(b["stall_ms"] > 0 and b["fetched_bytes"] > 0 for b in moved)
        assert every["commits"] == []  # nothing applied outside the stop-the-world steps
        online = runs["eplbd"]
        assert online["client_stats"].get("received_welcome", 0) >= 1
        assert online["client_stats"].get("snapshots", 0) > 0  # recorded and shipped
        assert online["epoch_final"] - online["epoch_start"] == len(online["commits"])
        for c in online["commits"]:  # whatever the planner committed, the ranks agreed
            assert c["moves"] > 0 or c["split_changed"]  # time objective: a new split only
    for mode in ("decode", "prefill"):  # the embedded planner balanced modelled time
        decisions = saved["history"][mode]["groups"][0]["decisions"]
        assert decisions and {d["objective"] for d in decisions} == {"time"}
    assert result["config"]["objective"] == "time" and "Online planner objective: **time**" in md
    for name in ("| none |", "| deepseek |", "| deepseek-every-n |", "| eplbd |", "**decode**"):
        assert name in md
    assert "**prefill**" in md and "stall median" in md
    after = doc.read_bytes() if doc.exists() else None
    assert after == before


def _stack(dims: Dims, layout: torch.Tensor | None = None, gemm: str = "loop") -> EPStack:
    from eplbd_client import EplbClient

    c = EplbClient(len(dims.layers), dims.experts, 72)
    stack = EPStack(dims, c, None, torch.device("cpu"), gemm)
    if layout is not None:
        c.prepare(layout, 1)
        deadline = time.monotonic() + 60
        while c.epoch != 1 and time.monotonic() < deadline:
            c.step()  # the staging thread copies the replicas; the next step applies them
            time.sleep(0.001)
        assert c.epoch == 1
    return stack


def _outputs(stack: EPStack, dims: Dims, ids: torch.Tensor, steps: int, T: int) -> torch.Tensor:
    return torch.stack(
        [
            stack.forward(step_inputs(dims, s, 0, T, "cpu"), ids[s * T : (s + 1) * T])
            for s in range(steps)
        ]
    )


def test_output_check_passes_a_rebalanced_layout_and_catches_a_wrong_expert() -> None:
    from benchmarks._e2e_worker import deepseek_layout, trace_load
    from eplbd.demo._trace import load_trace

    layers = (0, 12, 25)
    dims = Dims(hidden=64, ffn=48, experts=64, top_k=6, layers=layers)
    tr = load_trace(TRACE, list(layers))
    ids = torch.from_numpy(tr.ids[1])
    T, steps = 32, 3
    v = fingerprint_vector(dims, "cpu")

    def check(y: torch.Tensor, ref: torch.Tensor) -> bool:
        fp = (y.float() @ v).reshape(steps, T)
        fr = (ref.float() @ v).reshape(steps, T)
        return compare_outputs(y, ref, fp, fr).ok

    ref = _outputs(_stack(dims), dims, ids, steps, T)
    layout = deepseek_layout(trace_load(list(tr.ids), 64), 72, 1)
    assert (layout != torch.arange(72).remainder(64)).any()
    balanced = _stack(dims, layout)
    assert check(_outputs(balanced, dims, ids, steps, T), ref)

    # one rank, grouped GEMMs: the path with no host synchronisation (CUDA-graphed on a GPU)
    if pick_gemm("auto", torch.device("cpu"), dims.dtype)[0] == "grouped":
        assert check(_outputs(_stack(dims, layout, "grouped"), dims, ids, steps, T), ref)

    # slot 3 of layer 1 computes another expert's FFN: a stale or misplaced weight
    wrong = _stack(dims, layout)
    w13, w2 = wrong.w13[1], wrong.w2[1]
    other = int((layout[1] != layout[1, 3]).nonzero()[0])
    w13[3].copy_(w13[other])
    w2[3].copy_(w2[other])
    assert not check(_outputs(wrong, dims, ids, steps, T), ref)


def test_v3_preset_and_synthetic_routing(tmp_path: Path) -> None:
    from benchmarks.bench_e2e_gpu import _parse, build_config, write_synthetic_trace
    from eplbd.demo._trace import load_trace

    cfg = build_config(_parse(["--device", "cpu", "--world-size", "8", "--shape", "v3"]))
    assert (cfg.hidden, cfg.ffn, cfg.experts, cfg.top_k) == (7168, 2048, 256, 8)
    assert cfg.num_physical == 288 and cfg.routing == "synthetic" and cfg.objective == "time"
    assert cfg.planner_env()["EPLBD_PLANNER_EXPERT_SHAPE"] == "7168,2048"
    cfg.check()
    with pytest.raises(ValueError, match="ESFT"):
        build_config(_parse(["--device", "cpu", "--shape", "v3", "--routing", "esft"])).check()
    tiny = build_config(_parse(["--device", "cpu", "--tiny", "--shape", "v3", "--layers", "3"]))
    write_synthetic_trace(tmp_path / "t.npz", tiny)
    tr = load_trace(tmp_path / "t.npz")
    assert tr.domains == tiny.domains and len(tr.domains) == 4
    assert all(a.shape == (tiny.synthetic_tokens, 3, 8) for a in tr.ids)
    load = torch.bincount(torch.from_numpy(tr.ids[0][:, 0].ravel()), minlength=256).double()
    assert int(load.gt(0).sum()) > 200 and load.max() > 3 * load.mean()  # V3-size, skewed
    assert not (tr.ids[0] == tr.ids[1]).all()  # each domain its own popularity


def test_doc_section_keeps_each_group_size() -> None:
    first = doc_section(None, "ws2", "two GPUs\n")
    assert "<!-- e2e:ws2 -->\ntwo GPUs\n<!-- /e2e:ws2 -->" in first
    assert "Not yet run: EP = 4" in first
    assert "EP = 8 (DeepSeek-V3 shapes)" in first
    both = doc_section(first, "ws4", "four GPUs\n")
    assert "two GPUs" in both and "four GPUs" in both and "Not yet run: EP = 8" in both
    assert "EP = 4" not in both.split("Not yet run", 1)[1]
    cpu = doc_section(both, "ws8-cpu-v3-host", "CPU\n")  # a CPU job is never "measured"
    assert "CPU" in cpu and "Not yet run: EP = 8 (DeepSeek-V3 shapes)" in cpu
    assert both.index("e2e:ws2") < both.index("e2e:ws4")
    again = doc_section(both, "ws2", "two GPUs, rerun\n")
    assert again.count("<!-- e2e:ws2 -->") == 1 and "two GPUs, rerun" in again
    assert "four GPUs" in again
    assert "--world-size 2" in again and "--world-size 4" in again


def test_hashed_values_depend_on_key_and_index_only() -> None:
    a = hash_values(10_000, "cpu", 1, 2, 3)
    assert a.dtype == torch.int64 and int(a.min()) >= -128 and int(a.max()) <= 127
    assert torch.equal(a, hash_values(10_000, "cpu", 1, 2, 3))
    assert torch.equal(a[:100], hash_values(100, "cpu", 1, 2, 3))
    b = hash_values(10_000, "cpu", 1, 2, 4)
    assert (a != b).float().mean() > 0.9
    counts = torch.bincount(a + 128, minlength=256).float()
    assert counts.min() > 0.5 * counts.mean()  # every level used, roughly uniformly
