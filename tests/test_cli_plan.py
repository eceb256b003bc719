"""``eplbd plan``: load files, table and JSON output, layout files, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eplbd.cli.main import main
from eplbd.layout import Layout
from eplbd.planner import balance, plan

ROOT = Path(__file__).resolve().parent.parent


def _load(L: int = 3, E: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(rng.random((L, E)) ** 3 * 1000)


@pytest.fixture
def loadfile(tmp_path: Path) -> Path:
    p = tmp_path / "load.json"
    p.write_text(json.dumps(_load().tolist()))
    return p


def test_table(loadfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(loadfile), "--gpus", "4", "--slots", "20"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = ["layer", "before", "after", "bound", "moves", "active", "changed", "reason"]
    assert lines[0].split() == head
    assert [ln.split()[0] for ln in lines[1:4]] == ["0", "1", "2"]
    assert "from scratch" in lines[1]
    assert "balance (sum max / sum mean)" in out and "moves:" in out
    # the figures are those of the planner
    lay = plan(_load(), num_gpus=4, num_physical_experts=20)
    after = balance(_load(), lay, 4)
    assert float(lines[1].split()[2]) == pytest.approx(float(after[0]), abs=5e-4)


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".json"])
def test_json_and_output_file(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    w = _load(seed=1)
    src = tmp_path / f"load{suffix}"
    if suffix == ".npy":
        np.save(src, w.astype(np.int64))
    elif suffix == ".pt":
        torch.save(torch.from_numpy(w).float(), src)
    else:
        src.write_text(json.dumps({"load": w.tolist()}))
    out_file = tmp_path / "layout.json"
    rc = main(
        [
            "plan",
            str(src),
            "--gpus",
            "4",
            "--slots",
            "20",
            "--nodes",
            "2",
            "--json",
            "-o",
            str(out_file),
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == 1
    lay = Layout.from_dict(doc["layout"])
    assert lay == Layout.from_json(out_file.read_text())
    assert lay == plan(w, num_gpus=4, num_physical_experts=20, num_nodes=2)
    figs = doc["figures"]
    assert len(figs["layers"]) == 3
    assert figs["summary"]["num_gpus"] == 4 and figs["summary"]["num_nodes"] == 2
    assert figs["summary"]["bound_ratio"] >= 1.0


def test_previous_layout_and_policies(
    loadfile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prev = tmp_path / "prev.json"
    assert main(["plan", str(loadfile), "--gpus", "4", "--slots", "20", "-o", str(prev)]) == 0
    capsys.readouterr()
    # planning again from the plan of the same load changes nothing
    assert (
        main(
            [
                "plan",
                str(loadfile),
                "--gpus",
                "4",
                "--slots",
                "20",
                "--previous",
                str(prev),
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["figures"]["summary"]["moves"] == 0
    assert Layout.from_dict(doc["layout"]) == Layout.from_json(prev.read_text())
    rc = main(
        ["plan", str(loadfile), "--gpus", "4", "--slots", "20", "--policy", "deepseek", "--json"]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert {r["reason"] for r in doc["figures"]["layers"]} == {"baseline"}


def test_move_budget_flag(
    loadfile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = tmp_path / "start.json"
    start.write_text(Layout.default(3, 16, 20).to_json())
    args = [
        "plan",
        str(loadfile),
        "--gpus",
        "4",
        "--slots",
        "20",
        "--previous",
        str(start),
        "--json",
    ]
    assert main([*args, "--max-moves", "6"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["figures"]["summary"]["moves"] <= 6
    assert main([*args, "--min-gain", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["figures"]["summary"]["moves"] == 0
    assert main([*args, "--move-cost", "1000"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["figures"]["summary"]["moves"] == 0
    assert {r["reason"] for r in doc["figures"]["layers"]} == {"not_worth_moves"}


def _bad(tmp_path: Path, name: str, content: bytes | str) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


@pytest.mark.parametrize(
    ("name", "content", "extra", "msg"),
    [
        ("missing.json", None, [], "no such file"),
        ("load.csv", "1,2\n", [], "unsupported file type"),
        ("load.json", "{not json", [], "cannot read"),
        ("load.json", "[[1, 2], [3]]", [], "rectangular"),
        ("load.json", '[[1, "a"]]', [], "must be numbers"),
        ("load.json", "[1, 2, 3]", [], "list of lists"),
        ("load.json", "[[1, -2, 3, 4]]", [], "negative"),
        ("load.npy", b"garbage", [], "cannot read"),
        ("load.pt", b"garbage", [], "cannot read"),
        ("load.json", "[[1, 2, 3, 4]]", ["--slots", "5"], "cannot be split evenly over 2 GPUs"),
        ("load.json", "[[1, 2, 3, 4]]", ["--slots", "2"], "cannot hold 4"),
        ("load.json", "[[1, 2, 3, 4]]", ["--nodes", "3"], "over 3 nodes"),
        ("load.json", "[[1, 2, 3, 4]]", ["--previous", "nope.json"], "no such file"),
        ("load.json", "[[1, 2, 3, 4]]", ["--max-moves", "-3"], "max_moves"),
        ("load.json", "[[1, 2, 3, 4]]", ["--move-cost", "-1"], "move_cost"),
    ],
)
def test_bad_input_exits_78_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str | None,
    extra: list[str], msg: str,
) -> None:  # fmt: skip
    path = tmp_path / name if content is None else _bad(tmp_path, name, content)
    args = ["plan", str(path), "--gpus", "2", "--slots", "4", *extra]
    if "--slots" in extra:
        args = ["plan", str(path), "--gpus", "2", *extra]
    if "--previous" in extra:
        args[-1] = str(tmp_path / "nope.json")
    assert main(args) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eplbd plan: error:") and msg in err


def test_nan_and_bad_previous(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([[1.0, float("nan")]]))
    assert main(["plan", str(nan), "--gpus", "1", "--slots", "2"]) == 78
    assert "not finite" in capsys.readouterr().err
    good = _bad(tmp_path, "load.json", "[[1, 2, 3, 4]]")
    wrong = _bad(tmp_path, "prev.json", Layout.default(1, 4, 8).to_json())
    assert main(["plan", str(good), "--gpus", "2", "--slots", "4", "--previous", str(wrong)]) == 78
    assert "previous layout has 1 layers x 4 experts x 8 slots" in capsys.readouterr().err
    garbage = _bad(tmp_path, "g.json", '{"schema_version": 99}')
    assert (
        main(["plan", str(good), "--gpus", "2", "--slots", "4", "--previous", str(garbage)]) == 78
    )
    assert "schema_version" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "msg"),
    [
        ("[[1e308, 1e308, 1e308, 1e308]]", "above"),  # sums overflow to inf, then nan
        ("[[3.5e38, 1, 2, 3]]", "above"),  # beyond float32
        ("[[1e16, 1, 2, 3]]", "above"),
        ("[[Infinity, 1, 2, 3]]", "not finite"),
        ("[[1, 2, 3, NaN]]", "not finite"),
    ],
)
def test_loads_out_of_range_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, msg: str
) -> None:
    """Nothing is planned or written from loads that cannot be summed exactly."""
    path = _bad(tmp_path, "load.json", content)
    out = tmp_path / "layout.json"
    assert main(["plan", str(path), "--gpus", "2", "--slots", "4", "-o", str(out)]) == 78
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("eplbd plan: error:") and msg in err, err
    assert "layer 0 expert 0" in err or "expert 3" in err


def test_the_largest_accepted_load_plans(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _bad(tmp_path, "load.json", f"[[{2**53}, 1, 2, 3]]")
    assert main(["plan", str(path), "--gpus", "2", "--slots", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["figures"]["summary"]
    assert np.isfinite(summary["balance_after"]) and summary["balance_after"] >= 1.0


def test_unwritable_output_exits_1(
    loadfile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "no" / "such" / "dir" / "layout.json"
    assert main(["plan", str(loadfile), "--gpus", "4", "--slots", "20", "-o", str(target)]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_usage_errors_exit_2(loadfile: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["plan", str(loadfile), "--slots", "20"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["plan", str(loadfile), "--gpus", "four", "--slots", "20"])
    assert e.value.code == 2


def test_subprocess_and_lazy_import(loadfile: Path, tmp_path: Path) -> None:
    # generous deadlines: three interpreters importing torch on a loaded 2-core machine
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "eplbd", "plan"]
    topo = ["--gpus", "4", "--slots", "20"]
    ok = subprocess.run(
        [*cmd, str(loadfile), *topo, "--json"],
        capture_output=True, text=True, env=env, timeout=280, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["figures"]["summary"]["slots"] == 60
    bad = subprocess.run(
        [*cmd, str(tmp_path / "x.json"), *topo],
        capture_output=True, text=True, env=env, timeout=280, check=False,
    )  # fmt: skip
    assert bad.returncode == 78 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().endswith("no such file")
    lazy = subprocess.run(
        [sys.executable, "-c", "import sys, eplbd.cli.plan; print('torch' in sys.modules)"],
        capture_output=True, text=True, env=env, timeout=280, check=False,
    )  # fmt: skip
    assert lazy.stdout.strip() == "False"


def test_free_moves_from_the_served_layout_reach_the_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the case: 8 experts, 2 GPUs, 12 slots, the served layout as --previous
    toy = tmp_path / "toy.json"
    toy.write_text(json.dumps([[80, 44, 40, 12, 16, 24, 4, 50]]))
    cur = tmp_path / "cur.json"
    cur.write_text(Layout.from_phy2log([[5, 6, 1, 0, 7, 2, 3, 1, 0, 7, 5, 4]], 8).to_json())
    args = ["plan", str(toy), "--gpus", "2", "--slots", "12", "--json"]
    assert main(args) == 0
    scratch = json.loads(capsys.readouterr().out)["figures"]["layers"][0]
    assert main([*args, "--previous", str(cur), "--move-cost", "0", "--min-gain", "0"]) == 0
    layer = json.loads(capsys.readouterr().out)["figures"]["layers"][0]
    assert scratch["balance_after"] == pytest.approx(1.0)
    assert layer["balance_after"] == pytest.approx(1.0) and layer["reason"] == "improved"


def test_time_objective_with_a_cost_model(
    loadfile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from eplbd.planner import CostModel

    model = tmp_path / "model.json"
    model.write_text(CostModel(fixed_us=20.0, tile_us=5.0, tile_rows=128, device="test").to_json())
    base = ["plan", str(loadfile), "--gpus", "4", "--slots", "20"]
    assert main([*base, "--cost-model", str(model), "--steps", "10", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["figures"]["summary"]["objective"] == "time"
    m = doc["figures"]["metrics"]
    assert m["time_balance"] >= 1.0 and m["token_balance"] >= 1.0
    assert 0 < m["activated_slots_per_gpu"]["max"] <= 5
    assert m["cost_model"]["device"] == "test"
    Layout.from_dict(doc["layout"])  # shares, if any, travel in the layout's JSON
    assert main([*base, "--expert", "2048,1408", "--objective", "tokens"]) == 0
    out = capsys.readouterr().out
    assert "modelled time balance" in out and "token balance" in out
    for bad, msg in (
        (["--objective", "time"], "needs a cost_model"),
        (["--expert", "2048"], "--expert wants H,F"),
        (["--cost-model", str(tmp_path / "none.json")], "no such file"),
        (["--cost-model", str(loadfile)], "cost model JSON must be an object"),
        (["--expert", "64,64", "--steps", "0"], "steps"),
    ):
        assert main([*base, *bad]) == 78, bad
        assert msg in capsys.readouterr().err


def test_huge_load_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps([[1e308, 1e308, 1.0, 2.0]]))
    assert main(["plan", str(huge), "--gpus", "2", "--slots", "6"]) == 78
    assert "above 2^53" in capsys.readouterr().err


def _npy_header_only(path: Path, shape: tuple[int, ...]) -> Path:
    """A .npy whose header declares ``shape`` (float64) but which holds a few bytes."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f8", "fortran_order": False, "shape": shape}
        )
        f.write(bytes(16))
    return path


