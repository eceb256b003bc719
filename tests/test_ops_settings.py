from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from eplbd.ops import settings as cfg


@dataclass(frozen=True)
class AgentLike:
    ENV_PREFIXES: ClassVar[tuple[str, ...]] = ("EPLBD_AGENT_", "EPLBD_")
    CONFIG_SECTION: ClassVar[str | None] = "agent"

    planner: str | None = cfg.setting(
        None, help="planner endpoint", check=cfg.check_endpoint("tcp", "ipc")
    )
    runtime_dir: Path = cfg.setting(
        Path("/run/eplbd"), help="ipc directory", check=cfg.check_path(absolute=True)
    )
    window_steps: int = cfg.setting(256, help="steps per window", min=1, max=1_000_000)
    duty: float = cfg.setting(0.5, help="fraction of steps recorded", min=0.0, max=1.0)
    log_level: str = cfg.setting(
        "info", help="log level", choices=("debug", "info", "warning", "error")
    )
    embedded_planner: bool = cfg.setting(False, help="run the planner in this process")
    groups: tuple[str, ...] = cfg.setting((), help="groups to serve")
    curve_secret: str | None = cfg.setting(None, help="CURVE secret", secret=True)
    metrics_port: int = cfg.setting(9750, help="metrics port", min=0, max=65535, env="X_PORT")
    planner_timeout_s: float = cfg.setting(5.0, help="planner silence limit", min=0.1)


@dataclass(frozen=True)
class PlannerLike:
    ENV_PREFIXES: ClassVar[tuple[str, ...]] = ("EPLBD_PLANNER_", "EPLBD_")
    CONFIG_SECTION: ClassVar[str | None] = "planner"

    listen: str = cfg.setting("tcp://127.0.0.1:7050", help="bind", check=cfg.check_endpoint())
    log_level: str = cfg.setting("info", help="log level")
    agent_limit: int = cfg.setting(8, help="agents", min=1)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, AgentLike)
    return parser.parse_args(argv)


def test_defaults_when_nothing_given() -> None:
    s = cfg.load(AgentLike, parse([]), {})
    assert s == AgentLike()
    assert set(cfg.sources(s).values()) == {"default"}


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    conf = tmp_path / "eplbd.toml"
    conf.write_text(
        'log_level = "debug"\nwindow-steps = 10\nduty = 1\n'
        '[agent]\nwindow_steps = 20\ngroups = ["a", "b"]\n'
        "[planner]\nwhatever = 1\n"
    )
    env = {"EPLBD_CONFIG": str(conf), "EPLBD_WINDOW_STEPS": "30", "EPLBD_DUTY": "0.25"}
    s = cfg.load(AgentLike, parse([]), env)
    assert (s.log_level, s.window_steps, s.duty, s.groups) == ("debug", 30, 0.25, ("a", "b"))
    src = cfg.sources(s)
    assert src["log_level"] == f"file {conf}"
    assert src["window_steps"] == "env EPLBD_WINDOW_STEPS"
    # the daemon's own prefix beats the shared one, a flag beats both
    env["EPLBD_AGENT_WINDOW_STEPS"] = "40"
    assert cfg.load(AgentLike, parse([]), env).window_steps == 40
    s = cfg.load(AgentLike, parse(["--window-steps", "50", "--config", str(conf)]), env)
    assert s.window_steps == 50
    assert cfg.sources(s)["window_steps"] == "flag --window-steps"
    assert s.duty == 0.25  # file said 1, env said 0.25


def test_types_from_text() -> None:
    env = {
        "EPLBD_AGENT_EMBEDDED_PLANNER": "yes",
        "EPLBD_GROUPS": " g0, g1 ,,",
        "EPLBD_RUNTIME_DIR": "/tmp/x",
        "X_PORT": "0x10",
        "EPLBD_PLANNER": "",  # optional: empty means None
    }
    s = cfg.load(AgentLike, None, env)
    assert s.embedded_planner is True
    assert s.groups == ("g0", "g1")
    assert s.runtime_dir == Path("/tmp/x")
    assert s.metrics_port == 16
    assert s.planner is None
    assert cfg.load(AgentLike, parse(["--no-embedded-planner"]), env).embedded_planner is False


