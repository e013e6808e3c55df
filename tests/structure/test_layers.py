"""The shape of the code: one-way imports, one module that spells the trial report's keys, short functions.

Read from the source with ``ast``, so a circle hidden in a function-level import counts as much as
one at the top of a module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("spaces", "trainables", "search")
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in known}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        # A module's own package (its __init__) is no dependency: Python loads it first anyway.
        graph[name] = {dep for dep in _imports(path, known) if dep != name and dep != name.split(".")[0]}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_circle_between_modules():
    graph = _graph()
    assert len(graph) > 25
    assert _cycle(graph) == []


def test_packages_import_one_way():
    for module, deps in _graph().items():
        package = module.split(".")[0]
        if package == "spaces":
            assert not {d for d in deps if d.startswith(("trainables", "search"))}, module
        if package == "trainables":
            assert not {d for d in deps if d.startswith("search")}, module


def test_search_layers_import_only_lower_ones():
    order = ["storage", "layout", "confirm", "algorithms", "trial", "tracking", "monitor", "report", "plan", "sweep", "upstream", "results", "study", "jobs", "cli"]
    graph = _graph()
    for position, layer in enumerate(order):
        above = {f"search.{name}" for name in order[position:]} - {f"search.{layer}"}
        assert not graph[f"search.{layer}"] & above, layer
    assert set(order) == {m.split(".")[1] for m in graph if m.startswith("search.")}


def test_the_detector_uses_the_engine_not_the_classifiers_private_helpers():
    source = (ROOT / "trainables" / "detection.py").read_text()
    assert "trainables.classification" not in source
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not private, f"{path.name} imports private {private} from {node.module}"


# The result keys the trial report adds, and the keys the trainers and the sweep used to pass around.
_REPORT_KEYS = re.compile(r"""["'](report\.(?:done|total|unit|outcome|error)|trial_failed|trial_error|epochs|iterations)["']""")


def test_only_the_report_module_spells_the_reports_keys():
    spelled = {}
    for name, path in _modules().items():
        if name == "trainables.report" or name.startswith("spaces"):
            continue  # spaces names recipe keys (schedule.epochs), not result keys
        hits = _REPORT_KEYS.findall(path.read_text())
        if hits:
            spelled[name] = hits
    assert spelled == {}
    assert _REPORT_KEYS.findall((ROOT / "trainables" / "report.py").read_text())


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_longer_than_a_screen(package):
    long = []
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert long == []
