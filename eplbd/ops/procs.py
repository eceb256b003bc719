"""Child processes of the demo and the benchmarks: environment, lifetime, logs.

Stdlib only, so the demo's driver stays free of torch.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

__all__ = ["child_env", "die_with_parent", "exit_now", "log_tail", "stop_process"]


def die_with_parent() -> None:
    """``preexec_fn`` for Linux children: SIGTERM them when this process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:
        pass


def exit_now(code: int = 0) -> NoReturn:
    """End a worker process whose work is done, without finalizing the interpreter.

    Objects left in reference cycles (a closed client and its agent link hold the process
    groups) are collected first, so library threads (gloo's) are joined while the
    interpreter is whole; then stdio is flushed and the process exits. During
    finalization a C++ thread that wakes and takes the GIL aborts the process ("terminate
    called without an active exception"): a rank with every result written would die of
    SIGABRT. Call it only where the process owns nothing else that must be flushed.
    """
    gc.collect()
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(code)


def child_env(
    extra: Mapping[str, str] | None = None, roots: tuple[str, ...] = ()
) -> dict[str, str]:
    """This process's environment for a child that imports the same eplbd and eplbd_client.

    ``EPLBD_*`` variables are dropped so that an operator's settings do not leak into the
    children's own configuration; ``roots`` are extra import roots put first on PYTHONPATH.
    Packages are located without importing them (no torch in the parent).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    env["PYTHONUNBUFFERED"] = "1"
    found = set(roots)
    for name in ("eplbd", "eplbd_client"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            found.add(str(Path(spec.origin).resolve().parents[1]))
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([*sorted(found), *([old] if old else [])])
    env.update(extra or {})
    return env


def stop_process(p: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5.0)


def log_tail(path: Path, lines: int = 15, indent: str = "") -> str:
    """The last ``lines`` lines of a child's log, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(indent + x for x in text.splitlines()[-lines:])
