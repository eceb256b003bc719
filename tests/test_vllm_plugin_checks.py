"""The vLLM plugin's decisions without vLLM: settings, version and configuration checks, and
what ``register()`` and the patches do with a stand-in for vLLM's ``EplbState``. The plugin
on vLLM itself is in test_vllm_plugin.py."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from eplbd_client.vllm import _patches, load_settings, refusal, register, supported_version

from eplbd.ops.settings import ConfigError


def test_settings_come_from_the_environment_and_bad_ones_name_the_variable(
    tmp_path: Path,
) -> None:
    assert load_settings({}).agent is None
    daemons_file = tmp_path / "eplbd.toml"
    daemons_file.write_text("window_steps = 8\n")  # the daemons' shared file is not read
    s = load_settings(
        {
            "EPLBD_AGENT": "ipc:///run/eplbd/agent.sock",
            "EPLBD_GROUP": "qwen3-a",
            "EPLBD_SYNC_INTERVAL": "8",
            "EPLBD_VLLM_STAGING_BUDGET_BYTES": "1048576",
            "EPLBD_CONFIG": str(daemons_file),
        }
    )
    assert (s.agent, s.group, s.sync_interval, s.staging_budget_bytes) == (
        "ipc:///run/eplbd/agent.sock",
        "qwen3-a",
        8,
        1 << 20,
    )
    assert load_settings({"EPLBD_AGENT": "tcp://10.0.0.2:7060"}).group is None
    # EPLBD_VLLM_CONFIG: top-level keys or a [vllm] table (which wins), as documented; the
    # daemons, reading the same file, skip that table
    conf = tmp_path / "vllm.toml"
    conf.write_text('sync_interval = 2\n[vllm]\nsync_interval = 4\ngroup = "qwen-a"\n')
    s = load_settings({"EPLBD_AGENT": "ipc:///x", "EPLBD_VLLM_CONFIG": str(conf)})
    assert (s.sync_interval, s.group) == (4, "qwen-a")
    for env, field in [
        ({"EPLBD_AGENT": "http://host:1"}, "agent"),
        ({"EPLBD_AGENT": "ipc:///x", "EPLBD_SYNC_INTERVAL": "0"}, "sync_interval"),
        ({"EPLBD_AGENT": "ipc:///x", "EPLBD_GROUP": "g" * 257}, "group"),
        ({"EPLBD_AGENT": "ipc:///x", "EPLBD_VLLM_SYNC_INTERVL": "8"}, "sync_intervl"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_settings(env)
        assert e.value.field == field, (env, str(e.value))


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.32.0", True),
        ("0.32.4.dev12+g1a2b3c", True),
        ("0.31.2", False),
        ("0.33.0", False),
        ("1.32.0", False),
        ("unknown", False),
        ("", False),
    ],
)
def test_supported_vllm_versions(version: str, ok: bool) -> None:
    assert supported_version(version) is ok


def _config(**eplb: Any) -> SimpleNamespace:
    return SimpleNamespace(
        eplb_config=SimpleNamespace(use_async=eplb.get("use_async", False)),
        enable_elastic_ep=eplb.get("elastic", False),
        pipeline_parallel_size=eplb.get("pp", 1),
    )


def _moe_model(layers: int = 2) -> SimpleNamespace:
    return SimpleNamespace(
        num_moe_layers=layers,
        num_logical_experts=16,
        num_physical_experts=20,
        moe_layers=[SimpleNamespace(eplb_state=object()) for _ in range(layers)],
    )


def test_refusals_name_the_reason() -> None:
    ok = {"model_name": None, "registered": 1}
    assert refusal(_config(), _moe_model(), **ok) is None
    cases = [
        (_config(use_async=True), _moe_model(), ok, "use_async"),
        (_config(elastic=True), _moe_model(), ok, "elastic"),
        (_config(pp=2), _moe_model(), ok, "pipeline"),
        (_config(), _moe_model(), {"model_name": "d (draft)", "registered": 1}, "draft"),
        (_config(), _moe_model(), {"model_name": None, "registered": 2}, "draft"),
        (_config(), SimpleNamespace(num_moe_layers=2), ok, "MixtureOfExperts"),
        (_config(), _moe_model(0), ok, "no MoE layers"),
    ]
    for cfg, model, kw, word in cases:
        reason = refusal(cfg, model, **kw)
        assert reason is not None and word in reason, (word, reason)
    no_state = _moe_model()
    no_state.moe_layers[1].eplb_state = None
    assert "no EPLB state" in str(refusal(_config(), no_state, **ok))


class _EplbState:
    """A stand-in for vLLM's EplbState: records what vLLM's own methods were asked."""

    def __init__(self, use_async: bool = True) -> None:
        self.parallel_config = _config(use_async=use_async)
        self.model_states: dict[str, Any] = {}
        self.calls: list[str] = []

    def add_model(self, model: Any, model_config: Any, model_name: str | None = None) -> None:
        self.model_states[str(len(self.model_states))] = model
        self.calls.append("add_model")

    def step(
        self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False
    ) -> None:
        self.calls.append(f"step dummy={is_dummy}")


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """Just enough of a ``vllm`` package for register() and install()."""
    pkgs = {}
    for name in (
        "vllm",
        "vllm.distributed",
        "vllm.distributed.eplb",
        "vllm.distributed.eplb.eplb_state",
    ):
        mod = types.ModuleType(name)
        mod.__path__ = []  # type: ignore[attr-defined]
        pkgs[name] = mod
        monkeypatch.setitem(sys.modules, name, mod)
    pkgs["vllm"].__version__ = "0.32.0"  # type: ignore[attr-defined]
    state_cls = type("EplbState", (_EplbState,), {})
    pkgs["vllm.distributed.eplb.eplb_state"].EplbState = state_cls  # type: ignore[attr-defined]
    yield pkgs["vllm"]


def test_register_without_eplbd_agent_touches_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("EPLBD_AGENT", raising=False)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    with caplog.at_level(logging.INFO, logger="vllm.eplbd"):
        register()
    assert "vllm" not in sys.modules  # not even imported
    assert [r.getMessage() for r in caplog.records] == [
        "eplbd: vLLM plugin idle (EPLBD_AGENT is not set); vLLM's own EPLB runs"
    ]


@pytest.mark.parametrize(
    ("env", "version", "says"),
    [
        ({"EPLBD_AGENT": "ipc:///run/eplbd/agent.sock"}, "0.31.1", "vLLM 0.31.1 is not supported"),
        ({"EPLBD_AGENT": "udp://x"}, "0.32.0", "invalid setting agent"),
        ({"EPLBD_AGENT": "ipc:///a", "EPLBD_VLLM_BOGUS": "1"}, "0.32.0", "invalid setting bogus"),
    ],
)
def test_register_refuses_with_one_line_and_patches_nothing(
    fake_vllm: types.ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    env: dict[str, str],
    version: str,
    says: str,
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(fake_vllm, "__version__", version)
    state_cls = sys.modules["vllm.distributed.eplb.eplb_state"].EplbState  # type: ignore[attr-defined]
    before = (state_cls.add_model, state_cls.step)
    with caplog.at_level(logging.INFO, logger="vllm.eplbd"):
        register()
    assert (state_cls.add_model, state_cls.step) == before
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and says in lines[0], lines
    assert "vLLM's own EPLB runs" in lines[0]


def test_patches_leave_vllms_eplb_running_where_they_refuse(
    fake_vllm: types.ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EPLBD_AGENT", "ipc:///run/eplbd/agent.sock")
    register()
    register()  # vLLM may load plugins more than once in a process: installs once
    state_cls = sys.modules["vllm.distributed.eplb.eplb_state"].EplbState  # type: ignore[attr-defined]
    assert state_cls.step.__wrapped__ is _EplbState.step
    assert state_cls.add_model.__wrapped__ is _EplbState.add_model
    state = state_cls(use_async=True)  # vLLM's default: eplbd refuses
    with caplog.at_level(logging.INFO, logger="vllm.eplbd"):
        state.add_model(_moe_model(), SimpleNamespace(model="m"))
        state.step(is_dummy=True)
        state.step()
    assert state.calls == ["add_model", "step dummy=True", "step dummy=False"]
    assert getattr(state, _patches._HANDOVER, None) is None
    assert [r.getMessage() for r in caplog.records] == [
        "eplbd: vLLM's own EPLB runs, eplbd does not take over: async EPLB is on; pass "
        "--eplb-config '{\"use_async\": false}'"
    ]


def test_a_handed_over_state_steps_the_client_and_refuses_a_second_model(
    fake_vllm: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setenv("EPLBD_AGENT", "ipc:///run/eplbd/agent.sock")
    register()
    state_cls = sys.modules["vllm.distributed.eplb.eplb_state"].EplbState  # type: ignore[attr-defined]
    state = state_cls(use_async=False)
    stepped: list[int] = []
    client = SimpleNamespace(
        step=lambda: stepped.append(1), epoch=0, ep_rank=0, group_name="g", step_count=0
    )
    padding = [torch.tensor(5, dtype=torch.int32)]
    setattr(state, _patches._HANDOVER, _patches.Handover(client, padding))  # type: ignore[arg-type]
    state.step(is_dummy=True)
    assert stepped == [1] and int(padding[0]) == 5  # a dummy step keeps vLLM's count
    state.step()
    assert stepped == [1, 1] and int(padding[0]) == 0  # a dummy forward after it counts nothing
    state.step(is_dummy=True, is_profile=True)
    assert len(stepped) == 3 and state.calls == []  # vLLM's own step never runs
    with pytest.raises(RuntimeError, match="second model"):
        state.add_model(_moe_model(), SimpleNamespace(model="draft"))


def test_every_setting_is_documented() -> None:
    from eplbd_client.vllm import VllmPluginSettings

    from eplbd.ops import settings as cfg

    doc = (Path(__file__).resolve().parents[1] / "docs" / "integration.md").read_text()
    for spec in cfg.specs(VllmPluginSettings):
        for name in cfg.env_names(VllmPluginSettings, spec):
            assert f"`{name}`" in doc, name
