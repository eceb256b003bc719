"""Every package's public surface: a sorted ``__all__`` whose names all resolve."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

PACKAGES = [
    "eplbd",
    "eplbd.agent",
    "eplbd.controller",
    "eplbd.kernels",
    "eplbd.ops",
    "eplbd.planner",
    "eplbd.testing",
    "eplbd.wire",
    "eplbd_client",
    "eplbd_client.vllm",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    mod = importlib.import_module(name)
    names = list(mod.__all__)
    assert names == sorted(names), f"{name}.__all__ is not sorted"
    assert len(set(names)) == len(names), f"{name}.__all__ repeats a name"
    for n in names:
        assert getattr(mod, n, None) is not None, f"{name}.{n} is listed but missing"


def test_fixed_interfaces_are_public() -> None:
    from eplbd_client import EplbClient

    from eplbd.kernels import map_and_record
    from eplbd.planner import plan, rebalance_experts

    assert callable(map_and_record) and callable(plan) and callable(rebalance_experts)
    for method in (
        "register_expert_weights",
        "map_and_record",
        "step",
        "layer_state",
        "prepare",
        "close",
    ):
        assert callable(getattr(EplbClient, method))
    assert isinstance(EplbClient.epoch, property)


def _imports_of(path: Path, package: str) -> set[str]:
    """The sibling modules ``path`` imports (TYPE_CHECKING imports included: a cycle there
    still ties two modules together)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith(package + ".")
        ):
            out.add(node.module[len(package) + 1 :].split(".")[0])
    return out


@pytest.mark.parametrize("name", [p for p in PACKAGES if p != "eplbd"])
def test_no_import_cycles_between_sibling_modules(name: str) -> None:
    pkg_dir = Path(importlib.import_module(name).__file__ or "").parent
    graph = {
        p.stem: _imports_of(p, name) - {p.stem}
        for p in pkg_dir.glob("*.py")
        if p.stem != "__init__"
    }
    done: set[str] = set()

    def visit(mod: str, stack: list[str]) -> None:
        if mod in stack:
            cycle = stack[stack.index(mod) :] + [mod]
            raise AssertionError(f"import cycle in {name}: {' -> '.join(cycle)}")
        if mod in done or mod not in graph:
            return
        for dep in sorted(graph[mod]):
            visit(dep, [*stack, mod])
        done.add(mod)

    for mod in sorted(graph):
        visit(mod, [])


@pytest.mark.parametrize("doc", ["docs/operations.md", "docs/daemons.md"])
def test_settings_tables_in_the_docs_match_the_declarations(doc: str) -> None:
    """The reference tables are generated (eplbd.ops.settings.reference_markdown): a setting
    added, removed or changed without its table fails here."""
    from eplbd.agent import AgentSettings
    from eplbd.controller import PlannerSettings
    from eplbd.ops.settings import reference_markdown

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    for cls in (AgentSettings, PlannerSettings):
        assert reference_markdown(cls) in text, f"{doc}: the {cls.__name__} table is stale"


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its subcommands' parsers."""
    out: set[str] = set()
    for action in parser._actions:
        out.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _options(sub)
    return out - {"--help"}


def test_cli_reference_names_every_subcommand_and_option() -> None:
    """docs/cli.md is the CLI's reference: a command or an option added without it fails
    here (the daemons' options are settings, in their generated tables)."""
    from eplbd.cli._client import CliSettings
    from eplbd.cli.main import SUBCOMMANDS, build_parser
    from eplbd.ops.settings import reference_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    table = reference_markdown(CliSettings).splitlines()[2:]
    assert all(row in doc for row in table), "the CLI settings table is stale"
    for var in ("EPLBD_CLI_CURVE_SECRET_KEY", "EPLBD_CLI_CURVE_SERVER_KEY", "EPLBD_CLI_CONFIG"):
        assert var in doc
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 69 |", "| 75 |", "| 78 |"):
        assert code in doc, code
    for name in SUBCOMMANDS:
        assert f"`eplbd {name}" in doc, name
        if name in ("planner", "agent"):
            continue
        _, module = build_parser([name])
        parser = argparse.ArgumentParser(prog=f"eplbd {name}")
        parser.set_defaults(command=name)
        module.add_arguments(parser)
        missing = sorted(o for o in _options(parser) if o not in doc)
        assert not missing, f"eplbd {name}: {missing} not in docs/cli.md"
