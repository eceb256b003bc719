"""Daemon logging: structlog, JSON lines off a terminal, readable console output on one.

Both structlog loggers (:func:`get_logger`) and plain stdlib loggers (``eplbd.wire``, third
party libraries) go through one handler on the root logger and one processor chain, so every
line has the same shape::

    {"event": "commit", "epoch": 7, "group": "g0", "node": "gpu-3", "level": "info",
     "logger": "eplbd.controller", "timestamp": "2025-01-01T12:00:00.123456Z"}

Context that holds for a whole task (``node``, ``group``, ``epoch``, ``worker``) is bound
with :func:`bind_context` / :func:`bound_context` (structlog contextvars), so it follows the
task across calls and threads that copy the context, without being passed around.

Only daemons and the CLI call :func:`configure_logging`; the client library embedded in an
inference engine logs through ``logging.getLogger("eplbd_client")`` and never configures
the host's logging.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import structlog

__all__ = [
    "LEVELS",
    "bind_context",
    "bound_context",
    "clear_context",
    "configure_logging",
    "get_logger",
]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _EplbdHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler we installed so a second configure replaces it, never doubles it."""


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (use {', '.join(LEVELS)})") from None


def configure_logging(
    level: str | int = "info",
    json: bool | None = None,
    *,
    stream: IO[str] | None = None,
) -> None:
    """Set up structlog and stdlib logging for a daemon or the CLI.

    ``json=None`` chooses JSON lines when ``stream`` (default stdout) is not a terminal, the
    console renderer when it is. Timestamps are ISO 8601 in UTC. Calling again replaces the
    previous configuration.
    """
    out = sys.stdout if stream is None else stream
    if json is None:
        isatty = getattr(out, "isatty", None)
        json = not (callable(isatty) and isatty())
    lvl = _level(level)

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Any
    if json:
        final: list[Any] = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.UnicodeDecoder(),
            structlog.processors.JSONRenderer(default=str),
        ]
    else:
        colors = bool(getattr(out, "isatty", bool)()) and "NO_COLOR" not in os.environ
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
        final = [structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]

    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final)
    handler = _EplbdHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _EplbdHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str, **initial: Any) -> Any:
    """A structlog logger named ``name`` (a stdlib logger name, e.g. ``eplbd.agent``)."""
    return structlog.get_logger(name, **initial)


def bind_context(**values: Any) -> None:
    """Bind ``node``, ``group``, ``epoch``, ``worker``... to every later log line of this task."""
    structlog.contextvars.bind_contextvars(**values)


def clear_context() -> None:
    """Forget every bound context value."""
    structlog.contextvars.clear_contextvars()


@contextmanager
def bound_context(**values: Any) -> Iterator[None]:
    """Bind values for the duration of a ``with`` block, then restore the previous ones."""
    with structlog.contextvars.bound_contextvars(**values):
        yield
