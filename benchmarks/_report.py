"""Writes a benchmark's figures into docs/benchmarks.md, between its own markers.

Each benchmark owns one section (``<!-- BEGIN name -->`` ... ``<!-- END name -->``) so that
several benchmarks can update the page without touching each other's figures.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine_line() -> str:
    """One line naming the machine and the versions, for every figure written down."""
    try:
        import triton

        tv = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency on Linux
        tv = "absent"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (
        f"{dev}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"Python {platform.python_version()}, torch {torch.__version__}, triton {tv}"
    )


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _m: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    fd, tmp = tempfile.mkstemp(dir=doc.parent, prefix=".benchmarks.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, doc)
