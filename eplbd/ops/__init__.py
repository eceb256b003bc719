"""eplbd.ops: the operational plumbing shared by the daemons and the CLI.

Settings (defaults < config file < environment < flags), structlog logging, the systemd
notify protocol and watchdog, Prometheus metrics, clocks and exit codes. Standard library
plus structlog and prometheus_client only, and imported lazily: ``from eplbd.ops.exits import
EXIT_CONFIG`` or ``from eplbd.ops import EXIT_CONFIG`` loads neither structlog (about 100 ms)
nor prometheus_client, so ``eplbd status`` starts fast. Nothing here imports torch, zmq or numpy.

Modules: :mod:`~eplbd.ops.settings`, :mod:`~eplbd.ops.logging`, :mod:`~eplbd.ops.sdnotify`,
:mod:`~eplbd.ops.metrics`, :mod:`~eplbd.ops.clock`, :mod:`~eplbd.ops.exits`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eplbd.ops import sdnotify
    from eplbd.ops.clock import SYSTEM_CLOCK, Clock, FakeClock, SystemClock
    from eplbd.ops.exits import (
        EXIT_CODES,
        EXIT_CONFIG,
        EXIT_ERROR,
        EXIT_OK,
        EXIT_TIMEOUT,
        EXIT_UNREACHABLE,
        EXIT_USAGE,
    )
    from eplbd.ops.logging import (
        bind_context,
        bound_context,
        clear_context,
        configure_logging,
        get_logger,
    )
    from eplbd.ops.metrics import (
        CardinalityError,
        Counter,
        Gauge,
        MetricsServer,
        Registry,
        Summary,
        serve_metrics,
    )
    from eplbd.ops.sdnotify import Watchdog
    from eplbd.ops.settings import (
        ConfigError,
        add_arguments,
        check_endpoint,
        check_path,
        describe,
        load,
        reference_markdown,
        setting,
        sources,
        validate,
    )

_WHERE: dict[str, str] = {
    "CardinalityError": "metrics",
    "Clock": "clock",
    "ConfigError": "settings",
    "Counter": "metrics",
    "EXIT_CODES": "exits",
    "EXIT_CONFIG": "exits",
    "EXIT_ERROR": "exits",
    "EXIT_OK": "exits",
    "EXIT_TIMEOUT": "exits",
    "EXIT_UNREACHABLE": "exits",
    "EXIT_USAGE": "exits",
    "FakeClock": "clock",
    "Gauge": "metrics",
    "MetricsServer": "metrics",
    "Registry": "metrics",
    "SYSTEM_CLOCK": "clock",
    "Summary": "metrics",
    "SystemClock": "clock",
    "Watchdog": "sdnotify",
    "add_arguments": "settings",
    "bind_context": "logging",
    "bound_context": "logging",
    "check_endpoint": "settings",
    "check_path": "settings",
    "clear_context": "logging",
    "configure_logging": "logging",
    "describe": "settings",
    "get_logger": "logging",
    "load": "settings",
    "reference_markdown": "settings",
    "sdnotify": "",
    "serve_metrics": "metrics",
    "setting": "settings",
    "sources": "settings",
    "validate": "settings",
}

__all__ = [
    "CardinalityError",
    "Clock",
    "ConfigError",
    "Counter",
    "EXIT_CODES",
    "EXIT_CONFIG",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "FakeClock",
    "Gauge",
    "MetricsServer",
    "Registry",
    "SYSTEM_CLOCK",
    "Summary",
    "SystemClock",
    "Watchdog",
    "add_arguments",
    "bind_context",
    "bound_context",
    "check_endpoint",
    "check_path",
    "clear_context",
    "configure_logging",
    "describe",
    "get_logger",
    "load",
    "reference_markdown",
    "sdnotify",
    "serve_metrics",
    "setting",
    "sources",
    "validate",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'eplbd.ops' has no attribute {name!r}")
    module = importlib.import_module(f"eplbd.ops.{where or name}")
    value = module if not where else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
