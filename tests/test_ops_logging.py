from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import structlog

from eplbd.ops import logging as elog


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        elog.clear_context()
        structlog.reset_defaults()


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_lines_with_context_and_utc_time() -> None:
    buf = io.StringIO()  # not a terminal: JSON chosen automatically
    elog.configure_logging("info", stream=buf)
    log = elog.get_logger("eplbd.controller")
    elog.bind_context(node="gpu-3", group="g0")
    with elog.bound_context(epoch=7, worker="w1"):
        log.info("commit", moves=12)
    log.debug("hidden")
    log.warning("after", ranks=[0, 1])
    out = lines(buf)
    assert len(out) == 2
    first, second = out
    assert first["event"] == "commit" and first["moves"] == 12
    assert (first["node"], first["group"], first["epoch"], first["worker"]) == (
        "gpu-3",
        "g0",
        7,
        "w1",
    )
    assert first["level"] == "info" and first["logger"] == "eplbd.controller"
    ts = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert ts.utcoffset() == timedelta(0)
    assert "epoch" not in second and second["group"] == "g0" and second["ranks"] == [0, 1]


def test_stdlib_loggers_share_the_output() -> None:
    buf = io.StringIO()
    elog.configure_logging("debug", json=True, stream=buf)
    elog.bind_context(node="n1")
    logging.getLogger("eplbd.wire").warning("dropped %d frames from %s", 3, "peer-a")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        elog.get_logger("eplbd.agent").exception("failed")
    wire, exc = lines(buf)
    assert wire["event"] == "dropped 3 frames from peer-a"
    assert wire["logger"] == "eplbd.wire" and wire["level"] == "warning" and wire["node"] == "n1"
    assert "timestamp" in wire
    assert exc["level"] == "error" and "RuntimeError: boom" in exc["exception"]


def test_console_on_a_terminal_and_reconfigure() -> None:
    tty = Tty()
    elog.configure_logging("info", stream=tty)
    elog.get_logger("eplbd.agent").info("registered", worker="w0")
    text = tty.getvalue()
    assert "registered" in text and "w0" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])

    buf = io.StringIO()
    elog.configure_logging("warning", json=True, stream=buf)  # replaces, never doubles
    elog.get_logger("eplbd.agent").info("quiet")
    elog.get_logger("eplbd.agent").error("loud")
    assert [r["event"] for r in lines(buf)] == ["loud"]
    assert tty.getvalue() == text
    assert sum(isinstance(h, elog._EplbdHandler) for h in logging.getLogger().handlers) == 1


def test_bad_level() -> None:
    with pytest.raises(ValueError, match="level"):
        elog.configure_logging("loud", stream=io.StringIO())
