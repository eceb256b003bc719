"""The vLLM plugin: hands a vLLM worker's experts to eplbd (docs/integration.md, "vLLM").

vLLM loads it in every process it starts (entry point ``eplbd`` in the group
``vllm.general_plugins``). Importing this package imports nothing of vLLM and changes
nothing. :func:`register` checks the opt-in (``EPLBD_AGENT``), the settings and the vLLM
version; if any is missing or wrong it logs one line and returns, leaving vLLM untouched.
Otherwise it installs the patches of ``_patches`` (``EplbState.add_model``,
``EplbState.step``), which hand each worker's MoE layers to one
:class:`~eplbd_client.EplbClient` after the model is loaded, unless that worker's EPLB
configuration is one eplbd does not support (async EPLB, elastic EP, pipeline parallelism,
an MoE draft model): then vLLM's own EPLB runs, and the log says why.
"""

from __future__ import annotations

import logging

from eplbd_client.vllm._patches import active_client, refusal
from eplbd_client.vllm._settings import (
    SUPPORTED_VLLM,
    VllmPluginSettings,
    load_settings,
    supported_version,
)

__all__ = [
    "SUPPORTED_VLLM",
    "VllmPluginSettings",
    "active_client",
    "load_settings",
    "refusal",
    "register",
    "supported_version",
]

log = logging.getLogger("vllm.eplbd")


def register() -> None:
    """vLLM's plugin hook: install the patches if the user asked for eplbd and this vLLM is
    supported; otherwise log one line and return."""
    import os

    from eplbd.ops.settings import ConfigError

    if not os.environ.get("EPLBD_AGENT"):
        log.info("eplbd: vLLM plugin idle (EPLBD_AGENT is not set); vLLM's own EPLB runs")
        return
    try:
        settings = load_settings()
    except ConfigError as e:
        log.warning("eplbd: vLLM plugin not enabled, vLLM's own EPLB runs: %s", e)
        return
    import vllm

    version = str(getattr(vllm, "__version__", "unknown"))
    if not supported_version(version):
        want = ".".join(map(str, SUPPORTED_VLLM))
        log.warning(
            "eplbd: vLLM plugin not enabled, vLLM's own EPLB runs: vLLM %s is not supported "
            "(this eplbd supports %s.x)",
            version,
            want,
        )
        return
    from eplbd_client.vllm._patches import install

    install(settings)
    log.info(
        "eplbd: vLLM plugin enabled (agent %s): MoE workers with EPLB hand their experts to "
        "eplbd after loading",
        settings.agent,
    )
