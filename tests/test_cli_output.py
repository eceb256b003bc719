from __future__ import annotations

import argparse
import errno
import io
import json
import math
import os
from pathlib import Path

import pytest

from eplbd.cli import _output as o


class Stream(io.StringIO):
    def __init__(self, tty: bool = False, encoding: str | None = "utf-8") -> None:
        super().__init__()
        self._tty = tty
        self._encoding = encoding

    def isatty(self) -> bool:
        return self._tty

    @property
    def encoding(self) -> str | None:  # type: ignore[override]
        return self._encoding


def test_table_alignment() -> None:
    text = o.render_table(
        ["layer", "balance", "moves", "state"],
        [[0, 1.5, 12, "ok"], [10, 1.0625, None, "frozen"], [3, float("nan"), 7, "ok"]],
    )
    lines = text.splitlines()
    assert lines[0] == "layer  balance  moves  state"
    assert lines[1] == "    0    1.500     12  ok"
    assert lines[2] == "   10    1.062      -  frozen"
    assert lines[3] == "    3        -      7  ok"
    end = len("layer  balance  moves")
    assert {line[end - 1] for line in lines} == {"s", "2", "-", "7"}  # numbers end together
    assert text.endswith("\n")


def test_table_mixed_column_left_aligned_and_explicit_align() -> None:
    text = o.render_table(["a", "b"], [["x", 1], [2, True]])
    assert text.splitlines()[1:] == ["x  1", "2  yes"]
    text = o.render_table(["name", "n"], [["ab", "7"]], align=[">", ">"])
    assert text.splitlines() == ["name  n", "  ab  7"]
    with pytest.raises(ValueError):
        o.render_table(["a"], [[1, 2]])


def test_color_rules() -> None:
    tty, pipe = Stream(tty=True), Stream(tty=False)
    assert o.use_color(tty, environ={})
    assert not o.use_color(pipe, environ={})
    assert not o.use_color(tty, environ={"NO_COLOR": ""})  # set at all, even empty
    assert not o.use_color(tty, json=True, environ={})
    assert o.use_color(pipe, force=True, environ={"NO_COLOR": "1"})
    assert not o.use_color(tty, json=True, force=True, environ={})
    assert o.style("x", "red", enabled=True) == "\x1b[31mx\x1b[0m"
    assert o.style("x", "red", enabled=False) == "x"


def test_colored_table_aligns_on_visible_text() -> None:
    stream = Stream(tty=True)
    out = o.Output(stream, environ={})
    assert out.color
    out.table(["k", "v"], [[out.style("hot", "red"), 1], ["cool", 22]])
    lines = stream.getvalue().splitlines()
    assert lines[0] == "\x1b[1mk      v\x1b[0m"
    assert lines[1] == "\x1b[31mhot\x1b[0m    1"
    assert lines[2] == "cool  22"


def test_json_document_and_lines() -> None:
    s = Stream()
    o.emit_json({"groups": [{"balance": 1.2, "idle": float("nan")}]}, s)
    doc = json.loads(s.getvalue())
    assert doc["schema_version"] == o.SCHEMA_VERSION
    assert doc["groups"] == [{"balance": 1.2, "idle": None}]

    s = Stream()
    for epoch in range(3):
        o.emit_json_line({"epoch": epoch, "inf": math.inf}, s)
    lines = s.getvalue().splitlines()
    assert len(lines) == 3
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    assert all(json.loads(line)["schema_version"] == o.SCHEMA_VERSION for line in lines)
    assert json.loads(lines[0])["inf"] is None


def test_json_never_colored() -> None:
    stream = Stream(tty=True)
    out = o.Output(stream, json=True, environ={})
    assert not out.color
    out.emit_json_line({"a": 1})
    assert "\x1b" not in stream.getvalue()


