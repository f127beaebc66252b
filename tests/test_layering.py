"""The layers, enforced: each folder imports only the folders below it, Ray lives in cluster/ only,
and no folder has an import circle, whatever the import form (top level, function-local,
TYPE_CHECKING, importlib). The rules are those of docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> the folders it may import (besides itself); the order is the layering, bottom first
ALLOWED = {
    "chatvec": set(),
    "core": {"chatvec"},
    "merge": {"chatvec", "core"},
    "eval": {"chatvec", "core"},
    "cluster": {"chatvec", "core", "merge", "eval"},
    "runs": {"chatvec", "core", "merge", "eval", "cluster"},
    "demo": {"chatvec", "core", "merge", "eval"},
    "cli": {"chatvec", "core", "merge", "eval", "cluster", "runs", "demo"},
}
FOLDERS = list(ALLOWED)
NO_RAY = ["chatvec", "core", "merge", "eval", "demo"]


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "checkpoints" not in p.parts)


def module_name(path: Path) -> str:
    """The dotted name a source file imports as: `merge/plan.py` is `chatvec.merge.plan`."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[0] == "chatvec":
        return ".".join(parts)
    return ".".join(["chatvec", *parts])


def folder_of(module: str) -> str | None:
    """The source folder that holds a `chatvec.*` module, or None for anything else."""
    parts = module.split(".")
    if parts[0] != "chatvec":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "chatvec"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, wherever it stands: ``import x``, ``from x
    import y`` (relative ones resolved; ``y`` counted as ``x.y`` too, since it may be a module),
    and ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    inside = ROOT in path.parents
    me = module_name(path) if inside else ""
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_the_parser_sees_every_import_form(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "import ray\nimport ray.util as u\nfrom ray import remote\n"
        "if TYPE_CHECKING:\n    from chatvec.eval.contracts import RunSettings\n"
        "def f():\n    import importlib\n    importlib.import_module('ray.data')\n    __import__('ray')\n"
        "    from chatvec.core import layout\n",
        encoding="utf-8",
    )
    names = [name for _line, name in imports(sample)]
    assert names.count("ray") == 3 and "ray.util" in names and "ray.data" in names
    assert "chatvec.core.layout" in names and "chatvec.eval.contracts.RunSettings" in names


def test_module_names_follow_the_package_map():
    assert module_name(ROOT / "merge" / "plan.py") == "chatvec.merge.plan"
    assert module_name(ROOT / "eval" / "kinds" / "__init__.py") == "chatvec.eval.kinds"
    assert module_name(ROOT / "chatvec" / "__init__.py") == "chatvec"
    assert folder_of("chatvec.eval.kinds.chat") == "eval" and folder_of("numpy") is None


@pytest.mark.parametrize("folder", NO_RAY)
def test_no_ray_below_cluster(folder):
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {name}"
        for p in python_files(folder)
        for line, name in imports(p)
        if name == "ray" or name.startswith("ray.")
    ]
    assert not bad, "Ray belongs in cluster/ only:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", FOLDERS)
def test_folders_import_only_the_layers_below(folder):
    bad = []
    for path in python_files(folder):
        for line, name in imports(path):
            target = folder_of(name)
            if target is not None and target != folder and target not in ALLOWED[folder]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, f"{folder}/ may import only {sorted(ALLOWED[folder])}:\n" + "\n".join(bad)


def test_no_old_top_level_names():
    """Everything is imported as `chatvec.<folder>`; a bare `merge.x` would only work by accident."""
    bare = {"merge", "eval", "cluster", "demo", "core", "runs", "cli"}
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {name}"
        for p in python_files(*FOLDERS, "tests", "bench")
        for line, name in imports(p)
        if name.split(".")[0] in bare
    ]
    assert not bad, "\n".join(bad)


def _graph(folder: str) -> dict[str, set[str]]:
    paths = python_files(folder)
    modules = {module_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        me = module_name(path)
        graph[me] = set()
        for _line, name in imports(path):
            parts = name.split(".")
            prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
            target = next((m for m in prefixes if m in modules), None)
            # a package's __init__ is run by every import of its modules; that is no edge of ours
            if target is not None and target != me and not me.startswith(target + "."):
                graph[me].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_import_circles(folder):
    found = cycles(_graph(folder))
    assert found == [], "\n".join(" -> ".join(c) for c in found)


def test_benchmarks_and_kinds_import_one_way():
    """eval.benchmarks looks kinds up by name; no kind imports eval.benchmarks, even lazily."""
    bad = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in python_files("eval/kinds")
        for line, name in imports(p)
        if name.startswith("chatvec.eval.benchmarks")
    ]
    assert not bad, "\n".join(bad)
