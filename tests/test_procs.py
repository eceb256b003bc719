"""eplbd.ops.procs: how worker processes end."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import atexit, sys
    from eplbd.ops.procs import exit_now

    class Held:  # in a reference cycle: only the collector frees it
        def __init__(self):
            self.me = self
        def __del__(self):
            sys.stdout.write("collected;")

    Held()
    atexit.register(lambda: sys.stdout.write("finalized;"))
    sys.stdout.write("done;")  # buffered: no newline, stdout is a pipe
    exit_now(3)
    """
)


def test_exit_now_collects_cycles_flushes_and_skips_finalization() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "done;collected;", proc.stdout