@pytest.mark.parametrize(
    ("name", "msg"),
    [
        ("complex.pt", "complex64"),  # was planned on its real part
        ("bool.pt", "torch.bool"),  # was planned on 0/1
        ("sparse.pt", "sparse_coo"),  # was internal error: TypeError
        ("huge.npy", "shorter than the shape its header declares"),  # was MemoryError
        ("vast.npy", "shorter than the shape its header declares"),
        ("deep.json", "nested too deeply"),
    ],
)
def test_bad_load_files_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, msg: str
) -> None:
    """A load file that is not a dense [L][E] array of real numbers is bad input (78), one
    line, never planned on and never an internal error."""
    path = tmp_path / name
    dense = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    if name == "complex.pt":
        torch.save(dense.to(torch.complex64), path)
    elif name == "bool.pt":
        torch.save(dense > 2, path)
    elif name == "sparse.pt":
        torch.save(dense.to_sparse(), path)
    elif name == "huge.npy":
        _npy_header_only(path, (100000, 100000))  # 74.5 GiB declared in 144 bytes
    elif name == "vast.npy":
        _npy_header_only(path, (10**9, 10**9))  # more than any address space
    else:
        path.write_text("[" * 100000 + "]" * 100000)
    assert main(["plan", str(path), "--gpus", "2", "--slots", "4"]) == 78
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "" and err.count("\n") == 1, err
    assert err.startswith(f"eplbd plan: error: {path}:") and msg in err, err


