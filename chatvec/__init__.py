"""chatvec: chat vector merging (arXiv 2310.04799) and multilingual evaluation on Ray.

Everything lives under this namespace. The source tree keeps one folder per layer at the top
(`core/`, `merge/`, `eval/`, `cluster/`, `runs/`, `cli/`, `demo/`); `pyproject.toml` maps each
into `chatvec.<folder>`, so an installed chatvec adds no top-level name but `chatvec`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("chatvec")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0"
