"""The operator commands against a real planner on real sockets.

The planner is ``python3 -m eplbd planner`` (ipc sockets under a short temp dir); an agent
thread of the test process speaks the protocol to it through
eplbd.wire the way ``eplbd agent`` does: agent_hello for two ranks, heartbeats, skewed load
snapshots, and ``staged`` / ``committed`` answers to every ``prepare``. The automatic
trigger is off (an unreachable gain threshold), so only the commands change epochs.

Commands run in-process through ``eplbd.cli.main.main`` (fast: torch is already imported);
the terminal tests run ``python3 -m eplbd`` with stdout on a pseudo-terminal.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
from _cli import clean_cli_env, cli

from eplbd.cli._client import PlannerClient
from eplbd.layout import Layout
from eplbd.wire import (
    ABORT,
    ABORTED,
    AGENT_HELLO,
    COMMITTED,
    HEARTBEAT,
    PREPARE,
    SNAPSHOT,
    STAGED,
    control_client,
    new_incarnation,
    snapshot_sender,
)

pytestmark = pytest.mark.timeout(60)

L, E, G, P = 3, 4, 2, 6
HOT = 2
ROOT = Path(__file__).resolve().parents[1]


class AgentThread(threading.Thread):
    """One agent hosting ranks 0..G-1 of group "g"; answers every prepare at once."""

    def __init__(self, control: str, snapshots: str) -> None:
        super().__init__(daemon=True, name="fake-agent")
        self.control, self.snapshots = control, snapshots
        self.stop = threading.Event()
        self.layout = Layout.default(L, E, P)
        self.epoch = 0
        self.step = 0
        self.error: BaseException | None = None

    def counts(self) -> torch.Tensor:
        hot = self.layout.phy2log == HOT
        return torch.where(hot, 100, 10).to(torch.int32)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # surfaced by the fixture
            self.error = e

    def _run(self) -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        inc = new_incarnation()
        ctrl = control_client(ctx, self.control, identity="a0")
        push = snapshot_sender(ctx, self.snapshots)
        workers = [
            {
                "worker": f"w{r}",
                "incarnation": f"wi{r}",
                "group": "g",
                "ep_rank": r,
                "ep_size": G,
                "node": "n0",
                "num_layers": L,
                "num_logical_experts": E,
                "num_physical_experts": P,
                "epoch": 0,
                "software_version": "test",
                "protocol_version": 1,
            }
            for r in range(G)
        ]
        hello = {
            "agent": "a0",
            "incarnation": inc,
            "node": "n0",
            "software_version": "test",
            "protocol_version": 1,
            "workers": workers,
        }
        ctrl.send(AGENT_HELLO, hello, timeout_ms=5000)
        seq, next_beat, next_snap = 0, 0.0, 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + 0.1
                    ctrl.send(HEARTBEAT, {"sender": "a0", "incarnation": inc})
                if now >= next_snap:
                    next_snap = now + 0.05
                    seq += 1
                    self.step += 10
                    body = {
                        "agent": "a0",
                        "incarnation": inc,
                        "group": "g",
                        "ep_ranks": list(range(G)),
                        "seq": seq,
                        "epoch": self.epoch,
                        "step_start": self.step - 10,
                        "step_end": self.step,
                        "tokens": 1000,
                    }
                    push.send(SNAPSHOT, body, {"counts": self.counts()})
                got = ctrl.recv(20)
                if got is None:
                    continue
                m = got.message
                ids = {"agent": "a0", "group": "g", "epoch": m.body.get("epoch")}
                if m.type == PREPARE:
                    e = int(m.body["epoch"])
                    for r in range(G):
                        ctrl.send(
                            STAGED,
                            {
                                **ids,
                                "ep_rank": r,
                                "worker": f"w{r}",
                                "ok": True,
                                "reason": "",
                                "staged_bytes": 0,
                            },
                        )
                    self.layout = Layout.from_phy2log(m.tensors["phy2log"], E, num_gpus=G)
                    self.epoch = e
                    for r in range(G):
                        ctrl.send(
                            COMMITTED, {**ids, "ep_rank": r, "worker": f"w{r}", "step": self.step}
                        )
                elif m.type == ABORT:
                    for r in range(G):
                        ctrl.send(
                            ABORTED, {**ids, "ep_rank": r, "worker": f"w{r}", "reason": "abort"}
                        )
        finally:
            ctrl.close()
            push.close()
            ctx.term()


@pytest.fixture(scope="module")
def planner() -> Iterator[str]:
    """``python3 -m eplbd planner`` with one complete group "g" that has load data; yields
    its control endpoint."""
    tmp = Path(tempfile.mkdtemp(prefix="eplbd-cli-", dir="/tmp"))
    (tmp / "state").mkdir()
    control = f"ipc://{tmp}/planner.sock"
    argv = [
        sys.executable, "-m", "eplbd", "planner",
        "--listen", control,
        "--state-dir", str(tmp / "state"),
        "--metrics", "",
        "--window-s", "0.2",
        "--windows", "3",
        "--min-windows", "1",
        "--min-gain", "1000",  # no automatic rebalance: only the commands change epochs
        "--heartbeat-s", "0.2",
        "--tick-s", "0.02",
        "--prepare-timeout-s", "10",
        "--log-level", "warning",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    log = open(tmp / "planner.log", "wb")  # noqa: SIM115 - closed in the finally
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    agent: AgentThread | None = None
    try:
        deadline = time.monotonic() + 30
        while not (tmp / "planner-snapshots.sock").exists():
            assert proc.poll() is None, (tmp / "planner.log").read_text()
            assert time.monotonic() < deadline, "the planner did not start"
            time.sleep(0.05)
        agent = AgentThread(control, f"ipc://{tmp}/planner-snapshots.sock")
        agent.start()
        with PlannerClient(control, timeout_s=2.0) as c:
            while True:
                groups = c.status("top").get("groups") or []
                if groups and groups[0].get("layers") and groups[0].get("source") == "forecast":
                    break
                assert agent.error is None, agent.error
                assert time.monotonic() < deadline, "the planner never got load data"
                time.sleep(0.05)
        yield control
    finally:
        if agent is not None:
            agent.stop.set()
            agent.join(5)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_cli_env(monkeypatch)


def status_json(capsys: pytest.CaptureFixture[str], planner: str) -> dict[str, Any]:
    rc, out, err = cli(capsys, "status", "--planner", planner, "--json")
    assert rc == 0, err
    return json.loads(out)


# --- views -----------------------------------------------------------------------------------


def test_status_table_and_json(planner: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "status", "--planner", planner)
    assert rc == 0, err
    assert "\x1b[" not in out  # not a terminal: no colour
    lines = out.splitlines()
    agent_row = next(x for x in lines if x.startswith("a0 "))
    assert "alive" in agent_row and "g:0-1" in agent_row
    group_row = next(x for x in lines if x.startswith("g "))
    assert f"{G}/{G}" in group_row and f"{L}x{E}->{P}" in group_row
    assert sum(1 for x in lines if "w0" in x or "w1" in x) == G  # the rank table

    doc = status_json(capsys, planner)
    assert doc["schema_version"] >= 1 and doc["what"] == "status"
    assert doc["endpoint"] == planner
    (g,) = doc["groups"]
    assert g["group"] == "g" and g["ep_size"] == G and g["complete"] is True
    assert [r["state"] for r in g["ranks"]] == ["alive"] * G
    # the hot expert sits on one GPU of the initial layout: the planner sees imbalance
    assert g["balance_now"] is None or g["balance_now"] >= 1.0


def test_top_shows_layers_and_hot_experts(planner: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "top", "--planner", planner, "--hot", "1")
    assert rc == 0, err
    rows = [x.split() for x in out.splitlines() if x.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(L))
    assert all(f"e{HOT}" in " ".join(r) for r in rows)  # the hottest expert of every layer
    assert "commit pending" in out or "pending epoch" in out

    rc, out, err = cli(capsys, "top", "--planner", planner, "--json", "--layers", "1-2")
    assert rc == 0, err
    doc = json.loads(out)
    (g,) = doc["groups"]
    assert [x["layer"] for x in g["layers"]] == [1, 2]
    for x in g["layers"]:
        assert x["hot"][0]["expert"] == HOT
        assert x["balance_now"] >= x["lower_bound"] - 1e-9
    assert "pending" in g


def test_views_refuse_layers_the_model_lacks(
    planner: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """As freeze --layers does: a view never quietly drops a layer that was asked for."""
    for cmd in ("top", "heatmap", "freeze"):
        rc, out, err = cli(capsys, cmd, "--planner", planner, "--layers", f"0,{L + 96}")
        assert rc == 1 and out == "", (cmd, rc, out)
        assert f"layers [{L + 96}] do not exist" in err and f"has {L})" in err, (cmd, err)
    rc, out, err = cli(capsys, "top", "--planner", planner, "--layers", f"0,{L - 1}", "--json")
    assert rc == 0 and [x["layer"] for x in json.loads(out)["groups"][0]["layers"]] == [0, L - 1]


def test_heatmap_gpu_and_expert(planner: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "heatmap", "--planner", planner, "--ascii")
    assert rc == 0, err
    assert all(ord(c) < 128 for c in out)
    rows = [x for x in out.splitlines() if x.strip()[:1].isdigit()]
    assert len(rows) == L
    for r in rows:
        parts = r.split()
        assert float(parts[-1]) >= 1.0  # max/mean of the row

    rc, out, err = cli(capsys, "heatmap", "--planner", planner, "--by", "expert", "--ascii")
    assert rc == 0, err
    rows = [x for x in out.splitlines() if x.strip()[:1].isdigit()]
    for r in rows:
        layer, cells, hottest = r.split()[0], r[9 : 9 + E], r.split()[-3]
        assert cells[HOT] == "@" and hottest == f"e{HOT}", (layer, r)

    rc, out, err = cli(capsys, "heatmap", "--planner", planner, "--json")
    assert rc == 0, err
    (g,) = json.loads(out)["groups"]
    assert len(g["by_gpu"]) == L and all(len(r) == G for r in g["by_gpu"])
    assert len(g["by_expert"]) == L and all(len(r) == E for r in g["by_expert"])


def test_watch_json_one_object_per_line(planner: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(
        capsys, "status", "--planner", planner, "--watch", "0.05", "--count", "3", "--json"
    )
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3
    docs = [json.loads(x) for x in lines]
    assert all(d["schema_version"] >= 1 and d["groups"][0]["group"] == "g" for d in docs)
    assert docs[0]["at"] < docs[2]["at"]

    rc, out, err = cli(capsys, "top", "--planner", planner, "--watch", "0.05", "--count", "2")
    assert rc == 0, err
    assert out.count("every 0.05s: eplbd top") == 2


# --- commands --------------------------------------------------------------------------------


def test_dry_run_plans_without_applying(planner: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = status_json(capsys, planner)["groups"][0]["epoch"]
    rc, out, err = cli(capsys, "rebalance", "--planner", planner, "--dry-run")
    assert rc == 0, err
    assert out.startswith("dry run")
    assert sum(1 for x in out.splitlines() if x.strip()[:1].isdigit()) == L

    rc, out, err = cli(capsys, "rebalance", "--planner", planner, "--dry-run", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True and doc["op"] == "rebalance" and doc["group"] == "g"
    d = doc["data"]["decision"]
    assert d["action"] == "dry_run" and len(d["layers"]) == L
    assert d["balance_after"] <= d["balance_now"]
    assert status_json(capsys, planner)["groups"][0]["epoch"] == before


def test_rebalance_wait_then_history(planner: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = status_json(capsys, planner)["groups"][0]["epoch"]
    rc, out, err = cli(capsys, "rebalance", "--planner", planner, "--wait", "10")
    assert rc == 0, err
    assert f"epoch {before + 1} committed on {G} ranks" in out
    assert status_json(capsys, planner)["groups"][0]["epoch"] == before + 1

    rc, out, err = cli(capsys, "history", "--planner", planner)
    assert rc == 0, err
    row = next(x for x in out.splitlines() if " force " in x and "committed" in x)
    assert str(before + 1) in row.split()

    rc, out, err = cli(capsys, "history", "--planner", planner, "--json", "--limit", "1")
    assert rc == 0, err
    (g,) = json.loads(out)["groups"]
    (att,) = g["attempts"]
    assert att["epoch"] == before + 1 and att["state"] == "committed"
    assert att["trigger"] == "force"


def test_freeze_unfreeze(planner: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "freeze", "--planner", planner, "--layers", "0,2")
    assert rc == 0, err
    assert status_json(capsys, planner)["groups"][0]["frozen_layers"] == [0, 2]
    rc, out, err = cli(capsys, "top", "--planner", planner, "--json")
    layers = json.loads(out)["groups"][0]["layers"]
    assert [x["frozen"] for x in layers] == [True, False, True]
    rc, out, err = cli(capsys, "unfreeze", "--planner", planner)
    assert rc == 0, err
    g = status_json(capsys, planner)["groups"][0]
    assert g["frozen_layers"] == [] and g["frozen"] is False


def test_rollback(planner: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "rollback", "999", "--planner", planner)
    assert rc == 1
    assert "999" in err and err.startswith("eplbd rollback:")
    before = status_json(capsys, planner)["groups"][0]["epoch"]
    rc, out, err = cli(capsys, "rollback", "0", "--planner", planner, "--wait", "10", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["ok"] and doc["outcome"]["state"] == "committed"
    assert doc["data"]["decision"]["target_epoch"] == 0
    assert status_json(capsys, planner)["groups"][0]["epoch"] == before + 1


def test_rollback_to_a_negative_epoch_is_a_usage_error(
    planner: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused by the CLI (exit 2): nothing reaches the planner, which counts no bad message."""
    bad_before = status_json(capsys, planner)["planner"]["counters"]["bad"]
    for epoch in ("-1", str(2**63), "x"):
        rc, out, err = cli(capsys, "rollback", "--planner", planner, "--", epoch)
        assert rc == 2 and out == "", (epoch, rc)
        assert "EPOCH" in err and "wrong type" not in err, err
    assert status_json(capsys, planner)["planner"]["counters"]["bad"] == bad_before


