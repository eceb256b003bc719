"""What the CLI tests share: running `eplbd ...` in-process and a clean environment."""

from __future__ import annotations

import os

import pytest

from eplbd.cli.main import main


def clean_cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop EPLBD_* settings and NO_COLOR, so the host's environment cannot steer a test."""
    for k in list(os.environ):
        if k.startswith("EPLBD_") or k == "NO_COLOR":
            monkeypatch.delenv(k)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``eplbd ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err