@pytest.mark.parametrize(
    ("env", "field", "source", "words"),
    [
        ({"EPLBD_WINDOW_STEPS": "0"}, "window_steps", "env EPLBD_WINDOW_STEPS", "minimum"),
        ({"EPLBD_WINDOW_STEPS": "ten"}, "window_steps", "env EPLBD_WINDOW_STEPS", "integer"),
        ({"EPLBD_DUTY": "nan"}, "duty", "env EPLBD_DUTY", "finite"),
        ({"EPLBD_DUTY": "1.5"}, "duty", "env EPLBD_DUTY", "maximum"),
        ({"EPLBD_LOG_LEVEL": "loud"}, "log_level", "env EPLBD_LOG_LEVEL", "one of"),
        ({"EPLBD_PLANNER": "tcp://host"}, "planner", "env EPLBD_PLANNER", "HOST:PORT"),
        ({"EPLBD_PLANNER": "tcp://h:70000"}, "planner", "env EPLBD_PLANNER", "port"),
        ({"EPLBD_PLANNER": "udp://h:1"}, "planner", "env EPLBD_PLANNER", "scheme"),
        ({"EPLBD_PLANNER": "ipc://" + "x" * 108}, "planner", "env EPLBD_PLANNER", "107"),
        ({"EPLBD_RUNTIME_DIR": "run/eplbd"}, "runtime_dir", "env EPLBD_RUNTIME_DIR", "absolute"),
        ({"EPLBD_EMBEDDED_PLANNER": "maybe"}, "embedded_planner", "env", "boolean"),
        ({"EPLBD_AGENT_WINDOW": "3"}, "window", "env EPLBD_AGENT_WINDOW", "unknown"),
    ],
)
def test_bad_environment_names_field_and_source(
    env: dict[str, str], field: str, source: str, words: str
) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(AgentLike, None, env)
    assert info.value.field == field
    assert info.value.source is not None and info.value.source.startswith(source)
    assert words in str(info.value)
    assert field in str(info.value)