@pytest.mark.parametrize("flag", ["--previous", "--cost-model"])
def test_deeply_nested_json_files_exit_78(
    loadfile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    assert main(["plan", str(loadfile), "--gpus", "4", "--slots", "20", flag, str(deep)]) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"eplbd plan: error: {deep}:"), err
    assert "nested too deeply" in err


def test_a_failed_output_write_keeps_the_old_file(loadfile: Path, tmp_path: Path) -> None:
    """-o replaces FILE whole or not at all: a write that fails half way (here the file size
    limit, as a full disk would) leaves the old layout as it was and no temporary file."""
    out = tmp_path / "layout.json"
    out.write_text('{"old": true}\n')
    out.chmod(0o640)
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
        "from eplbd.cli.main import main\n"
        f"sys.exit(main(['plan', {str(loadfile)!r}, '--gpus', '4', '--slots', '20', "
        f"'-o', {str(out)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, env=env, timeout=280, check=False,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert f"cannot write {out}" in r.stderr and "Traceback" not in r.stderr
    assert out.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout.json", "load.json"]
    # a write that succeeds replaces the file and keeps its mode
    assert main(["plan", str(loadfile), "--gpus", "4", "--slots", "20", "-o", str(out)]) == 0
    assert Layout.from_json(out.read_text()).num_physical == 20
    assert out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout.json", "load.json"]
