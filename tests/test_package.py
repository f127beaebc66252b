"""chatvec installs one top-level name, `chatvec`, and works from a folder of the user's that has
its own `eval/`, `merge/`, `cluster/` and `demo/` packages (common in ML repositories)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the tracked files (a build leaves its own folders behind)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    assert files.returncode == 0, files.stderr
    for rel in files.stdout.splitlines():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (path,) = out.glob("chatvec-*.whl")
    return path


def test_the_wheel_holds_no_top_level_package_but_chatvec(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"chatvec"}, sorted(top)
    # every source folder is inside, with its data
    for module in (
        "chatvec/merge/plan.py",
        "chatvec/eval/pipeline.py",
        "chatvec/eval/contracts.py",
        "chatvec/cluster/weight_swap.py",
        "chatvec/core/storage.py",
        "chatvec/runs/sweep_run.py",
        "chatvec/cli/main.py",
        "chatvec/demo/toyworld/build.py",
    ):
        assert module in names, module
    assert any(n.startswith("chatvec/eval/data/chat/") and n.endswith(".jsonl") for n in names)
    assert any(n.startswith("chatvec/demo/toyworld/checkpoints/cp/") for n in names)
    assert any(n.startswith("chatvec/cluster/k8s/") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "chatvec = chatvec.cli.main:entry" in zipfile.ZipFile(wheel).read(entry).decode()


def user_project(folder: Path) -> Path:
    """A project whose own packages shadow every generic name chatvec ever used."""
    for name in ("eval", "merge", "cluster", "demo", "core", "runs", "cli"):
        pkg = folder / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f"raise ImportError('the user project\\'s own {name} package')\n")
    return folder


def test_the_cli_works_from_a_folder_with_packages_of_the_same_names(tmp_path):
    project = user_project(tmp_path / "project")
    run = subprocess.run([str(BIN / "chatvec"), "benchmarks"], cwd=project, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "chat" in run.stdout
