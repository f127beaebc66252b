"""The layers, enforced: Ray only in cluster/; eval/ uses only merge/'s shared infrastructure; no
import circles inside eval/ or merge/. The rules are those of docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# merge/ modules eval/ may import: storage, errors, the store's layout, units, YAML loading, and a
# checkpoint's file identities (the merge cache's notion of "the same model", reused for cells)
SHARED_MERGE_MODULES = {
    "merge.errors",
    "merge.storage",
    "merge.layout",
    "merge.units",
    "merge.yamlconfig",
    "merge.checkpoint",
}


def python_files(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, *, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in the file: ``import x``, ``from x import y`` (relative
    ones resolved), and ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    inside = ROOT in path.parents
    package = (
        ""
        if not inside
        else (module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0])
    )
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
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
            # `from merge import layout` imports the module merge.layout
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
        "import ray\nimport ray.util as u\nfrom ray import remote\n"
        "def f():\n    import importlib\n    importlib.import_module('ray.data')\n    __import__('ray')\n"
        "from merge import layout\n",
        encoding="utf-8",
    )
    names = [name for _line, name in imports(sample)]
    assert names.count("ray") == 3 and "ray.util" in names and "ray.data" in names
    assert "merge.layout" in names


@pytest.mark.parametrize("package", ["merge", "eval"])
def test_no_ray_below_cluster(package):
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {name}"
        for p in python_files(package)
        for line, name in imports(p)
        if name == "ray" or name.startswith("ray.")
    ]
    assert not bad, "Ray belongs in cluster/ only:\n" + "\n".join(bad)


def test_eval_imports_only_the_shared_merge_modules():
    bad = []
    for path in python_files("eval"):
        for line, name in imports(path):
            if name == "merge" or not name.startswith("merge."):
                continue
            module = ".".join(name.split(".")[:2])
            if module not in SHARED_MERGE_MODULES:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, (
        f"eval/ may import only merge's shared modules ({', '.join(sorted(SHARED_MERGE_MODULES))}):\n" + "\n".join(bad)
    )


def test_nothing_imports_the_eval_package_itself():
    # `import eval` would shadow the builtin in the importing module; import its modules instead
    bad = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in python_files("eval", "merge", "cluster", "demo")
        for line, name in imports(p)
        if name == "eval" and "import eval" in p.read_text().splitlines()[line - 1]
    ]
    assert not bad, "use `from eval.x import y`:\n" + "\n".join(bad)


def _cycles(package: str) -> list[list[str]]:
    """Circles among the package's modules through their top-level imports."""
    paths = python_files(package)
    modules = {module_name(p) for p in paths} - {package}
    graph: dict[str, set[str]] = {}
    for path in paths:
        me = module_name(path)
        graph[me] = set()
        for _line, name in imports(path, top_level_only=True):
            parts = name.split(".")
            prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
            target = next((m for m in prefixes if m in modules), None)
            if target is not None and target != me:
                graph[me].add(target)
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


@pytest.mark.parametrize("package", ["eval", "merge"])
def test_no_import_circles(package):
    assert _cycles(package) == []


def test_benchmarks_and_kinds_import_one_way():
    """eval.benchmarks looks kinds up by name; no kind imports eval.benchmarks, even lazily."""
    bad = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in python_files("eval/kinds")
        for line, name in imports(p)
        if name.startswith("eval.benchmarks")
    ]
    assert not bad, "\n".join(bad)
