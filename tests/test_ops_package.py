from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import eplbd.ops
from eplbd.cli import _output
from eplbd.ops import logging, metrics, sdnotify, settings

ROOT = Path(__file__).resolve().parents[1]


def test_all_is_sorted_and_honest() -> None:
    for mod in (eplbd.ops, _output, logging, metrics, sdnotify, settings):
        names = mod.__all__
        assert names == sorted(names)
        assert len(set(names)) == len(names)
        for name in names:
            assert hasattr(mod, name), f"{mod.__name__}.{name}"


def test_no_heavy_imports() -> None:
    """eplbd.ops and the CLI's output module import neither torch, zmq nor numpy, and an
    exit code costs no structlog, so `eplbd status` starts fast. The check loads them under
    an import blocker, with the `eplbd` package stubbed so that only these modules (not
    eplbd/__init__) are judged."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys, types
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "zmq", "numpy", "triton"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        pkg = types.ModuleType("eplbd")
        pkg.__path__ = [{str(ROOT / "eplbd")!r}]
        sys.modules["eplbd"] = pkg
        from eplbd.ops import EXIT_CONFIG, EXIT_UNREACHABLE
        import eplbd.cli._output
        lazy = [m for m in ("structlog", "http.server") if m in sys.modules]
        assert not lazy, "loaded for an exit code: " + str(lazy)
        import eplbd.ops, eplbd.ops.settings, eplbd.ops.metrics, eplbd.ops.logging
        import eplbd.ops.sdnotify, eplbd.ops.clock, eplbd.ops.exits
        assert eplbd.ops.Registry is eplbd.ops.metrics.Registry
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
