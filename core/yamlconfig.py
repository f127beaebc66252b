"""Load YAML into pydantic models with errors that name the key and the line."""

from __future__ import annotations

from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from chatvec.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _line_of(node: Any, loc: tuple) -> int | None:
    """Follow a pydantic error location through the composed YAML tree to a 1-based line."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    line = k.start_mark.line + 1
                    node = v
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def parse_model(text: str, model: type[M], source: str) -> M:
    """Parse YAML text into `model`; every problem is listed in one ConfigError."""
    try:
        data = yaml.safe_load(text)
        tree = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # A value that fits no member of a union gives one error per member, each with a type
        # tag appended to its location: report them as one problem at the key itself.
        grouped: dict[tuple, list[dict]] = {}
        for err in exc.errors():
            grouped.setdefault(_data_path(data, tuple(err["loc"])), []).append(err)
        problems = []
        for loc, errs in grouped.items():
            key = ".".join(str(p) for p in loc) or "(top level)"
            line = _line_of(tree, loc)
            where = f"line {line}: " if line else ""
            if errs[0]["type"] == "extra_forbidden":
                msg = "unknown key (check its spelling against the documented keys)"
            else:
                msg = " or ".join(dict.fromkeys(e["msg"] for e in errs))
                if "input" in errs[0] and errs[0]["type"] != "missing":
                    msg = f"{msg} (got {errs[0]['input']!r})"
            problems.append(f"{where}{key}: {msg}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems)) from None


def _data_path(data: Any, loc: tuple) -> tuple:
    """The part of a pydantic location that names keys present in the data (or missing ones)."""
    path = []
    node = data
    for i, key in enumerate(loc):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        elif isinstance(node, dict) and i == len(loc) - 1:
            path.append(key)  # a missing or unknown key: still name it
            break
        else:
            break
        path.append(key)
    return tuple(path)


def load_model(path: str, model: type[M]) -> M:
    """Read a YAML file (local path or any storage URI) into `model`."""
    import os
    import posixpath

    from chatvec.core.storage import Store, is_local, local_path

    if is_local(path):
        p = local_path(path)
        if not os.path.isfile(p):
            raise ConfigError(f"{path} does not exist: pass the path of a YAML file")
        with open(p, encoding="utf-8") as fh:
            text = fh.read()
    else:
        parent, name = posixpath.split(path.rstrip("/"))
        text = Store(parent).read_text(name)
    return parse_model(text, model, path)
