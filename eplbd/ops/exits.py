"""Process exit codes shared by the daemons and the CLI (the BSD ``sysexits.h`` values).

systemd units use ``RestartPreventExitStatus=78``: a daemon that exits with
:data:`EXIT_CONFIG` is not restarted, since restarting would fail again the same way.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 69  # EX_UNAVAILABLE: the planner or agent did not answer
EXIT_TIMEOUT = 75  # EX_TEMPFAIL: an operation ran past its deadline
EXIT_CONFIG = 78  # EX_CONFIG: a setting is invalid; systemd must not restart

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_ERROR: "error",
    EXIT_USAGE: "usage",
    EXIT_UNREACHABLE: "unreachable",
    EXIT_TIMEOUT: "timeout",
    EXIT_CONFIG: "bad configuration",
}
