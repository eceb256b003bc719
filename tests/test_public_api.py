"""Every package's public surface: a sorted ``__all__`` whose names all resolve."""

from __future__ import annotations

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