def test_unknown_group_is_an_error(planner: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "status", "--planner", planner, "--group", "nope")
    assert rc == 1 and "nope" in err
    rc, out, err = cli(capsys, "freeze", "--planner", planner, "--group", "nope")
    assert rc == 1 and "nope" in err


def test_layout_show_writes_what_plan_reads_and_diff_says_what_moves(
    planner: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, out, err = cli(capsys, "rebalance", "--planner", planner, "--wait", "10")
    assert rc == 0, err  # an epoch whose layout differs from the default
    epoch = status_json(capsys, planner)["groups"][0]["epoch"]
    current = tmp_path / "current.json"
    rc, out, err = cli(capsys, "layout", "show", "--planner", planner, "-o", str(current))
    assert rc == 0, err
    assert f"epoch {epoch}" in out and "in service" in out and str(current) in out
    assert sum(1 for x in out.splitlines() if x.strip()[:1].isdigit()) == L * G
    served = Layout.from_json(current.read_text())  # the format eplbd plan --previous reads
    load = tmp_path / "load.json"
    load.write_text(json.dumps([[10.0] * E] * L))
    argv = ["plan", str(load), "--gpus", str(G), "--slots", str(P), "--previous", str(current)]
    rc, out, err = cli(capsys, *argv)
    assert rc == 0, err
    rc, out, err = cli(capsys, "layout", "show", "--planner", planner, "--epoch", "0", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["epoch"] == 0 and doc["state"] == "default" and doc["num_gpus"] == G
    assert Layout.from_dict(doc["layout"]) == Layout.default(L, E, P)
    rc, out, err = cli(capsys, "layout", "show", "--planner", planner, "--epoch", "999")
    assert rc == 1 and "no layout of epoch 999 is kept" in err and "kept: 0" in err

    # diff: epochs from the planner, or files (no planner, but --gpus)
    want = int((served.phy2log != Layout.default(L, E, P).phy2log).sum())
    rc, out, err = cli(
        capsys, "layout", "diff", "0", str(epoch), "--planner", planner, "--json",
        "--expert-bytes", "1000",
    )  # fmt: skip
    assert rc == 0, err
    d = json.loads(out)
    assert d["slots_moved"] == want > 0 and d["bytes_moved"] == 1000 * want
    assert d["expert_bytes_source"] == "--expert-bytes"
    default = Layout.default(L, E, P).phy2log
    for m in d["moves"]:
        assert m["gpu"] == m["slot"] // (P // G)
        assert m["expert"] == int(served.phy2log[m["layer"], m["slot"]])
        assert m["replaces"] == int(default[m["layer"], m["slot"]])
        held = {int(p) // (P // G) for p in (default[m["layer"]] == m["expert"]).nonzero()}
        assert m["from_gpu"] in held  # it comes from a GPU that had it
    assert d["layers_changed"] == sorted({m["layer"] for m in d["moves"]})
    rc, out, err = cli(capsys, "layout", "diff", "0", str(epoch), "--planner", planner)
    assert rc == 0 and f"{want} of {L * P} slots" in out and "bytes moved: unknown" in out
    zero = tmp_path / "zero.json"
    zero.write_text(Layout.default(L, E, P).to_json())
    rc, out, err = cli(capsys, "layout", "diff", str(zero), str(current), "--json")
    assert rc == 2 and "--gpus" in err
    rc, out, err = cli(
        capsys, "layout", "diff", str(zero), str(current), "--gpus", str(G), "--json"
    )
    assert rc == 0 and json.loads(out)["moves"] == d["moves"]
    torn = tmp_path / "torn.json"
    torn.write_text('{"schema_version": 1, "num_logical_experts": 4, "phy2log": [[0, 1, 9]]}')
    rc, out, err = cli(capsys, "layout", "diff", str(zero), str(torn), "--gpus", str(G))
    assert rc == 78 and "torn.json" in err


# --- a real terminal -------------------------------------------------------------------------


def _on_tty(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "eplbd", *argv],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        os.close(slave)
        slave = -1
        chunks = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif p.poll() is not None:
                break
        rc = p.wait(10)
        return rc, b"".join(chunks).decode("utf-8", "replace")
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
        if p.poll() is None:
            p.kill()


def test_colour_only_on_a_terminal_and_never_with_no_color(planner: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_") and k != "NO_COLOR"}
    rc, text = _on_tty(["status", "--planner", planner], env)
    assert rc == 0, text
    assert "\x1b[" in text and "alive" in text
    rc, text = _on_tty(["status", "--planner", planner], {**env, "NO_COLOR": "1"})
    assert rc == 0, text
    assert "\x1b[" not in text and "alive" in text


def test_heat_ramp_falls_back_to_ascii(planner: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "heatmap", "--planner", planner, "--by", "expert")
    assert rc == 0, err  # capsys writes UTF-8: the block ramp
    assert "█" in out
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    p = subprocess.run(
        [sys.executable, "-m", "eplbd", "heatmap", "--planner", planner, "--by", "expert"],
        capture_output=True,
        env={**env, "PYTHONIOENCODING": "latin-1"},
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout and all(b < 128 for b in p.stdout)
    assert b"@" in p.stdout  # the top of the ASCII ramp marks the hot expert


def test_status_answer_without_torch(planner: str) -> None:
    """A full status round trip (request, reply, table) in an interpreter that never imports
    torch or numpy."""
    code = (
        "import sys\n"
        "from eplbd.cli.main import main\n"
        f"rc = main(['status', '--planner', {planner!r}])\n"
        "assert rc == 0, rc\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'triton'))\n"
        "assert not bad, bad[:5]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )
    assert p.returncode == 0, p.stderr
    assert "alive" in p.stdout


def test_layout_files_with_shares_are_read_shown_and_diffed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Schema 2 layouts (a weighted split): diff reads them, reports a change of the split
    alone as no slot move, and refuses a malformed split (exit 78)."""
    p2l = [[0, 1, 2, 3, 0, 1]] * 2
    equal = Layout.from_phy2log(p2l, 4)
    split = equal.with_share([[1, 1, 1, 1, 0, 2]] * 2)
    a, b, torn = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "torn.json"
    a.write_text(equal.to_json())
    b.write_text(split.to_json())
    rc, out, err = cli(capsys, "layout", "diff", str(a), str(b), "--gpus", "2", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["slots_moved"] == 0 and doc["layers_resplit"] == [0, 1]
    rc, out, err = cli(capsys, "layout", "diff", str(a), str(b), "--gpus", "2")
    assert rc == 0 and "split (shares) changes in 2 layer(s)" in out, out
    bad = json.loads(split.to_json())
    bad["share"][1][0] = 0  # expert 0 of layer 1 has no replica with a share
    torn.write_text(json.dumps(bad))
    rc, out, err = cli(capsys, "layout", "diff", str(a), str(torn), "--gpus", "2")
    assert rc == 78 and "torn.json" in err and "share" in err
    from eplbd.cli.layout import _slot_text  # eplbd layout show: e:s where the share is not 1

    assert [_slot_text(3, s) for s in (None, 1, 0, 2)] == ["3", "3", "3:0", "3:2"]


def test_layout_show_output_is_replaced_whole_or_not_at_all(
    planner: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """-o FILE: a write that fails (the disk fills before the data is on it) leaves the old
    file as it was and no temporary file; one that succeeds replaces it."""
    out = tmp_path / "layout.json"
    out.write_text('{"old": true}\n')

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        rc, _, err = cli(capsys, "layout", "show", "--planner", planner, "-o", str(out))
    assert rc == 1 and f"cannot write {out}: No space left on device" in err, err
    assert out.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["layout.json"]
    rc, _, err = cli(capsys, "layout", "show", "--planner", planner, "-o", str(out))
    assert rc == 0, err
    Layout.from_json(out.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["layout.json"]


def test_layout_diff_refuses_a_deeply_nested_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """[[[[...]]]]: json.loads gives up with a RecursionError, which was a traceback."""
    deep, zero = tmp_path / "deep.json", tmp_path / "zero.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    zero.write_text(Layout.default(L, E, P).to_json())
    for a, b in ((deep, zero), (zero, deep)):
        rc, out, err = cli(capsys, "layout", "diff", str(a), str(b), "--gpus", str(G))
        assert rc == 78 and out == "", err
        assert err == f"eplbd layout: {deep}: not a layout JSON file (nested too deeply)\n"


def test_heatmap_folded_gpu_columns_say_gpus() -> None:
    """With more GPUs than columns, the note names what a column folds: GPUs, not experts."""
    import io

    from eplbd.cli._output import Output
    from eplbd.cli.heatmap import render

    group = {
        "group": "g",
        "epoch": 1,
        "source": "forecast",
        "by_gpu": [[float(i % 7 + 1) for i in range(64)]] * 2,
        "by_expert": [[1.0] * 64] * 2,
        "replicas": [[1] * 64] * 2,
    }
    for by, noun in (("gpu", "GPUs"), ("expert", "experts")):
        buf = io.StringIO()
        render(Output(buf, ascii=True), {"groups": [group]}, by=by, width=16)
        assert f"each column the hottest of 4 {noun}" in buf.getvalue(), buf.getvalue()
