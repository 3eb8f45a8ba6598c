"""Every module imports on its own; the import graph has no cycles (imports inside functions
count too); an optional dependency that is missing is named with its extra."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import flora_lightning

PACKAGE = Path(flora_lightning.__file__).parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a package's own ``__init__`` excluded)."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = name.split(".")
                    if path.name != "__init__.py":
                        parts = parts[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        # a child importing its parent package is the package's re-exports, not a cycle
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search, three colours)."""
    done, on_path = set(), []

    def visit(module: str) -> list[str] | None:
        if module in on_path:
            return [*on_path[on_path.index(module) :], module]
        if module in done:
            return None
        on_path.append(module)
        for dep in sorted(graph[module]):
            if cycle := visit(dep):
                return cycle
        on_path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def test_find_cycle_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert (
        "flora_lightning.federation.loop" in graph
        and "flora_lightning.federation.local_trainer" in graph
    )
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Each module imported in a fresh state of the package: every flora_lightning module is dropped
# from sys.modules first, so a module that only imports because another one ran before it (or
# that sits on an import cycle) fails here. Third-party libraries stay loaded (one process).
ISOLATED_IMPORTS = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for key in [k for k in sys.modules if k.split(".")[0] == "flora_lightning"]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-4)
print(json.dumps(failures))
"""


def test_every_module_imports_in_isolation():
    names = sorted(module_names())
    if importlib.util.find_spec("flwr") is None:  # the `flower` extra is not installed
        names = [n for n in names if not n.startswith("flora_lightning.flower")]
    assert "flora_lightning.bench.__main__" in names and "flora_lightning.clip.hub" in names
    done = subprocess.run(
        [sys.executable, "-c", ISOLATED_IMPORTS, json.dumps(names)],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert failures == {}, "\n".join(f"{name}:\n{tb}" for name, tb in failures.items())


def test_plots_without_matplotlib_name_the_extra(monkeypatch, tmp_path):
    from flora_lightning.sweep.plots import PlotsNotInstalledError, plot_accuracy

    summary = {"rounds": [{"round": 0, "test_acc": 0.5}, {"round": 1, "test_acc": 0.6}]}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(PlotsNotInstalledError, match=r'pip install "flora-lightning\[plots\]"'):
        plot_accuracy({"FLoRA": [summary]}, tmp_path / "accuracy.png", "test")
    assert not (tmp_path / "accuracy.png").exists()
    monkeypatch.undo()  # matplotlib back
    plot_accuracy({"FLoRA": [summary]}, tmp_path / "accuracy.png", "test")  # installed: works
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