def test_heat_ramp_unicode_and_ascii() -> None:
    vals = [0, 1, 4, 8]
    assert o.heat_ramp(vals, ascii=False) == " ▁▄█"
    assert o.heat_ramp(vals, ascii=True) == " :+@"
    # picked from the stream's encoding
    assert o.heat_ramp(vals, stream=Stream(encoding="UTF8")) == " ▁▄█"
    assert o.heat_ramp(vals, stream=Stream(encoding="ascii")) == " :+@"
    assert o.heat_ramp(vals, stream=Stream(encoding="latin-1")) == " :+@"
    assert o.heat_ramp(vals, stream=Stream(encoding=None)) == " :+@"


def test_heat_char_edges() -> None:
    ramp = o.UNICODE_RAMP
    assert o.heat_char(0.001, 0, 100, ramp) == "▁"  # any load is visible
    assert o.heat_char(-5, 0, 100, ramp) == " "
    assert o.heat_char(500, 0, 100, ramp) == "█"
    assert o.heat_char(float("nan"), 0, 1, ramp) == "?"
    assert o.heat_ramp([5, 5, 5], ascii=False) == "███"  # even load: full, not blank
    assert o.heat_ramp([0, 0], ascii=False) == "  "
    assert o.heat_ramp([2, 4], vmin=2, vmax=4, ascii=True) == " @"
    levels = [o.heat_char(v / 100, 0, 1, ramp) for v in range(101)]
    assert [ramp.index(c) for c in levels] == sorted(ramp.index(c) for c in levels)
    assert set(levels) == set(ramp)


def test_output_from_args() -> None:
    parser = argparse.ArgumentParser()
    o.add_output_arguments(parser, watch=True)
    args = parser.parse_args(["--json", "--watch"])
    assert args.watch == 2.0
    out = o.Output.from_args(args, Stream(tty=True))
    assert out.json and not out.color
    args = parser.parse_args(["--ascii", "--watch", "0.5", "--no-color"])
    out = o.Output.from_args(args, Stream(tty=True))
    assert args.watch == 0.5 and not out.color and not out.unicode
    assert out.heat([0, 1]) == " @"
    args = parser.parse_args([])
    assert args.watch is None and args.color is None


def test_status_next_column_says_what_the_next_rebalance_waits_for() -> None:
    from eplbd.cli.status import _next

    def nxt(**kw: object) -> dict[str, object]:
        base: dict[str, object] = {"blocked_by": None, "earliest_in_s": None}
        return {"next_rebalance": {**base, **kw}}

    assert _next(nxt(blocked_by="pending_commit", earliest_in_s=5.0)) == "pending commit"
    assert _next({**nxt(blocked_by="frozen"), "frozen": True}) == "frozen"
    assert _next(nxt(earliest_in_s=252.0, windows_needed=2)) == "cooldown 4m12s"
    assert _next(nxt(windows_needed=2, next_evaluation_in_s=3.0)) == "2 more windows of load"
    assert _next(nxt(windows_needed=1)) == "1 more window of load"
    assert _next(nxt(tokens_needed=40)) == "40 more tokens"
    assert _next(nxt(next_evaluation_in_s=3.25)) == "evaluates in 3.2s"
    assert _next(nxt()) == "waits for load"
    # one frozen layer does not hide what the other layers wait for
    g = {**nxt(earliest_in_s=10.0), "frozen_layers": [0, 2, 3]}
    assert _next(g) == "cooldown 10.0s; layers 0,2-3 frozen"


def test_write_file_is_whole_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-o FILE: a failed write (here the rename) keeps the old file and leaves no temporary
    file; a good one replaces it, keeps its mode, and goes through a symlink as open() would;
    a device (-o /dev/stdout) is written to directly."""
    target = tmp_path / "out.json"
    target.write_text("old\n")
    target.chmod(0o640)

    def fail(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", fail)
        with pytest.raises(OSError):
            o.write_file(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    o.write_file(target, "new\n")
    assert target.read_text() == "new\n" and target.stat().st_mode & 0o777 == 0o640
    link = tmp_path / "link.json"
    link.symlink_to(target)
    o.write_file(link, "linked\n")
    assert link.is_symlink() and target.read_text() == "linked\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "out.json"]
    o.write_file(os.devnull, "nothing\n")
    with pytest.raises(FileNotFoundError):
        o.write_file(tmp_path / "no" / "dir.json", "x\n")