def test_bad_flag_and_file(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(AgentLike, parse(["--metrics-port", "-1"]), {})
    assert (info.value.field, info.value.source) == ("metrics_port", "flag --metrics-port")

    conf = tmp_path / "c.toml"
    conf.write_text("[agent]\nwindow_stepz = 3\n")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(AgentLike, parse(["--config", str(conf)]), {})
    assert info.value.field == "agent.window_stepz"
    assert info.value.source == f"file {conf}"

    conf.write_text('window_steps = "many"\n')
    with pytest.raises(cfg.ConfigError, match="window_steps.*integer"):
        cfg.load(AgentLike, parse(["--config", str(conf)]), {})

    conf.write_text("window_steps = \n")
    with pytest.raises(cfg.ConfigError, match="not valid TOML") as info:
        cfg.load(AgentLike, parse(["--config", str(conf)]), {})
    assert info.value.field == "config"

    conf.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")  # a RecursionError inside
    with pytest.raises(cfg.ConfigError, match="nested too deeply") as info:
        cfg.load(AgentLike, parse(["--config", str(conf)]), {})
    assert info.value.field == "config"

    with pytest.raises(cfg.ConfigError, match="not found") as info:
        cfg.load(AgentLike, None, {"EPLBD_AGENT_CONFIG": str(tmp_path / "nope.toml")})
    assert info.value.source == "env EPLBD_AGENT_CONFIG"


def test_unknown_table_is_an_error(tmp_path: Path) -> None:
    """A misspelled table ([planer]) must not be skipped as another daemon's."""
    conf = tmp_path / "c.toml"
    for table, daemon in (("planer", AgentLike), ("agnet", AgentLike), ("agnet", PlannerLike)):
        conf.write_text(f"[{table}]\ncooldown_s = 5\n")
        with pytest.raises(cfg.ConfigError, match="unknown table") as info:
            cfg.load(daemon, {"config": str(conf)}, {})
        assert info.value.field == table and info.value.source == f"file {conf}"
        assert "[agent], [cli], [planner], [vllm]" in str(info.value)
    # the other daemons' tables are fine
    conf.write_text("[planner]\nwhatever = 1\n[cli]\ntimeout = 3\n[agent]\nduty = 1\n")
    assert cfg.load(AgentLike, {"config": str(conf)}, {}).duty == 1


def test_shared_environment_file_serves_both_daemons() -> None:
    """One /etc/default/eplbd for both units: shared names reach both, each daemon's own
    names reach only it, and no shared name is read that looks like the other daemon's."""
    env = {
        "EPLBD_LOG_LEVEL": "debug",
        "EPLBD_AGENT_PLANNER": "tcp://planner-host:7050",
        "EPLBD_AGENT_PLANNER_TIMEOUT_S": "9",
        "EPLBD_PLANNER_LISTEN": "tcp://0.0.0.0:7050",
        "EPLBD_PLANNER_AGENT_LIMIT": "4",
    }
    agent = cfg.load(AgentLike, None, env)
    planner = cfg.load(PlannerLike, None, env)
    assert (agent.log_level, planner.log_level) == ("debug", "debug")
    assert (agent.planner, agent.planner_timeout_s) == ("tcp://planner-host:7050", 9.0)
    assert (planner.listen, planner.agent_limit) == ("tcp://0.0.0.0:7050", 4)
    names = {s.name: cfg.env_names(AgentLike, s) for s in cfg.specs(AgentLike)}
    assert names["planner_timeout_s"] == ["EPLBD_AGENT_PLANNER_TIMEOUT_S"]
    assert names["planner"] == ["EPLBD_AGENT_PLANNER", "EPLBD_PLANNER"]
    assert cfg.env_names(PlannerLike, cfg.specs(PlannerLike)[2]) == ["EPLBD_PLANNER_AGENT_LIMIT"]
    # EPLBD_PLANNER_TIMEOUT_S would be a typo of the planner's, not a setting of the agent's
    with pytest.raises(cfg.ConfigError, match="unknown") as info:
        cfg.load(PlannerLike, None, {"EPLBD_PLANNER_TIMEOUT_S": "9"})
    assert info.value.field == "timeout_s"
    assert cfg.load(AgentLike, None, {"EPLBD_PLANNER_TIMEOUT_S": "9"}).planner_timeout_s == 5.0


def test_flag_given_as_typed_mapping() -> None:
    s = cfg.load(AgentLike, {"window_steps": 7, "groups": ["x"]}, {})
    assert (s.window_steps, s.groups) == (7, ("x",))
    with pytest.raises(cfg.ConfigError, match="integer"):
        cfg.load(AgentLike, {"window_steps": 7.5}, {})


def test_secret_is_hidden() -> None:
    s = cfg.load(AgentLike, None, {"EPLBD_CURVE_SECRET": "hunter2"})
    assert s.curve_secret == "hunter2"
    assert cfg.describe(s)["curve_secret"] == "***"
    assert "hunter2" not in repr(cfg.describe(s))


def test_describe_is_json_friendly() -> None:
    import json

    s = cfg.load(AgentLike, parse(["--groups", "a,b"]), {})
    d = cfg.describe(s)
    assert json.loads(json.dumps(d)) == d
    assert d["runtime_dir"] == "/run/eplbd" and d["groups"] == ["a", "b"]
    assert list(d) == [f.name for f in dataclasses.fields(AgentLike)]


def test_validate_direct_instance() -> None:
    cfg.validate(AgentLike())
    with pytest.raises(cfg.ConfigError, match="duty"):
        cfg.validate(AgentLike(duty=2.0))


def test_help_lists_flags_env_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="x")
    cfg.add_arguments(parser, AgentLike)
    parser.print_help()
    text = capsys.readouterr().out
    for words in ("--config FILE", "--window-steps", "EPLBD_AGENT_WINDOW_STEPS", "256", "X_PORT"):
        assert words in text
    assert "--no-embedded-planner" in text


def test_reference_markdown_has_every_field() -> None:
    text = cfg.reference_markdown(AgentLike)
    for f in dataclasses.fields(AgentLike):
        assert f"`{f.name}`" in text
    assert "`EPLBD_AGENT_WINDOW_STEPS` or `EPLBD_WINDOW_STEPS`" in text
    assert "`X_PORT`" in text


def test_declaration_errors() -> None:
    with pytest.raises(TypeError):
        cfg.setting(help="no default")

    @dataclass(frozen=True)
    class Plain:
        x: int = 1

    with pytest.raises(TypeError, match="setting"):
        cfg.specs(Plain)


def test_exit_code() -> None:
    assert cfg.EXIT_CONFIG == 78
