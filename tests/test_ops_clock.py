from __future__ import annotations

import threading
import time

import pytest

from eplbd.ops import EXIT_CODES, EXIT_CONFIG, EXIT_TIMEOUT, EXIT_UNREACHABLE
from eplbd.ops.clock import Clock, FakeClock, SystemClock


def test_fake_clock_moves_only_when_told() -> None:
    c = FakeClock(monotonic=5.0, time=100.0)
    assert isinstance(c, Clock)
    assert (c.monotonic(), c.time()) == (5.0, 100.0)
    c.advance(2.5)
    c.sleep(0.5)
    c.sleep(-1)
    assert (c.monotonic(), c.time()) == (8.0, 103.0)
    with pytest.raises(ValueError):
        c.advance(-0.1)


def test_fake_clock_threads() -> None:
    c = FakeClock(monotonic=0.0)

    def work() -> None:
        for _ in range(1000):
            c.advance(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert c.monotonic() == 4000.0


def test_system_clock() -> None:
    c = SystemClock()
    assert isinstance(c, Clock)
    m0 = c.monotonic()
    c.sleep(0.01)
    assert c.monotonic() - m0 >= 0.009
    assert abs(c.time() - time.time()) < 1.0


def test_exit_codes_are_sysexits() -> None:
    assert (EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_CONFIG) == (69, 75, 78)
    assert sorted(EXIT_CODES) == [0, 1, 2, 69, 75, 78]
